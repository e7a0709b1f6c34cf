"""Generation throughput of test.py's batched greedy decoding: eval_batch_size 16 vs 1.

    python bench/eval_throughput.py
    python bench/eval_throughput.py --rows 64 --hidden_size 128 --max_new_tokens 32

Same tiny random model (real 49954-token Alpaca tokenizer), same 64 MSRA prompts, same
settings; only the batch size changes. A random model rarely says </s>, so every row
generates max_new_tokens tokens in both runs. Prints a Markdown block for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dataset import build_prompt, load_data  # noqa: E402
from model_utils import generate_answers, load_model, load_tokenizer  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch_sizes", default="16,1")
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_hidden_layers", type=int, default=2)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--data", default=str(ROOT / "tests/data/msra_dev_instruct.txt"))
    args = parser.parse_args()

    rows = load_data(args.data)[: args.rows]
    prompts = [build_prompt(r["instruct"], r["query"]) for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        geometry = {"hidden_size": args.hidden_size, "num_hidden_layers": args.num_hidden_layers}
        base = make_tiny_model(Path(tmp) / "tiny", **geometry)
        tokenizer = load_tokenizer(base)
        model = load_model(base, dtype="float32", device="cpu", tokenizer=tokenizer)
    generate_answers(model, tokenizer, prompts[:2], 2, 4, progress=False)  # warm-up
    results = {}
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        answers, seconds = timed(
            generate_answers, model, tokenizer, prompts, batch_size, args.max_new_tokens, progress=False
        )
        results[batch_size] = (answers, seconds)
        print(f"eval_batch_size {batch_size:>3}: {len(prompts) / seconds:7.2f} rows/s ({seconds:.1f}s)", flush=True)

    sizes = list(results)
    fast, slow = max(sizes), min(sizes)
    same = results[fast][0] == results[slow][0]
    speedup = results[slow][1] / results[fast][1]
    print()
    print(f"`python bench/eval_throughput.py` on {date.today()}, {platform.machine()} CPU, {os.cpu_count()} cores,")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads. Tiny LLaMA: {args.num_hidden_layers} layers,")
    print(f"hidden {args.hidden_size}, 49954-token vocab; {len(prompts)} MSRA prompts, greedy, ")
    print(f"max_new_tokens {args.max_new_tokens} (a random model rarely stops early).")
    print()
    print("| eval_batch_size | rows/s | seconds |")
    print("|---:|---:|---:|")
    for batch_size in sizes:
        seconds = results[batch_size][1]
        print(f"| {batch_size} | {len(prompts) / seconds:.2f} | {seconds:.1f} |")
    print()
    print(f"Batch {fast} is {speedup:.1f}x faster than batch {slow}; outputs identical: {'yes' if same else 'NO'}.")


if __name__ == "__main__":
    main()
