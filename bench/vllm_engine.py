"""The hf engine against the vLLM engine on one model: 32 concurrent /v1/ner clients, and test.py on 200 rows.

    python bench/vllm_engine.py                      # the real SmolLM2 + the LoRA of make bench-real, when present
    python bench/vllm_engine.py --train_args_path=checkpoint/msra/train_trainer/adapter_model/train_args.json

Both runs in one go, same model, same rows, greedy fp32: serve.py --engine hf and --engine vllm (which
starts vLLM's CPU build from .venv-vllm), each sent `--requests` single-text /v1/ner requests by
`--clients` clients that send their next request when the last returns; then test.py with engine=hf and
engine=vllm on the first `--rows` rows of the official MSRA test set (wall time: loading and vLLM's start
included). Prints a Markdown table for BENCHMARKS.md and whether the two engines' answers are equal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_throughput import percentile, run_clients  # noqa: E402

from config_utils import load_config  # noqa: E402
from dataset import load_data  # noqa: E402
from serve import ServerProcess  # noqa: E402

REAL_RUN = ROOT / ".bench/real_model/run/adapter_model/train_args.json"  # written by make bench-real
DEV = ROOT / "data/msra/instruct_data/dev.txt"


def serve_run(engine: str, argv: list[str], texts: list[str], clients: int) -> dict:
    with ServerProcess([*argv, "--engine", engine], timeout=900) as server:
        asyncio.run(run_clients(server.url, texts[:4], 2))  # warm-up
        seconds, latencies, answers = asyncio.run(run_clients(server.url, texts, clients))
    rate, p50, p95 = len(texts) / seconds, percentile(latencies, 0.5), percentile(latencies, 0.95)
    print(f"serve {engine}: {rate:.2f} req/s, p50 {p50:.2f}s, p95 {p95:.2f}s", flush=True)
    return {"rate": rate, "p50": p50, "p95": p95, "seconds": seconds, "answers": answers}


def test_run(engine: str, train_args: Path, rows: int, out: Path, max_new_tokens: int, mode: str = "grammar") -> dict:
    cmd = [sys.executable, str(ROOT / "test.py"), f"--train_args_path={train_args}", f"--dev_path={DEV}"]
    cmd += [f"--max_rows={rows}", f"--output_dir={out}", f"--engine={engine}", f"--max_new_tokens={max_new_tokens}"]
    cmd += [f"--vllm_constraint={mode}"]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"test.py engine={engine} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    ready = re.search(r"vLLM ready after (\d+)s", result.stdout)
    checks = re.search(r"vLLM: (\d+) of (\d+) constrained answers .* \((\d+) tokens\)", result.stdout)
    metrics = json.loads((out / "test_metrics.json").read_text(encoding="utf-8"))
    predictions = (out / "test_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    print(f"test.py {engine}: {seconds:.0f}s, F1 {metrics['f1']:.3f}", flush=True)
    corrected = f"{checks.group(1)} answers, {checks.group(3)} tokens" if checks else "-"
    start = ready and ready.group(1)
    return {"seconds": seconds, "f1": metrics["f1"], "predictions": predictions, "start": start, "corrected": corrected}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_args_path", default=str(REAL_RUN))
    parser.add_argument("--requests", type=int, default=96, help="/v1/ner requests per engine")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rows", type=int, default=200, help="test.py rows per engine")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / ".bench/vllm_engine"))
    args = parser.parse_args()
    # vLLM's CPU build keeps one core for its API server by default: on 2 cores that halves its engine.
    # Both engines get both cores here; the default is measured in BENCHMARKS.md too.
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

    train_args = Path(args.train_args_path)
    if not train_args.is_file():
        sys.exit(f"{train_args}: not found; run make bench-real first, or pass --train_args_path of a trained LoRA")
    trained = load_config(train_args)
    adapter = train_args.parent
    texts = [r["query"].removeprefix("文本：") for r in load_data(DEV)[: args.requests]]
    argv = ["--base_model", trained["model_dir"], "--lora_model", str(adapter), "--only_cpu", "--dtype", "float32"]
    argv += ["--max_new_tokens", str(args.max_new_tokens), "--max_texts", "1"]
    serve = {engine: serve_run(engine, argv, texts, args.clients) for engine in ("hf", "vllm")}
    out = Path(args.out)
    tests = {e: test_run(e, train_args, args.rows, out / e, args.max_new_tokens) for e in ("hf", "vllm")}
    check = test_run("vllm", train_args, args.rows, out / "check", args.max_new_tokens, "check")
    tests["vllm, vllm_constraint=check"] = check

    same_serve = sum(a == b for a, b in zip(serve["hf"]["answers"], serve["vllm"]["answers"], strict=True))
    same_test = [
        sum(a == b for a, b in zip(tests["hf"]["predictions"], r["predictions"], strict=True)) for r in tests.values()
    ]
    print()
    print(f"`python bench/vllm_engine.py` on {date.today()}, {platform.machine()} CPU, {os.cpu_count()} cores, "
          f"vllm-cpu 0.32.0, fp32, greedy, max_new_tokens {args.max_new_tokens}, "
          f"VLLM_CPU_NUM_OF_RESERVED_CPU={os.environ['VLLM_CPU_NUM_OF_RESERVED_CPU']}.")  # fmt: skip
    print(f"Model: {trained['model_dir']} + the LoRA {adapter} (prompt_template {trained.get('prompt_template')}).")
    print()
    print(f"serve.py, {args.clients} concurrent clients, {len(texts)} single-text /v1/ner requests (MSRA test rows):")
    print()
    print("| engine | requests/s | p50 latency | p95 latency | wall |")
    print("|---|---:|---:|---:|---:|")
    for engine, r in serve.items():
        print(f"| {engine} | {r['rate']:.2f} | {r['p50']:.2f} s | {r['p95']:.2f} s | {r['seconds']:.1f} s |")
    print()
    print(f"Answers equal between the engines: {same_serve} of {len(texts)}.")
    print()
    print(f"test.py on the first {args.rows} rows of the official MSRA test set (wall time, loading included):")
    print()
    print("| engine | wall | F1 | of which vLLM's start | corrected token by token | predictions equal to hf's |")
    print("|---|---:|---:|---:|---|---:|")
    for (engine, r), same in zip(tests.items(), same_test, strict=True):
        start = f"{r['start']} s" if r["start"] else "-"
        cells = [engine, f"{r['seconds']:.0f} s", f"{r['f1']:.3f}", start, r["corrected"], f"{same} of {args.rows}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
