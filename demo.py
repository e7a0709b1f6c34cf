"""The whole pipeline on a tiny random LLaMA, as a user would type it (`make demo`).

    python demo.py                 # CPU, about 5 minutes on 2 cores
    python demo.py --smoke         # the smallest scale (the end-to-end test runs this)

It builds a tiny original-format LLaMA and two tiny LoRAs shaped like Chinese-LLaMA-Plus and
Chinese-Alpaca-Plus under model_hub/tiny/, then runs convert -> merge -> process -> train
(DeepSpeed, 2 processes) -> test -> predict, and a learning check: a LoRA trained hard on
16 rows must reproduce them. It ends with one table: command, time, peak memory, output.
A random base cannot recognise entities, so its F1 on MSRA means nothing; the learning
check's F1 shows that training and evaluation really work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from llama_ner.io_utils import run_measured

ROOT = Path(__file__).resolve().parent
PY = sys.executable
_VENV_DEEPSPEED = Path(sys.executable).parent / "deepspeed"
DEEPSPEED = [str(_VENV_DEEPSPEED)] if _VENV_DEEPSPEED.exists() else [PY, "-m", "deepspeed.launcher.runner"]
TINY = Path("model_hub/tiny")
DEMO_DATA = Path("data/demo")
TRAIN_DIR = "checkpoint/demo/train_trainer"
MEMO_DIR = "checkpoint/demo_memorize/train_trainer"
MIN_LEARNED_F1 = 0.9

# rows used at each scale: training rows (0 = all of train.txt), dev rows scored, rows memorized
SCALES = {
    "full": {"train_rows": 0, "eval_rows": 64, "memorize_rows": 16},
    "smoke": {"train_rows": 48, "eval_rows": 8, "memorize_rows": 6},
}


# Overrides that make a LoRA memorize a handful of rows: on a 2-layer model with the 49954-token
# vocabulary, 12 MSRA rows come back exactly under greedy decoding after ~70 epochs.
MEMORIZE_OVERRIDES: dict[str, Any] = {
    "lora_r": 32,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "learning_rate": 3e-3,
    "warmup_ratio": 0.0,
    "train_batch_size": 4,
    "num_train_epochs": 70,
    "save_steps": 100000,
    "log_steps": 20,
    "dev_path": "",
}


def hard_train_argv(model_dir: str | Path, train_path: str | Path, save_dir: str | Path, **overrides: Any) -> list[str]:
    """Training-script arguments (MEMORIZE_OVERRIDES + overrides) that make a LoRA memorize train_path."""
    values = {**MEMORIZE_OVERRIDES, **overrides}
    values.update(model_dir=str(model_dir), train_path=str(train_path), save_dir=str(save_dir))
    return [f"{key}={','.join(v) if isinstance(v, list) else v}" for key, v in values.items()]


def build_inputs() -> None:
    """The files a user downloads, in their real layout, at tiny scale (random weights)."""
    from llama_ner.tiny_models import (  # in a child: this process stays small
        make_tiny_chinese_loras,
        make_tiny_original,
    )

    make_tiny_original(TINY, dim=128)  # hidden 128: room enough to memorize 16 answers quickly
    make_tiny_chinese_loras(TINY, TINY)


def write_rows(src: Path, dst: Path, n: int, max_answer_chars: int = 0) -> Path:
    """The first n rows of src (0: all); with max_answer_chars, only rows with a short entity answer."""
    lines = src.read_text(encoding="utf-8").splitlines()
    if max_answer_chars:
        answers = [json.loads(line)["answer"] for line in lines]
        lines = [line for line, a in zip(lines, answers, strict=True) if a != "没有" and len(a) <= max_answer_chars]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n".join(lines[:n] if n else lines) + "\n", encoding="utf-8")
    return dst


def steps(scale: dict) -> list[tuple[str, list[str], str]]:
    """(name, command, output) in pipeline order."""
    merged = TINY / "chinese-alpaca-7b"
    loras = f"{TINY}/chinese-llama-plus-lora-7b,{TINY}/chinese-alpaca-plus-lora-7b"
    train_args = f"{TRAIN_DIR}/adapter_model/train_args.json"
    train_data = ["--train_path=" + str(DEMO_DATA / "train.txt")] if scale["train_rows"] else []
    memo_data = DEMO_DATA / "memorize.txt"
    test = [PY, "test.py", f"--train_args_path={train_args}", f"--dev_path={DEMO_DATA / 'dev.txt'}"]
    return [
        ("build tiny LLaMA + LoRAs", [PY, "demo.py", "--build_inputs"], str(TINY)),
        (
            "convert",
            [PY, "convert_llama_weights_to_hf.py", "--input_dir", str(TINY), "--model_size", "7B"]
            + ["--output_dir", str(TINY / "7B-hf")],
            str(TINY / "7B-hf"),
        ),
        (
            "merge 2 LoRAs",
            [PY, "merge_llama_with_chinese_lora.py", "--base_model", str(TINY / "7B-hf"), "--lora_model", loras]
            + ["--output_type", "huggingface", "--output_dir", str(merged)],
            str(merged),
        ),
        ("process", [PY, "process.py"], "data/msra/instruct_data/"),
        (
            "train (deepspeed x2)",
            [*DEEPSPEED, "--num_gpus", "2", "train_trainer.py", "--data_name=demo", f"--model_dir={merged}"]
            + [f"--save_dir={TRAIN_DIR}", *train_data, f"--dev_path={DEMO_DATA / 'dev.txt'}", "--num_train_epochs=1"],
            f"{TRAIN_DIR}/adapter_model",
        ),
        ("test", [*test, "--max_new_tokens=32"], f"{TRAIN_DIR}/test_metrics.json"),
        ("predict", [PY, "predict.py", f"--train_args_path={train_args}", "--max_new_tokens=32"], "(printed)"),
        (
            "learning check: train",
            [PY, "train_trainer.py", "data_name=demo_memorize", *hard_train_argv(merged, memo_data, MEMO_DIR)],
            f"{MEMO_DIR}/adapter_model",
        ),
        (
            "learning check: test",
            [PY, "test.py", f"--train_args_path={MEMO_DIR}/adapter_model/train_args.json", f"--dev_path={memo_data}"],
            f"{MEMO_DIR}/test_metrics.json",
        ),
    ]


def read_metrics(save_dir: str) -> dict | None:
    path = Path(save_dir) / "test_metrics.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def print_summary(results: list, scale: dict) -> dict | None:
    """The table of steps and the two F1s; returns the learning check's metrics."""
    print("\n" + "=" * 100)
    print(f"{'step':<24} {'status':<7} {'time':>7} {'peak RSS':>9}  output")
    for name, _cmd, code, seconds, peak, output in results:
        status = "ok" if code == 0 else f"exit {code}"
        print(f"{name:<24} {status:<7} {seconds:6.1f}s {peak / 2**20:7.0f}MB  {output}")
    print(f"{'total':<24} {'':<7} {sum(r[3] for r in results):6.1f}s  (peak RSS: the step's whole process tree)")
    base, learned = read_metrics(TRAIN_DIR), read_metrics(MEMO_DIR)
    if base:
        print(
            f"MSRA dev, first {scale['eval_rows']} rows: P={base['precision']:.3f} R={base['recall']:.3f} "
            f"F1={base['f1']:.3f}  (random base model: this F1 means nothing)"
        )
    if learned:
        print(
            f"learning check, {scale['memorize_rows']} trained rows: P={learned['precision']:.3f} "
            f"R={learned['recall']:.3f} F1={learned['f1']:.3f}  (near 1.0: training and evaluation work)"
        )
    print("commands:")
    for name, cmd, *_ in results:
        print(f"  [{name}] {' '.join(cmd)}")
    return learned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="smallest scale: fewer rows everywhere")
    parser.add_argument("--build_inputs", action="store_true", help="only build the tiny model and LoRAs")
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.build_inputs:
        build_inputs()
        return
    scale = SCALES["smoke" if args.smoke else "full"]
    shutil.rmtree(TINY, ignore_errors=True)
    for old in (TRAIN_DIR, MEMO_DIR):
        shutil.rmtree(Path(old).parent, ignore_errors=True)
    write_rows(ROOT / "tests/data/msra_dev_instruct.txt", DEMO_DATA / "memorize.txt", scale["memorize_rows"], 20)
    results = []
    for name, cmd, output in steps(scale):
        if name == "train (deepspeed x2)":  # process.py has written instruct_data/ by now
            write_rows(Path("data/msra/instruct_data/train.txt"), DEMO_DATA / "train.txt", scale["train_rows"])
            write_rows(Path("data/msra/instruct_data/dev.txt"), DEMO_DATA / "dev.txt", scale["eval_rows"])
        print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
        code, seconds, peak = run_measured(cmd)
        results.append((name, cmd, code, seconds, peak, output))
        if code != 0:
            break
    learned = print_summary(results, scale)
    if results[-1][2] != 0:
        sys.exit(f"demo failed at step '{results[-1][0]}' (exit {results[-1][2]}); its output is above")
    if learned is None or learned["f1"] < MIN_LEARNED_F1:
        sys.exit(f"learning check failed: F1 below {MIN_LEARNED_F1} on the rows the LoRA was trained on")


if __name__ == "__main__":
    main()
