"""What every script shares, with no heavy imports: one-line user errors, reading text and
JSON, checking output paths, atomic writes, checksums, and measuring a command's time and
peak memory.

    run_cli(main)                                  # a UserError prints one line, exit code 2
    with atomic_dir("out/model") as tmp: ...       # out/model appears only once complete
    code, seconds, peak_bytes = run_measured([sys.executable, "merge_llama_with_chinese_lora.py", ...])
    code, seconds, (load_peak, train_peak), out = run_measured_phases(cmd, "trainable params:")

Every output is written under a temporary name beside its destination and renamed into
place once complete, so an interrupted run never leaves a file that looks finished; a
temporary name left by a killed run is reported (with its size) by the next run.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
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


DISK_FAULTS = {  # errno -> what to do; the writers' temporaries are gone by the time this is printed
    errno.ENOSPC: "free space there or choose another place",
    errno.EDQUOT: "free space (the disk quota is full) or choose another place",
    errno.EROFS: "the file system is read-only: choose a writable place",
    errno.EACCES: "no permission to write there: choose a writable place",
    errno.ELOOP: "a symlink loop: point the path at the real file or folder",
}


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main(); a UserError becomes one line on stderr and exit code 2, and so does a full,
    read-only or forbidden disk (every writer writes to a temporary that it removes when it fails)."""
    try:
        main()
    except UserError as err:
        print(err, file=sys.stderr)
        sys.exit(2)
    except (OSError, RuntimeError) as err:
        fault = disk_fault(err)
        if fault is None:
            raise
        print(f"error: {fault}", file=sys.stderr)
        sys.exit(2)


TORCH_WRITER_FAILURES = ("unexpected pos", "PytorchStreamWriter failed")  # torch's zip writer on a full disk


def disk_fault(err: BaseException, path: str | Path | None = None) -> str | None:
    """One line for a disk fault (no space, read-only, no permission) anywhere in err's chain, else None.
    It names `path` (the output being written) when given, else the file the error names.

    torch.save reports a full disk as a RuntimeError whose cause is the OSError, or, from its zip writer,
    as `[enforce fail at inline_container.cc] . unexpected pos` with no cause: that one counts when the
    disk under `path` is (still) full."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in DISK_FAULTS:
            where = path or err.filename
            return f"{f'{where}: ' if where else ''}{os.strerror(err.errno)}; {DISK_FAULTS[err.errno]}"
        if isinstance(err, RuntimeError) and str(err).startswith("Symlink loop"):  # pathlib's resolve()
            return f"{path or err}: {DISK_FAULTS[errno.ELOOP]}"
        if isinstance(err, RuntimeError) and path and any(s in str(err) for s in TORCH_WRITER_FAILURES):
            if disk_full(path):
                return f"{path}: {os.strerror(errno.ENOSPC)}; {DISK_FAULTS[errno.ENOSPC]}"
        err = err.__cause__ or err.__context__
    return None


def disk_full(path: str | Path) -> bool:
    """Less than 1 MiB free on the filesystem that holds `path` (or its nearest existing parent)."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize < 1 << 20


def read_text(path: str | Path, error: type[UserError] = UserError) -> str:
    """The text of a UTF-8 file (a BOM is dropped); any other encoding is a one-line `error`.

    GBK/GB18030 is common for Chinese data: the message says so when the bytes read as it.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        try:
            data.decode("gb18030")
            guess = "; it reads as GBK/GB18030"
        except UnicodeDecodeError:
            guess = ""
        raise error(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x}){guess}: save it as UTF-8, "
            f"e.g. iconv -f GB18030 -t UTF-8 {path} > {path.with_suffix('.utf8' + path.suffix)}"
        ) from None


def read_lines(path: str | Path, error: type[UserError] = UserError) -> list[str]:
    """The lines of a UTF-8 text file, without their line ends (`\\n` or `\\r\\n`); line i is lines[i - 1]."""
    return read_text(path, error).replace("\r\n", "\n").split("\n")


def read_json(path: str | Path, fix: str = "", error: type[UserError] = UserError) -> Any:
    """The JSON value in `path`; a missing file, bad bytes or bad JSON is a one-line `error` naming the file.

    `fix` says what to do when the file is missing (e.g. "train first").
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} not found" + (f": {fix}" if fix else ""))
    try:
        return json.loads(read_text(path, error))
    except json.JSONDecodeError as err:
        raise error(f"{path}:{err.lineno}: not valid JSON ({err.msg}); fix the file or replace it") from None


def read_json_object(path: str | Path, fix: str = "", error: type[UserError] = UserError) -> dict[str, Any]:
    """`read_json` for files that must hold one JSON object (configs)."""
    value = read_json(path, fix, error)
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, found a {type(value).__name__}; fix the file or replace it")
    return value


