"""Annotated NER files -> sentences with character spans, in the annotation tools' formats.

    sentences = read_annotated("data.jsonl")                # the format detected from the content
    sentences = read_annotated("export.json", "label-studio")
    text, spans = sentences[0]                              # spans: [(start, end, tag)], end exclusive

FORMATS:
  msra          JSON lines: {"text", "entity_list": [{"entity_index": {"begin", "end"}, "entity_type", "entity"}]}
  cluener       JSON lines: {"text", "label": {type: {entity: [[start, end]]}}}, end inclusive
  doccano       JSON lines: {"text", "label": [[start, end, type]]}, or {"text", "entities": [{"start_offset",
                "end_offset", "label"}]}
  label-studio  a JSON array of tasks: {"data": {"text"}, "annotations": [{"result": [{"value": {"start", "end",
                "text", "labels": [type]}}]}]}
  chars         one character a line, a tab or a space, then its tag: O, or B-/I- (BIO), B-/I-/E-/S- (BIOES),
                B-/M-/E-/S- (BMES) and any type name; a blank line between sentences

Every span is checked where it is read: inside its text, its stated text equal to text[start:end], no two
spans overlapping (the answer format lists flat entities). Errors name file:line (file: task N for Label
Studio) and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from dataset import DataError
from llama_ner.io_utils import read_lines

Span = tuple[int, int, str]  # start, end (exclusive), the file's own tag
Sentence = tuple[str, list[Span]]
FORMATS = ("msra", "cluener", "doccano", "label-studio", "chars")
INSIDE = ("I-", "M-", "E-")  # tags that continue an entity begun by B-


def read_annotated(path: str | Path, fmt: str = "auto", loose_tags: bool = False) -> list[Sentence]:
    """Every sentence of `path` with its checked spans; `fmt` one of FORMATS or auto (from the content).
    `loose_tags`: an I-/M-/E- tag that continues nothing starts an entity instead of being an error."""
    path = Path(path)
    if fmt not in ("auto", *FORMATS):
        raise DataError(f"format={fmt!r} is not a format here: use auto or one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise DataError(f"{path}: file not found; pass --in_file=<annotated file>")
    lines = read_lines(path, DataError)
    first = next((line.strip() for line in lines if line.strip()), "")
    if not first:
        raise DataError(f"{path}: file is empty")
    if fmt == "auto":
        fmt = "label-studio" if first.startswith("[") else json_format(path, first) if first[0] == "{" else "chars"
    if fmt == "label-studio":
        sentences = list(read_label_studio(path, "\n".join(lines)))
    elif fmt == "chars":
        sentences = list(read_chars(path, lines, loose_tags))
    else:
        sentences = list(read_json_lines(path, lines, fmt))
    if not any(spans for _, spans in sentences):
        raise DataError(f"{path}: no entity is labelled in its {len(sentences)} sentence(s) ({fmt} format); "
                        "label some, or check --format")  # fmt: skip
    return sentences


def json_format(path: Path, line: str, where: str = "") -> str:
    """Which JSON-lines format a row is, from its keys."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where or path}: not a JSON line ({err})") from None
    keys = set(row) if isinstance(row, dict) else set()
    if "entity_list" in keys:
        return "msra"
    if isinstance(row.get("label"), dict):
        return "cluener"
    if isinstance(row.get("label"), list) or "entities" in keys:
        return "doccano"
    raise DataError(
        f"{where or path}: a JSON line with keys {sorted(keys)} is none of msra (entity_list), cluener "
        "(label: {type: ...}), doccano (label: [[start, end, type]] or entities); pass --format"
    )


def read_json_lines(path: Path, lines: list[str], fmt: str) -> Iterator[Sentence]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if (found := json_format(path, line, where)) != fmt:
            raise DataError(f"{where}: a {found} row in a {fmt} file (the first row's format): one format a file")
        row = json.loads(line)
        text = row.get("text")
        if not isinstance(text, str):
            raise DataError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        try:
            spans = list(ROW_SPANS[fmt](row))
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise DataError(f"{where}: a {fmt} row's labels must be {LABEL_SHAPES[fmt]} "
                            f"({type(err).__name__}: {err})") from None  # fmt: skip
        yield text, checked_spans(text, spans, where)


def msra_spans(row: dict) -> Iterator[tuple[int, int, str, str | None]]:
    for e in row["entity_list"]:
        yield int(e["entity_index"]["begin"]), int(e["entity_index"]["end"]), str(e["entity_type"]), e["entity"]


def cluener_spans(row: dict) -> Iterator[tuple[int, int, str, str | None]]:
    for tag, by_entity in row["label"].items():
        for entity, offsets in by_entity.items():
            for start, end in offsets:  # end inclusive
                yield int(start), int(end) + 1, str(tag), entity


def doccano_spans(row: dict) -> Iterator[tuple[int, int, str, str | None]]:
    if "entities" in row:
        for e in row["entities"]:
            yield int(e["start_offset"]), int(e["end_offset"]), str(e["label"]), None
    else:
        for start, end, tag in row["label"]:
            yield int(start), int(end), str(tag), None


ROW_SPANS = {"msra": msra_spans, "cluener": cluener_spans, "doccano": doccano_spans}
LABEL_SHAPES = {
    "msra": "entity_list: [{'entity_index': {'begin', 'end'}, 'entity_type', 'entity'}]",
    "cluener": "label: {type: {entity: [[start, end]]}} (end inclusive)",
    "doccano": "label: [[start, end, type]] or entities: [{'start_offset', 'end_offset', 'label'}]",
}


