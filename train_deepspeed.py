"""LoRA fine-tuning with a plain DeepSpeed loop (deepspeed.initialize, backward, step).

    deepspeed --num_gpus 1 train_deepspeed.py
    deepspeed --num_gpus 2 train_deepspeed.py zero_stage=3 num_train_epochs=2
    mpirun --allow-run-as-root --oversubscribe -np 2 python train_deepspeed.py resume=true

Saves save_dir/adapter_model (PEFT adapter + train_args.json) every save_steps optimizer
steps and at the end; save_dir/deepspeed_checkpoint holds the optimizer state that
`resume=true` continues from.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

from config_utils import Config, ConfigError, answer_help_first
from dataset import IGNORE_INDEX, answer_types, longest_text, shared_instruction
from llama_ner.io_utils import UserError, disk_fault, run_cli
from llama_ner.training.train_config import TRAIN_DEFAULTS, parse_train_args

DEFAULTS = {**TRAIN_DEFAULTS, "save_dir": "./checkpoint/msra/train_deepspeed/"}  # adapter: save_dir/adapter_model
if __name__ == "__main__":  # answer --help before torch and DeepSpeed load (seconds)
    answer_help_first(lambda: parse_train_args(DEFAULTS, __doc__, source=__file__))

import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from llama_ner.training.checkpoints import (
    BestAdapter,
    remove_old_checkpoints,
    resume_state,
    run_summary,
    save_adapter,
    state_to_resume,
)
from llama_ner.training.checks import (
    check_inputs,
    deepspeed_config,
    print_run_config,
    read_deepspeed_json,
    resolve_autocast,
    resolve_precision,
    validation_rows,
)
from llama_ner.training.model import (
    LengthGroupedSampler,
    TrainCollate,
    build_model,
    causal_lm_loss,
    load_train_tokenizer,
    row_length,
)
from llama_ner.training.processes import init_distributed, is_main_process, leave_distributed, rank, world_size
from llama_ner.training.time_budget import TimeBudget, budget_scheduler

CHECKPOINT_DIR = "deepspeed_checkpoint"  # optimizer + LoRA state for resume, under save_dir


def make_loader(rows: list[dict], batch_size: int, collate: TrainCollate, shuffle: bool, args: Config) -> DataLoader:
    """This process's batches; training batches hold rows of similar length when group_by_length is on."""
    if shuffle and args.group_by_length:
        lengths = [row_length(row, args) for row in rows]
        sampler = LengthGroupedSampler(lengths, batch_size, world_size(), args.seed, rank())
    else:
        sampler = DistributedSampler(rows, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=args.seed)
    return DataLoader(rows, batch_size=batch_size, sampler=sampler, collate_fn=collate.collate_fn)


def add_scheduler(ds: dict, total_steps: int, warmup_ratio: float) -> dict:
    """Linear warmup then linear decay to 0 over the run, unless deepspeed.json names a scheduler."""
    lr = ds["optimizer"]["params"]["lr"]
    ds.setdefault(
        "scheduler",
        {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": total_steps,
                "warmup_min_lr": 0.0,
                "warmup_max_lr": lr,
                "warmup_num_steps": max(1, math.ceil(warmup_ratio * total_steps)),  # DeepSpeed needs >= 1
                "warmup_type": "linear",
            },
        },
    )
    return ds


