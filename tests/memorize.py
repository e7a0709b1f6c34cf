"""Train a LoRA that memorizes a few rows, for tests that need a model that knows answers.

    save_dir = train_memorized_lora(base_dir, rows, tmp_path / "run")
    # save_dir/adapter_model/{adapter_config.json, adapter_model.safetensors, train_args.json}

A plain torch loop (no Trainer) so the evaluation tests do not depend on the training
scripts: LoRA r=32 on all 7 projections, lr 3e-3, no dropout, full batch. On a 2-layer
hidden-64 model 80 epochs reproduce 12 MSRA rows under greedy decoding with a smallest
teacher-forced logit margin of 0.09; 120 epochs raise it to 0.35, safe on other machines.
(The loss stays near 9.6: the random lm_head keeps logits flat; only the argmax moves.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from config_utils import Config, save_config
from dataset import NerCollate, answer_types, load_data, shared_instruction
from demo import MEMORIZE_OVERRIDES
from llama_ner.training.model import causal_lm_loss
from llama_ner.training.train_config import TRAIN_DEFAULTS


def train_args(base_dir: Path, save_dir: Path, dev_path: Path, rows: int, epochs: int) -> dict[str, Any]:
    """The train_args.json the training scripts would write for this run (the demo's memorize recipe)."""
    run = {"model_dir": str(base_dir), "save_dir": str(save_dir), "train_path": str(dev_path)}
    run |= {"dev_path": str(dev_path), "train_batch_size": rows, "num_train_epochs": epochs, "max_seq_length": 256}
    trained = answer_types(load_data(dev_path)[:rows])  # as the training scripts record it
    return {**TRAIN_DEFAULTS, **MEMORIZE_OVERRIDES, **run, "trained_entity_types": trained}


def train_memorized_lora(
    base_dir: Path,
    rows: list[dict[str, Any]],
    save_dir: Path,
    dev_path: Path,
    epochs: int = 120,
    seed: int = 0,
    quantization_bit: int = 0,
    prompt_template: str = "alpaca",
) -> tuple[Path, list[float]]:
    """Fit a LoRA on `rows` (full batch) and save it with train_args.json; returns (save_dir, loss per epoch).

    quantization_bit=4/8 trains on a bitsandbytes base loaded and prepared as the trainers do (QLoRA).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llama_ner.model_loading import pretrained_kwargs
    from llama_ner.tokenizer import load_tokenizer
    from llama_ner.training.model import prepare_kbit

    args = train_args(Path(base_dir), Path(save_dir), Path(dev_path), len(rows), epochs)
    args["quantization_bit"] = quantization_bit
    args["ner_instruction"] = shared_instruction(rows)  # as the training scripts record it
    args["prompt_template"] = prompt_template
    args["max_seq_length"] = 512 if prompt_template == "chat" else args["max_seq_length"]  # the system prompt too
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, **pretrained_kwargs(quantization_bit, torch.float32, "cpu"))
    if quantization_bit:
        model = prepare_kbit(model, torch.float32)
    targets = args["lora_target_modules"]
    lora = LoraConfig(r=args["lora_r"], lora_alpha=args["lora_alpha"], lora_dropout=0.0, target_modules=targets)
    model = get_peft_model(model, lora)
    batch = NerCollate(Config(args), tokenizer).collate_fn(rows)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args["learning_rate"])
    model.train()
    losses = []
    for _ in range(epochs):
        loss = causal_lm_loss(model, batch)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapter = Path(save_dir) / "adapter_model"
    model.save_pretrained(adapter)
    save_config(args, adapter / "train_args.json")
    return Path(save_dir), losses
