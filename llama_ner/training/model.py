"""The model being trained and what it eats: tokenizer, base + LoRA (optionally 4/8-bit), batches and loss.

    model = build_model(args, load_train_tokenizer(args), "fp32")
    loss = causal_lm_loss(model, TrainCollate(args, tokenizer).collate_fn(rows[:12]))

Batches are padded to their own length and left-aligned, so every answer token sits in the last few
positions and the LM head runs only there (`logits_to_keep`): on LLaMA's 49954-token vocabulary the head
is most of a small model's compute and most of a big one's memory.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from config_utils import Config, ConfigError
from dataset import IGNORE_INDEX, NerCollate
from llama_ner.model_loading import check_adapter_fits, keep_off_cpu_packing, load_base, match_vocab
from llama_ner.tokenizer import load_tokenizer
from llama_ner.training.processes import is_main_process, train_device


def load_train_tokenizer(args: Config):
    """The LoRA's own tokenizer when peft_path ships one (Chinese-Alpaca LoRA), else model_dir's."""
    if args.peft_path and any(
        (Path(args.peft_path) / name).is_file() for name in ("tokenizer.model", "tokenizer.json")
    ):
        return load_tokenizer(args.peft_path)
    return load_tokenizer(args.model_dir)


def lora_config(args: Config):
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=list(args.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def build_model(args: Config, tokenizer: Any, precision: str) -> torch.nn.Module:
    """The base model in the training dtype with a new LoRA (or peft_path's, trainable)."""
    from peft import PeftModel, get_peft_model

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    torch.manual_seed(args.seed)
    model = load_base(args.model_dir, args.quantization_bit, dtype, train_device())
    match_vocab(model, tokenizer)
    model.config.use_cache = False
    if args.quantization_bit:
        model = prepare_kbit(model, dtype)
    if args.quantization_bit == 4:
        keep_off_cpu_packing(model)  # the dev loss runs without grad, where bitsandbytes would repack
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if args.peft_path:
        check_adapter_fits(model, args.peft_path, args.model_dir)
        model = PeftModel.from_pretrained(model, args.peft_path, is_trainable=True)
    else:
        try:
            model = get_peft_model(model, lora_config(args))
        except ValueError as err:  # peft names the modules it could not find
            raise ConfigError(f"lora_target_modules={args.lora_target_modules}: {err}") from None
    if is_main_process():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    return model


def prepare_kbit(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """peft's preparation of a 4/8-bit base (every base weight frozen), back in the training dtype.

    prepare_model_for_kbit_training upcasts every unquantized weight (norms, embed_tokens,
    lm_head) to fp32; DeepSpeed casts them to the training dtype again. Casting here keeps the
    model consistent on its own and the fp32 copies out of the peak (at 7B, embed_tokens and
    lm_head in fp32 are 1.6 GB, a third of what the 4-bit layers weigh).
    """
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for param in model.parameters():
        if param.dtype == torch.float32 and dtype != torch.float32:
            param.data = param.data.to(dtype)
    return model


class TrainCollate(NerCollate):
    """NerCollate's batches left-aligned, with position ids, so all answer tokens end each row."""

    def collate_fn(self, batch: list[dict[str, Any] | str]) -> dict[str, torch.Tensor]:
        return left_align(super().collate_fn(batch))


def left_align(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move each right-padded row's tokens to the end; position ids count real tokens only."""
    mask = batch["attention_mask"]
    width = mask.shape[1]
    shift = width - mask.sum(1, keepdim=True)
    source = (torch.arange(width).unsqueeze(0) - shift) % width
    out = {key: value.gather(1, source) for key, value in batch.items()}
    out["position_ids"] = (out["attention_mask"].cumsum(1) - 1).clamp(min=0)
    return out


def length_grouped_order(lengths: list[int], batch_size: int, processes: int, seed: int, epoch: int) -> list[int]:
    """Every row's index once (the first few again, as DistributedSampler pads, so that every process gets
    as many rows): each run of batch_size * processes indices holds rows of similar length, in random order.

    Rows are shuffled (seed + epoch), cut into windows of 64 global batches, each window sorted by
    length, cut into global batches, and the batches shuffled: padding is small, order still random.
    """
    rng = random.Random(seed * 1000003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    while len(order) % processes:
        order.append(order[len(order) % len(lengths)])
    group = batch_size * processes
    window = 64 * group
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + group] for i in range(0, len(chunk), group)]
    rng.shuffle(batches)
    return [i for batch in batches for i in batch]


class LengthGroupedSampler(torch.utils.data.Sampler):
    """length_grouped_order as a sampler, new each epoch (set_epoch). rank=None: the whole order (the Trainer's
    accelerate hands each process its batches); rank=r: process r's slice of every global batch."""

    def __init__(self, lengths: list[int], batch_size: int, processes: int, seed: int, rank: int | None = None):
        self.lengths, self.batch_size, self.processes, self.seed, self.rank = lengths, batch_size, processes, seed, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        order = length_grouped_order(self.lengths, self.batch_size, self.processes, self.seed, self.epoch)
        if self.rank is None:
            return order
        group, share = self.batch_size * self.processes, []
        for start in range(0, len(order), group):
            chunk = order[start : start + group]
            size = len(chunk) // self.processes
            share += chunk[self.rank * size : (self.rank + 1) * size]
        return share

    def __iter__(self):
        return iter(self.order())

    def __len__(self) -> int:
        padded = -(-len(self.lengths) // self.processes) * self.processes
        return padded if self.rank is None else padded // self.processes


def row_length(row: dict[str, Any], args: Any) -> int:
    """Characters of a row's prompt and answer: the grouping key (tokens follow characters closely)."""
    return sum(len(row.get(key) or "") for key in (args.instruct_column, args.query_column, args.response_column))


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], bf16_autocast: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy over the label tokens, with logits only where labels are.

    The LM head runs on the positions from the first label onward (all of a left-aligned
    batch's answers): the same loss as the model's own, without the full logits tensor.
    `bf16_autocast`: the forward's matmuls in bf16 (weights and the loss stay fp32).
    """
    labels = batch["labels"]
    has_label = labels != IGNORE_INDEX
    first = torch.where(has_label.any(1), has_label.float().argmax(1), labels.shape[1]).min()
    keep = max(int(labels.shape[1] - first) + 1, 2)  # the logit before the first label predicts it
    keep = min(keep, labels.shape[1])
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    autocast = contextlib.nullcontext()
    if bf16_autocast:
        autocast = torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16)
    with autocast:
        logits = model(**kwargs, logits_to_keep=keep, use_cache=False).logits
    logits = logits[:, :-1].float()
    targets = labels[:, labels.shape[1] - keep + 1 :]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
