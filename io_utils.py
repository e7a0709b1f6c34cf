"""Small file helpers shared by the scripts: atomic writes and checksums.

Every output is written under a temporary name beside its destination and renamed into
place once complete, so an interrupted run never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path


class UserError(SystemExit):
    """A problem the user can fix (bad option, file, data): one line, exit code 2, no traceback.

    Raise it (or a subclass) anywhere; `run_cli` prints it. It is a SystemExit, so even an
    uncaught one exits non-zero instead of printing a traceback.
    """

    prefix = "error"

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return f"{self.prefix}: {self.message}"


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main(); a UserError becomes one line on stderr and exit code 2."""
    try:
        main()
    except UserError as err:
        print(err, file=sys.stderr)
        sys.exit(2)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path; on success rename it to `path`, on error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` (whose old content goes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def run_measured(cmd: list[str], **popen_kwargs) -> tuple[int, float, int]:
    """Run a command; return (exit code, seconds, peak RSS in bytes of its whole process tree).

    The tree is sampled every 50 ms, so launchers that fork workers (deepspeed, mpirun) are
    counted as the sum of their processes.
    """
    import time

    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, **popen_kwargs)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    return proc.returncode, time.perf_counter() - start, peak
