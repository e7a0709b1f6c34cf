"""MSRA NER -> instruction JSON lines ({"instruct", "query", "answer"}).

    python process.py                     # data/msra/ori_data/ -> data/msra/instruct_data/{train,dev}.txt
    python process.py --in_file=data/msra/ori_data/msra_test_bio.txt --out_file=dev.txt --mode=dev
    python process.py --instruction=short ...   # a one-line instruction instead of the seed's long one

The input format is detected: JSON lines with `text` and `entity_list` (begin/end character
offsets), or one character a line, `char<TAB>TAG` or `char TAG`, tags BIO or BMES (B-/M-/E-/S-), a
blank line between sentences. The
answer lists the distinct `实体_类型` pairs in order of first appearance, joined by `\\n`,
or `没有`. Mode `train` keeps every non-empty sentence; `dev` only those with entities.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from config_utils import ConfigParser
from dataset import INSTRUCTIONS, NO_ENTITY, DataError, ner_row
from llama_ner.io_utils import atomic_path, check_output_file, read_lines, run_cli

TYPE_NAMES = {"PER": "人名", "LOC": "地名", "ORG": "机构名", "NR": "人名", "NS": "地名", "NT": "机构名"}

# (in_file, out_file, mode) that a bare `python process.py` processes
DEFAULT_JOBS = [
    ("data/msra/ori_data/msra_1000.txt", "data/msra/instruct_data/train.txt", "train"),
    ("data/msra/ori_data/msra_test_bio.txt", "data/msra/instruct_data/dev.txt", "dev"),
]

config = {
    "in_file": "",  # MSRA file (JSON lines or BIO); empty: process the repo's defaults
    "out_file": "",  # where the instruction JSON lines go (written atomically)
    "mode": "train",  # train: keep every sentence; dev: keep only sentences with entities
    "instruction": "seed",  # seed (the original's long instruction), short (one line), or the text itself
}

Sentence = tuple[str, list[tuple[str, str]]]  # text, [(entity, TYPE), ...] in order


def type_name(tag: str, where: str) -> str:
    if tag not in TYPE_NAMES:
        raise DataError(f"{where}: unknown entity type {tag!r}; expected one of PER, LOC, ORG")
    return TYPE_NAMES[tag]


def read_json_lines(path: Path, lines: list[str]) -> Iterator[Sentence]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
            text, entity_list = row["text"], row["entity_list"]
            spans = sorted((e["entity_index"]["begin"], e["entity_index"]["end"], e) for e in entity_list)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(
                f"{where}: expected {{'text': ..., 'entity_list': [{{'entity_index': {{'begin', 'end'}}, "
                f"'entity_type', 'entity'}}]}} ({type(err).__name__}: {err})"
            ) from None
        entities = []
        for begin, end, entity in spans:
            if text[begin:end] != entity["entity"]:
                raise DataError(f"{where}: entity {entity['entity']!r} is not text[{begin}:{end}] {text[begin:end]!r}")
            entities.append((entity["entity"], type_name(entity["entity_type"], where)))
        yield text, entities


def read_bio(path: Path, lines: list[str]) -> Iterator[Sentence]:
    chars: list[str] = []
    entities: list[tuple[str, str]] = []
    current: list[str] = []  # [entity text, type] being extended

    def close() -> None:
        if current:
            entities.append((current[0], current[1]))
            current.clear()

    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line.strip():
            close()
            if chars:
                yield "".join(chars), entities
            chars, entities = [], []
            continue
        parts = line.split("\t") if "\t" in line else [line[:1], line[2:]] if line[1:2] == " " else [line]
        if len(parts) != 2 or len(parts[0]) != 1 or not parts[1]:
            raise DataError(f"{path}:{lineno}: expected 'char<TAB>TAG' or 'char TAG', got {line!r}")
        char, tag = parts
        where = f"{path}:{lineno}"
        if tag == "O":
            close()
        elif tag[:2] not in ("B-", "I-", "M-", "E-", "S-"):
            raise DataError(f"{where}: unknown tag {tag!r}; expected O or B-/I-TYPE (BIO), or B-/M-/E-/S-TYPE (BMES)")
        elif tag[0] in "BS" or not current or current[1] != type_name(tag[2:], where):
            close()  # an I-/M-/E- that does not continue its entity starts a new one
            current.extend([char, type_name(tag[2:], where)])
        else:
            current[0] += char
        if tag[:2] in ("E-", "S-"):  # BMES: the entity ends here
            close()
        chars.append(char)
    close()
    if chars:
        yield "".join(chars), entities


def read_sentences(path: str | Path) -> Iterator[Sentence]:
    """Sentences from either MSRA format, detected from the first non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; pass --in_file=<MSRA file>")
    lines = read_lines(path, DataError)
    first = next((line for line in lines if line.strip()), "")
    if not first:
        raise DataError(f"{path}: file is empty")
    return read_json_lines(path, lines) if first.lstrip().startswith("{") else read_bio(path, lines)


def make_answer(entities: list[tuple[str, str]]) -> str:
    pairs = dict.fromkeys(f"{entity}_{kind}" for entity, kind in entities)
    return "\n".join(pairs) if pairs else NO_ENTITY


def instruction_text(name: str) -> str:
    """--instruction's text: a name of INSTRUCTIONS, or any other non-empty text as it is."""
    if not name.strip():
        raise DataError(f"instruction is empty: use {' or '.join(INSTRUCTIONS)}, or the instruction's own text")
    return INSTRUCTIONS.get(name, name)


def convert(in_file: str | Path, out_file: str | Path, mode: str, instruction: str = "seed") -> Counter:
    """Write the instruction rows; returns counts (rows, entity mentions per type)."""
    if mode not in ("train", "dev"):
        raise DataError(f"mode={mode!r}: use mode=train or mode=dev")
    instruct = instruction_text(instruction)
    check_output_file(out_file, "out_file", [in_file])
    sentences = list(read_sentences(in_file))  # every line checked before anything is written
    counts: Counter = Counter()
    with atomic_path(out_file) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for text, entities in sentences:
            counts["sentences"] += 1
            if mode == "dev" and not entities:
                continue
            row = ner_row(text, make_answer(entities), instruct)
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            counts["rows"] += 1
            counts["answer lines"] += len(row["answer"].split("\n")) if entities else 0
            counts.update(kind for _, kind in entities)
    return counts


def main(argv: list[str] | None = None) -> None:
    args = ConfigParser(config, __doc__, [__file__]).parse_main(argv)
    if bool(args.in_file) != bool(args.out_file):
        raise DataError("pass both --in_file and --out_file, or neither to process the repo's defaults")
    jobs = [(args.in_file, args.out_file, args.mode)] if args.in_file else DEFAULT_JOBS
    instruction_text(args.instruction)
    for _, out_file, _ in jobs:  # every output path checked before the first job runs
        check_output_file(out_file, "out_file", [job[0] for job in jobs])
    for in_file, out_file, mode in jobs:
        counts = convert(in_file, out_file, mode, args.instruction)
        per_type = ", ".join(f"{name} {counts[name]}" for name in ("人名", "地名", "机构名"))
        print(
            f"{in_file} -> {out_file} ({mode}): {counts['rows']} rows of {counts['sentences']} sentences, "
            f"{counts['answer lines']} answer lines; mentions: {per_type}"
        )


if __name__ == "__main__":
    run_cli(main)
