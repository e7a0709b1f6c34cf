"""bench/real_model.py's split of the train set: the validation rows (lists of names among them when asked)
are never trained on, not even as a duplicate; type-balanced sampling draws rows of a rare type more often."""

from __future__ import annotations

import json
import sys
from collections import Counter

import pytest

from conftest import ROOT
from llama_ner.io_utils import UserError

sys.path.insert(0, str(ROOT / "bench"))
import real_model  # noqa: E402


def rows_file(tmp_path):
    rows = [{"instruct": "i", "query": f"文本：北京{i}", "answer": "北京_地名"} for i in range(90)]
    rows += [{"instruct": "i", "query": f"文本：李鹏{i}", "answer": "李鹏_人名"} for i in range(10)]
    rows += [{"instruct": "i", "query": f"文本：无{i}", "answer": "没有"} for i in range(20)]
    names = "\n".join(f"{chr(0x4E00 + k)}{chr(0x4E00 + k)}_人名" for k in range(12))
    rows += [{"instruct": "i", "query": f"文本：名单{i}", "answer": names} for i in range(3)]
    rows += [{"instruct": "i", "query": "文本：北京0", "answer": "北京_地名"}]  # the same sentence twice
    path = tmp_path / "train.txt"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_validation_rows_are_never_trained_on_and_rare_types_are_drawn_more(tmp_path):
    for sampling, person_share in (("natural", (0.1, 0.3)), ("types", (0.5, 1.0))):
        out = tmp_path / sampling
        out.mkdir()
        train, validation = real_model.split_rows(rows_file(tmp_path), 1000, 10, 0.1, sampling, out, val_lists=2)
        trained = [json.loads(line) for line in train.read_text(encoding="utf-8").splitlines()]
        held = [json.loads(line) for line in validation.read_text(encoding="utf-8").splitlines()]
        assert len(held) == 10 and all(r["answer"] != "没有" for r in held)
        assert sum(r["query"].startswith("文本：名单") for r in held) == 2
        assert not {r["query"] for r in held} & {r["query"] for r in trained}
        assert sum(r["answer"] == "没有" for r in trained) <= 100
        mentions = Counter(line.rpartition("_")[2] for r in trained for line in r["answer"].split("\n"))
        persons = mentions["人名"] / (mentions["人名"] + mentions["地名"])
        assert person_share[0] < persons < person_share[1], (sampling, mentions)
        assert mentions["地名"] > 0


def test_more_lists_than_the_train_set_holds_is_one_line(tmp_path):
    with pytest.raises(UserError, match="only 3 rows name 10 or more persons: lower --val_lists"):
        real_model.split_rows(rows_file(tmp_path), 1000, 10, 0.1, "natural", tmp_path, val_lists=4)
