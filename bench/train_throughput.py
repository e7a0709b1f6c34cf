"""Training speed: our batches and loss vs the seed recipe, on the CPU.

    python bench/train_throughput.py                 # 4 layers, hidden 256, 240 MSRA rows, 1 epoch
    python bench/train_throughput.py --repeats 1 --rows 48

Both runs use the HF Trainer (no DeepSpeed, so its start-up and optimizer offload are not
timed), a random 4-layer hidden-256 LLaMA with the real 49954-token tokenizer, batch 12
and a r=8 LoRA on the 7 projections. The seed recipe pads every batch to max_seq_length
(192) and lets the model compute logits for every position; ours pads each batch to its
own longest row, left-aligned, and computes logits only from the first answer token on.
Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataset import IGNORE_INDEX, NerCollate, load_data  # noqa: E402
from llama_ner.tiny_models import make_tiny_model  # noqa: E402
from llama_ner.tokenizer import load_tokenizer  # noqa: E402
from llama_ner.training.model import TrainCollate, build_model  # noqa: E402
from llama_ner.training.train_config import TRAIN_DEFAULTS, parse_train_args  # noqa: E402

MODEL = ROOT / ".bench" / "tiny-4x256"
DATA = ROOT / "tests" / "data" / "msra_dev_instruct.txt"


def seed_collate(args, tokenizer):
    """The seed's batches: every one padded to max_seq_length."""
    collate = NerCollate(args, tokenizer)
    collate.pad_to_multiple_of = args.max_seq_length
    return collate.collate_fn


def time_run(
    recipe: str,
    rows: list[dict],
    gradient_checkpointing: bool = False,
    model_dir: Path = MODEL,
    extra_argv: tuple[str, ...] = (),
    learning_rate: float = 1e-4,
) -> tuple[float, float, int]:
    """Wall and CPU seconds for one epoch of trainer.train(), and the real (non-pad) tokens it saw.

    CPU seconds (all threads) suffer less than wall time when other jobs share the cores.
    `extra_argv`: training keys both recipes get (bench/real_model.py: prompt_template=chat).
    """
    from transformers import Trainer, TrainingArguments

    from llama_ner.training.time_budget import TimeBudget
    from train_trainer import LoraTrainer

    argv = [f"model_dir={model_dir}", "lora_dropout=0.1", f"gradient_checkpointing={gradient_checkpointing}"]
    args = parse_train_args({**TRAIN_DEFAULTS, "save_dir": str(ROOT / ".bench" / "out")}, "", [*argv, *extra_argv])
    tokenizer = load_tokenizer(model_dir)
    model = build_model(args, tokenizer, "fp32")
    collate = seed_collate(args, tokenizer) if recipe == "seed" else TrainCollate(args, tokenizer).collate_fn
    training_args = TrainingArguments(
        output_dir=str(ROOT / ".bench" / "out"),
        per_device_train_batch_size=12,
        num_train_epochs=1,
        learning_rate=learning_rate,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=42,
    )
    if recipe == "seed":
        trainer = Trainer(model=model, args=training_args, train_dataset=rows, data_collator=collate)
    else:
        args.bf16_autocast = False  # fp32 as the seed: the recipes differ in batches and loss only
        trainer = LoraTrainer(model=model, args=training_args, train_dataset=rows, data_collator=collate,
                              run_args=args, budget=TimeBudget(0))  # fmt: skip
    tokens = sum(int(collate(rows[i : i + 12])["attention_mask"].sum()) for i in range(0, len(rows), 12))
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    return time.perf_counter() - start, time.process_time() - cpu_start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--repeats", type=int, default=2, help="runs per recipe, alternating; the fastest counts")
    cli = parser.parse_args()
    if not (MODEL / "config.json").is_file():
        make_tiny_model(MODEL, "alpaca", hidden_size=256, num_hidden_layers=4)
    rows = load_data(DATA)[: cli.rows]
    recipes = {"seed": {}, "ours": {}, "ours + gradient checkpointing": {"gradient_checkpointing": True}}
    best: dict[str, tuple[float, float, int]] = {}
    runs: dict[str, list[float]] = {name: [] for name in recipes}
    for repeat in range(cli.repeats):
        for name, options in recipes.items():
            recipe = "seed" if name == "seed" else "ours"
            seconds, cpu_seconds, tokens = time_run(recipe, rows, **options)
            print(f"run {repeat + 1}: {name}: {seconds:.1f} s wall, {cpu_seconds:.1f} s CPU", flush=True)
            runs[name].append(seconds)
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, cpu_seconds, tokens)
    answer_tokens = sum(
        int((TrainCollate(parse_train_args({**TRAIN_DEFAULTS, "save_dir": "x"}, "", []), load_tokenizer(MODEL))
             .collate_fn(rows[i : i + 12])["labels"] != IGNORE_INDEX).sum())
        for i in range(0, len(rows), 12)
    )  # fmt: skip
    seed_seconds, seed_cpu, _ = best["seed"]
    print(f"\n{len(rows)} rows, batch 12, {answer_tokens} answer tokens; {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")  # fmt: skip
    print("| recipe | wall, 1 epoch (best run) | CPU (that run) | every run (wall) | tokens/s | speed-up wall / CPU |")
    print("|---|---|---|---|---|---|")
    for name, (seconds, cpu, tokens) in best.items():
        every = ", ".join(f"{t:.1f}" for t in runs[name])
        speed = f"{seed_seconds / seconds:.2f}x / {seed_cpu / cpu:.2f}x"
        print(f"| {name} | {seconds:.1f} s | {cpu:.1f} s | {every} | {tokens / seconds:.0f} | {speed} |")


if __name__ == "__main__":
    main()
