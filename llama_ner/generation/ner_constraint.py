"""Constrained decoding of NER answers: `没有`, or distinct `实体_类型` lines grounded in the text.

    constraint = NerConstraint(tokenizer, texts, ("人名", "地名", "机构名"))   # texts[i]: prompt i's text
    answers = generate_answers(model, tokenizer, prompts, constraint=constraint)
    python -m llama_ner.generation.ner_constraint --text 北京是中国的首都。 --out ner.gbnf   # the grammar for llama.cpp

The answers allowed, over the bytes the answer tokens spell (sentencepiece's `▁` is a space,
a `<0xNN>` piece is one byte, so byte-fallback pieces work like any other):

    ANSWER = " "? ( "没有" | LINE ( "\\n" LINE )* ) </s>        LINE = ENTITY "_" TYPE

ENTITY is a non-empty substring of the text that neither starts nor ends with whitespace and
holds no line break; TYPE is one of the entity types; no LINE twice. The optional space is the
one sentencepiece puts before the first word (training encodes answers that way); decoding
strips it. The type is what follows the last `_` of a line (as metrics.py reads it), so an
entity may contain `_` when the text does.

`NerLogitsProcessor` masks every token that would leave this language, so greedy decoding picks
the model's best allowed token at each step and an answer that was already valid comes out
unchanged. Per text, the positions of the text where each vocabulary piece matches are found
once; per step only the pieces that continue the current line's occurrences in the text, plus a
handful of separator and type pieces, are looked at. If max_new_tokens ends an answer in the
middle of a line, `NerConstraint.close` drops that unfinished line (no line left: `没有`).

Why a LogitsProcessor of our own and not xgrammar, outlines or lm-format-enforcer: each row
has its own language ("a substring of this text"), a grammar of workable size cannot forbid a
repeated line, and none of them was installed or measured here (docs/constrained_decoding.md).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from config_utils import answer_help_first
from dataset import NO_ENTITY, QUERY_PREFIX, build_prompt, load_data, ner_row, prompt_format
from llama_ner.generation.metrics import ENTITY_TYPES, parse_line
from llama_ner.io_utils import UserError, atomic_write_text, check_output_file, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of `python -m llama_ner.generation.ner_constraint`: the GBNF grammar of one text."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text", required=True, help="the sentence to label (without 文本：)")
    p.add_argument("--entity_types", default="", help="comma-separated; default: those of --train_path, else MSRA's")
    p.add_argument("--train_path", default="", help="training data (JSON lines) whose answers give the types")
    p.add_argument("--max_lines", type=int, default=0, help="at most this many answer lines (0: no limit)")
    p.add_argument("--out", default="", help="write the grammar here (default: print it)")
    p.add_argument("--prompt_out", default="", help="also write the model prompt here (llama-cli -f)")
    p.add_argument(
        "--prompt_template",
        default="alpaca",
        choices=["alpaca", "chat", "raw"],
        help="the prompt format the LoRA was trained with (its train_args.json prompt_template)",
    )
    p.add_argument(
        "--tokenizer_dir", default="", help="the model's tokenizer folder (needed for --prompt_template chat)"
    )
    return p.parse_args(argv)


if __name__ == "__main__":  # answer --help before torch and transformers load (seconds)
    answer_help_first(parse_args)

import numpy as np
import torch
from transformers import LogitsProcessor

from llama_ner.tokenizer import load_tokenizer, token_bytes

NOTHING = NO_ENTITY.encode()
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines splits on


# ---- entity types -------------------------------------------------------------------------------


def check_types(types: Sequence[str], where: str) -> tuple[str, ...]:
    """Distinct types, each non-empty, without `_`, whitespace at its ends or a line break."""
    out = tuple(dict.fromkeys(t.strip() for t in types if t.strip()))
    bad = [t for t in out if "_" in t or any(c in LINE_BREAKS for c in t)]
    if not out or bad:
        raise UserError(f"{where}: entity types must be non-empty and hold no '_' or line break, got {list(types)}")
    return out


def load_entity_types(
    spec: str = "", train_path: str | Path | None = None, column: str = "answer", strict: bool = False
) -> tuple[str, ...]:
    """Types from `spec` ("人名,地名"), else those in train_path's answers, else MSRA's three.

    A train_path that cannot be read (train_args.json records it relative to where training ran)
    or holds no typed answer is a warning, not an error: MSRA's types are right for MSRA, and an
    adapter can be evaluated without its training data; the warning names the override. With
    `strict` (a path the user typed) it is an error.
    """
    if spec:
        return check_types(spec.split(","), "entity_types")
    if not train_path:
        print(f"entity types: MSRA's {'/'.join(ENTITY_TYPES)} (no training data given)")
        return ENTITY_TYPES
    if strict:
        rows = load_data(train_path, (column,))  # a missing or unreadable file is the user's one-line error
    elif not Path(train_path).is_file():
        return msra_types_instead(
            f"training data {train_path} not found (a relative path is read from the current directory)"
        )
    else:
        try:
            rows = load_data(train_path, (column,))
        except (UserError, OSError) as err:
            return msra_types_instead(f"cannot read the training data ({err})")
    found = [pair[1] for row in rows for line in str(row[column]).splitlines() if (pair := parse_line(line))]
    if not found:
        return msra_types_instead(f"no typed answer in the training data {train_path}")
    types = check_types(found, f"{train_path}")
    print(f"entity types from {train_path}: {'/'.join(types)}")
    return types


def msra_types_instead(why: str) -> tuple[str, ...]:
    print(
        f"warning: {why}: constrained answers use MSRA's types {'/'.join(ENTITY_TYPES)}; if the data has other "
        "types, pass them: entity_types=A,B (--entity_types A,B for chat_ner.py / serve.py / ner_constraint.py)",
        file=sys.stderr,
    )
    return ENTITY_TYPES


def text_of_query(query: str, instruct: str = "") -> str:
    """The text an answer's entities come from: the query without `文本：`, else the instruction."""
    return query.removeprefix(QUERY_PREFIX) if query else instruct


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


