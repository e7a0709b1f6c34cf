"""Throughput and latency of serve.py's /v1/ner under 1, 8 and 32 concurrent clients.

    python bench/serve_throughput.py
    python bench/serve_throughput.py --requests 64 --clients 1,8,32 --max_new_tokens 32

serve.py runs for real (uvicorn, a free port) on a tiny random LLaMA (real 49954-token
Alpaca tokenizer); each client sends single-text /v1/ner requests (MSRA sentences) one after
another over its own connection. A random model rarely says </s>, so every answer is
max_new_tokens long. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from dataset import load_data  # noqa: E402
from llama_ner.tiny_models import make_tiny_model  # noqa: E402
from serve import ServerProcess  # noqa: E402


async def run_clients(url: str, texts: list[str], clients: int) -> tuple[float, list[float], list[str]]:
    """(wall seconds, per-request latencies, answers in text order) for len(texts) requests over `clients` clients."""
    latencies: list[float] = []
    answers: dict[int, str] = {}
    todo = list(range(len(texts)))

    async def client(http: httpx.AsyncClient) -> None:
        while todo:
            i = todo.pop(0)
            start = time.perf_counter()
            response = await http.post("/v1/ner", json={"texts": [texts[i]]})
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)
            answers[i] = response.json()["results"][0]["answer"]

    start = time.perf_counter()
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return time.perf_counter() - start, latencies, [answers[i] for i in range(len(texts))]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_hidden_layers", type=int, default=2)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--max_batch_size", type=int, default=16)
    parser.add_argument("--data", default=str(ROOT / "tests/data/msra_dev_instruct.txt"))
    args = parser.parse_args()

    texts = [r["query"].removeprefix("文本：") for r in load_data(args.data)[: args.requests]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        geometry = {"hidden_size": args.hidden_size, "num_hidden_layers": args.num_hidden_layers}
        base = make_tiny_model(Path(tmp) / "tiny", **geometry)
        argv = ["--base_model", str(base), "--only_cpu", "--max_new_tokens", str(args.max_new_tokens)]
        with ServerProcess([*argv, "--max_batch_size", str(args.max_batch_size)]) as server:
            asyncio.run(run_clients(server.url, texts[:4], 2))  # warm-up
            reference = None
            for clients in (int(c) for c in args.clients.split(",")):
                seconds, latencies, answers = asyncio.run(run_clients(server.url, texts, clients))
                reference = reference or answers
                row = (clients, len(texts) / seconds, percentile(latencies, 0.5), percentile(latencies, 0.95), seconds)
                rows.append((*row, answers == reference))
                print(f"{clients:>3} clients: {row[1]:6.2f} req/s, p50 {row[2]:.2f}s, p95 {row[3]:.2f}s", flush=True)
            health = httpx.get(server.url + "/health").json()

    print()
    print(f"`python bench/serve_throughput.py` on {date.today()}, {platform.machine()} CPU, {os.cpu_count()} cores.")
    print(f"Tiny LLaMA: {args.num_hidden_layers} layers, hidden {args.hidden_size}, 49954-token vocab; serve.py")
    print(f"--max_batch_size {args.max_batch_size}, --max_new_tokens {args.max_new_tokens}; {len(texts)} single-text")
    print("/v1/ner requests per row (MSRA sentences), each client sending its next request when the last returns.")
    print()
    print("| concurrent clients | requests/s | p50 latency | p95 latency | wall | answers as with 1 client |")
    print("|---:|---:|---:|---:|---:|---|")
    for clients, rate, p50, p95, seconds, same in rows:
        print(f"| {clients} | {rate:.2f} | {p50:.2f} s | {p95:.2f} s | {seconds:.1f} s | {'yes' if same else 'NO'} |")
    print()
    print(f"Server: {health['batches']} generate calls in all, largest {health['largest_batch']} texts.")


if __name__ == "__main__":
    main()
