"""NER LoRA on a real pretrained model: SmolLM2-135M-Instruct, N rows of the full MSRA train set, scored by
test.py on the first rows of the official test set (data/msra/instruct_data/dev.txt).

    make bench-real                                                   # the measured run (about 75 minutes here)
    python bench/real_model.py --rows 48 --eval_rows 16 --seed_rows 24   # a smoke run (minutes)

Every step is the command a user types (printed), run as a child process and timed: train_trainer.py with
prompt_template=chat, then test.py zero-shot (--adapter_path=none), tuned, and tuned with
--constrained=false. Then the seed's recipe (plain Trainer + peft: batches padded to max_seq_length, the
model's own loss over every position) and ours, with the seed's settings (r 8, batch 12, max_seq_length
192, lr 1e-5), each timed for one epoch over the same --seed_rows rows. Needs `make smollm2 msra-full`.
Prints a Markdown block for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama_ner.io_utils import run_measured  # noqa: E402

MODEL = ROOT / "model_hub" / "smollm2-135m-instruct"
TRAIN_FULL = ROOT / "data" / "msra" / "instruct_data" / "train_full.txt"
DEV = ROOT / "data" / "msra" / "instruct_data" / "dev.txt"
SEED_SETTINGS = ("lora_r=8", "lora_alpha=32", "max_seq_length=192", "train_batch_size=12")
SEED_LR = 1e-5  # the seed's deepspeed.json
A40_BF16_FLOPS = 149.7e12  # NVIDIA's dense bf16 peak for the A40
ASSUMED_MFU = 0.3  # a LoRA step at this size rarely beats 30% of peak


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000, help="training rows sampled from train_full.txt")
    parser.add_argument("--none_share", type=float, default=0.2, help="at most this share of `没有` rows")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_seq_length", type=int, default=384)
    parser.add_argument("--eval_rows", type=int, default=500, help="first rows of dev.txt that test.py scores")
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--seed_rows", type=int, default=96, help="rows both recipes are timed on")
    parser.add_argument("--out", default=str(ROOT / ".bench" / "real_model"))
    parser.add_argument("--time_recipe", choices=["seed", "ours"], help=argparse.SUPPRESS)  # child mode
    return parser.parse_args()


def sample_rows(rows: int, none_share: float, out: Path) -> Path:
    """`rows` random training rows (seed 0), of which at most none_share answer `没有`."""
    lines = TRAIN_FULL.read_text(encoding="utf-8").splitlines()
    random.Random(0).shuffle(lines)
    with_entities = [line for line in lines if json.loads(line)["answer"] != "没有"]
    without = [line for line in lines if json.loads(line)["answer"] == "没有"]
    n_none = min(int(rows * none_share), len(without))
    chosen = with_entities[: rows - n_none] + without[:n_none]
    random.Random(1).shuffle(chosen)
    path = out / "train.txt"
    path.write_text("\n".join(chosen) + "\n", encoding="utf-8")
    return path


def run(name: str, cmd: list[str], log: Path) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, output) of one step; its output goes to `log` too."""
    print(f"\n## {name}\n$ {' '.join(cmd)}", flush=True)
    with open(log, "w", encoding="utf-8") as out:
        code, seconds, peak = run_measured(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    text = log.read_text(encoding="utf-8", errors="replace")
    if code != 0:
        sys.exit(f"{name} failed (exit {code}); its output: {log}\n{text[-2000:]}")
    print(f"{name}: {seconds:.0f} s, peak {peak / 2**20:.0f} MB", flush=True)
    return seconds, peak, text


def metrics_of(folder: Path) -> dict:
    return json.loads((folder / "test_metrics.json").read_text(encoding="utf-8"))


def time_recipe(recipe: str, rows_file: Path) -> None:
    """Child mode: one epoch of `recipe` over rows_file with the seed's settings; prints a JSON line."""
    sys.path.insert(0, str(ROOT / "bench"))
    from train_throughput import time_run

    from dataset import load_data

    rows = load_data(rows_file)
    extra = ("prompt_template=chat", *SEED_SETTINGS)
    seconds, cpu, tokens = time_run(recipe, rows, model_dir=MODEL, extra_argv=extra, learning_rate=SEED_LR)
    print(json.dumps({"recipe": recipe, "seconds": seconds, "cpu": cpu, "tokens": tokens, "rows": len(rows)}))


def training_tokens(rows_file: Path, max_seq_length: int) -> tuple[int, int]:
    """(tokens, answer tokens) the trainer sees: prompt + answer + EOS per row, cut as training cuts."""
    from dataset import encode_example, load_data, prompt_format
    from llama_ner.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    fmt = prompt_format("chat", tokenizer)
    total = answer = 0
    for row in load_data(rows_file):
        ids, labels = encode_example(tokenizer, fmt.build(row["instruct"], row["query"]), row["answer"],
                                     max_seq_length, fmt.tail)  # fmt: skip
        total += len(ids)
        answer += sum(label != -100 for label in labels)
    return total, answer


def main() -> None:
    cli = parse_args()
    out = Path(cli.out)
    if cli.time_recipe:
        time_recipe(cli.time_recipe, out / "seed_rows.txt")
        return
    missing = [f"{p} (make {t})" for p, t in ((MODEL, "smollm2"), (TRAIN_FULL, "msra-full")) if not p.exists()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}")
    out.mkdir(parents=True, exist_ok=True)
    train_file = sample_rows(cli.rows, cli.none_share, out)
    py = sys.executable
    save_dir = out / "run"
    train_cmd = [py, "train_trainer.py", "data_name=real_model", f"model_dir={MODEL.relative_to(ROOT)}",
                 "prompt_template=chat", f"train_path={train_file}", "dev_path=", f"save_dir={save_dir}",
                 f"lora_r={cli.lora_r}", f"lora_alpha={2 * cli.lora_r}", "lora_dropout=0.05",
                 f"learning_rate={cli.lr}", "warmup_ratio=0.03", f"num_train_epochs={cli.epochs}",
                 f"train_batch_size={cli.batch}", f"max_seq_length={cli.max_seq_length}",
                 "log_steps=25", "save_steps=100000"]  # fmt: skip
    train_seconds, train_peak, train_log = run("train", train_cmd, out / "train.log")
    train_args = save_dir / "adapter_model" / "train_args.json"
    test = [py, "test.py", f"--train_args_path={train_args}", f"--dev_path={DEV.relative_to(ROOT)}",
            f"--max_rows={cli.eval_rows}", f"--max_new_tokens={cli.max_new_tokens}"]  # fmt: skip
    evals = {
        "zero-shot (constrained)": [*test, "--adapter_path=none", f"--output_dir={out / 'zero_shot'}"],
        "tuned (constrained)": [*test, f"--output_dir={out / 'tuned'}"],
        "tuned, constrained=false": [*test, "--constrained=false", f"--output_dir={out / 'tuned_free'}"],
    }
    results = {}
    for name, cmd in evals.items():
        seconds, peak, _ = run(f"test.py: {name}", cmd, out / f"{Path(cmd[-1].split('=')[1]).name}.log")
        results[name] = (seconds, metrics_of(Path(cmd[-1].split("=", 1)[1])))
    seed_file = out / "seed_rows.txt"
    seed_file.write_text("".join(train_file.read_text(encoding="utf-8").splitlines(True)[: cli.seed_rows]))
    recipes = {}
    for recipe in ("seed", "ours"):
        _, _, text = run(f"recipe timing: {recipe}", [py, __file__, "--time_recipe", recipe, "--out", str(out)],
                         out / f"recipe_{recipe}.log")  # fmt: skip
        recipes[recipe] = json.loads(text.strip().splitlines()[-1])

    tokens, answer_tokens = training_tokens(train_file, cli.max_seq_length)
    done = re.search(r"done: (\d+) steps in (\d+)s, train loss ([\d.]+)", train_log)
    losses = re.findall(r"'loss': '([\d.]+)'", train_log)
    import torch

    print("\n---- for BENCHMARKS.md ----\n")
    print(f"SmolLM2-135M-Instruct (fp32), {cli.rows} rows of MSRA train ({cli.none_share:.0%} at most `没有`), "
          f"{cli.epochs} epoch(s), LoRA r={cli.lora_r} on the 7 projections, lr {cli.lr}, batch {cli.batch}; "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads\n")  # fmt: skip
    trainer_seconds = float(done.group(2)) if done else train_seconds
    print(f"training: {train_seconds / 60:.1f} min wall (process; the Trainer's loop {trainer_seconds / 60:.1f} min), "
          f"{done.group(1) if done else '?'} steps, {tokens} tokens ({answer_tokens} answer tokens): "
          f"{tokens / trainer_seconds:.0f} tokens/s in the loop; "
          f"loss {losses[0] if losses else '?'} (first {25} steps) -> {losses[-1] if losses else '?'}; "
          f"peak RSS {train_peak / 2**30:.1f} GB\n")  # fmt: skip
    print(f"| test.py on dev.txt[:{cli.eval_rows}] | P | R | F1 | wall |")
    print("|---|---|---|---|---|")
    for name, (seconds, m) in results.items():
        print(f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {seconds / 60:.1f} min |")
    seed, ours = recipes["seed"], recipes["ours"]
    print(f"\nrecipe timing, {seed['rows']} rows, r 8, batch 12, max_seq_length 192, 1 epoch: seed "
          f"{seed['seconds']:.1f} s, ours {ours['seconds']:.1f} s: ours {seed['seconds'] / ours['seconds']:.2f}x "
          f"faster (wall)")  # fmt: skip
    params = 134.5e6
    seed_flops = 6 * params * 192 * cli.rows  # every row padded to 192, 6 FLOPs a parameter a token (upper bound)
    print(
        f"seed recipe on one A40, computed (not measured): {seed_flops:.2e} FLOPs for {cli.rows} rows at "
        f"{ASSUMED_MFU:.0%} of {A40_BF16_FLOPS / 1e12:.0f} TFLOP/s = {seed_flops / A40_BF16_FLOPS / ASSUMED_MFU:.1f} s"
    )
    print("\ncommands:\n" + "\n".join(" ".join(c) for c in [train_cmd, *evals.values()]))


if __name__ == "__main__":
    main()
