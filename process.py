"""Annotated NER data -> instruction JSON lines ({"instruct", "query", "answer"}).

    python process.py                     # data/msra/ori_data/ -> data/msra/instruct_data/{train,dev}.txt
    python process.py --in_file=data/msra/ori_data/msra_test_bio.txt --out_file=dev.txt --mode=dev
    python process.py --instruction=short ...   # a one-line instruction instead of the seed's long one
    python process.py --in_file=doccano.jsonl --out_file=train.txt --types=DIS=疾病,DRUG=药物 \
        --dev_share=0.1 --dev_file=dev.txt   # your own data: 10% of its sentences become the dev file

The format is detected from the content, or named by --format: MSRA's JSON lines (text, entity_list),
CLUENER, doccano (label or entities), Label Studio's JSON export, or one character a line with BIO, BIOES
or BMES tags (llama_ner/annotations.py). --types names the answer's type for each tag; MSRA's tags
(PER/LOC/ORG, NR/NS/NT) are 人名/地名/机构名, any other tag keeps its own name. The answer lists the
distinct `实体_类型` pairs in order of first appearance, joined by `\\n`, or `没有`; the instruction names
the types (the seed's text as it is for MSRA's three). Mode `train` keeps every non-empty sentence; `dev`
only those with entities, as does the --dev_share split (no sentence text on both sides).
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path

from config_utils import ConfigParser
from dataset import INSTRUCTIONS, NO_ENTITY, DataError, ner_row
from llama_ner.annotations import Sentence, count_tags, read_annotated, type_mapping
from llama_ner.io_utils import atomic_path, check_output_file, run_cli

MSRA_TYPE_NAMES = {"PER": "人名", "LOC": "地名", "ORG": "机构名", "NR": "人名", "NS": "地名", "NT": "机构名"}
MSRA_TYPES = ("人名", "地名", "机构名")  # as the seed's instructions name them

# (in_file, out_file, mode) that a bare `python process.py` processes
DEFAULT_JOBS = [
    ("data/msra/ori_data/msra_1000.txt", "data/msra/instruct_data/train.txt", "train"),
    ("data/msra/ori_data/msra_test_bio.txt", "data/msra/instruct_data/dev.txt", "dev"),
]

config = {
    "in_file": "",  # annotated file (any format below); empty: process the repo's MSRA defaults
    "out_file": "",  # where the instruction JSON lines go (written atomically)
    "mode": "train",  # train: keep every sentence; dev: keep only sentences with entities
    "instruction": "seed",  # seed (the original's long instruction), short (one line), or the text itself
    "format": "auto",  # auto (from the content), msra, cluener, doccano, label-studio, chars
    "types": "",  # tag -> answer type: PER=人名,LOC=地名 or a JSON file; MSRA's tags map by default
    "loose_tags": False,  # chars: an I-/M-/E- that continues nothing starts an entity (else an error)
    "dev_share": 0.0,  # this share of the sentences goes to dev_file instead of out_file
    "dev_file": "",  # where the dev split goes (with dev_share)
    "seed": 0,  # the split's shuffle
}


def make_answer(entities: list[tuple[str, str]]) -> str:
    pairs = dict.fromkeys(f"{entity}_{kind}" for entity, kind in entities)
    return "\n".join(pairs) if pairs else NO_ENTITY


def instruction_text(name: str, types: list[str] | None = None) -> str:
    """--instruction's text: a name of INSTRUCTIONS (naming `types` where they are not MSRA's), or any
    other non-empty text as it is."""
    if not name.strip():
        raise DataError(f"instruction is empty: use {' or '.join(INSTRUCTIONS)}, or the instruction's own text")
    if name not in INSTRUCTIONS:
        return name
    if types and not set(types) <= set(MSRA_TYPES):  # MSRA's data (any of its types) keeps the seed's text
        return INSTRUCTIONS[name].replace("、".join(MSRA_TYPES), "、".join(types))
    return INSTRUCTIONS[name]


def answer_types(sentences: list[Sentence], spec: str, where: str) -> dict[str, str]:
    """tag -> the answer's type name for every tag in the data; a --types tag the data lacks is a warning."""
    given = type_mapping(spec)
    found = count_tags(sentences)
    for tag in given.keys() - found.keys():
        print(f"warning: types={spec} names {tag}, which no span of {where} has; its tags: "
              f"{', '.join(sorted(found))}", file=sys.stderr)  # fmt: skip
    names = {tag: given.get(tag, MSRA_TYPE_NAMES.get(tag, tag)) for tag in [*given, *found] if tag in found}
    for tag, name in names.items():
        if "_" in name or "\n" in name:
            raise DataError(f"{where}: tag {tag!r} holds '_', which answers use before the type: pass "
                            f"--types={tag}=<name without _>")  # fmt: skip
    return names


