"""Long texts answered in windows no longer than the texts the model was trained on, answers merged.

    windows = split_windows(text, 100)       # [Window(start, end, keep_start, keep_end), ...]
    answer = merge_answers(text, windows, [answer_of(text[w.start:w.end]) for w in windows])
    answers = answer_in_windows(texts, 100, lambda pieces: answers_of([piece for _, piece in pieces]))

A model trained on texts of at most N characters has never answered a longer one: the MSRA test set
holds a 2,430-character list of 567 names, and a generation limit sized for sentences cuts its
answer after a few entities. Windows end after sentence punctuation (。！？；, then ，、：) where there
is some within the limit; a text with none is cut hard with an overlap, so an entity the cut splits is
whole in the neighbouring window. Each window keeps the entities that start inside its own share of
the text (`keep_start`..`keep_end`, the overlaps divided at their middle).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from dataset import NO_ENTITY
from llama_ner.generation.metrics import locate, ordered_pairs

SENTENCE_ENDS = "。！？；!?;"
CLAUSE_ENDS = "，、：,:"
OVERLAP = 24  # characters two hard-cut windows share: longer than nearly every MSRA entity


class Window(NamedTuple):
    start: int  # the window is text[start:end]
    end: int
    keep_start: int  # its answer's entities that start in [keep_start, keep_end) are kept
    keep_end: int


def split_windows(text: str, limit: int) -> list[Window]:
    """Windows of at most `limit` characters covering `text`; one window when it fits (or limit <= 0)."""
    if limit <= 0 or len(text) <= limit:
        return [Window(0, len(text), 0, len(text))]
    overlap = min(OVERLAP, limit // 4)
    spans, start = [], 0
    while start < len(text):
        end = min(start + limit, len(text))
        if end < len(text):
            cut = last_boundary(text, start, end)
            if cut:
                spans.append((start, cut, False))
                start = cut
                continue
        spans.append((start, end, end < len(text)))
        start = end - overlap if end < len(text) else end
    windows = []
    for i, (begin, end, hard) in enumerate(spans):
        keep_start = windows[-1].keep_end if windows else 0
        keep_end = (end + spans[i + 1][0]) // 2 if hard else end  # a hard cut's overlap is shared at its middle
        windows.append(Window(begin, end, keep_start, keep_end if i + 1 < len(spans) else len(text)))
    return windows


def last_boundary(text: str, start: int, end: int) -> int:
    """The position after the last sentence end in text[start:end], else after the last clause end; 0: none."""
    for marks in (SENTENCE_ENDS, CLAUSE_ENDS):
        cut = max(text.rfind(mark, start, end) for mark in marks)
        if cut > start:
            return cut + 1
    return 0


def merge_answers(text: str, windows: list[Window], answers: list[str]) -> str:
    """One answer for `text` from its windows' answers: the distinct `实体_类型` lines in the order the
    entities first occur, each kept by the window whose share it starts in; `没有` when none is left.
    A line whose entity is not in its window (unconstrained answers) is kept as it was answered."""
    if len(windows) == 1:
        return answers[0]
    found: dict[tuple[str, str], int] = {}  # each kept line -> where its entity first occurs in text
    for window, answer in zip(windows, answers, strict=True):
        piece, pairs = text[window.start : window.end], ordered_pairs(answer)
        starts: dict[tuple[str, str], list[int]] = {pair: [] for pair in pairs}
        for start, end, kind in locate(piece, pairs):  # 李 of a cut 李铁映 is not the 李 inside 李鹏
            starts[piece[start:end], kind].append(window.start + start)
        for pair, where in starts.items():
            kept = [start for start in where if window.keep_start <= start < window.keep_end]
            if kept or not where:
                first = min(kept or [window.keep_start])
                found[pair] = min(found.get(pair, first), first)
    lines = [f"{entity}_{kind}" for (entity, kind), _ in sorted(found.items(), key=lambda item: item[1])]
    return "\n".join(lines) or NO_ENTITY


def answer_in_windows(texts: list[str], limit: int, answer: Callable[[list[tuple[int, str]]], list[str]]) -> list[str]:
    """One answer a text: `answer` gets every window as (index of its text, window text), all texts'
    windows in one call (one batched generation), and returns an answer for each; they are merged."""
    splits = [split_windows(text, limit) for text in texts]
    pieces = [(i, texts[i][w.start : w.end]) for i, windows in enumerate(splits) for w in windows]
    split = [len(windows) for windows in splits if len(windows) > 1]
    if split:
        print(f"{len(split)} texts longer than {limit} characters are answered in {sum(split)} windows (window_chars)")
    answers, merged = answer(pieces), []
    for text, windows in zip(texts, splits, strict=True):
        merged.append(merge_answers(text, windows, answers[: len(windows)]))
        answers = answers[len(windows) :]
    return merged
