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
from dataset import IGNORE_INDEX, NerCollate

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_args(base_dir: Path, save_dir: Path, dev_path: Path, **overrides: Any) -> dict[str, Any]:
    """A train_args.json like the training scripts write."""
    return {
        "data_name": "msra",
        "model_dir": str(base_dir),
        "lora_r": 32,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
        "lora_target_modules": TARGET_MODULES,
        "max_seq_length": 256,
        "instruct_column": "instruct",
        "query_column": "query",
        "response_column": "answer",
        "train_path": str(dev_path),
        "dev_path": str(dev_path),
        "train_batch_size": 12,
        "learning_rate": 3e-3,
        "save_dir": str(save_dir),
        **overrides,
    }


def answer_loss(causal_lm: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy on the answer tokens only; the vocabulary projection runs on
    those positions alone (the prompt is ~90% of each row, and lm_head dominates the cost)."""
    hidden = causal_lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    logits = causal_lm.lm_head(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), labels[keep])


def train_memorized_lora(
    base_dir: Path, rows: list[dict[str, Any]], save_dir: Path, dev_path: Path, epochs: int = 120, seed: int = 0
) -> tuple[Path, list[float]]:
    """Fit a LoRA on `rows` (full batch) and save it with train_args.json; returns (save_dir, loss per epoch)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from model_utils import load_tokenizer

    args = train_args(Path(base_dir), Path(save_dir), Path(dev_path))
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(r=args["lora_r"], lora_alpha=args["lora_alpha"], lora_dropout=0.0, target_modules=TARGET_MODULES)
    model = get_peft_model(model, lora)
    batch = NerCollate(Config(args), tokenizer).collate_fn(rows)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args["learning_rate"])
    model.train()
    losses = []
    for _ in range(epochs):
        loss = answer_loss(model.base_model.model, batch)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapter = Path(save_dir) / "adapter_model"
    model.save_pretrained(adapter)
    save_config(args, adapter / "train_args.json")
    return Path(save_dir), losses
