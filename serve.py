"""Serve a tuned model over HTTP: an OpenAI-style API, a batch NER endpoint and a web page.

    python serve.py --base_model ./model_hub/chinese-alpaca-7b \
        --lora_model ./checkpoint/msra/train_trainer/adapter_model
    curl -s localhost:19327/v1/ner -H 'Content-Type: application/json' -d '{"texts": ["我在北京工作。"]}'
    python serve.py --base_model ... --host 0.0.0.0 --api_key "$(openssl rand -hex 16)"

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions
(OpenAI shapes, `stream: true` for server-sent events), POST /v1/ner {"texts": [...]} ->
entities with character spans, GET / (a page; /?text=... runs at once). The model loads once
as chat_ner.py loads it; NER answers are generated as test.py generates them (greedy, the
training prompt, constrained answers unless a request says "constrained": false); concurrent
requests are batched (batching.py). The app is http_api.py.

Engines: --engine hf (default) generates in this process; --engine vllm starts vLLM's OpenAI server for
the base model and the LoRA on a private 127.0.0.1 port (from .venv-vllm: make vllm) and sends it every
input (continuous batching); --engine_url URL drives a vLLM already running anywhere (a GPU box, several
GPUs, several nodes). Same endpoints, same answers (greedy, fp32): docs/vllm.md.

    python serve.py --base_model ... --lora_model ... --engine vllm
    python serve.py --base_model ... --lora_model ... --engine_url http://gpu-box:8000 --engine_model ner
"""

from __future__ import annotations

import argparse
import re
import shlex
import socket
import subprocess
import sys
import threading
from pathlib import Path

from llama_ner.generation.inference import EVAL_DEFAULTS
from llama_ner.generation.loading import ModelSpec, add_model_args, load, spec_from_args
from llama_ner.io_utils import UserError, read_json_object, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 = every interface")
    p.add_argument("--port", type=int, default=19327, help="0 = any free port (printed at start)")
    p.add_argument("--api_key", default=None, help="when set, /v1/* requests need 'Authorization: Bearer KEY'")
    p.add_argument("--max_batch_size", type=int, default=16, help="inputs generated together")
    tokens = EVAL_DEFAULTS["max_new_tokens"]
    p.add_argument("--max_new_tokens", type=int, default=tokens, help="default and upper bound of max_tokens")
    p.add_argument(
        "--max_texts", type=int, default=64, help="most texts (/v1/ner) or prompts (/v1/completions) per request"
    )
    p.add_argument("--model_name", default="chinese-alpaca-ner", help="the model id /v1/models reports")
    p.add_argument(
        "--engine",
        default=None,
        choices=["hf", "vllm"],
        help="hf: generate in this process (default); vllm: on vLLM (started here unless --engine_url)",
    )
    p.add_argument("--engine_url", default="", help="a running vLLM OpenAI server to generate on (implies vllm)")
    p.add_argument(
        "--engine_model",
        default="",
        help="the id to ask --engine_url for (default: ner with a --lora_model, else --base_model)",
    )
    p.add_argument("--engine_api_key", default=None, help="the --api-key the vLLM at --engine_url was started with")
    p.add_argument("--engine_port", type=int, default=0, help="port of the vLLM started here (0: a free one)")
    p.add_argument(
        "--vllm_python",
        default="",
        help="python of vLLM's environment (default: $VLLM_PYTHON, else ./.venv-vllm/bin/python)",
    )
    p.add_argument("--vllm_args", default="", help='more flags for the vLLM started here, e.g. '
                   '"--tensor-parallel-size 2 --gpu-memory-utilization 0.8"')  # fmt: skip
    p.add_argument("--vllm_constraint", default="grammar", choices=["grammar", "check"],
                   help="constrained answers on vLLM: grammar (structured outputs, then checked) or check (plain "
                   "greedy, checked and corrected token by token); the same answers, different speed")  # fmt: skip
    args = p.parse_args(argv)
    args.engine = args.engine or ("vllm" if args.engine_url else "hf")
    if args.engine == "hf" and args.engine_url:
        raise UserError("--engine hf with --engine_url: the URL is a vLLM server; pass --engine vllm (or drop it)")
    if args.engine == "hf" and (args.vllm_args or args.engine_port):
        raise UserError("--vllm_args / --engine_port are for --engine vllm; add --engine vllm or drop them")
    if args.engine_url and not re.match(r"https?://", args.engine_url):
        raise UserError(f"--engine_url {args.engine_url}: give a URL such as http://127.0.0.1:8000")
    for name in ("max_batch_size", "max_new_tokens", "max_texts"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} {getattr(args, name)}: must be at least 1")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: must be 0-65535")
    if args.api_key is not None and not re.fullmatch(r"[!-~]+", args.api_key):
        # HTTP headers are latin-1 bytes: a key of other characters could never match one
        raise UserError('--api_key: use printable ASCII without spaces (e.g. --api_key "$(openssl rand -hex 16)")')
    return args


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, before the model loads: a taken port is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port} ({err.strerror}); pick another --port or stop the other server"
        ) from None
    sock.listen(128)
    return sock