def read_label_studio(path: Path, content: str) -> Iterator[Sentence]:
    try:
        tasks = json.loads(content)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not JSON ({err.msg}); Label Studio exports one JSON array") from None
    if not isinstance(tasks, list):
        raise DataError(f"{path}: expected Label Studio's JSON export, an array of tasks")
    for number, task in enumerate(tasks, 1):
        where = f"{path}: task {number}" + (f" (id {task['id']})" if isinstance(task, dict) and "id" in task else "")
        try:
            text = task["data"]["text"]
            done = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
            results = [r["value"] for r in (done[0]["result"] if done else []) if "labels" in r.get("value", {})]
            spans = [(int(v["start"]), int(v["end"]), str(v["labels"][0]), v.get("text")) for v in results]
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise DataError(f"{where}: expected data.text and annotations[].result[].value {{start, end, text, "
                            f"labels}} ({type(err).__name__}: {err})") from None  # fmt: skip
        if not isinstance(text, str):
            raise DataError(f"{where}: data.text must be a string")
        yield text, checked_spans(text, spans, where)


def checked_spans(text: str, spans: list[tuple[int, int, str, str | None]], where: str) -> list[Span]:
    """Spans sorted by start, each inside the text, equal to its stated text, none overlapping another."""
    out: list[Span] = []
    for start, end, tag, stated in sorted(spans, key=lambda s: (s[0], s[1])):
        if not 0 <= start < end <= len(text):
            raise DataError(f"{where}: span [{start}, {end}) {tag} is outside its text of {len(text)} characters")
        if stated is not None and text[start:end] != stated:
            raise DataError(f"{where}: span [{start}, {end}) says {stated!r} but the text there is "
                            f"{text[start:end]!r}; fix the offsets")  # fmt: skip
        if not tag.strip():
            raise DataError(f"{where}: span [{start}, {end}) {text[start:end]!r} has an empty type")
        if out and start < out[-1][1]:
            s, e, t = out[-1]
            raise DataError(f"{where}: spans [{s}, {e}) {t} {text[s:e]!r} and [{start}, {end}) {tag} "
                            f"{text[start:end]!r} overlap; answers list flat entities, so keep one")  # fmt: skip
        out.append((start, end, tag))
    return out


def read_chars(path: Path, lines: list[str], loose_tags: bool) -> Iterator[Sentence]:
    chars: list[str] = []
    spans: list[Span] = []
    open_span: list = []  # [start, tag] of the entity being extended

    def close() -> None:
        if open_span:
            spans.append((open_span[0], len(chars), open_span[1]))
            open_span.clear()

    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        where = f"{path}:{lineno}"
        if not line.strip():
            close()
            if chars:
                yield "".join(chars), spans
            chars, spans = [], []
            continue
        parts = line.split("\t") if "\t" in line else [line[:1], line[2:]] if line[1:2] == " " else [line]
        if len(parts) != 2 or len(parts[0]) != 1 or not parts[1]:
            raise DataError(f"{where}: expected 'char<TAB>TAG' or 'char TAG', got {line!r}")
        char, tag = parts
        prefix, kind = tag[:2], tag[2:]
        if tag == "O":
            close()
        elif prefix not in ("B-", "S-", *INSIDE) or not kind:
            raise DataError(f"{where}: unknown tag {tag!r}; expected O, or B-/I-TYPE (BIO), B-/I-/E-/S-TYPE "
                            "(BIOES), B-/M-/E-/S-TYPE (BMES)")  # fmt: skip
        elif prefix in INSIDE and (not open_span or open_span[1] != kind):
            if not loose_tags:
                raise DataError(f"{where}: {tag} continues no B-{kind} (the line before is not inside a {kind}); "
                                f"fix the tag, or pass --loose_tags=true to start an entity there")  # fmt: skip
            close()
            open_span.extend([len(chars), kind])
        elif prefix in ("B-", "S-"):
            close()
            open_span.extend([len(chars), kind])
        chars.append(char)
        if prefix in ("E-", "S-"):  # BIOES / BMES: the entity ends here
            close()
    close()
    if chars:
        yield "".join(chars), spans


def type_mapping(spec: str) -> dict[str, str]:
    """--types: 'PER=人名,LOC=地名', or a JSON file {"PER": "人名"}, -> {tag: name}."""
    if not spec:
        return {}
    if spec.endswith(".json") or Path(spec).is_file():
        try:
            mapping = json.loads(Path(spec).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"types={spec}: cannot read it as a JSON object {{tag: name}} ({err})") from None
        if not isinstance(mapping, dict):
            raise DataError(f"types={spec}: expected a JSON object {{tag: name}}")
    else:
        pairs = [item.split("=", 1) for item in spec.split(",") if item.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise DataError(f"types={spec!r}: expected TAG=name pairs joined by commas, e.g. PER=人名,LOC=地名")
        mapping = {tag.strip(): name.strip() for tag, name in pairs}
    for tag, name in mapping.items():
        if not isinstance(name, str) or not name or "_" in name or "\n" in name:
            raise DataError(f"types={spec}: the name of {tag} must be non-empty text with no '_' or line break")
    return {str(tag): name for tag, name in mapping.items()}


def spans_text(text: str, spans: list[Span]) -> list[tuple[str, str]]:
    """[(entity text, tag)] of the spans, in order."""
    return [(text[start:end], tag) for start, end, tag in spans]


def count_tags(sentences: list[Sentence]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, spans in sentences:
        for *_, tag in spans:
            counts[tag] = counts.get(tag, 0) + 1
    return counts
