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
    assert [line.split()[0] for line in table.splitlines()[2:6]] == ["人名", "地名", "机构名", "micro"]
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


# Span-level scores against seqeval (the scorer NER papers report with) on hand-written character BIO tags.
# Each case: text, gold answer, predicted answer, gold tags, predicted tags (one tag a character).
SPAN_CASES = [
    # an entity that occurs twice: both occurrences are spans, both found
    ("北京人爱北京", "北京_地名", "北京_地名", "B-地名 I-地名 O O B-地名 I-地名", "B-地名 I-地名 O O B-地名 I-地名"),
    # one entity missed, one found
    ("李四去上海", "李四_人名\n上海_地名", "上海_地名", "B-人名 I-人名 O B-地名 I-地名", "O O O B-地名 I-地名"),
    # the wrong type: a miss and a spurious span
    ("新华社报道", "新华社_机构名", "新华社_地名", "B-机构名 I-机构名 I-机构名 O O", "B-地名 I-地名 I-地名 O O"),
    # a partial span, and the longer entity wins where an answer's two entities overlap
    (
        "北京大学在北京",
        "北京大学_机构名\n北京_地名",
        "北京_机构名",
        "B-机构名 I-机构名 I-机构名 I-机构名 O B-地名 I-地名",
        "B-机构名 I-机构名 O O O B-机构名 I-机构名",
    ),  # fmt: skip
    # nothing expected, a spurious one answered
    ("今天很好", "没有", "今天_人名", "O O O O", "B-人名 I-人名 O O"),
    # adjacent entities of one type stay two spans
    ("张三李四", "张三_人名\n李四_人名", "张三李四_人名", "B-人名 I-人名 B-人名 I-人名", "B-人名 I-人名 I-人名 I-人名"),
]


def test_span_scores_equal_seqeval():
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    from llama_ner.generation.metrics import span_score

    texts, golds, preds, gold_tags, pred_tags = (list(column) for column in zip(*SPAN_CASES, strict=True))
    y_true, y_pred = [t.split() for t in gold_tags], [t.split() for t in pred_tags]
    assert [len(t) for t in y_true] == [len(t) for t in texts] == [len(t) for t in y_pred]
    ours = span_score(texts, golds, preds)
    assert ours["precision"] == pytest.approx(precision_score(y_true, y_pred))
    assert ours["recall"] == pytest.approx(recall_score(y_true, y_pred))
    assert ours["f1"] == pytest.approx(f1_score(y_true, y_pred))
    report = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    for kind in ("人名", "地名", "机构名"):
        assert ours["per_type"][kind]["f1"] == pytest.approx(report[kind]["f1-score"]), kind
        assert ours["per_type"][kind]["support"] == report[kind]["support"], kind
    assert (ours["tp"], ours["fp"], ours["fn"]) == (3, 5, 6)  # hand-counted: 2+1+0+0+0+0, 0+0+1+2+1+1, 0+1+1+2+0+2


def test_span_scores_differ_from_pair_scores_where_an_entity_repeats():
    from llama_ner.generation.metrics import span_score

    text, gold, pred = "北京人爱北京，上海", "北京_地名\n上海_地名", "北京_地名"
    assert score([gold], [pred])["recall"] == pytest.approx(1 / 2)  # pairs: 北京 once, 上海
    assert span_score([text], [gold], [pred])["recall"] == pytest.approx(2 / 3)  # spans: 北京 twice, 上海


def test_error_report_names_missed_wrong_and_spurious():
    from llama_ner.generation.metrics import error_report

    golds = ["北京_地名\n李四_人名", "北京_地名\n新华社_机构名", "没有"]
    preds = ["李四_人名", "北京_机构名", "今天_人名"]
    report = error_report(golds, preds)
    assert report["missed"] == {"地名": [["北京", 1]], "机构名": [["新华社", 1]]}
    assert report["wrong_type"] == {"地名": [["北京 -> 机构名", 1]]}
    assert report["spurious"] == {"人名": [["今天", 1]]}


def test_table_names_both_scores():
    from llama_ner.generation.metrics import span_score

    metrics = score(["北京_地名"], ["北京_地名"])
    metrics["span_level"] = span_score(["北京"], ["北京_地名"], ["北京_地名"])
    table = format_table(metrics)
    assert "entity pairs" in table and "spans (start, end and type" in table
    assert table.count("micro       1.0000    1.0000    1.0000") == 2
