"""Greedy decoding with continuous batching: an answer that ends leaves the batch at once and waiting prompts
take the free places, so no forward pass is spent on answers already finished.

    ids = greedy_continuous(model, encoded, batch_size=16, max_new_tokens=256, eos_id=2, pad_id=2)

transformers' generate runs a batch until its longest answer ends: on MSRA's first 200 test rows (batches of 16
sorted by prompt length, gold answers) 58% of the row-steps go to rows already answered (bench/eval_speed.py).
Here each row's KV cache is dropped when its answer ends (</s> or max_new_tokens), and when a quarter of the
batch is free the next prompts are prefilled (on a copy of the shared prefix's cache, as generate.py lays
them out) and joined to the running cache, left-padded to one length: once cached, a key's place in the
cache does not matter, the attention mask and the positions (real tokens counted per row) say what is what.
Greedy over the same logits as generate's, so the answers are the same (up to float rounding of another
batch shape). A row's grammar masks its logits as the NER constraint does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from llama_ner.generation.ner_constraint import allowed_only
from llama_ner.generation.ner_grammar import State


def greedy_continuous(
    model: torch.nn.Module,
    encoded: list[list[int]],
    batch_size: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    prefix: Callable[[int], Any] | None = None,
    shared: int = 0,
    grammar: Callable[[int], Any] | None = None,
    progress: Any = None,
) -> list[list[int]]:
    """The generated ids of each prompt (its </s> included when it ended with one).

    `prefix(rows)` gives the KV cache, for that many rows, of the `shared` first tokens every prompt starts
    with (None: no shared prefix); `grammar(i)` the grammar (ner_grammar.TextGrammar) of prompt i's answer
    (None: unconstrained). `progress` (a tqdm bar, or None) advances by one per finished answer.
    """
    waiting = deque(sorted(range(len(encoded)), key=lambda i: len(encoded[i])))
    answers: list[list[int]] = [[] for _ in encoded]
    batch = None  # the running rows: Running
    while waiting or batch is not None:
        free = batch_size - (batch.size if batch else 0)
        if waiting and free >= max(1, batch_size // 4):
            take = [waiting.popleft() for _ in range(min(free, len(waiting)))]
            joined = prefill(model, [encoded[i] for i in take], take, pad_id, prefix, shared, grammar)
            batch = joined if batch is None else batch.join(joined)
        tokens = batch.next_tokens()
        ended = []
        for row, (i, token) in enumerate(zip(batch.index, tokens, strict=True)):
            answers[i].append(token)
            if token == eos_id or len(answers[i]) >= max_new_tokens:
                ended.append(row)
        if progress is not None and ended:
            progress.update(len(ended))
        batch = batch.step(model, tokens, ended)
    return answers


class Running:
    """The rows being generated: their prompt indices, KV cache, attention mask, next positions, last logits,
    and grammar states (None: unconstrained)."""

    def __init__(self, index, cache, mask, positions, logits, grammars, states) -> None:
        self.index: list[int] = index
        self.cache = cache
        self.mask: torch.Tensor = mask  # [rows, cached columns]: 1 where a real token is cached
        self.positions: torch.Tensor = positions  # [rows]: the position the next token takes
        self.logits: torch.Tensor = logits  # [rows, vocab]: for the next token
        self.grammars: list[Any] | None = grammars
        self.states: list[Any] | None = states

    @property
    def size(self) -> int:
        return len(self.index)

    def next_tokens(self) -> list[int]:
        """Each row's greedy next token, among what its grammar allows."""
        logits = self.logits if self.grammars is None else allowed_only(self.logits, self.grammars, self.states)
        tokens = logits.argmax(-1).tolist()
        if self.grammars is not None:
            self.states = [g.step(s, t) for g, s, t in zip(self.grammars, self.states, tokens, strict=True)]
        return tokens

    def step(self, model: torch.nn.Module, tokens: list[int], ended: list[int]) -> Running | None:
        """Drop the `ended` rows, then run the others' tokens through the model; None when no row is left."""
        gone = set(ended)
        keep = [r for r in range(self.size) if r not in gone]
        if not keep:
            return None
        if ended:
            self.select(keep)
            tokens = [tokens[r] for r in keep]
        device = self.mask.device
        self.mask = torch.cat([self.mask, torch.ones(len(keep), 1, dtype=self.mask.dtype, device=device)], dim=1)
        with torch.inference_mode():
            out = model(
                input_ids=torch.tensor(tokens, device=device)[:, None],
                attention_mask=self.mask,
                position_ids=self.positions[:, None],
                past_key_values=self.cache,
                use_cache=True,
            )
        self.cache, self.logits = out.past_key_values, out.logits[:, -1, :].float()
        self.positions = self.positions + 1
        return self

    def select(self, keep: list[int]) -> None:
        """Keep only these rows, and drop cache columns no kept row has a real token in."""
        rows = torch.tensor(keep, device=self.mask.device)
        self.index = [self.index[r] for r in keep]
        self.mask, self.positions, self.logits = self.mask[rows], self.positions[rows], self.logits[rows]
        if self.grammars is not None:
            self.grammars = [self.grammars[r] for r in keep]
            self.states = [self.states[r] for r in keep]
        first = int(self.mask.any(0).int().argmax())  # leading columns that are padding in every kept row
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[rows, :, first:], layer.values[rows, :, first:]

    def join(self, other: Running) -> Running:
        """These rows and `other`'s in one batch, the shorter cache left-padded to the longer one's length."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for part in (self, other):
            pad = width - part.mask.shape[1]
            if pad:
                part.mask = torch.nn.functional.pad(part.mask, (pad, 0))
                for layer in part.cache.layers:
                    layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, pad, 0))
                    layer.values = torch.nn.functional.pad(layer.values, (0, 0, pad, 0))
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys, mine.values = torch.cat([mine.keys, theirs.keys]), torch.cat([mine.values, theirs.values])
        self.index += other.index
        self.mask = torch.cat([self.mask, other.mask])
        self.positions = torch.cat([self.positions, other.positions])
        self.logits = torch.cat([self.logits, other.logits])
        if self.grammars is not None:
            self.grammars += other.grammars
            self.states += other.states
        return self


def prefill(
    model: torch.nn.Module,
    prompts: list[list[int]],
    index: list[int],
    pad_id: int,
    prefix: Callable[[int], Any] | None,
    shared: int,
    grammar: Callable[[int], Any] | None,
) -> Running:
    """The prompts run through the model at once (left-padded after the shared prefix, whose cache is copied)."""
    device = next(model.parameters()).device
    rests = [ids[shared:] for ids in prompts]
    width = max(map(len, rests))
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rests], device=device)
    mask = torch.tensor([[1] * shared + [0] * (width - len(r)) + [1] * len(r) for r in rests], device=device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)[:, shared:]
    with torch.inference_mode():
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=prefix(len(prompts)) if prefix is not None else None,
            use_cache=True,
            logits_to_keep=1,
        )
    grammars = [grammar(i) for i in index] if grammar is not None else None
    states = [State() for _ in index] if grammar is not None else None
    return Running(index, out.past_key_values, mask, mask.sum(1), out.logits[:, -1, :].float(), grammars, states)
