"""Entity-level scoring of generated NER answers ('实体_类型' lines, '没有' for none).

    gold = ["北京_地名\\n周恩来_人名", "没有"]
    pred = ["北京_地名", "没有"]
    score(gold, pred)["f1"]   # 0.667: one of two entities found, nothing wrong predicted

Each answer becomes a set of distinct (entity, type) pairs, so order and repeats do not
count. Micro precision/recall/F1 sum true/false positives over sentences; a sentence is an
exact match when its two sets are equal (both empty counts). A line that is not
'entity_type' (no `_`, empty entity or type) is not a prediction; it is counted as malformed.
Where no entity was expected nor predicted (every answer `没有`, or a type nobody named), P/R/F1
are undefined: None in the metrics, `n/a` in the table; exact match and `none_accuracy` (the rows
answered `没有` that should be) say how such rows went.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

from dataset import NO_ENTITY

ENTITY_TYPES = ("人名", "地名", "机构名")


def parse_line(line: str) -> tuple[str, str] | None:
    """'北京_地名' -> ('北京', '地名'); the type is after the last `_`. None when malformed."""
    entity, sep, kind = line.strip().rpartition("_")
    entity, kind = entity.strip(), kind.strip()
    if not sep or not entity or not kind:
        return None
    return entity, kind


def parse_entities(text: str) -> set[tuple[str, str]]:
    """Distinct (entity, type) pairs of an answer; '没有' and blank lines give nothing."""
    return parse_answer(text)[0]


def parse_answer(text: str) -> tuple[set[tuple[str, str]], int]:
    """(distinct pairs, number of malformed lines) of one answer."""
    pairs, malformed = set(), 0
    for line in text.splitlines():
        line = line.strip()
        if not line or line == NO_ENTITY:
            continue
        pair = parse_line(line)
        if pair is None:
            malformed += 1
        else:
            pairs.add(pair)
    return pairs, malformed


def prf(tp: int, fp: int, fn: int) -> dict[str, float | None]:
    """Precision, recall, F1 (0.0 where a denominator is zero; None, undefined, with nothing expected or
    predicted)."""
    if tp == fp == fn == 0:
        return {"precision": None, "recall": None, "f1": None}
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def score(golds: list[str], preds: list[str]) -> dict[str, Any]:
    """Micro P/R/F1 overall and per type, exact-match rate, counts. Lists align row by row."""
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold answers but {len(preds)} predictions")
    counts: dict[str, list[int]] = {kind: [0, 0, 0] for kind in ENTITY_TYPES}  # tp, fp, fn
    exact = malformed = none_rows = none_right = 0
    for gold_text, pred_text in zip(golds, preds, strict=True):
        gold = parse_entities(gold_text)
        pred, bad = parse_answer(pred_text)
        malformed += bad
        exact += gold == pred
        none_rows += not gold
        none_right += not gold and not pred
        for pair in pred | gold:
            tally = counts.setdefault(pair[1], [0, 0, 0])
            tally[0 if pair in gold and pair in pred else 1 if pair in pred else 2] += 1
    tp, fp, fn = (sum(c[i] for c in counts.values()) for i in range(3))
    per_type = {
        kind: {**prf(*c), "tp": c[0], "fp": c[1], "fn": c[2], "support": c[0] + c[2]} for kind, c in counts.items()
    }
    n = len(golds)
    return {
        **prf(tp, fp, fn),
        "exact_match": exact / n if n else 0.0,
        "none_rows": none_rows,  # rows whose answer is 没有
        "none_accuracy": none_right / none_rows if none_rows else None,  # of them, the share answered 没有
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "malformed": malformed,
        "n": n,
        "per_type": per_type,
    }


def locate(text: str, pairs: Iterable[tuple[str, str]]) -> list[tuple[int, int, str]]:
    """Character spans [start, end) of each (entity, type) at every place it occurs in `text`, sorted; longer
    entities first where two would overlap (中国 inside 中国银行), the answer's first type where one entity
    has two."""
    found = []
    for order, (entity, kind) in enumerate(pairs):
        start = text.find(entity)
        while start >= 0:
            found.append((-len(entity), start, order, kind))
            start = text.find(entity, start + 1)
    taken = [False] * len(text)
    spans = []
    for negative_length, start, _, kind in sorted(found):
        end = start - negative_length
        if not any(taken[start:end]):
            taken[start:end] = [True] * (end - start)
            spans.append((start, end, kind))
    return sorted(spans)


def span_score(texts: list[str], golds: list[str], preds: list[str]) -> dict[str, Any]:
    """Span-level micro and per-type P/R/F1, as NER papers report (seqeval on character BIO tags): a span
    counts when its start, end and type all match; gold and answered entities are located in their text."""
    counts: dict[str, list[int]] = {}
    for text, gold_text, pred_text in zip(texts, golds, preds, strict=True):
        gold = set(locate(text, ordered_pairs(gold_text)))
        pred = set(locate(text, ordered_pairs(pred_text)))
        for span in gold | pred:
            counts.setdefault(span[2], [0, 0, 0])[0 if span in gold and span in pred else 1 if span in pred else 2] += 1
    tp, fp, fn = (sum(c[i] for c in counts.values()) for i in range(3))
    per_type = {kind: {**prf(*c), "tp": c[0], "fp": c[1], "fn": c[2], "support": c[0] + c[2]}
                for kind, c in sorted(counts.items())}  # fmt: skip
    return {**prf(tp, fp, fn), "tp": tp, "fp": fp, "fn": fn, "per_type": per_type}


def ordered_pairs(answer: str) -> list[tuple[str, str]]:
    """The answer's (entity, type) lines in order, repeats dropped."""
    lines = (line.strip() for line in answer.splitlines())
    return list(dict.fromkeys(pair for line in lines if line and line != NO_ENTITY and (pair := parse_line(line))))


