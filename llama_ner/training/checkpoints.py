"""Saving and resuming: save_dir/adapter_model/ holds the adapter, train_args.json and STATE_FILE.

Both trainers save with `save_adapter` and `resume_state` (step, total steps, process count, resolved
config, optimizer checkpoint), read it back with `state_to_resume`, which refuses a resume whose
SAME_FOR_RESUME keys differ, and end with `run_summary`. With validation by F1 (eval_f1_rows),
`BestAdapter` scores each saved adapter, logs save_dir/validation.jsonl, keeps the best in
save_dir/best_adapter and, at the end, makes it adapter_model (the last one: last_adapter_model).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from config_utils import Config, ConfigError, load_config, save_config
from llama_ner.io_utils import atomic_dir, atomic_write_text
from llama_ner.training.processes import barrier, is_main_process, world_size

ADAPTER_DIR = "adapter_model"  # save_dir/adapter_model holds the adapter and train_args.json
BEST_DIR = "best_adapter"  # with eval_f1_rows: the best-F1 adapter so far, adapter_model at the end
LAST_DIR = "last_adapter_model"  # with eval_f1_rows: the last adapter, when it was not the best
VALIDATION_FILE = "validation.jsonl"  # with eval_f1_rows: one line per validation (step, minutes, P/R/F1)
STATE_FILE = "resume_state.json"  # beside the adapter: step, total steps, world size, resolved config

# a resumed run must agree with the saved one on these: model, data, batches, the optimizer and scheduler's
# settings (the saved state holds them: a new value would be ignored), prompt, precision, process count
SAME_FOR_RESUME = ("model_dir", "peft_path", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
SAME_FOR_RESUME += ("train_path", "train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "seed")
SAME_FOR_RESUME += ("max_seq_length", "learning_rate", "warmup_ratio", "max_grad_norm", "zero_stage")
SAME_FOR_RESUME += ("quantization_bit", "precision", "prompt_template", "world_size")


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable parameters, gathered first when ZeRO-3 has partitioned them.

    Every process must call this (the gather is collective).
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    partitioned = [p for _, p in named if hasattr(p, "ds_id")]
    gather = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    with gather:
        return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in named}


def save_adapter(model: torch.nn.Module, save_dir: str | Path, args: Config, state: dict | None = None) -> Path:
    """Write save_dir/adapter_model (safetensors adapter, train_args.json, state) on rank 0, atomically.

    `model` is the PeftModel (engine.module under DeepSpeed). Every process must call this.
    """
    weights = trainable_state_dict(model)
    out = Path(save_dir) / ADAPTER_DIR
    if is_main_process():
        with atomic_dir(out) as tmp:
            model.save_pretrained(str(tmp), state_dict=weights, safe_serialization=True)
            save_config(args, tmp / "train_args.json")
            if state is not None:
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    barrier()
    return out


def resume_state(args: Config, global_step: int, total_steps: int, checkpoint: str) -> dict[str, Any]:
    """What both trainers save beside the adapter (STATE_FILE): the step reached, the run's length,
    the process count, the resolved config, and the optimizer checkpoint (relative to save_dir)."""
    return {
        "global_step": global_step,
        "total_steps": total_steps,
        "world_size": world_size(),
        "checkpoint": checkpoint,
        "train_args": args.to_dict(),
    }


def load_state(save_dir: str | Path) -> dict[str, Any] | None:
    """The state saved beside the last adapter, or None when there is none."""
    path = Path(save_dir) / ADAPTER_DIR / STATE_FILE
    if not path.is_file():
        return None
    return load_config(path, fix="start over with resume=false")


def state_to_resume(args: Config) -> dict[str, Any] | None:
    """resume=true: the state saved beside the adapter, checked against `args` (call before the model
    loads); None (with a note when resume=true) when the run starts from step 0."""
    if not args.resume:
        return None
    state = load_state(args.save_dir)
    if state is None:
        if is_main_process():
            print(f"resume: nothing saved in {Path(args.save_dir) / ADAPTER_DIR} yet; starting from step 0")
        return None
    check_resume(state, args)
    if is_main_process():
        print(f"resuming from {args.save_dir} at step {state['global_step']}/{state['total_steps']}")
    return state


def check_resume(state: dict[str, Any], args: Config) -> None:
    """A resumed run must see the same model, data, batch settings, quantization, precision and
    process count as the saved one."""
    saved = {**state["train_args"], "world_size": state["world_size"]}
    now = {**args.to_dict(), "world_size": world_size()}
    for key in SAME_FOR_RESUME:
        if key in saved and saved[key] != now.get(key):  # a state saved by an older version may lack a key
            fix = f"pass {key}={saved[key]}"
            if key == "world_size":
                fix = f"start {saved[key]} processes"
            elif key == "precision":  # not a key: resolved from deepspeed.json's fp16/bf16 sections
                fix = f"train in {saved[key]} again ({args.deepspeed_json_path}'s fp16/bf16 sections)"
            raise ConfigError(
                f"resume: {key} was {saved[key]!r} in the saved run, now {now.get(key)!r}; "
                f"{fix} or start over with resume=false"
            )


def run_summary(steps: int, seconds: float, train_loss: float, dev_loss: float | None, save_dir: str | Path) -> str:
    """The one line both trainers end with."""
    dev = f", dev loss {dev_loss:.4f}" if dev_loss is not None else ""
    adapter = Path(save_dir) / ADAPTER_DIR
    return f"done: {steps} steps in {seconds:.0f}s, train loss {train_loss:.4f}{dev}; adapter in {adapter}"


def remove_old_checkpoints(folder: str | Path, keep: str) -> None:
    """Delete every DeepSpeed checkpoint tag in `folder` but `keep` (rank 0)."""
    folder = Path(folder)
    if not is_main_process() or not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_dir() and path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def rank(entry: dict[str, Any]) -> float:
    """What "best" means: F1, or exact match where F1 is undefined (no entity expected nor predicted)."""
    return entry["f1"] if entry["f1"] is not None else entry["exact_match"]


class BestAdapter:
    """Validation by F1 at each save: `score(model)` (rank 0; the others wait) -> test.py's metrics dict."""

    def __init__(self, save_dir: str | Path, score: Callable[[torch.nn.Module], dict[str, Any]], budget: Any) -> None:
        self.save_dir = Path(save_dir)
        self.score = score
        self.budget = budget  # time_budget.TimeBudget: validation is not training time
        self.history: list[dict[str, Any]] = []

    def validate(self, model: torch.nn.Module, step: int, train_loss: float | None) -> None:
        """Score the adapter just saved; copy it to best_adapter when its F1 is the best yet."""
        minutes = self.budget.spent() / 60
        with self.budget.paused():
            if is_main_process():
                self.record(self.score(model), step, minutes, train_loss)
            barrier()

    def record(self, metrics: dict[str, Any], step: int, minutes: float, train_loss: float | None) -> None:
        entry = {
            "step": step,
            "train_minutes": round(minutes, 2),
            "train_loss": train_loss,
            **{k: rounded(metrics[k]) for k in ("precision", "recall", "f1", "exact_match")},
            "per_type_f1": {kind: rounded(m["f1"]) for kind, m in metrics["per_type"].items()},
            "n": metrics["n"],
        }
        best = max(self.history, key=rank, default=None)
        self.history.append(entry)
        lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self.history)
        atomic_write_text(self.save_dir / VALIDATION_FILE, lines)
        better = best is None or rank(entry) >= rank(best)  # a tie goes to the longer-trained
        if better:
            with atomic_dir(self.save_dir / BEST_DIR) as tmp:
                shutil.copytree(self.save_dir / ADAPTER_DIR, tmp, dirs_exist_ok=True)
        print(
            f"validation at step {step} ({entry['train_minutes']:.1f} training min): P {entry['precision']} "
            f"R {entry['recall']} F1 {entry['f1']} on {entry['n']} rows" + (" (best so far)" if better else ""),
            flush=True,
        )

    def finish(self) -> dict[str, Any] | None:
        """Make the best-F1 adapter adapter_model (the last one moves to last_adapter_model); the best entry."""
        if not is_main_process() or not self.history:
            barrier()
            return None
        best, last = max(reversed(self.history), key=rank), self.history[-1]
        if best is not last:
            with atomic_dir(self.save_dir / LAST_DIR) as tmp:
                shutil.copytree(self.save_dir / ADAPTER_DIR, tmp, dirs_exist_ok=True)
            with atomic_dir(self.save_dir / ADAPTER_DIR) as tmp:
                shutil.copytree(self.save_dir / BEST_DIR, tmp, dirs_exist_ok=True)
        print(
            f"adapter_model is the best by validation F1: step {best['step']}, F1 {best['f1']}"
            + (f" (the last, step {last['step']}, is in {self.save_dir / LAST_DIR})" if best is not last else "")
        )
        barrier()
        return best
