"""Batched greedy generation: prompts encoded as in training, cut to the model's positions, answers decoded
up to EOS. The token prefix every prompt shares (template head, instruction, `文本：`) is computed once and
its KV cache reused by every batch.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch

from dataset import ALPACA, PromptFormat, fit_prompt
from llama_ner.generation.continuous import greedy_continuous
from llama_ner.io_utils import UserError


def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    batch_size: int = 16,
    max_new_tokens: int = 128,
    progress: bool = True,
    constraint: Any = None,
    prompt_format: PromptFormat = ALPACA,
    prefix_cache: bool = True,
    continuous: bool = True,
    **gen_kwargs: Any,
) -> list[str]:
    """Continue each prompt (greedy unless gen_kwargs say otherwise) and return the new text.

    Prompts are tokenized as in training (BOS, no EOS), sorted by length so a batch holds
    similar lengths, left-padded, and generated with the KV cache until `</s>` or
    max_new_tokens. Only the generated tokens up to the first `</s>` are decoded.
    `constraint` (e.g. ner_constraint.NerConstraint) limits what each answer may be: its
    `processor(indices, prompt_width)` masks the logits of a batch, its `close(index, answer)`
    finishes an answer that max_new_tokens cut. With `prefix_cache`, the tokens all prompts start with
    are run once; each row is then prefix + padding + the rest of its prompt (the padding masked, the
    positions counting real tokens only), the same attention as left padding. Greedy decoding (no gen_kwargs)
    is `continuous` (continuous.py: a finished answer leaves the batch, a waiting prompt takes its place);
    continuous=False, sampling and sliding-window models run transformers' generate batch by batch.
    """
    from tqdm import tqdm
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    positions = getattr(model.config, "max_position_embeddings", None)
    encoded = encode_prompts(positions, tokenizer, prompts, max_new_tokens, prompt_format.tail)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = {"do_sample": False, "num_beams": 1, "use_cache": True, **gen_kwargs}
    answers: list[str] = [""] * len(prompts)
    shared = shared_prefix_length(encoded) if prefix_cache and len(prompts) > 1 else 0
    prefix = prefix_kv(model, encoded[0][:shared], device) if shared >= MIN_PREFIX else None
    shared = shared if prefix is not None else 0
    if continuous and not gen_kwargs and not getattr(model.config, "sliding_window", None):
        grammar = (lambda i: constraint.seen_grammar(i, len(encoded[i]))) if constraint is not None else None
        bar = tqdm(total=len(prompts), desc="generate", unit="answer", disable=not progress or len(prompts) < 2)
        generated = greedy_continuous(
            model, encoded, batch_size, max_new_tokens, tokenizer.eos_token_id, pad_id,
            (lambda rows: batch_of(prefix, rows)) if prefix is not None else None, shared, grammar, bar,
        )  # fmt: skip
        bar.close()
        return [finished_answer(tokenizer, constraint, i, ids) for i, ids in enumerate(generated)]
    starts = range(0, len(order), max(1, batch_size))
    for start in tqdm(starts, desc="generate", unit="batch", disable=not progress or len(starts) < 2):
        index = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in index)
        pads = [width - len(encoded[i]) for i in index]
        input_ids = torch.tensor(
            [encoded[i][:shared] + [pad_id] * pad + encoded[i][shared:] for i, pad in zip(index, pads, strict=True)],
            device=device,
        )
        attention_mask = torch.tensor(
            [[1] * shared + [0] * pad + [1] * (len(encoded[i]) - shared) for i, pad in zip(index, pads, strict=True)],
            device=device,
        )
        if constraint is not None:
            extra = list(gen_kwargs.get("logits_processor") or [])
            settings["logits_processor"] = LogitsProcessorList([*extra, constraint.processor(index, width)])
        with torch.inference_mode():
            if prefix is not None:
                settings["past_key_values"] = batch_of(prefix, len(index))
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad_id,
                **settings,
            )
        for row, i in enumerate(index):
            answers[i] = finished_answer(tokenizer, constraint, i, output[row, width:].tolist())
    return answers


def finished_answer(tokenizer: Any, constraint: Any, index: int, ids: list[int]) -> str:
    """Prompt `index`'s answer from its generated ids, finished by the constraint (closed if cut, one type an
    entity)."""
    answer = decode_new_tokens(tokenizer, ids)
    if constraint is not None:
        return constraint.finish(index, answer, tokenizer.eos_token_id not in ids)
    return answer


MIN_PREFIX = 8  # a shorter shared prefix saves less than copying its cache costs


def shared_prefix_length(encoded: list[list[int]]) -> int:
    """How many leading token ids every prompt shares, leaving each at least one token of its own."""
    shared = min(len(ids) for ids in encoded) - 1
    first = encoded[0]
    for ids in encoded[1:]:
        same = 0
        while same < shared and ids[same] == first[same]:
            same += 1
        shared = same
    return max(shared, 0)


def prefix_kv(model: torch.nn.Module, prefix: list[int], device: torch.device) -> Any:
    """The KV cache of the shared prefix (one row), or None when it is too short to be worth it."""
    if len(prefix) < MIN_PREFIX:
        return None
    with torch.inference_mode():
        return model(input_ids=torch.tensor([prefix], device=device), use_cache=True).past_key_values


def batch_of(prefix: Any, rows: int) -> Any:
    """A copy of the one-row prefix cache for `rows` rows (generation appends to it)."""
    cache = copy.deepcopy(prefix)
    cache.batch_repeat_interleave(rows)
    return cache


def prompt_budget(positions: int | None, max_new_tokens: int) -> int | None:
    """Tokens a prompt may have: the model's positions (config.json's max_position_embeddings) minus
    max_new_tokens (None: the model sets no limit)."""
    if positions is None:
        return None
    if max_new_tokens >= positions:
        raise UserError(
            f"max_new_tokens={max_new_tokens} leaves no room for the input: the model takes {positions} positions "
            "in all; lower max_new_tokens"
        )
    return positions - max_new_tokens


def encode_prompts(
    positions: int | None, tokenizer: Any, prompts: list[str], max_new_tokens: int, tail: str = ALPACA.tail
) -> list[list[int]]:
    """Token ids of each prompt, cut (the query's end, as training cuts) to fit the model with max_new_tokens.

    Prints one warning naming the inputs that were cut. Every entry point that generates calls this.
    """
    budget = prompt_budget(positions, max_new_tokens)
    if budget is None:
        return [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    fitted = [fit_prompt(tokenizer, p, budget, tail) for p in prompts]
    cut = [i + 1 for i, (_, was_cut) in enumerate(fitted) if was_cut]
    if cut:
        shown = ", ".join(map(str, cut[:10])) + (", ..." if len(cut) > 10 else "")
        print(
            f"warning: {len(cut)} input(s) longer than the model takes were cut to {budget} tokens (the end of the "
            f"query dropped, as in training): the model has {budget + max_new_tokens} positions, max_new_tokens="
            f"{max_new_tokens}; input(s) {shown}",
            file=sys.stderr,
        )
    return [ids for ids, _ in fitted]


def decode_new_tokens(tokenizer: Any, ids: list[int]) -> str:
    """Text of generated ids up to (not including) the first `</s>`, stripped."""
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
