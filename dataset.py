"""Instruction data: loading, the prompt (alpaca, the tokenizer's chat template, or raw), and the training
collate function.

    rows = load_data("data/msra/instruct_data/train.txt")
    prompt = build_prompt(rows[0]["instruct"], rows[0]["query"])                  # the Alpaca prompt
    prompt = build_prompt(rows[0]["instruct"], rows[0]["query"], prompt_format("chat", tokenizer))
    batch = NerCollate(args, tokenizer).collate_fn(rows[:12])

Training and every inference script build prompts with `build_prompt` and the format training used
(train_args.json's prompt_template), so the text a model is trained on is exactly the text it is asked.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config_utils import ConfigError
from llama_ner.io_utils import UserError, read_lines

if TYPE_CHECKING:
    import torch

NER_INSTRUCTION = (
    "你现在是一个实体识别模型，你需要提取文本里面的人名、地名、机构名，"
    "如果存在结果，返回'实体_实体类型'，不同实体间用\n分隔。如果没有结果，回答'没有'。"
)
SHORT_INSTRUCTION = "找出文本中的人名、地名、机构名。"  # the same task in a tenth of the tokens
INSTRUCTIONS = {"seed": NER_INSTRUCTION, "short": SHORT_INSTRUCTION}  # process.py --instruction's names
QUERY_PREFIX = "文本："
NO_ENTITY = "没有"

PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: "
)

IGNORE_INDEX = -100
PROMPT_TEMPLATES = ("alpaca", "chat", "raw")  # prompt_template's values


class DataError(UserError):
    """Bad data file: the message names file:line and the fix."""

    prefix = "data error"


@dataclass(frozen=True)
class PromptFormat:
    """A prompt is head + instruction (+ newline + query) + tail; the answer follows the tail. A prompt too long
    for the model loses the end of its query, never the tail."""

    name: str
    head: str
    tail: str
    instruction: str = NER_INSTRUCTION  # what a plain sentence is asked with (ner_row): the one trained on

    def build(self, instruct: str, query: str = "") -> str:
        return self.head + (f"{instruct}\n{query}" if query else instruct) + self.tail


ALPACA = PromptFormat("alpaca", *PROMPT_TEMPLATE.split("{instruction}"))
RAW = PromptFormat("raw", "", "\n")  # instruction and text as they are, the answer on the next line


def prompt_format(name: str = "alpaca", tokenizer: Any = None, instruction: str = "") -> PromptFormat:
    """alpaca (the seed's prompt), chat (the tokenizer's chat template: one user turn, then the assistant's),
    or raw; `instruction`: the NER instruction plain sentences get ('' = the seed's)."""
    fmt = named_format(name, tokenizer)
    return replace(fmt, instruction=instruction) if instruction else fmt


def named_format(name: str, tokenizer: Any) -> PromptFormat:
    if name == "alpaca":
        return ALPACA
    if name == "raw":
        return RAW
    if name != "chat":
        raise ConfigError(f"prompt_template={name!r}: use one of {', '.join(PROMPT_TEMPLATES)}")
    if not getattr(tokenizer, "chat_template", None):
        where = getattr(tokenizer, "name_or_path", "") or "this model"
        raise ConfigError(
            f"prompt_template=chat: the tokenizer of {where} has no chat template (tokenizer_config.json "
            "chat_template or chat_template.jinja); use prompt_template=alpaca or raw"
        )
    marker = "\x00INSTRUCTION\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False
    )
    head, _, tail = without_added_bos(tokenizer, text).partition(marker)
    return PromptFormat("chat", head, tail)


def without_added_bos(tokenizer: Any, text: str) -> str:
    """A chat template's text without its leading BOS when the tokenizer adds one itself (no second BOS)."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer.encode("a", add_special_tokens=True)[:1] == [tokenizer.bos_token_id]:
        return text[len(bos) :]
    return text


def build_prompt(instruct: str, query: str = "", fmt: PromptFormat = ALPACA) -> str:
    """The prompt for one row: instruction, then the query on its own line, in `fmt` (Alpaca's by default)."""
    return fmt.build(instruct, query)


def ner_row(text: str, answer: str | None = None, instruction: str = NER_INSTRUCTION) -> dict[str, str]:
    """Wrap a plain sentence in the NER instruction (the seed's unless told), as process.py does."""
    row = {"instruct": instruction, "query": QUERY_PREFIX + text}
    if answer is not None:
        row["answer"] = answer
    return row


def shared_instruction(rows: list[dict[str, Any]], column: str = "instruct") -> str:
    """The instruction most training rows share (train_args.json's ner_instruction): plain sentences get it."""
    counts = Counter(row.get(column) for row in rows if isinstance(row.get(column), str))
    return counts.most_common(1)[0][0] if counts else ""


def answer_types(rows: list[dict[str, Any]], column: str = "answer") -> str:
    """The entity types of the rows' `实体_类型` answer lines, in order of first appearance, joined by commas
    (train_args.json's trained_entity_types: constrained answers use them)."""
    found = (line.strip().rpartition("_") for row in rows for line in str(row.get(column) or "").splitlines())
    return ",".join(
        dict.fromkeys(kind.strip() for entity, sep, kind in found if sep and entity.strip() and kind.strip())
    )


def longest_text(rows: list[dict[str, Any]], column: str = "query") -> int:
    """The characters of the longest `文本：` text of the rows (train_args.json's trained_text_chars: longer
    texts are answered in windows of this length)."""
    return max((len(str(row.get(column) or "").removeprefix(QUERY_PREFIX)) for row in rows), default=0)


def load_data(
    path: str | Path, columns: tuple[str, ...] = (), answer_column: str = "", optional: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Read JSON lines; a bad line, a row missing one of `columns` or holding a non-string there (or in an
    `optional` column it has), or an empty `answer_column`, names file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; run `python process.py` or pass the right *_path")
    rows = []
    lines = read_lines(path, DataError)
    first = next((line.strip() for line in lines if line.strip()), "")
    if first.startswith("["):
        raise DataError(
            f'{path}: a JSON array; expected JSON lines, one object a line. Convert it: python -c "import json,sys; '
            f'[print(json.dumps(r, ensure_ascii=False)) for r in json.load(open(sys.argv[1]))]" {path} > rows.txt'
        )
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg}); fix or delete the line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object per line")
        missing = [c for c in columns if c not in row]
        if missing:
            raise DataError(
                f"{path}:{lineno}: missing column {missing[0]!r} (has {sorted(row)}); "
                f"fix the data or set {missing[0]!r}'s *_column option"
            )
        for column in (*columns, *(c for c in optional if row.get(c) is not None)):
            value = row[column]
            if not isinstance(value, str):
                raise DataError(
                    f"{path}:{lineno}: column {column!r} is {json.dumps(value, ensure_ascii=False)[:40]} "
                    f"({type(value).__name__}); expected a string"
                )
            if not value.strip() and column == answer_column:
                raise DataError(
                    f"{path}:{lineno}: empty {column!r}; write {NO_ENTITY} for a text without entities "
                    "(as process.py does), or delete the row"
                )
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows; the file is empty")
    return rows


def encode_example(
    tokenizer, prompt: str, answer: str, max_seq_length: int, tail: str = ALPACA.tail
) -> tuple[list[int], list[int]]:
    """Token ids and labels for one row, at most max_seq_length long.

    The prompt is tokenized whole (as at inference). When the row is too long the
    prompt's tail (the query) is cut by characters and re-tokenized, so the answer and
    EOS (the tokenizer's) are always kept whole; `tail` is the prompt format's (PromptFormat.tail).
    """
    answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    answer_ids = answer_ids[: max_seq_length - 1]  # only an absurdly long answer loses its end
    prompt_ids, _ = fit_prompt(tokenizer, prompt, max_seq_length - len(answer_ids), tail)
    input_ids = prompt_ids + answer_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    return input_ids, labels


def fit_prompt(tokenizer, prompt: str, budget: int, tail: str = ALPACA.tail) -> tuple[list[int], bool]:
    """(ids, cut): the prompt's token ids (BOS first), its query's end cut when it is longer than `budget`.

    Training and every inference entry point (test, predict, chat, the server) cut the same way.
    """
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    if len(ids) <= budget:
        return ids, False
    return truncate_prompt(tokenizer, prompt, budget, tail), True


def truncate_prompt(tokenizer, prompt: str, budget: int, tail: str = ALPACA.tail) -> list[int]:
    """Longest prompt whose query part (before the format's `tail`) fits `budget` tokens (binary search on
    characters)."""
    head, sep, tail = prompt.rpartition(tail) if tail and tail in prompt else (prompt, "", "")
    lo, hi = 0, min(len(head), 32 * budget)  # a token spans at most 16 characters: longer cannot fit
    while lo < hi:  # largest cut of `head` that fits
        mid = (lo + hi + 1) // 2
        if len(tokenizer.encode(head[:mid] + sep + tail, add_special_tokens=True)) <= budget:
            lo = mid
        else:
            hi = mid - 1
    ids = tokenizer.encode(head[:lo] + sep + tail, add_special_tokens=True)
    if len(ids) > budget:  # even the template alone is too long: keep BOS and the end
        ids = ids[:1] + ids[len(ids) - budget + 1 :] if budget > 1 else ids[:budget]
    return ids


class NerCollate:
    """Turns instruction rows into padded `input_ids`, `labels`, `attention_mask`."""

    def __init__(self, args: Any, tokenizer: Any) -> None:
        self.instruct_column = args.instruct_column
        self.query_column = args.query_column
        self.response_column = args.response_column
        self.max_seq_length = args.max_seq_length
        self.pad_to_multiple_of = getattr(args, "pad_to_multiple_of", 1) or 1
        self.tokenizer = tokenizer
        self.format = prompt_format(getattr(args, "prompt_template", "alpaca"), tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(self, row: dict[str, Any]) -> tuple[list[int], list[int]]:
        prompt = build_prompt(row[self.instruct_column], row.get(self.query_column) or "", self.format)
        return encode_example(self.tokenizer, prompt, row[self.response_column], self.max_seq_length, self.format.tail)

    def collate_fn(self, batch: list[dict[str, Any] | str]) -> dict[str, torch.Tensor]:
        import torch  # here, not at the top: process.py and --help need only the data format

        rows = [json.loads(r) if isinstance(r, str) else r for r in batch]
        encoded = [self.encode(row) for row in rows]
        longest = max(len(ids) for ids, _ in encoded)
        multiple = self.pad_to_multiple_of
        width = min(-(-longest // multiple) * multiple, self.max_seq_length)
        input_ids, labels, attention_mask = [], [], []
        for ids, labs in encoded:
            pad = width - len(ids)
            input_ids.append(ids + [self.pad_id] * pad)
            labels.append(labs + [IGNORE_INDEX] * pad)
            attention_mask.append([1] * len(ids) + [0] * pad)
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(attention_mask, dtype=torch.long),
        }
