"""The whole pipeline on a tiny random LLaMA, as a user would type it (`make demo`).

    python demo.py                 # CPU, a few minutes
    python demo.py --keep_going    # run every step even after a failure

It builds a tiny original-format LLaMA and two tiny LoRAs shaped like Chinese-LLaMA-Plus and
Chinese-Alpaca-Plus under model_hub/tiny/, then runs convert -> merge -> process -> train
(DeepSpeed, 2 processes) -> test -> predict, and a learning check: a LoRA trained hard on
16 rows must reproduce them. It ends with one table: command, time, peak memory, output.
A random base cannot recognise entities: its F1 on MSRA means nothing; the learning
check's F1 shows that training and evaluation work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from io_utils import run_measured
from train_utils import hard_train_argv

ROOT = Path(__file__).resolve().parent
PY = sys.executable
DEEPSPEED = [PY, "-m", "deepspeed.launcher.runner"] if shutil.which("deepspeed") is None else ["deepspeed"]
TINY = Path("model_hub/tiny")
DEMO_DATA = Path("data/demo")
EVAL_ROWS = 64  # dev rows test.py scores in the demo (a random model talks until max_new_tokens)
MEMORIZE_ROWS = 16


def build_inputs() -> None:
    """The files a user downloads, in their real layout, at tiny scale (random weights)."""
    from tiny_models import make_tiny_chinese_loras, make_tiny_original

    make_tiny_original(TINY, dim=128)  # hidden 128: room enough to memorize 16 answers quickly
    make_tiny_chinese_loras(TINY, TINY)


def head_rows(src: Path, dst: Path, n: int, max_answer_chars: int = 0) -> Path:
    """The first n rows of src (with an entity and a short answer, when max_answer_chars is set)."""
    lines = src.read_text(encoding="utf-8").splitlines()
    if max_answer_chars:
        answers = [json.loads(line)["answer"] for line in lines]
        lines = [line for line, a in zip(lines, answers, strict=True) if a != "没有" and len(a) <= max_answer_chars]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n".join(lines[:n]) + "\n", encoding="utf-8")
    return dst


def steps() -> list[tuple[str, list[str], str]]:
    """(name, command, output) in pipeline order."""
    merged = TINY / "chinese-alpaca-7b"
    loras = f"{TINY}/chinese-llama-plus-lora-7b,{TINY}/chinese-alpaca-plus-lora-7b"
    train_dir = "checkpoint/demo/train_trainer"
    memo_dir = "checkpoint/demo_memorize/train_trainer"
    train_args = f"{train_dir}/adapter_model/train_args.json"
    memo_args = f"{memo_dir}/adapter_model/train_args.json"
    memo_data = DEMO_DATA / "memorize.txt"
    dev_head = DEMO_DATA / "dev_head.txt"
    return [
        ("build tiny LLaMA + LoRAs", [PY, "demo.py", "--build_inputs"], str(TINY)),
        (
            "convert",
            [
                PY,
                "convert_llama_weights_to_hf.py",
                "--input_dir",
                str(TINY),
                "--model_size",
                "7B",
                "--output_dir",
                str(TINY / "7B-hf"),
            ],
            str(TINY / "7B-hf"),
        ),
        (
            "merge 2 LoRAs",
            [
                PY,
                "merge_llama_with_chinese_lora.py",
                "--base_model",
                str(TINY / "7B-hf"),
                "--lora_model",
                loras,
                "--output_type",
                "huggingface",
                "--output_dir",
                str(merged),
            ],
            str(merged),
        ),
        ("process", [PY, "process.py"], "data/msra/instruct_data/"),
        (
            "train (deepspeed x2)",
            [
                *DEEPSPEED,
                "--num_gpus",
                "2",
                "train_trainer.py",
                "--data_name=demo",
                f"--model_dir={merged}",
                f"--save_dir={train_dir}",
                "--num_train_epochs=1",
                "--train_batch_size=8",
                "--save_steps=1000",
                "--eval_steps=1000",
            ],
            f"{train_dir}/adapter_model",
        ),
        (
            "test",
            [PY, "test.py", f"--train_args_path={train_args}", f"--dev_path={dev_head}", "--max_new_tokens=32"],
            f"{train_dir}/test_metrics.json",
        ),
        ("predict", [PY, "predict.py", f"--train_args_path={train_args}", "--max_new_tokens=32"], "stdout"),
        (
            "learning check: train",
            [PY, "train_trainer.py", "data_name=demo_memorize", *hard_train_argv(merged, memo_data, memo_dir)],
            f"{memo_dir}/adapter_model",
        ),
        (
            "learning check: test",
            [PY, "test.py", f"--train_args_path={memo_args}", f"--dev_path={memo_data}"],
            f"{memo_dir}/test_metrics.json",
        ),
    ]


def read_metrics(train_args: str) -> dict:
    args = json.loads(Path(train_args).read_text(encoding="utf-8"))
    return json.loads((Path(args["save_dir"]) / "test_metrics.json").read_text(encoding="utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build_inputs", action="store_true", help="only build the tiny model and LoRAs")
    parser.add_argument("--keep_going", action="store_true", help="run every step even after a failure")
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.build_inputs:
        build_inputs()
        return
    shutil.rmtree(TINY, ignore_errors=True)
    head_rows(ROOT / "tests/data/msra_dev_instruct.txt", DEMO_DATA / "memorize.txt", MEMORIZE_ROWS, 20)
    results = []
    for name, cmd, output in steps():
        if name == "test":
            head_rows(Path("data/msra/instruct_data/dev.txt"), DEMO_DATA / "dev_head.txt", EVAL_ROWS)
        print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
        code, seconds, peak = run_measured(cmd)
        results.append((name, cmd, code, seconds, peak, output))
        if code != 0 and not args.keep_going:
            break
    print_summary(results)
    if any(code != 0 for _, _, code, *_ in results) or len(results) < len(steps()):
        sys.exit(1)


def print_summary(results: list) -> None:
    print("\n" + "=" * 100)
    print(f"{'step':<24} {'status':<7} {'time':>7} {'peak RSS':>9}  output")
    for name, _cmd, code, seconds, peak, output in results:
        status = "ok" if code == 0 else f"exit {code}"
        print(f"{name:<24} {status:<7} {seconds:6.1f}s {peak / 2**20:7.0f}MB  {output}")
    total = sum(r[3] for r in results)
    print(f"{'total':<24} {'':<7} {total:6.1f}s")
    for label, path, note in [
        (
            "random base on MSRA dev",
            "checkpoint/demo/train_trainer/adapter_model/train_args.json",
            f"first {EVAL_ROWS} dev rows; a random base cannot do NER, so this F1 means nothing",
        ),
        (
            "learning check",
            "checkpoint/demo_memorize/train_trainer/adapter_model/train_args.json",
            f"the {MEMORIZE_ROWS} rows it was trained on; near 1.0 shows training and evaluation work",
        ),
    ]:
        if Path(path).is_file():
            try:
                m = read_metrics(path)
                print(f"{label}: P={m['precision']:.3f} R={m['recall']:.3f} F1={m['f1']:.3f} ({note})")
            except (OSError, KeyError, json.JSONDecodeError):
                pass
    print("commands:")
    for name, cmd, *_ in results:
        print(f"  [{name}] {' '.join(cmd)}")


if __name__ == "__main__":
    main()