def answer_entities(text: str, answer: str) -> list[dict[str, Any]]:
    """The answer's distinct `实体_类型` lines in order, each with every [start, end) where it occurs in text
    (/v1/ner's and predict.py --output_path's shape)."""
    return [
        {"text": name, "type": kind, "spans": [[m.start(), m.start() + len(name)] for m in
                                               re.finditer(f"(?={re.escape(name)})", text)]}
        for name, kind in ordered_pairs(answer)
    ]  # fmt: skip


def error_report(golds: list[str], preds: list[str], top: int = 10) -> dict[str, dict[str, list]]:
    """Per gold type, the most frequent missed entities, entities given another type ('北京 -> 机构名'), and
    per answered type the spurious ones (in no gold answer of the row), each [[entity, count]]."""
    missed: dict[str, Counter] = {}
    wrong: dict[str, Counter] = {}
    spurious: dict[str, Counter] = {}
    for gold_text, pred_text in zip(golds, preds, strict=True):
        gold, pred = parse_entities(gold_text), parse_entities(pred_text)
        gold_types = {entity: kind for entity, kind in gold}
        pred_types = {entity: kind for entity, kind in pred}
        for entity, kind in gold - pred:
            if entity in pred_types:
                wrong.setdefault(kind, Counter())[f"{entity} -> {pred_types[entity]}"] += 1
            else:
                missed.setdefault(kind, Counter())[entity] += 1
        for entity, kind in pred - gold:
            if entity not in gold_types:
                spurious.setdefault(kind, Counter())[entity] += 1
    return {
        name: {kind: [list(item) for item in tally.most_common(top)] for kind, tally in sorted(table.items())}
        for name, table in (("missed", missed), ("wrong_type", wrong), ("spurious", spurious))
    }


def display_width(text: str) -> int:
    """Terminal columns of `text`: CJK characters take two."""
    return sum(2 if ord(ch) >= 0x2E80 else 1 for ch in text)


def format_table(metrics: dict[str, Any]) -> str:
    """The metrics as fixed-width text tables: distinct (entity, type) pairs per row, then span-level."""
    lines = ["entity pairs (distinct 实体_类型 per row; this project's F1)", *type_table(metrics)]
    if metrics["f1"] is None:
        lines.append("no entity was expected or predicted: P/R/F1 are undefined (n/a), not 0")
    none = metrics.get("none_accuracy")
    none_part = f"; `没有` right on {none:.4f} of {metrics['none_rows']} such rows" if none is not None else ""
    lines.append(
        f"exact match {metrics['exact_match']:.4f} over {metrics['n']} rows{none_part}; "
        f"malformed lines {metrics['malformed']}"
    )
    if "span_level" in metrics:
        lines += ["spans (start, end and type by character offsets; published MSRA F1s count these)"]
        lines += type_table(metrics["span_level"])
    return "\n".join(lines)


def type_table(metrics: dict[str, Any]) -> list[str]:
    lines = [f"{'type':<8}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    rows = [*metrics["per_type"].items(), ("micro", {**metrics, "support": metrics["tp"] + metrics["fn"]})]
    for kind, m in rows:
        label = kind + " " * max(1, 8 - display_width(kind))
        values = "".join(f"{'n/a' if m[k] is None else f'{m[k]:.4f}':>10}" for k in ("precision", "recall", "f1"))
        lines.append(f"{label}{values}{m['support']:>9}")
    return lines
