"""Validation by F1 while training: the model being trained answers validation rows as test.py would
(its prompts, its constraint, greedy generation) and is scored entity by entity.

    metrics = validation_f1(model, tokenizer, rows, args)    # {"precision", "recall", "f1", ...}
"""

from __future__ import annotations

from typing import Any

import torch

from config_utils import Config
from llama_ner.generation.inference import answer_rows
from llama_ner.generation.loading import spec_from_config
from llama_ner.generation.metrics import score


def validation_f1(model: torch.nn.Module, tokenizer: Any, rows: list[dict[str, Any]], args: Config) -> dict[str, Any]:
    """Score `rows` with the training model (put back in training mode after), constrained as test.py is."""
    config = Config({**args.to_dict(), "constrained": True, "entity_types": "",
                     "max_new_tokens": args.eval_f1_max_new_tokens})  # fmt: skip
    spec = spec_from_config(config)  # the prompt, types and windows test.py would use for this run
    was_training = model.training
    use_cache = model.config.use_cache
    model.eval()
    model.config.use_cache = True
    try:
        with torch.no_grad():
            answers, _ = answer_rows(model, tokenizer, rows, config, spec, progress=False)
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
    return score([row[args.response_column] for row in rows], answers)
