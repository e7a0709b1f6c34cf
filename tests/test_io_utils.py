"""Atomic outputs: an interrupted write leaves the old content or nothing, never a partial file."""

import os
import subprocess
import sys

import pytest

from llama_ner.io_utils import (
    UserError,
    atomic_dir,
    atomic_path,
    atomic_write_text,
    check_output_dir_path,
    check_output_file,
    read_json,
    read_json_object,
    read_lines,
    read_text,
    run_cli,
    run_measured,
    sha256_file,
)


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


def test_read_text_names_line_and_encoding_of_gbk_file(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_bytes("first line\n北京是中国的首都\n".encode("gb18030"))
    with pytest.raises(UserError, match=r"rows.txt:2: not UTF-8 text .*GBK/GB18030.*iconv"):
        read_text(path)
    path.write_bytes("\ufeff第一\r\n第二\n".encode())  # a BOM and Windows line ends
    assert read_lines(path) == ["第一", "第二", ""]


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="none.json not found: make it"):
        read_json(tmp_path / "none.json", "make it")
    (tmp_path / "bad.json").write_text('{"a": 1,\n')
    with pytest.raises(UserError, match=r"bad.json:2: not valid JSON"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1]")
    assert read_json(tmp_path / "list.json") == [1]
    with pytest.raises(UserError, match="expected a JSON object"):
        read_json_object(tmp_path / "list.json")


def test_check_output_file_refuses_dirs_files_and_inputs(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("x")
    assert check_output_file(tmp_path / "new" / "out.txt", "--out") == tmp_path / "new" / "out.txt"
    with pytest.raises(UserError, match="is a directory"):
        check_output_file(tmp_path, "--out")
    with pytest.raises(UserError, match="data.txt is a file"):
        check_output_file(data / "out.txt", "--out")
    with pytest.raises(UserError, match="is the input"):
        check_output_file(tmp_path / "." / "data.txt", "--out", [data])
    with pytest.raises(UserError, match="is a file"):
        check_output_dir_path(data, "--output_dir")


def test_stale_temporary_of_a_dead_run_is_reported_with_its_size(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".model.tmp-{dead.pid}"
    stale.mkdir()
    (stale / "shard").write_bytes(b"\0" * 3_000_000)
    alive = tmp_path / f".model.tmp-{os.getppid()}"  # a running process's folder is not reported
    alive.mkdir()
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "a").write_text("1")
    err = capsys.readouterr().err
    assert str(stale) in err and "3.0 MB" in err and "interrupted run" in err
    assert str(alive) not in err
    assert stale.exists()  # reported, not removed


def test_stale_temporary_is_reported_once_when_the_output_is_checked(tmp_path, capsys):
    stale = tmp_path / ".out.txt.tmp-99999999"  # above Linux's pid_max: no such process
    stale.write_bytes(b"\0" * 1500)
    check_output_file(tmp_path / "out.txt", "--out")
    assert f"{stale} was left by an interrupted run" in capsys.readouterr().err
    atomic_write_text(tmp_path / "out.txt", "x")  # the write itself does not repeat the warning
    assert str(stale) not in capsys.readouterr().err


def test_atomic_dir_refuses_to_replace_a_file(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("x")
    with pytest.raises(UserError, match="is a file"), atomic_dir(data):
        pass
    assert data.read_text() == "x"
