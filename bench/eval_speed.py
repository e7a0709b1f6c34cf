"""test.py's speed on the real model, side by side in one run: the old path (no prefix cache) against
today's levers, on the same rows of the official test set, with the answers compared row by row.

    python bench/eval_speed.py                          # after make bench-real (its adapter and test file)
    python bench/eval_speed.py --rows 64 --variants old,default

Each variant is the test.py command a user types (printed), run as a child process and timed (model
loading included). `old` is test.py's decoding before the prefix cache and continuous batching
(prefix_cache=false, continuous_batching=false, eval_batch_size 16, fp32); `default` is today's test.py as it
stands; the others change one or two settings.
Prints a Markdown block for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama_ner.io_utils import run_measured  # noqa: E402

BENCH = ROOT / ".bench" / "real_model"
VARIANTS = {
    "old": ["--prefix_cache=false", "--continuous_batching=false", "--eval_batch_size=16"],
    "default": [],
    "batch 32": ["--eval_batch_size=32"],
    "bf16": ["--dtype=bfloat16"],
    "batch 32 bf16": ["--eval_batch_size=32", "--dtype=bfloat16"],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_args", default=str(BENCH / "run" / "adapter_model" / "train_args.json"))
    parser.add_argument("--dev_path", default=str(BENCH / "test_short.txt"))
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--max_new_tokens", type=int, default=512, help="bench/real_model.py's")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)}; '': the finished share only")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant, alternating; the fastest counts")
    parser.add_argument("--out", default=str(ROOT / ".bench" / "eval_speed"))
    return parser.parse_args()


def main() -> None:
    cli = parse_args()
    names = [name.strip() for name in cli.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not Path(cli.train_args).is_file():
        sys.exit(f"unknown variant {unknown[0]!r}" if unknown else f"{cli.train_args} missing: run make bench-real")
    print(finished_share(cli.train_args, cli.dev_path, cli.rows, 16), flush=True)
    if not names:
        return
    out = Path(cli.out)
    results = {}
    for repeat in range(cli.repeats):  # alternating: this VM's speed drifts by up to 2x within minutes
        for name in names:
            folder = out / name.replace(" ", "_")
            folder.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "test.py", f"--train_args_path={cli.train_args}", f"--dev_path={cli.dev_path}",
                   f"--max_rows={cli.rows}", f"--max_new_tokens={cli.max_new_tokens}", f"--output_dir={folder}",
                   *VARIANTS[name]]  # fmt: skip
            print(f"\n## {name} (run {repeat + 1})\n$ {' '.join(cmd)}", flush=True)
            with open(folder / "test.log", "w", encoding="utf-8") as log:
                code, seconds, peak = run_measured(cmd, cwd=ROOT, stdout=log, stderr=log)
            if code != 0:
                sys.exit(f"{name} failed (exit {code}): {folder / 'test.log'}")
            metrics = json.loads((folder / "test_metrics.json").read_text(encoding="utf-8"))
            lines = (folder / "test_predictions.jsonl").read_text(encoding="utf-8").splitlines()
            predictions = [json.loads(line)["prediction"] for line in lines]
            print(f"{name}: {seconds:.0f} s, F1 {metrics['f1']:.3f}", flush=True)
            if name not in results or seconds < results[name][0]:
                results[name] = (seconds, peak, metrics, predictions)

    base = results[names[0]]
    print(f"\n---- for BENCHMARKS.md ----\n\ntest.py on the first {cli.rows} rows of {Path(cli.dev_path).name}, "
          f"max_new_tokens {cli.max_new_tokens}, constrained (the default), model loading included, the fastest of "
          f"{cli.repeats} alternating runs\n")  # fmt: skip
    print(f"| variant | wall | rows/s | vs {names[0]} | answers equal to {names[0]}'s | F1 | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for name, (seconds, peak, metrics, predictions) in results.items():
        same = sum(a == b for a, b in zip(predictions, base[3], strict=True))
        print(f"| {name} (`{' '.join(VARIANTS[name]) or 'as is'}`) | {seconds / 60:.1f} min | "
              f"{cli.rows / seconds:.2f} | {base[0] / seconds:.2f}x | {same}/{len(predictions)} | "
              f"{metrics['f1']:.3f} | {peak / 2**30:.1f} GB |")  # fmt: skip


def finished_share(train_args: str, dev_path: str, rows: int, batch: int) -> str:
    """How much of a batch-by-batch generate goes to answers already finished: the row-steps of batches of
    `batch` prompts sorted by prompt length, each run to its longest answer, against the answers' own tokens
    (the gold answers of the rows, + </s>: what a model that answers right generates)."""
    from dataset import load_data
    from llama_ner.tokenizer import load_tokenizer

    trained = json.loads(Path(train_args).read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(ROOT / trained["model_dir"])
    data = load_data(dev_path)[:rows]
    prompt = [len(tokenizer.encode(r["instruct"] + r["query"])) for r in data]
    answer = [len(tokenizer.encode(r["answer"], add_special_tokens=False)) + 1 for r in data]
    order = sorted(range(len(data)), key=prompt.__getitem__)
    batches = [order[i : i + batch] for i in range(0, len(order), batch)]
    stepped = sum(len(b) * max(answer[i] for i in b) for b in batches)
    share = 1 - sum(answer) / stepped
    return (f"batches of {batch} sorted by prompt length, run to their longest gold answer: {stepped} row-steps "
            f"for {sum(answer)} answer tokens, {share:.0%} of them on finished answers")  # fmt: skip


if __name__ == "__main__":
    main()
