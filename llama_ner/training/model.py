"""The model being trained and what it eats: tokenizer, base + LoRA (optionally 4/8-bit), batches and loss.

    model = build_model(args, load_train_tokenizer(args), "fp32")
    loss = causal_lm_loss(model, TrainCollate(args, tokenizer).collate_fn(rows[:12]))

Batches are padded to their own length and left-aligned, so every answer token sits in the last few
positions and the LM head runs only there (`logits_to_keep`): on LLaMA's 49954-token vocabulary the head
is most of a small model's compute and most of a big one's memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from config_utils import Config, ConfigError
from dataset import IGNORE_INDEX, NerCollate
from llama_ner.model_loading import check_adapter_fits, keep_off_cpu_packing, match_vocab, pretrained_kwargs
from llama_ner.tokenizer import load_tokenizer
from llama_ner.training.processes import is_main_process, train_device
from llama_ner.weights.model_files import check_model_dir


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
    from transformers import AutoModelForCausalLM

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    torch.manual_seed(args.seed)
    kwargs = pretrained_kwargs(args.quantization_bit, dtype, train_device())
    model = AutoModelForCausalLM.from_pretrained(check_model_dir(args.model_dir), **kwargs)
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


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the label tokens, with logits only where labels are.

    The LM head runs on the positions from the first label onward (all of a left-aligned
    batch's answers): the same loss as the model's own, without the full logits tensor.
    """
    labels = batch["labels"]
    has_label = labels != IGNORE_INDEX
    first = torch.where(has_label.any(1), has_label.float().argmax(1), labels.shape[1]).min()
    keep = max(int(labels.shape[1] - first) + 1, 2)  # the logit before the first label predicts it
    keep = min(keep, labels.shape[1])
    kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**kwargs, logits_to_keep=keep, use_cache=False).logits
    logits = logits[:, :-1].float()
    targets = labels[:, labels.shape[1] - keep + 1 :]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
