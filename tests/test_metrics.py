"""Entity-level metrics against hand-counted answers."""

from __future__ import annotations

import pytest

from llama_ner.generation.metrics import format_table, parse_answer, parse_entities, prf, score


def test_parse_entities_lines_and_none():
    assert parse_entities("北京_地名\n周恩来_人名") == {("北京", "地名"), ("周恩来", "人名")}
    assert parse_entities("没有") == set()
    assert parse_entities("") == set()
    assert parse_entities(" 北京_地名 \n\n没有\n") == {("北京", "地名")}


def test_parse_entities_duplicates_collapse():
    assert parse_entities("日_地名\n日_地名\n京_地名") == {("日", "地名"), ("京", "地名")}


def test_parse_entities_type_after_last_underscore():
    assert parse_entities("晋察冀_根据地_地名") == {("晋察冀_根据地", "地名")}


def test_malformed_lines_are_counted_not_predicted():
    pairs, malformed = parse_answer("杨次公政人名\n_地名\n北京_\n北京_地名\n___")
    assert pairs == {("北京", "地名")}
    assert malformed == 4


def test_prf_zero_denominators():
    assert prf(0, 0, 0) == {"precision": None, "recall": None, "f1": None}  # undefined, not 0
    assert prf(0, 3, 0)["precision"] == 0.0
    assert prf(1, 1, 3) == pytest.approx({"precision": 0.5, "recall": 0.25, "f1": 1 / 3})


def test_score_hand_counted():
    gold = [
        "北京_地名\n周恩来_人名",  # pred finds 北京 (tp), misses 周恩来 (fn)
        "新华日报_机构名",  # pred has the wrong type: fp 地名 + fn 机构名
        "没有",  # pred 没有: exact match, nothing counted
        "中国共产党_机构名",  # pred a substring: fp + fn (partial matches do not count)
        "越秀_机构名",  # pred repeats the right pair: one tp, no fp
        "没有",  # pred invents one entity: fp, plus one malformed line
    ]
    pred = ["北京_地名", "新华日报_地名", "没有", "共产党_机构名", "越秀_机构名\n越秀_机构名", "长安_地名\n胡说"]
    m = score(gold, pred)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 3, 3)
    assert m["precision"] == pytest.approx(2 / 5)
    assert m["recall"] == pytest.approx(2 / 5)
    assert m["f1"] == pytest.approx(2 / 5)
    assert m["exact_match"] == pytest.approx(2 / 6)
    assert m["malformed"] == 1
    assert m["n"] == 6
    per = m["per_type"]
    assert (per["地名"]["tp"], per["地名"]["fp"], per["地名"]["fn"]) == (1, 2, 0)
    assert (per["人名"]["tp"], per["人名"]["fp"], per["人名"]["fn"]) == (0, 0, 1)
    assert (per["机构名"]["tp"], per["机构名"]["fp"], per["机构名"]["fn"]) == (1, 1, 2)
    assert per["机构名"]["support"] == 3
    assert per["地名"]["precision"] == pytest.approx(1 / 3)
    assert per["人名"]["f1"] == 0.0


def test_score_perfect_and_order_insensitive():
    m = score(["北京_地名\n周恩来_人名", "没有"], ["周恩来_人名\n北京_地名", "没有"])
    assert (m["precision"], m["recall"], m["f1"], m["exact_match"]) == (1.0, 1.0, 1.0, 1.0)


def test_score_unknown_type_is_a_false_positive():
    m = score(["北京_地名"], ["北京_城市"])
    assert (m["tp"], m["fp"], m["fn"]) == (0, 1, 1)
    assert m["per_type"]["城市"]["fp"] == 1


def test_score_rejects_misaligned_lists():
    with pytest.raises(ValueError, match="2 gold answers but 1 predictions"):
        score(["没有", "没有"], ["没有"])


def test_format_table_lists_every_type_and_micro():
    table = format_table(score(["北京_地名"], ["北京_地名"]))
    assert [line.split()[0] for line in table.splitlines()[1:5]] == ["人名", "地名", "机构名", "micro"]
    assert "exact match 1.0000 over 1 rows" in table


def test_nothing_to_find_is_undefined_not_zero():
    """Every row answers 没有 and every prediction is right: no 0.000 that reads as total failure."""
    metrics = score(["没有", "没有", "没有"], ["没有", "没有", "没有"])
    assert metrics["f1"] is None and metrics["precision"] is None and metrics["recall"] is None
    assert metrics["exact_match"] == 1.0 and metrics["none_accuracy"] == 1.0 and metrics["none_rows"] == 3
    table = format_table(metrics)
    assert "undefined" in table and "n/a" in table and "0.0000" not in table.splitlines()[-3]
    assert "`没有` right on 1.0000 of 3 such rows" in table
    wrong = score(["没有", "没有"], ["北京_地名", "没有"])  # one entity predicted where none was: F1 0, defined
    assert wrong["f1"] == 0.0 and wrong["precision"] == 0.0 and wrong["none_accuracy"] == 0.5
    assert score(["北京_地名"], ["北京_地名"])["per_type"]["人名"]["f1"] is None  # a type nobody named