def check_token_budget(args: argparse.Namespace) -> None:
    """--max_new_tokens must leave the model room for a prompt (generate.prompt_budget), checked before it loads."""
    from llama_ner.generation.generate import prompt_budget

    config_file = Path(args.base_model) / "config.json"
    if config_file.is_file():  # else loading says what is wrong with the folder
        prompt_budget(read_json_object(config_file).get("max_position_embeddings"), args.max_new_tokens)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import uvicorn  # FastAPI, torch and transformers: after the command line is read

    from llama_ner.serving.http_api import create_app

    spec = spec_from_args(args)  # a bad --entity_types stops here
    args.types = spec.entity_types  # of constrained /v1/ner answers
    args.window_chars = spec.window_chars  # /v1/ner answers longer texts in windows of this length
    check_token_budget(args)
    sock = bind(args.host, args.port)
    engine, tokenizer = hf_engine(spec, args) if args.engine == "hf" else vllm_engine(spec, args)
    args.fmt = spec.prompt_format(tokenizer)  # the prompt the LoRA was trained with
    app = create_app(engine, tokenizer, args)
    host, port = sock.getsockname()[:2]
    print(f"serving {args.model_name} on http://{host}:{port} (page: /, API: /v1/...)", flush=True)
    if args.api_key is None and host not in ("127.0.0.1", "::1", "localhost"):
        print("warning: listening beyond this machine without --api_key: anyone who can reach it can use it")
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    finally:
        engine.close()  # the app's shutdown did, unless uvicorn failed before it


def hf_engine(spec: ModelSpec, args: argparse.Namespace) -> tuple[object, object]:
    """(Batcher over the model loaded here, tokenizer)."""
    from llama_ner.serving.batching import Batcher

    model, tokenizer = load(spec)
    return Batcher(model, tokenizer, args.max_batch_size), tokenizer


def vllm_engine(spec: ModelSpec, args: argparse.Namespace) -> tuple[object, object]:
    """(VllmEngine on the vLLM at --engine_url, or on one started here for the spec, tokenizer)."""
    from llama_ner.generation.loading import check_files
    from llama_ner.generation.vllm_client import connect
    from llama_ner.generation.vllm_process import VllmLaunch, vllm_dtype
    from llama_ner.serving.vllm_engine import VllmEngine
    from llama_ner.tokenizer import load_tokenizer

    if spec.bits:
        raise UserError("--engine vllm serves the base unquantized here: drop --load_in_kbits, or use --engine hf")
    if not args.engine_url:
        check_files(spec)
    tokenizer = load_tokenizer(spec.tokenizer)
    dtype = vllm_dtype(spec.dtype, spec.device == "cpu")
    launch = VllmLaunch(spec.base, spec.adapter, spec.tokenizer, dtype, args.engine_port,
                        args.vllm_python, shlex.split(args.vllm_args))  # fmt: skip
    key = args.engine_api_key
    grammar = args.vllm_constraint == "grammar"
    client, server, positions = connect(tokenizer, spec.base, spec.adapter, args.engine_url,
                                        args.engine_model, key, launch, grammar)  # fmt: skip
    print(f"engine: vLLM at {client.url}, model {client.model}, {positions} positions", flush=True)
    return VllmEngine(client, positions, server), tokenizer


class ServerProcess:
    """serve.py in a subprocess on a free port, for tests and benchmarks; `lines` collects its output.

    with ServerProcess(["--base_model", dir, "--only_cpu"]) as server:
        httpx.get(server.url + "/health")
    """

    def __init__(self, argv: list[str], timeout: float = 300) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--port", "0", *argv]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.url = ""
        ready = threading.Event()
        threading.Thread(target=self.read, args=(ready,), daemon=True).start()
        if not ready.wait(timeout) or not self.url:
            self.stop()
            raise RuntimeError("serve.py did not start:\n" + "".join(self.lines[-20:]))

    def read(self, ready: threading.Event) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            found = re.match(r"serving \S+ on (http://\S+) ", line)
            if found and not self.url:
                self.url = found.group(1)
            if self.url and "Application startup complete" in line:
                ready.set()
        ready.set()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    run_cli(main)