def check_output_file(path: str | Path, flag: str, inputs: list[str | Path] = ()) -> Path:
    """Refuse, before any work, an output file path that is a directory, lies under a file, or is an input.

    `inputs` are the files the run reads (--overwrite or not, an output never replaces one). Leftovers of
    killed runs beside it are reported here, before the work.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; pass a file path")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{flag} {path}: {parent} is a file, not a directory; choose another path")
    out = path.resolve()
    for item in inputs:
        if Path(item).resolve() == out:
            raise UserError(f"{flag} {path} is the input {item}: choose another path (outputs never replace inputs)")
    check_writable(path.parent, flag)
    report_stale_temporaries(path)
    return path


def check_output_dir_path(path: str | Path, flag: str) -> Path:
    """Refuse, before any work, an output directory path that is a file, lies under a file, or cannot be
    written (a read-only mount, no permission): the nearest existing folder must take new entries."""
    path = Path(path)
    for item in (path, *path.parents):
        if item.exists() and not item.is_dir():
            where = "is a file" if item == path else f"lies under {item}, which is a file"
            raise UserError(f"{flag} {path} {where}; pass a directory")
    check_writable(path, flag)
    return path


def check_writable(path: Path, flag: str) -> None:
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if is_read_only(existing) else "is not writable by this user"
        raise UserError(f"{flag} {path}: {existing} {why}; choose a writable place")


def is_read_only(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


_REPORTED: set[Path] = set()  # leftovers this process has already warned about


def report_stale_temporaries(path: str | Path) -> list[Path]:
    """Warn about `.NAME.tmp-PID` / `.NAME.old-PID` beside `path` whose process is gone (a killed run's).

    They are not removed: the message gives their size and the command that deletes them. Scripts call
    this when they check their output path, before the long work; each leftover is reported once.
    """
    path = Path(path)
    stale = [p for p in path.parent.glob(f".{glob.escape(path.name)}.*-*") if _dead_run_leftover(p, path.name)]
    for item in stale:
        if item.resolve() in _REPORTED:
            continue
        _REPORTED.add(item.resolve())
        size = _size(item)
        print(
            f"warning: {item} was left by an interrupted run (process {item.name.rsplit('-', 1)[1]} is gone) "
            f"and holds {human_size(size)}; delete it: rm -r '{item}'",
            file=sys.stderr,
        )
    return stale


def _dead_run_leftover(item: Path, name: str) -> bool:
    kind, _, pid = item.name[len(name) + 2 :].partition("-")
    if kind not in ("tmp", "old") or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def human_size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _size(item: Path) -> int:
    if item.is_file():
        return item.stat().st_size
    return sum(p.stat().st_size for p in item.rglob("*") if p.is_file())


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
    report_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        raise_disk_fault(err, path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` (whose old content goes; a file is refused)."""
    path = check_output_dir_path(path, "output directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    report_stale_temporaries(path)
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
    except (OSError, RuntimeError) as err:
        raise_disk_fault(err, path)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def raise_disk_fault(err: BaseException, path: Path) -> None:
    """A disk fault while writing `path` becomes one line naming `path` (not its temporary); the caller's
    finally removes the temporary. Anything else goes on as it was."""
    fault = disk_fault(err, path)
    if fault is not None:
        raise UserError(f"writing {fault}") from None


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


def run_measured_phases(cmd: list[str], marker: str, **popen_kwargs: Any) -> tuple[int, float, list[int], str]:
    """`run_measured` split in two at a line of the command's output: (exit code, wall seconds,
    [peak resident bytes until the first line containing `marker`, peak after it], its output).

    For one process (not a launcher's tree) whose first phase inflates the peak, e.g. a model read
    through mmap. The peak is the child's VmHWM (/proc/PID/status, Linux), sampled every 50 ms;
    at the marker it is recorded and reset to the current resident size (/proc/PID/clear_refs),
    so the second figure is the second phase's own peak (0 if the marker never came).
    """
    import threading

    def vm_hwm(pid: int) -> int:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024

    start = time.perf_counter()
    popen_kwargs |= {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    proc = subprocess.Popen(cmd, **popen_kwargs)
    peaks, phase, output, lock = [0, 0], 0, [], threading.Lock()

    def watch() -> None:
        while proc.poll() is None:
            with lock, contextlib.suppress(OSError, StopIteration):  # /proc/PID goes once the child is reaped
                peaks[phase] = max(peaks[phase], vm_hwm(proc.pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for line in proc.stdout:
        output.append(line)
        if phase == 0 and marker in line:
            with lock:
                with contextlib.suppress(OSError, StopIteration):
                    peaks[0] = max(peaks[0], vm_hwm(proc.pid))
                    Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
                phase = 1
    proc.wait()
    watcher.join()
    return proc.returncode, time.perf_counter() - start, peaks, "".join(output)


class ModelLoadError(UserError):
    """A model or tokenizer directory that cannot be used."""
