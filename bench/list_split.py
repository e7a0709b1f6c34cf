"""Scores of test.py runs split into the rows that are lists of names and the rest, so that a gain on a
list is not mistaken for a gain on sentences (MSRA's test set: one row of 567 names holds 66% of the persons
of its first 500 rows).

    python bench/list_split.py .bench/real_lists/tuned .bench/real_model/tuned        # test.py --output_dir's
    python bench/list_split.py .bench/real_lists/val_new .bench/real_lists/val_old --train .bench/real_lists/train.txt

A list is a row whose gold answer names LIST_NAMES persons or more (bench/real_model.py's rule). With
--train, also counts the run-on lists in a training file (text = its answered names run together).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from real_model import FEMALE_MARK, LIST_NAMES  # noqa: E402

from dataset import QUERY_PREFIX  # noqa: E402
from llama_ner.generation.metrics import score  # noqa: E402

TYPES = ("人名", "地名", "机构名")


def is_list(answer: str) -> bool:
    return answer.count("_人名") >= LIST_NAMES


def split_line(name: str, rows: list[dict]) -> str:
    """One table row: P / R / F1 and per-type F1 of `rows`."""
    m = score([r["answer"] for r in rows], [r["prediction"] for r in rows])
    types = " | ".join(f"{(m['per_type'].get(k, {}).get('f1') or 0):.3f}" for k in TYPES)
    return f"| {name} | {len(rows)} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {types} |"


def run_on_mentions(train_file: Path) -> tuple[int, int, int]:
    """(run-on list rows, their person mentions, all person mentions) of a training file."""
    rows = lists = listed = 0
    for line in train_file.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        names = [e.removesuffix("_人名") for e in row["answer"].split("\n") if e.endswith("_人名")]
        rows += len(names)
        text = row["query"].removeprefix(QUERY_PREFIX).replace(FEMALE_MARK, "")
        if len(names) > 1 and len(names) == row["answer"].count("\n") + 1 and text == "".join(names):
            lists, listed = lists + 1, listed + len(names)
    return lists, listed, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="test.py --output_dir folders (each has test_predictions.jsonl)")
    parser.add_argument("--train", help="a training file whose run-on lists to count")
    cli = parser.parse_args()
    for path in (Path(run) / "test_predictions.jsonl" for run in cli.runs):
        if not path.is_file():
            sys.exit(f"{path}: missing: give a folder test.py wrote (its --output_dir)")
    print("| run | rows | P | R | F1 | 人名 | 地名 | 机构名 |\n|---|---|---|---|---|---|---|---|")
    for run in map(Path, cli.runs):
        rows = [json.loads(line) for line in (run / "test_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
        print(split_line(f"{run}: lists of names", [r for r in rows if is_list(r["answer"])]))
        print(split_line(f"{run}: the other rows", [r for r in rows if not is_list(r["answer"])]))
    if cli.train:
        lists, listed, persons = run_on_mentions(Path(cli.train))
        print(f"\n{cli.train}: {lists} run-on lists, {listed} of its {persons} person mentions")


if __name__ == "__main__":
    main()
