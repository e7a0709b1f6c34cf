"""bench/real_model.py's split of the train set: the validation rows are never trained on, and type-balanced
sampling gives each entity type an equal share of the mentions drawn."""

from __future__ import annotations

import json
import sys
from collections import Counter

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import real_model  # noqa: E402


def rows_file(tmp_path):
    rows = [{"instruct": "i", "query": f"文本：北京{i}", "answer": "北京_地名"} for i in range(90)]
    rows += [{"instruct": "i", "query": f"文本：李鹏{i}", "answer": "李鹏_人名"} for i in range(10)]
    rows += [{"instruct": "i", "query": f"文本：无{i}", "answer": "没有"} for i in range(20)]
    path = tmp_path / "train.txt"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_validation_rows_are_never_trained_on_and_types_are_balanced(tmp_path):
    for sampling, person_share in (("natural", (0.05, 0.15)), ("types", (0.4, 0.6))):
        out = tmp_path / sampling
        out.mkdir()
        train, validation = real_model.split_rows(rows_file(tmp_path), 1000, 10, 0.1, sampling, out)
        trained = [json.loads(line) for line in train.read_text(encoding="utf-8").splitlines()]
        held = [json.loads(line) for line in validation.read_text(encoding="utf-8").splitlines()]
        assert len(held) == 10 and all(r["answer"] != "没有" for r in held)
        assert not {r["query"] for r in held} & {r["query"] for r in trained}
        kinds = Counter(r["answer"] for r in trained)
        assert kinds["没有"] <= 100
        persons = kinds["李鹏_人名"] / (kinds["李鹏_人名"] + kinds["北京_地名"])
        assert person_share[0] < persons < person_share[1], (sampling, kinds)