# ---- generation ----------------------------------------------------------------------------------


class NerLogitsProcessor(LogitsProcessor):
    """Masks, row by row, every token that would leave the row's allowed answers (left-padded batch)."""

    def __init__(self, grammars: list[TextGrammar], prompt_width: int) -> None:
        self.grammars = grammars
        self.states = [State() for _ in grammars]
        self.seen = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for column in input_ids[:, self.seen :].T.tolist():
            self.states = [g.step(s, t) for g, s, t in zip(self.grammars, self.states, column, strict=True)]
        self.seen = input_ids.shape[1]
        allowed = [g.allowed_ids(s) for g, s in zip(self.grammars, self.states, strict=True)]
        rows = torch.from_numpy(np.repeat(np.arange(len(allowed)), [a.size for a in allowed])).to(scores.device)
        columns = torch.from_numpy(np.concatenate(allowed)).to(scores.device)
        masked = torch.full_like(scores, float("-inf"))  # one pass over the logits; the allowed ones are few
        masked[rows, columns] = scores[rows, columns]
        return masked


class NerConstraint:
    """The NER answer constraint for a list of prompts: texts[i] is the text of prompt i."""

    def __init__(self, tokenizer: Any, texts: Sequence[str], types: Sequence[str] = ENTITY_TYPES) -> None:
        self.vocab = vocab_of(tokenizer)
        self.texts = list(texts)
        self.types = check_types(types, "entity types")

    def grammar(self, index: int) -> TextGrammar:
        return TextGrammar(self.texts[index], self.types, self.vocab)

    def processor(self, indices: Sequence[int], prompt_width: int) -> NerLogitsProcessor:
        """The logits processor for one batch: row r generates the answer for prompt indices[r].

        A prompt of prompt_width tokens shows the model at most prompt_width * vocab.longest
        characters of its text: a longer text (cut to fit the model) is cut there too, so its
        grammar is built over what the model can have seen, not over the whole input.
        """
        seen = prompt_width * self.vocab.longest
        for i in indices:
            self.texts[i] = self.texts[i][:seen]
        return NerLogitsProcessor([self.grammar(i) for i in indices], prompt_width)

    def close(self, index: int, answer: str) -> str:
        """An answer cut by max_new_tokens: drop its unfinished last line (nothing left: `没有`)."""
        grammar, lines = self.grammar(index), answer.split("\n")
        while lines and not grammar.is_valid("\n".join(lines)):
            lines.pop()
        return "\n".join(lines) or NO_ENTITY


