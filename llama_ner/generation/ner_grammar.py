"""The byte-level language of valid NER answers for one text: the bytes every token spells (`Vocab`), where an
answer is (`State`), and which tokens may come next (`TextGrammar`). Works on bytes, so sentencepiece pieces,
byte fallbacks and byte-level BPE tokens that split a character are all handled alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dataset import NO_ENTITY
from llama_ner.tokenizer import token_bytes

NOTHING = NO_ENTITY.encode()
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines splits on


# ---- the vocabulary as bytes --------------------------------------------------------------------


class Vocab:
    """The bytes every token spells (None: never in an answer), with lookup tables. One per tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.eos_id: int = tokenizer.eos_token_id
        self.token_bytes: list[bytes | None] = token_bytes(tokenizer)
        self.by_bytes: dict[bytes, list[int]] = {}
        self.prefixes: set[bytes] = set()
        for i, data in enumerate(self.token_bytes):
            if data:
                self.by_bytes.setdefault(data, []).append(i)
                self.prefixes.update(data[:k] for k in range(1, len(data) + 1))
        self.longest = max(len(b.decode(errors="replace")) for b in self.token_bytes if b)  # chars of one token
        self.with_underscore = [i for i, b in enumerate(self.token_bytes) if b and b"_" in b]
        self.with_newline = [i for i, b in enumerate(self.token_bytes) if b and b"\n" in b]
        self.nothing = self.ids_inside(b" " + NOTHING)

    def ids_inside(self, data: bytes) -> list[int]:
        """Tokens whose bytes are a substring of `data`."""
        pieces = {data[i:j] for i in range(len(data)) for j in range(i + 1, len(data) + 1)}
        return sorted(i for piece in pieces for i in self.by_bytes.get(piece, ()))


def vocab_of(tokenizer: Any) -> Vocab:
    """The tokenizer's Vocab, built once (about a second for 49954 pieces) and kept on it."""
    vocab = getattr(tokenizer, "_ner_vocab", None)
    if vocab is None:
        vocab = Vocab(tokenizer)
        tokenizer._ner_vocab = vocab
    return vocab


# ---- the language for one text ------------------------------------------------------------------


class State:
    """Where one answer is: the current line's bytes, where they occur in the text, the lines done."""

    __slots__ = ("line", "occ", "done", "lead", "finished")

    def __init__(self, line=b"", occ=None, done=frozenset(), lead=True, finished=False) -> None:
        self.line: bytes = line
        self.occ: list[int] | None = occ  # text positions where `line` occurs as an entity start; None: line empty
        self.done: frozenset[tuple[bytes, bytes]] = done  # (entity, type) of the finished lines
        self.lead: bool = lead  # the answer's first byte may still be sentencepiece's space
        self.finished: bool = finished  # </s> was generated