def log(message: str) -> None:
    """Print on rank 0 without breaking the progress bar."""
    if is_main_process():
        tqdm.write(message)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def sum_across_ranks(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over every process."""
    totals = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(totals)
    return totals.tolist()


def dev_loss(engine, loader: DataLoader) -> float:
    """Token-weighted dev loss over every rank's share of the dev rows."""
    engine.eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            loss_sum += causal_lm_loss(engine, to_device(batch, engine.device)).item() * count
            tokens += count
    engine.train()
    loss_sum, tokens = sum_across_ranks([loss_sum, tokens], engine.device)
    return loss_sum / max(tokens, 1)


def save(engine, args: Config, global_step: int, total_steps: int) -> None:
    """Optimizer state first, then the adapter that names it: a kill between the two keeps the old pair.
    A save that fails (a full disk) leaves no part of its checkpoint behind."""
    checkpoints = Path(args.save_dir) / CHECKPOINT_DIR
    tag = f"global_step{global_step}"
    try:
        engine.save_checkpoint(str(checkpoints), tag=tag, exclude_frozen_parameters=True)
    except (OSError, RuntimeError) as err:
        fault = disk_fault(err, checkpoints / tag)  # before the removal frees the disk again
        shutil.rmtree(checkpoints / tag, ignore_errors=True)
        if fault is not None:
            raise UserError(f"writing {fault}") from None
        raise
    state = resume_state(args, global_step, total_steps, f"{CHECKPOINT_DIR}/{tag}")
    save_adapter(engine.module, args.save_dir, args, state)
    remove_old_checkpoints(checkpoints, keep=tag)


def check_checkpoint_complete(checkpoint: Path, processes: int) -> None:
    """The optimizer checkpoint a resume names holds the model states and every process's optimizer share,
    none of them empty: a cut one (a disk that filled, a copy stopped half-way) is refused, not loaded."""
    model_states = sorted(checkpoint.glob("*model_states.pt"))  # ZeRO-3: one per process
    shares = sorted(checkpoint.glob("*optim_states.pt"))  # ZeRO-1/2/3: one per process
    cut = [p.name for p in [*model_states, *shares] if p.stat().st_size == 0]
    if not model_states:
        cut = ["mp_rank_00_model_states.pt"]
    if cut or (shares and len(shares) != processes):
        found = f"{len(shares)} optimizer shares for {processes} processes" if not cut else f"{cut[0]} missing or empty"
        raise ConfigError(
            f"resume: {checkpoint} is incomplete ({found}): it was cut while saving; start over with resume=false "
            "(or restore that folder)"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_train_args(DEFAULTS, __doc__, argv, source=__file__)
    train_rows, dev_rows = check_inputs(args)  # user errors surface before any model loads
    args.ner_instruction = shared_instruction(train_rows, args.instruct_column)  # plain sentences get it
    args.trained_entity_types = answer_types(train_rows, args.response_column)  # constrained answers use them
    args.trained_text_chars = longest_text(train_rows, args.query_column)  # longer texts are answered in windows
    precision = resolve_precision(read_deepspeed_json(args.deepspeed_json_path))
    args.precision = precision  # train_args.json records the precision used
    args.bf16_autocast = resolve_autocast(args.bf16_autocast, precision)
    torch.set_flush_denormal(True)  # CPU: subnormal floats (softmax tails) take a slow path; ~0 changes nothing
    init_distributed(args.ddp_timeout)
    import deepspeed

    print_run_config(args)
    tokenizer = load_train_tokenizer(args)
    collate = TrainCollate(args, tokenizer)
    train_loader = make_loader(train_rows, args.train_batch_size, collate, shuffle=True, args=args)
    dev_loader = make_loader(dev_rows, args.eval_batch_size, collate, shuffle=False, args=args)
    batches_per_epoch = len(train_loader)
    total_steps = batches_per_epoch * args.num_train_epochs // args.gradient_accumulation_steps
    if total_steps == 0:
        raise ConfigError(
            f"{len(train_rows)} rows make {batches_per_epoch} batches per process per epoch: too few for "
            f"gradient_accumulation_steps={args.gradient_accumulation_steps}; lower it or train longer"
        )

    budget = TimeBudget(args.train_minutes)
    ds = deepspeed_config(args, precision)
    if not args.train_minutes:
        ds = add_scheduler(ds, total_steps, args.warmup_ratio)
    args.learning_rate = ds["optimizer"]["params"]["lr"]  # train_args.json records the rate used
    state = state_to_resume(args)  # checked before the model loads (and after the rate is resolved)
    model = build_model(args, tokenizer, precision)
    trainable = [p for p in model.parameters() if p.requires_grad]
    warmup = max(1, math.ceil(args.warmup_ratio * total_steps))
    scheduler = (lambda optimizer: budget_scheduler(optimizer, budget, warmup)) if args.train_minutes else None
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds, lr_scheduler=scheduler)
    best = None
    if args.eval_f1_rows:
        from llama_ner.generation.validation import validation_f1

        rows = validation_rows(args, train_rows)
        best = BestAdapter(args.save_dir, lambda module: validation_f1(module, tokenizer, rows, args), budget)

    global_step = 0
    if state is not None:
        checkpoint = Path(args.save_dir) / state["checkpoint"]
        check_checkpoint_complete(checkpoint, state["world_size"])
        engine.load_checkpoint(str(checkpoint.parent), tag=checkpoint.name, load_module_strict=False)
        global_step = state["global_step"]

    done_batches = global_step * args.gradient_accumulation_steps  # batches already trained on
    bar = tqdm(total=total_steps, initial=global_step, desc="train", disable=not is_main_process())
    window_loss, window_batches, run_loss, run_batches, start = 0.0, 0, 0.0, 0, time.time()
    last_loss = None
    budget.start()
    engine.train()
    try:
        for epoch in range(done_batches // batches_per_epoch, args.num_train_epochs):
            train_loader.sampler.set_epoch(epoch)  # same order per epoch on every run: resume can skip
            for i, batch in enumerate(train_loader):
                if epoch * batches_per_epoch + i < done_batches or global_step >= total_steps:
                    continue
                boundary = engine.is_gradient_accumulation_boundary()
                loss = causal_lm_loss(engine, to_device(batch, engine.device), args.bf16_autocast)
                engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps
                engine.step()  # steps the optimizer (and clips) only at an accumulation boundary
                window_loss += loss.item()
                window_batches += 1
                run_loss += loss.item()
                run_batches += 1
                if not boundary:
                    continue
                global_step += 1
                bar.update(1)
                if global_step % args.log_steps == 0 or global_step == total_steps:
                    loss_sum, count = sum_across_ranks([window_loss, window_batches], engine.device)
                    lr = engine.get_lr()[0]
                    last_loss = loss_sum / count
                    log(f"step {global_step}/{total_steps} epoch {epoch + 1} loss {last_loss:.4f} lr {lr:.2e}")
                    window_loss, window_batches = 0.0, 0
                if dev_rows and args.eval_steps > 0 and global_step % args.eval_steps == 0:
                    log(f"step {global_step}/{total_steps} dev loss {dev_loss(engine, dev_loader):.4f}")
                if budget.over_everywhere():
                    log(f"train_minutes={args.train_minutes} spent at step {global_step}: stopping")
                    break
                if global_step % args.save_steps == 0 and global_step < total_steps:
                    save(engine, args, global_step, total_steps)
                    if best is not None:
                        best.validate(engine.module, global_step, last_loss)
            else:
                continue
            break  # the time budget is spent
    finally:  # the bar ends before an error line, which stays the last one
        bar.close()
    save(engine, args, global_step, total_steps)
    if best is not None:
        best.validate(engine.module, global_step, last_loss)
        best.finish()
    seconds = time.time() - start
    loss_sum, count = sum_across_ranks([run_loss, run_batches], engine.device)
    final_dev_loss = dev_loss(engine, dev_loader) if dev_rows else None  # every rank takes part
    log(run_summary(global_step, seconds, loss_sum / max(count, 1), final_dev_loss, args.save_dir))
    leave_distributed()


if __name__ == "__main__":
    run_cli(main)
