"""LoRA fine-tuning with the Hugging Face Trainer and DeepSpeed (deepspeed.json).

    deepspeed train_trainer.py
    deepspeed --num_gpus 2 train_trainer.py lora_r=16 learning_rate=3e-4 num_train_epochs=3
    torchrun --nproc_per_node 2 train_trainer.py resume=true

Saves save_dir/adapter_model (PEFT adapter + train_args.json) every save_steps optimizer
steps and at the end; save_dir/checkpoint-N holds the Trainer's resume state (optimizer,
scheduler, data position) that `resume=true` continues from.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from config_utils import Config, ConfigError, answer_help_first
from dataset import answer_types, longest_text, shared_instruction
from llama_ner.io_utils import run_cli
from llama_ner.training.train_config import TRAIN_DEFAULTS, parse_train_args

DEFAULTS = {**TRAIN_DEFAULTS, "save_dir": "./checkpoint/msra/train_trainer/"}  # adapter: save_dir/adapter_model
if __name__ == "__main__":  # answer --help before torch and transformers load (seconds)
    answer_help_first(lambda: parse_train_args(DEFAULTS, __doc__, source=__file__))

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from llama_ner.training.checkpoints import (
    ADAPTER_DIR,
    STATE_FILE,
    BestAdapter,
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
from llama_ner.training.processes import init_distributed, is_main_process, leave_distributed
from llama_ner.training.time_budget import TimeBudget, budget_scheduler


class LoraTrainer(Trainer):
    """The Trainer with our loss (logits only where labels are: training.model.causal_lm_loss), batches of
    similar lengths (group_by_length) and a rate that decays over the time budget (train_minutes)."""

    loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by the accumulation steps

    def __init__(self, *args, run_args: Config, budget: TimeBudget, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.run_args, self.budget = run_args, budget

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = causal_lm_loss(model, inputs, self.run_args.bf16_autocast)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _get_train_sampler(self, train_dataset=None):
        if not self.run_args.group_by_length:
            return super()._get_train_sampler(train_dataset)
        rows = train_dataset if train_dataset is not None else self.train_dataset
        lengths = [row_length(row, self.run_args) for row in rows]
        processes = self.args.world_size
        return LengthGroupedSampler(lengths, self.args.per_device_train_batch_size, processes, self.args.seed)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if not self.run_args.train_minutes or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        warmup = self.args.get_warmup_steps(num_training_steps)
        self.lr_scheduler = budget_scheduler(optimizer or self.optimizer, self.budget, warmup)
        return self.lr_scheduler


class SaveAdapterCallback(TrainerCallback):
    """Write save_dir/adapter_model (gathered under ZeRO-3, atomically) whenever the Trainer saves, and at the end;
    with eval_f1_rows, score each one (BestAdapter); stop when the time budget is spent."""

    def __init__(self, run_args: Config, budget: TimeBudget, best: BestAdapter | None) -> None:
        self.run_args, self.budget, self.best = run_args, budget, best
        self.validated_step = -1

    def save(self, state, model) -> None:
        resume = resume_state(self.run_args, state.global_step, state.max_steps, f"checkpoint-{state.global_step}")
        save_adapter(model, self.run_args.save_dir, self.run_args, resume)
        if self.best is not None and self.validated_step != state.global_step:
            losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
            self.best.validate(model, state.global_step, losses[-1] if losses else None)
            self.validated_step = state.global_step

    def on_train_begin(self, args, state, control, **kwargs):
        self.budget.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.budget.over_everywhere():
            if is_main_process():
                print(f"train_minutes={self.run_args.train_minutes} spent at step {state.global_step}: stopping")
            control.should_training_stop = True

    def on_save(self, args, state, control, model=None, **kwargs):
        self.save(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.save(state, model)
        if self.best is not None:
            self.best.finish()


def training_arguments(args: Config, ds: dict, precision: str, evaluate: bool) -> TrainingArguments:
    """TrainingArguments taking every shared value from the filled DeepSpeed config `ds`."""
    opt = ds["optimizer"]["params"]
    return TrainingArguments(
        output_dir=args.save_dir,
        deepspeed=ds,
        per_device_train_batch_size=ds["train_micro_batch_size_per_gpu"],
        gradient_accumulation_steps=ds["gradient_accumulation_steps"],
        max_grad_norm=ds["gradient_clipping"],
        learning_rate=opt["lr"],
        adam_beta1=opt["betas"][0],
        adam_beta2=opt["betas"][1],
        adam_epsilon=opt["eps"],
        weight_decay=opt["weight_decay"],
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),  # else the Trainer refuses bf16 without a GPU; DeepSpeed still runs
        per_device_eval_batch_size=args.eval_batch_size,
        num_train_epochs=args.num_train_epochs,
        lr_scheduler_type="linear",
        warmup_steps=args.warmup_ratio,  # a float below 1 is a share of the steps
        logging_steps=args.log_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=1,
        eval_strategy="steps" if evaluate and args.eval_steps > 0 else "no",
        eval_steps=args.eval_steps if args.eval_steps > 0 else None,
        prediction_loss_only=True,
        label_names=["labels"],
        remove_unused_columns=False,  # rows are raw dicts; TrainCollate tokenizes them
        seed=args.seed,
        ddp_timeout=args.ddp_timeout,
        report_to="none",
    )


def count_cpu_processes(training_args: TrainingArguments) -> None:
    """Make accelerate see every DeepSpeed process on a CPU run.

    accelerate picks its backend from CUDA; on DeepSpeed's CPU accelerator it finds none and
    counts one process, so each rank would train on all the data and the dev-loss gather
    fails. torch.distributed already knows the truth (gloo): copy it over.
    """
    state = training_args.distributed_state  # created by TrainingArguments on first use of .device
    if torch.distributed.is_initialized() and state.num_processes != torch.distributed.get_world_size():
        state.num_processes = torch.distributed.get_world_size()
        state.process_index = torch.distributed.get_rank()
        state.local_process_index = int(os.environ.get("LOCAL_RANK", "0"))
        state.backend = torch.distributed.get_backend()


def last_checkpoint(save_dir: str | Path) -> str | None:
    """The newest save_dir/checkpoint-N the Trainer finished writing (trainer_state.json is its last file)."""
    done = [p for p in Path(save_dir).glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    done = [p for p in done if p.name.split("-")[-1].isdigit()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def remove_unfinished_checkpoints(save_dir: str | Path) -> None:
    """Delete the Trainer's checkpoint-N folders that lack trainer_state.json, which it writes last."""
    for folder in Path(save_dir).glob("checkpoint-*"):
        if folder.is_dir() and not (folder / "trainer_state.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            print(f"removed the unfinished {folder}", file=sys.stderr)


def checkpoint_to_resume(save_dir: str | Path) -> str:
    """The Trainer's newest finished checkpoint-N beside a saved resume state (it holds the optimizer,
    scheduler and data position); none is an error, not a silent restart."""
    checkpoint = last_checkpoint(save_dir)
    if checkpoint is None:
        raise ConfigError(
            f"resume: {Path(save_dir) / ADAPTER_DIR / STATE_FILE} was saved, but {save_dir} holds no finished "
            "checkpoint-N (the Trainer's optimizer state) to continue from; start over with resume=false"
        )
    return checkpoint


def validation_tracker(args: Config, train_rows: list[dict], tokenizer, budget: TimeBudget) -> BestAdapter:
    """eval_f1_rows: score each saved adapter on the validation rows, as test.py would (generation)."""
    from llama_ner.generation.validation import validation_f1

    rows = validation_rows(args, train_rows)
    return BestAdapter(args.save_dir, lambda model: validation_f1(model, tokenizer, rows, args), budget)


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
    print_run_config(args)
    ds = deepspeed_config(args, precision)
    args.learning_rate = ds["optimizer"]["params"]["lr"]  # train_args.json records the rate used
    training_args = training_arguments(args, ds, precision, evaluate=bool(dev_rows))
    _ = training_args.device  # sets up accelerate's process state
    count_cpu_processes(training_args)
    state = state_to_resume(args)  # checked before the model loads
    resume_from = checkpoint_to_resume(args.save_dir) if state is not None else None

    tokenizer = load_train_tokenizer(args)
    model = build_model(args, tokenizer, precision)
    budget = TimeBudget(args.train_minutes)
    best = validation_tracker(args, train_rows, tokenizer, budget) if args.eval_f1_rows else None
    trainer = LoraTrainer(
        model=model,
        args=training_args,
        train_dataset=train_rows,
        eval_dataset=dev_rows or None,
        data_collator=TrainCollate(args, tokenizer).collate_fn,
        callbacks=[SaveAdapterCallback(args, budget, best)],
        run_args=args,
        budget=budget,
    )

    start = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    except BaseException:
        remove_unfinished_checkpoints(args.save_dir)  # a save cut short (a full disk) must not look resumable
        raise
    seconds = time.time() - start
    final_dev_loss = trainer.evaluate()["eval_loss"] if dev_rows else None
    if is_main_process():
        print(run_summary(result.global_step, seconds, result.training_loss, final_dev_loss, args.save_dir))
    leave_distributed()


if __name__ == "__main__":
    run_cli(main)