class TextGrammar:
    """The allowed answers for one text, and the allowed next tokens from any State."""

    def __init__(self, text: str, types: Sequence[str], vocab: Vocab) -> None:
        for char in LINE_BREAKS:
            text = text.replace(char, "\n")
        self.hay = hay = text.encode()
        self.types = tuple(t.encode() for t in types)
        self.vocab = vocab
        n = len(hay)
        boundary = [e == n or hay[e] & 0xC0 != 0x80 for e in range(n + 1)]
        self.valid_end = [False] * (n + 1)  # an entity may end here: a char boundary after a non-space char
        char_start = 0
        for e in range(1, n + 1):
            if boundary[e]:
                self.valid_end[e] = not hay[char_start:e].decode().isspace()
                char_start = e
        self.next_end = [-1] * (n + 2)  # first valid end >= e reachable without crossing a line break
        for e in range(n, -1, -1):
            if self.valid_end[e]:
                self.next_end[e] = e
            elif e < n and hay[e] != 0x0A:
                self.next_end[e] = self.next_end[e + 1]
        self.starts = [p for p in range(n) if boundary[p] and self.valid_end[self._char_end(p)] and hay[p] != 0x0A]
        self.start_set = set(self.starts)
        self.cont = [self._matches(p, b"") for p in range(n + 1)]  # tokens continuing an entity at p
        self.start_ids = self._union([self.cont[p] for p in self.starts])
        self.space_start_ids = self._union([self._matches(p, b" ") for p in self.starts])
        self.sep_ids = [i for i in vocab.with_underscore if self._sep_may_fit(vocab.token_bytes[i])]
        types_and_breaks = {i for t in self.types for i in vocab.ids_inside(t)} | set(vocab.with_newline)
        self.type_ids = sorted(types_and_breaks)  # tokens that may continue a line after its `_`

    # -- precomputation helpers

    def _char_end(self, p: int) -> int:
        e = p + 1
        while e < len(self.hay) and self.hay[e] & 0xC0 == 0x80:
            e += 1
        return e

    def _matches(self, p: int, lead: bytes) -> np.ndarray:
        """Tokens spelling `lead` + hay[p:e] for some e, with an entity end reachable from e."""
        ids, hay, vocab = [], self.hay, self.vocab
        for e in range(p + 1, len(hay) + 1):
            chunk = lead + hay[p:e]
            if hay[e - 1] == 0x0A or chunk not in vocab.prefixes:
                break
            if self.next_end[e] >= 0:
                ids.extend(vocab.by_bytes.get(chunk, ()))
        return np.array(ids, dtype=np.int64)

    @staticmethod
    def _union(arrays: list[np.ndarray]) -> np.ndarray:
        return np.unique(np.concatenate(arrays)) if arrays else np.zeros(0, dtype=np.int64)

    def _sep_may_fit(self, data: bytes) -> bool:
        """Could a token holding `_` ever be allowed for this text? (cheap filter; advance() decides)"""
        head, _, tail = data.partition(b"_")
        head = head[1:] if head.startswith(b" ") else head  # the answer may start with a space
        if head and head not in self.hay:
            return False
        return b"_" in self.hay or any(t.startswith(tail) or tail.startswith(t + b"\n") for t in self.types)

    # -- the language

    def entity_ok(self, entity: bytes) -> bool:
        """A non-empty substring of the text at a char start, ending after a non-space char."""
        hay, at = self.hay, self.hay.find(entity) if entity else -1
        while at >= 0:
            if at in self.start_set and self.valid_end[at + len(entity)]:
                return True
            at = hay.find(entity, at + 1)
        return False

    def fully_used(self, done: frozenset) -> set[bytes]:
        """Entities already given with every type: they cannot start another line."""
        counts: dict[bytes, int] = {}
        for entity, _ in done:
            counts[entity] = counts.get(entity, 0) + 1
        return {e for e, c in counts.items() if c == len(self.types)}

    def complete_pair(self, line: bytes, done: frozenset) -> tuple[bytes, bytes] | None:
        """(entity, type) when `line` is a finished new line, else None."""
        entity, sep, kind = line.rpartition(b"_")
        if sep and kind in self.types and (entity, kind) not in done and self.entity_ok(entity):
            return entity, kind
        return None

    def can_end(self, st: State) -> bool:
        """May </s> come now?"""
        return (not st.done and st.line == NOTHING) or self.complete_pair(st.line, st.done) is not None

    def extends(self, st: State) -> bool:
        """Can the line grow into an entity (not used with every type yet)?"""
        full = self.fully_used(st.done)
        size, hay, n = len(st.line), self.hay, len(self.hay)
        for p in self.starts if st.occ is None else st.occ:
            e = self.next_end[p + size]
            while e >= 0:
                if e > p and (not full or hay[p:e] not in full):
                    return True
                if e == n or hay[e] == 0x0A:
                    break
                e = self.next_end[e + 1]
        return False

    def viable(self, st: State) -> bool:
        """Can this state still become an allowed answer?"""
        line = st.line
        if not st.done and NOTHING.startswith(line):
            return True
        entity, sep, part = line.rpartition(b"_")
        if sep and any(t.startswith(part) and (entity, t) not in st.done for t in self.types):
            if self.entity_ok(entity):
                return True
        return (st.occ is None or bool(st.occ)) and self.extends(st)

    def advance(self, st: State, data: bytes) -> State | None:
        """The state after the bytes `data`, or None when they leave the language."""
        line, occ, done, lead, hay = st.line, st.occ, st.done, st.lead, self.hay
        for c in data:
            if lead and c == 0x20 and not line and not done:
                lead = False
                continue
            lead = False
            if c == 0x0A:
                pair = self.complete_pair(line, done)
                if pair is None:
                    return None
                line, occ, done = b"", None, done | {pair}
                continue
            line += bytes((c,))
            at = len(line) - 1
            if occ is None:
                occ = [p for p in self.starts if hay[p] == c]
            elif occ:
                occ = [p for p in occ if p + at < len(hay) and hay[p + at] == c]
        new = State(line, occ, done, lead)
        return new if self.viable(new) else None

    def step(self, st: State, token: int) -> State:
        """The state after generating `token` (which allowed_ids allowed)."""
        if st.finished or token == self.vocab.eos_id:
            return State(st.line, st.occ, st.done, False, True)
        data = self.vocab.token_bytes[token] if token < len(self.vocab.token_bytes) else None
        new = self.advance(st, data) if data else None
        if new is None:
            raise RuntimeError(f"token {token} ({data!r}) was generated but the NER constraint forbids it")
        return new

    def allowed_ids(self, st: State) -> np.ndarray:
        """Every token that keeps `st` on the way to an allowed answer."""
        vocab = self.vocab
        if st.finished:
            return np.array([vocab.eos_id])
        if st.occ is None:
            fast = [self.start_ids, self.space_start_ids] if st.lead and not st.done else [self.start_ids]
        else:
            fast = [self.cont[p + len(st.line)] for p in st.occ]
        ids = np.concatenate(fast) if fast else np.zeros(0, dtype=np.int64)
        if ids.size and self.fully_used(st.done):  # rare: filter one by one
            ids = np.array([i for i in np.unique(ids) if self.advance(st, vocab.token_bytes[i])], dtype=np.int64)
        candidates = list(self.sep_ids)
        if not st.done and NOTHING.startswith(st.line):
            candidates += vocab.nothing
        if b"_" in st.line:
            candidates += self.type_ids
        extra = [i for i in candidates if self.advance(st, vocab.token_bytes[i]) is not None]
        if self.can_end(st):
            extra.append(vocab.eos_id)
        return np.concatenate([ids, np.array(extra, dtype=np.int64)])

    def is_valid(self, answer: str) -> bool:
        """Is a decoded answer one of the allowed ones (its leading space already stripped)?"""
        st = self.advance(State(), answer.encode())
        return st is not None and self.can_end(st)