def split_dev(sentences: list[Sentence], share: float, seed: int) -> tuple[list[Sentence], list[Sentence]]:
    """(train, dev): `share` of the distinct sentence texts, drawn with `seed`, go to dev with every copy."""
    if not 0 < share < 1:
        raise DataError(f"dev_share={share}: use a share between 0 and 1 (e.g. 0.1), or 0 for no split")
    texts = sorted({text for text, _ in sentences})
    random.Random(seed).shuffle(texts)
    dev_texts = set(texts[: max(1, round(share * len(texts)))])
    return [s for s in sentences if s[0] not in dev_texts], [s for s in sentences if s[0] in dev_texts]


def write_rows(sentences: list[Sentence], out_file: str | Path, mode: str, instruct: str, names: dict) -> Counter:
    counts: Counter = Counter()
    with atomic_path(out_file) as tmp, open(tmp, "w", encoding="utf-8") as out:
        for text, spans in sentences:
            counts["sentences"] += 1
            if mode == "dev" and not spans:
                continue
            entities = [(text[start:end], names[tag]) for start, end, tag in spans]
            row = ner_row(text, make_answer(entities), instruct)
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            counts["rows"] += 1
            counts["answer lines"] += len(row["answer"].split("\n")) if spans else 0
            counts.update(kind for _, kind in entities)
    return counts


def convert(
    in_file: str | Path,
    out_file: str | Path,
    mode: str,
    instruction: str = "seed",
    fmt: str = "auto",
    types: str = "",
    loose_tags: bool = False,
    dev_share: float = 0.0,
    dev_file: str | Path = "",
    seed: int = 0,
) -> Counter:
    """Write the instruction rows (and the dev split); returns counts (rows, entity mentions per type, and
    the split's as dev_rows / dev_sentences)."""
    if mode not in ("train", "dev"):
        raise DataError(f"mode={mode!r}: use mode=train or mode=dev")
    if bool(dev_share) != bool(dev_file):
        raise DataError("pass both --dev_share and --dev_file to split off a dev file, or neither")
    instruction_text(instruction)
    for path, key in ((out_file, "out_file"), (dev_file, "dev_file")):
        if path:
            check_output_file(path, key, [in_file])
    if dev_file and Path(dev_file).resolve() == Path(out_file).resolve():
        raise DataError(f"dev_file={dev_file} is out_file too: name another file for the dev split")
    sentences = read_annotated(in_file, fmt, loose_tags)  # every line checked before anything is written
    names = answer_types(sentences, types, str(in_file))
    instruct = instruction_text(instruction, list(dict.fromkeys(names.values())))
    train, dev = split_dev(sentences, dev_share, seed) if dev_file else (sentences, [])
    counts = write_rows(train, out_file, mode, instruct, names)
    if dev_file:
        dev_counts = write_rows(dev, dev_file, "dev", instruct, names)
        counts.update({"dev_rows": dev_counts["rows"], "dev_sentences": dev_counts["sentences"]})
    counts["types"] = list(dict.fromkeys(names.values()))
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
        counts = convert(in_file, out_file, mode, args.instruction, args.format, args.types, args.loose_tags,
                         args.dev_share, args.dev_file, args.seed)  # fmt: skip
        per_type = ", ".join(f"{name} {counts[name]}" for name in counts["types"])
        split = ""
        if args.dev_file:
            split = f"; {args.dev_file}: {counts['dev_rows']} rows of {counts['dev_sentences']} sentences"
        print(
            f"{in_file} -> {out_file} ({mode}): {counts['rows']} rows of {counts['sentences']} sentences, "
            f"{counts['answer lines']} answer lines; mentions: {per_type}{split}"
        )


if __name__ == "__main__":
    run_cli(main)
