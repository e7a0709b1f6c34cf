"""What every script shares, with no heavy imports: one-line user errors, atomic writes,
checksums, and measuring a command's time and peak memory.

    run_cli(main)                                  # a UserError prints one line, exit code 2
    with atomic_dir("out/model") as tmp: ...       # out/model appears only once complete
    code, seconds, peak_bytes = run_measured([sys.executable, "merge_llama_with_chinese_lora.py", ...])

Every output is written under a temporary name beside its destination and renamed into
place once complete, so an interrupted run never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


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


def peak_rss_mb() -> float:
    """This process's own peak resident memory so far, in MB (Linux ru_maxrss is in KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_measured(cmd: list[str], **popen_kwargs: Any) -> tuple[int, float, int]:
    """Run a command; return (exit code, wall seconds, peak resident memory in bytes).

    The one memory measure of the demo and the benchmarks. Peak is the larger of the child's own
    peak (its rusage, exact) and the sum over its whole process tree, sampled every 50 ms, so
    launchers that fork workers (deepspeed, mpirun) count all their processes. The caller should
    not have imported torch: Linux carries a parent's resident size into a forked child's peak.
    """
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, **popen_kwargs)
    root = psutil.Process(proc.pid)
    tree_peak = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            tree = [root, *root.children(recursive=True)]
            tree_peak = max(tree_peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, max(tree_peak, usage.ru_maxrss * 1024)
