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

The language itself (the bytes of tokens, `TextGrammar`) is generation/ner_grammar.py; this module holds the
entity types, the transformers processor, the GBNF for llama.cpp and its command line.
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
from llama_ner.generation.metrics import ENTITY_TYPES, ordered_pairs, parse_line
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

from llama_ner.generation.ner_grammar import LINE_BREAKS, State, TextGrammar, vocab_of
from llama_ner.tokenizer import load_tokenizer

# ---- entity types -------------------------------------------------------------------------------


def check_types(types: Sequence[str], where: str) -> tuple[str, ...]:
    """Distinct types, each non-empty, without `_`, whitespace at its ends or a line break."""
    out = tuple(dict.fromkeys(t.strip() for t in types if t.strip()))
    bad = [t for t in out if "_" in t or any(c in LINE_BREAKS for c in t)]
    if not out or bad:
        raise UserError(f"{where}: entity types must be non-empty and hold no '_' or line break, got {list(types)}")
    return out


def load_entity_types(
    spec: str = "",
    train_path: str | Path | None = None,
    column: str = "answer",
    strict: bool = False,
    trained: str = "",
) -> tuple[str, ...]:
    """Types from `spec` ("人名,地名"), else `trained` (train_args.json's trained_entity_types, recorded by
    training), else those in train_path's answers (adapters trained before it was recorded), else MSRA's three.

    A train_path that cannot be read (train_args.json records it relative to where training ran)
    or holds no typed answer is a warning, not an error: MSRA's types are right for MSRA, and an
    adapter can be evaluated without its training data; the warning names the override. With
    `strict` (a path the user typed) it is an error.
    """
    if spec:
        return check_types(spec.split(","), "entity_types")
    if trained:
        types = check_types(trained.split(","), "trained_entity_types")
        print(f"entity types the adapter was trained on (train_args.json): {'/'.join(types)}")
        return types
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
        return allowed_only(scores, self.grammars, self.states)


def allowed_only(scores: torch.Tensor, grammars: Sequence[TextGrammar], states: Sequence[State]) -> torch.Tensor:
    """scores [rows, vocab] with every token row r's grammar does not allow from states[r] set to -inf."""
    allowed = [g.allowed_ids(s) for g, s in zip(grammars, states, strict=True)]
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
        return NerLogitsProcessor([self.seen_grammar(i, prompt_width) for i in indices], prompt_width)

    def seen_grammar(self, index: int, prompt_tokens: int) -> TextGrammar:
        """The grammar of prompt `index` over the part of its text a prompt of prompt_tokens tokens can show."""
        self.texts[index] = self.texts[index][: prompt_tokens * self.vocab.longest]
        return self.grammar(index)

    def finish(self, index: int, answer: str, cut: bool) -> str:
        """The answer as returned: closed when max_new_tokens cut it, then one type an entity (its first line's):
        greedy answers loop over the types of one fragment (`卢嘉_地名`, `卢嘉_机构名`); dropping the later lines
        raised validation F1 0.507 -> 0.532, forbidding them in the grammar lowered it (BENCHMARKS.md)."""
        typed: dict[str, str] = {}
        for entity, kind in ordered_pairs(self.close(index, answer) if cut else answer):
            typed.setdefault(entity, kind)
        return "\n".join(f"{entity}_{kind}" for entity, kind in typed.items()) or NO_ENTITY

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
