"""Training's levers on the real model, each alone and all together: rows a minute and validation loss.

    python bench/train_levers.py                      # SmolLM2-135M, 128 MSRA rows, batch 8 (~15 min here)
    python bench/train_levers.py --rows 64 --val_rows 24 --levers base,all

Every run starts from the same LoRA initialization (seed 0) on the same rows of the full MSRA train set
(data/msra/instruct_data/train_full.txt, `make msra-full`), in one pass of batch 8 at lr 1e-3 (AdamW,
constant), r 16 on the 7 projections, and is scored by the teacher-forced loss over the answer tokens of
the same held-out rows (fp32, each run's own prompt): the answers are the same tokens whatever the
prompt, so the losses compare. `base` is the recipe before these levers (chat template with its default
system prompt, the seed's long instruction, dropout 0.05, fp32, batches in random order); each lever
changes one thing from it; `all` is bench/real_model.py's recipe. Only the steps are timed (loading and
validation are not). Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dataset import IGNORE_INDEX, SHORT_INSTRUCTION, load_data  # noqa: E402
from llama_ner.tokenizer import load_tokenizer  # noqa: E402
from llama_ner.training.model import (  # noqa: E402
    TrainCollate,
    build_model,
    causal_lm_loss,
    length_grouped_order,
    row_length,
)
from llama_ner.training.train_config import TRAIN_DEFAULTS, parse_train_args  # noqa: E402

MODEL = ROOT / "model_hub" / "smollm2-135m-instruct"
TRAIN_FULL = ROOT / "data" / "msra" / "instruct_data" / "train_full.txt"
BASE = {"prompt_template": "chat", "instruction": "seed", "lora_dropout": 0.05, "bf16": False, "grouped": False}
LEVERS = {
    "base": {},
    "bf16 autocast": {"bf16": True},
    "length-grouped batches": {"grouped": True},
    "dropout 0": {"lora_dropout": 0.0},
    "short instruction": {"instruction": "short"},
    "raw template (no system prompt)": {"prompt_template": "raw"},
    "all": {"bf16": True, "grouped": True, "lora_dropout": 0.0, "instruction": "short", "prompt_template": "raw"},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=128, help="training rows (one pass)")
    parser.add_argument("--val_rows", type=int, default=48, help="held-out rows scored by their answer loss")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--levers", default=",".join(LEVERS), help="comma-separated names of LEVERS")
    return parser.parse_args()


def pick_rows(rows: int, val_rows: int) -> tuple[list[dict], list[dict]]:
    """Training and held-out rows drawn (seed 0) from the sentences with entities, as the headline trains on."""
    data = [r for r in load_data(TRAIN_FULL) if r["answer"] != "没有"]
    random.Random(0).shuffle(data)
    return data[:rows], data[rows : rows + val_rows]


def with_instruction(rows: list[dict], name: str) -> list[dict]:
    """process.py --instruction=short changes only the instruction (tests/test_process.py), so swap it here."""
    return rows if name == "seed" else [{**r, "instruct": SHORT_INSTRUCTION} for r in rows]


def answer_loss(model, collate, rows: list[dict], batch: int) -> float:
    model.eval()
    total = tokens = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            encoded = collate.collate_fn(rows[start : start + batch])
            count = int((encoded["labels"] != IGNORE_INDEX).sum())
            total += causal_lm_loss(model, encoded).item() * count
            tokens += count
    model.train()
    return total / tokens


def run(name: str, setting: dict, train_rows: list[dict], val_rows: list[dict], cli) -> dict:
    s = {**BASE, **setting}
    args = parse_train_args({**TRAIN_DEFAULTS, "save_dir": "x"}, "", [
        f"model_dir={MODEL}", f"prompt_template={s['prompt_template']}", f"lora_dropout={s['lora_dropout']}",
        "lora_r=16", "lora_alpha=32", "max_seq_length=384",
    ])  # fmt: skip
    tokenizer = load_tokenizer(MODEL)
    torch.manual_seed(0)
    model = build_model(args, tokenizer, "fp32")
    model.train()
    collate = TrainCollate(args, tokenizer)
    rows = with_instruction(train_rows, s["instruction"])
    val = with_instruction(val_rows, s["instruction"])
    order = list(range(len(rows)))
    if s["grouped"]:
        order = length_grouped_order([row_length(r, args) for r in rows], cli.batch, 1, seed=0, epoch=0)
    else:
        random.Random(0).shuffle(order)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cli.lr, weight_decay=0)
    seconds = tokens = padded = 0
    for start in range(0, len(order), cli.batch):
        batch = collate.collate_fn([rows[i] for i in order[start : start + cli.batch]])
        tokens += int(batch["attention_mask"].sum())
        padded += batch["attention_mask"].numel()
        began = time.perf_counter()
        loss = causal_lm_loss(model, batch, s["bf16"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - began
    result = {"name": name, "rows_per_min": len(rows) / seconds * 60, "tokens_per_row": tokens / len(rows),
              "padding": 1 - tokens / padded, "val_loss": answer_loss(model, collate, val, cli.batch)}  # fmt: skip
    print(f"{name}: {result['rows_per_min']:.1f} rows/min, val loss {result['val_loss']:.4f}", flush=True)
    return result


def main() -> None:
    cli = parse_args()
    torch.set_flush_denormal(True)
    train_rows, val_rows = pick_rows(cli.rows, cli.val_rows)
    results = [run(name, LEVERS[name], train_rows, val_rows, cli) for name in cli.levers.split(",")]
    base = results[0]
    print(f"\n{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M, "
          f"{cli.rows} rows (one pass, batch {cli.batch}, lr {cli.lr}), validation: answer loss on {cli.val_rows} "
          "held-out rows\n")  # fmt: skip
    print("| lever | rows/min | vs first | tokens/row | padding | validation loss |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['rows_per_min']:.1f} | {r['rows_per_min'] / base['rows_per_min']:.2f}x | "
              f"{r['tokens_per_row']:.0f} | {r['padding']:.0%} | {r['val_loss']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