# ---- GBNF for llama.cpp --------------------------------------------------------------------------


def gbnf_literal(text: str) -> str:
    """A GBNF string literal; quotes, backslashes and control characters escaped."""
    out = []
    for ch in text:
        if ch in '"\\' or ord(ch) < 0x20 or ch in LINE_BREAKS or ch.isspace():
            out.append(f"\\x{ord(ch):02X}" if ord(ch) < 0x100 else f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def gbnf(text: str, types: Sequence[str] = ENTITY_TYPES, max_lines: int = 0) -> str:
    """The same answers as a GBNF grammar for llama.cpp, for one text. GBNF cannot forbid a
    repeated line; `max_lines` (0: no limit) bounds the number of lines instead."""
    types = check_types(types, "entity types")
    chars = list(text)
    breaks = [c in LINE_BREAKS for c in chars]
    live = [False] * (len(chars) + 1)  # an entity can start at char i and end after a non-space char
    for i in range(len(chars) - 1, -1, -1):
        live[i] = not breaks[i] and (not chars[i].isspace() or live[i + 1])
    rules = []
    for i in range(len(chars) - 1, -1, -1):
        if not live[i]:
            continue
        rest = f"e{i + 1}" if live[i + 1] else ""
        if chars[i].isspace():
            rules.append(f"e{i} ::= {gbnf_literal(chars[i])} {rest}")
        else:
            rules.append(f"e{i} ::= {gbnf_literal(chars[i])}" + (f" {rest}?" if rest else ""))
    starts = [f"e{i}" for i in range(len(chars)) if live[i] and not chars[i].isspace()]
    lines = "line" + ("" if max_lines == 1 else ' ("\\n" line)' + ("*" if max_lines <= 0 else f"{{0,{max_lines - 1}}}"))
    head = [f'root ::= " "? ({gbnf_literal(NO_ENTITY)}' + (f" | {lines})" if starts else ")")]
    if starts:
        head += ['line ::= entity "_" type', "type ::= " + " | ".join(gbnf_literal(t) for t in types)]
        head.append("entity ::= " + " | ".join(starts))
    return "\n".join(head + rules[::-1]) + "\n"


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.max_lines < 0:
        raise UserError(f"--max_lines {args.max_lines}: pass a positive number, or 0 for no limit")
    if args.prompt_template == "chat" and not args.tokenizer_dir:
        raise UserError("--prompt_template chat needs --tokenizer_dir (the model folder whose chat template it is)")
    inputs = [args.train_path] if args.train_path else []
    for flag, path in (("--out", args.out), ("--prompt_out", args.prompt_out)):
        if path:  # before any work; an output never replaces an input
            check_output_file(path, flag, inputs)
    if args.out and args.prompt_out and Path(args.out).resolve() == Path(args.prompt_out).resolve():
        raise UserError(f"--out and --prompt_out are both {args.out}: pass two different files")
    with contextlib.redirect_stdout(sys.stderr):  # stdout may be the grammar
        types = load_entity_types(args.entity_types, args.train_path or None, strict=True)
    grammar = gbnf(args.text, types, args.max_lines)
    if args.prompt_out:
        row = ner_row(args.text)
        tokenizer = load_tokenizer(args.tokenizer_dir) if args.tokenizer_dir else None
        fmt = prompt_format(args.prompt_template, tokenizer)
        atomic_write_text(Path(args.prompt_out), build_prompt(row["instruct"], row["query"], fmt))
    if args.out:
        atomic_write_text(Path(args.out), grammar)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(grammar, end="")
    return grammar


if __name__ == "__main__":
    run_cli(main)
