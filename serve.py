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
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

from llama_ner.generation.inference import (
    EVAL_DEFAULTS,
    adapter_entity_types,
    add_model_args,
    args_prompt_format,
    load_from_args,
)
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
    args = p.parse_args(argv)
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
    if config_file.is_file():  # else load_from_args says what is wrong with the folder
        config = SimpleNamespace(**read_json_object(config_file))
        prompt_budget(SimpleNamespace(config=config), args.max_new_tokens)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import uvicorn  # FastAPI, torch and transformers: after the command line is read

    from llama_ner.serving.http_api import create_app

    args.types = adapter_entity_types(args)  # of constrained /v1/ner answers; a bad --entity_types stops here
    check_token_budget(args)
    sock = bind(args.host, args.port)
    model, tokenizer = load_from_args(args)
    args.fmt = args_prompt_format(args, tokenizer)  # the prompt the LoRA was trained with
    app = create_app(model, tokenizer, args)
    host, port = sock.getsockname()[:2]
    print(f"serving {args.model_name} on http://{host}:{port} (page: /, API: /v1/...)", flush=True)
    if args.api_key is None and host not in ("127.0.0.1", "::1", "localhost"):
        print("warning: listening beyond this machine without --api_key: anyone who can reach it can use it")
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])


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
            found = re.search(r" on (http://\S+) ", line)
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
