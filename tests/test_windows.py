"""Long texts in windows: every window fits, the windows cover the text, and an answer per window merges
into the answer of the whole text (the test set's 2,430-character list of names is the case)."""

from __future__ import annotations

import json

from llama_ner.generation.metrics import parse_entities
from llama_ner.generation.windows import merge_answers, split_windows

# the opening of the MSRA test set's longest row: names with nothing between them
NAMES = "江泽民 李鹏 乔石 李瑞环 彭真 朱镕基 刘华清 胡锦涛 荣毅仁 丁关根 田纪云 李岚清 李铁映 杨白冰 吴邦国".split()


def oracle_answer(text: str, spans: list[tuple[int, int, str]], window) -> str:
    """What a perfect model answers for one window: the entities wholly inside it, plus the part of one a
    hard cut splits (a plausible mistake the merge must drop)."""
    lines = [f"{text[s:e]}_{kind}" for s, e, kind in spans if window.start <= s and e <= window.end]
    lines += [f"{text[s : window.end]}_{kind}" for s, e, kind in spans if s < window.end < e]
    return "\n".join(dict.fromkeys(lines)) or "没有"


def test_windows_fit_cover_the_text_and_cut_after_punctuation():
    text = "甲" * 30 + "。" + "乙" * 50 + "，" + "丙" * 90
    windows = split_windows(text, 40)
    assert all(w.end - w.start <= 40 for w in windows)
    assert windows[0] == (0, 31, 0, 31)  # after the 。, not at 40
    assert [w.keep_start for w in windows[1:]] == [w.keep_end for w in windows[:-1]]  # the shares tile the text
    assert windows[0].keep_start == 0 and windows[-1].keep_end == len(text)
    covered = set().union(*(range(w.start, w.end) for w in windows))
    assert covered == set(range(len(text)))
    assert split_windows(text, 0) == split_windows(text, len(text)) == [(0, len(text), 0, len(text))]


def test_a_list_of_names_cut_hard_merges_into_every_name_once():
    text, spans = "主任委员：", []
    for name in NAMES * 3:
        spans.append((len(text), len(text) + len(name), "人名"))
        text += name
    windows = split_windows(text, 30)
    overlapping = any(w.start < prev.end for prev, w in zip(windows, windows[1:], strict=False))
    assert len(windows) > 4 and overlapping
    answers = [oracle_answer(text, spans, w) for w in windows]
    assert any("_人名" in a and a.split("\n")[-1].split("_")[0] not in NAMES for a in answers)  # a cut name
    merged = merge_answers(text, windows, answers)
    assert merged.split("\n") == [f"{name}_人名" for name in NAMES]  # in order of first occurrence, no part


def test_sentences_merge_to_the_union_of_their_answers(tmp_path):
    sentences = [
        ("郑振铎和阿英都是国民党时期的藏书家。", ["郑振铎_人名", "阿英_人名", "国民党_机构名"]),
        ("北京市的书店很多。", ["北京市_地名"]),
        ("没有名字的一句话。", []),
        ("他又回到北京市，见到了阿英。", ["北京市_地名", "阿英_人名"]),
    ]
    text = "".join(s for s, _ in sentences)
    windows = split_windows(text, 20)
    (one, _), (two, _), (three, _), (four, _) = sentences
    assert [text[w.start : w.end] for w in windows] == [one, two + three, four]  # short sentences share one
    answers = ["\n".join(sentences[0][1]), "\n".join(sentences[1][1]), "\n".join(sentences[3][1])]
    merged = merge_answers(text, windows, answers)
    union = {pair for _, lines in sentences for pair in parse_entities("\n".join(lines))}
    assert parse_entities(merged) == union and len(merged.split("\n")) == len(union)
    assert merge_answers(text, windows, ["没有"] * 3) == "没有"
    assert json.dumps(merged, ensure_ascii=False).count("阿英") == 1
