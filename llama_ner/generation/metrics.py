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


def display_width(text: str) -> int:
    """Terminal columns of `text`: CJK characters take two."""
    return sum(2 if ord(ch) >= 0x2E80 else 1 for ch in text)


def format_table(metrics: dict[str, Any]) -> str:
    """The metrics as a fixed-width text table."""
    lines = [f"{'type':<8}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    rows = [*metrics["per_type"].items(), ("micro", {**metrics, "support": metrics["tp"] + metrics["fn"]})]
    for kind, m in rows:
        label = kind + " " * max(1, 8 - display_width(kind))
        values = "".join(f"{'n/a' if m[k] is None else f'{m[k]:.4f}':>10}" for k in ("precision", "recall", "f1"))
        lines.append(f"{label}{values}{m['support']:>9}")
    if metrics["f1"] is None:
        lines.append("no entity was expected or predicted: P/R/F1 are undefined (n/a), not 0")
    none = metrics.get("none_accuracy")
    none_part = f"; `没有` right on {none:.4f} of {metrics['none_rows']} such rows" if none is not None else ""
    lines.append(
        f"exact match {metrics['exact_match']:.4f} over {metrics['n']} rows{none_part}; "
        f"malformed lines {metrics['malformed']}"
    )
    return "\n".join(lines)
