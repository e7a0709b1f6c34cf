"""Saving and resuming: save_dir/adapter_model/ holds the adapter, train_args.json and STATE_FILE.

Both trainers save with `save_adapter` and `resume_state` (step, total steps, process count, resolved
config, optimizer checkpoint), read it back with `state_to_resume`, which refuses a resume whose
SAME_FOR_RESUME keys differ, and end with `run_summary`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from config_utils import Config, ConfigError, load_config, save_config
from llama_ner.io_utils import atomic_dir
from llama_ner.training.processes import barrier, is_main_process, world_size

ADAPTER_DIR = "adapter_model"  # save_dir/adapter_model holds the adapter and train_args.json
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
