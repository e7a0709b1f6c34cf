"""Atomic outputs: an interrupted write leaves the old content or nothing, never a partial file."""

import subprocess
import sys

import pytest

from io_utils import UserError, atomic_dir, atomic_path, atomic_write_text, run_cli, run_measured, sha256_file


def test_atomic_path_failure_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with atomic_dir(target) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_sha256_matches_hashlib(tmp_path):
    import hashlib

    data = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=4096) == hashlib.sha256(data).hexdigest()


def test_run_cli_prints_one_line_and_exits_2(capsys):
    def main():
        raise UserError("x.txt:3: broken; fix it")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: x.txt:3: broken; fix it\n"


def test_run_measured_sees_child_memory():
    code, seconds, peak = run_measured(
        [sys.executable, "-c", "import time; b = bytearray(200 * 2**20); time.sleep(0.5)"],
        stdout=subprocess.DEVNULL,
    )
    assert code == 0 and seconds > 0.4
    assert peak > 200 * 2**20
