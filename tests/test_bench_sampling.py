"""bench/real_model.py's split of the train set: the validation rows (lists of names among them when asked)
are never trained on, not even as a duplicate; type-balanced sampling draws rows of a rare type more often;
run-on lists answer every name they run together, the validation's from names no training list holds; bad
arguments are one line and exit 2."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter

import pytest

from conftest import ROOT
from llama_ner.io_utils import UserError

sys.path.insert(0, str(ROOT / "bench"))
import list_split  # noqa: E402
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


def test_run_on_lists_answer_every_name_in_order_and_validation_names_are_never_trained_as_lists(tmp_path):
    names = [chr(0x4E00 + k) + chr(0x4E00 + k + 1) + chr(0x4E00 + k + 2) for k in range(0, 600, 3)]
    rows = [{"instruct": "i", "query": f"文本：{name}说", "answer": f"{name}_人名"} for name in names]
    rows += [{"instruct": "i", "query": f"文本：无{i}", "answer": "没有"} for i in range(20)]
    source = tmp_path / "rows.txt"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    train, validation = real_model.split_rows(source, 0, 10, 0.1, "natural", tmp_path, list_share=0.5, val_run_on=3)

    def run_on(path):
        return [r for r in map(json.loads, path.read_text(encoding="utf-8").splitlines()) if r["answer"].count("\n")]

    trained, held = run_on(train), run_on(validation)
    assert len(held) == 3 and len(trained) == int(0.5 * (193 + 20))  # half as many as the other training rows
    for row in trained + held:
        text = row["query"].removeprefix("文本：")
        answered = [entry.removesuffix("_人名") for entry in row["answer"].split("\n")]
        assert text.replace("（女）", "") == "".join(answered)  # every name, in the order of the text, once
        assert len(set(answered)) == len(answered) and len(text) <= real_model.RUN_ON_CHARS[1]
    listed = {entry for row in trained for entry in row["answer"].split("\n")}
    assert not listed & {entry for row in held for entry in row["answer"].split("\n")}
    lists, mentions, persons = list_split.run_on_mentions(train)  # what bench/list_split.py --train prints
    assert (lists, persons) == (len(trained), 193 + mentions)  # 193 sentences name one person each
    assert mentions == sum(r["answer"].count("\n") + 1 for r in trained)


@pytest.mark.parametrize(
    "args, says",
    [
        (["--train_minutes", "0"], "--train_minutes 0.0: give a positive number of minutes"),
        (["--list_share", "1"], "--list_share 1.0: give a share from 0 to below 1"),
        (["--val_rows", "8", "--val_run_on", "5", "--val_lists", "4"], "give 0 to --val_rows (8) lists of names"),
    ],
)
def test_bad_bench_arguments_are_one_line_and_exit_2(args, says, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "real_model.py"), *args, "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 2 and says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not list(tmp_path.iterdir())


def test_few_names_end_a_run_on_list_early_and_no_names_is_one_line():
    rows = [json.loads(r) for r in real_model.run_on_lists(["张三", "李四"], 3, random.Random(0), "i")]
    assert [sorted(r["answer"].split("\n")) for r in rows] == [["张三_人名", "李四_人名"]] * 3  # does not hang
    with pytest.raises(UserError, match="too few person names .* give --list_share 0 --val_run_on 0"):
        real_model.run_on_lists([], 1, random.Random(0), "i")
