"""Predict entities for a few texts with a trained LoRA and print them beside the gold answers.

    python predict.py                                     # the three built-in MSRA examples
    python predict.py --predict_path=my_texts.txt         # plain text, one sentence per line
    python predict.py --predict_path=data/msra/instruct_data/dev.txt --max_rows=5
    python predict.py --predict_path=my_texts.txt --output_path=tagged.jsonl   # tag a file

Loading is test.py's: train_args.json (--train_args_path=...) plus overrides. A
--predict_path file is either instruction JSON lines ({"instruct", "query"[, "answer"]})
or plain text, one sentence per line, which gets wrapped in the NER instruction. With --output_path
the answers go to JSON lines instead of the screen, one a row: {"text", "answer", "entities": [{"text",
"type", "spans": [[start, end]]}]} (serve.py's /v1/ner shape; every place each entity occurs), batched
(--eval_batch_size) with a progress bar.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from config_utils import print_config
from dataset import NER_INSTRUCTION, QUERY_PREFIX, DataError, load_data, ner_row
from llama_ner.generation.inference import engine_answer_rows, resolve_config
from llama_ner.generation.loading import spec_from_config
from llama_ner.generation.metrics import answer_entities, score
from llama_ner.io_utils import atomic_write_text, check_output_file, read_lines, run_cli

PREDICT_DEFAULTS = {
    "predict_path": "",  # '' = the built-in examples; else instruction JSON lines or plain text lines
    "max_rows": 0,  # predict only the first N rows; 0 = all
    "output_path": "",  # '' = print; else JSON lines with each entity's text, type and character spans
}

EXAMPLES = [
    ner_row(
        "我们是受到郑振铎先生、阿英先生著作的启示，从个人条件出发，瞄准现代出版史研究的空白，"
        "重点集藏解放区、国民党毁禁出版物。",
        "郑振铎_人名\n阿英_人名\n国民党_机构名",
    ),
    ner_row("去年，我们又被评为“北京市首届家庭藏书状元明星户”。", "北京市_地名"),
    ner_row(
        "藏书家、作家姜德明先生在1997年出版的书话专集《文林枝叶》中以“爱书的朋友”为题，"
        "详细介绍了我们夫妇的藏品及三口之家以书为友、好乐清贫的逸闻趣事。",
        "姜德明_人名",
    ),
]


def is_json_lines(lines: list[str]) -> bool:
    """True when the first non-blank line is a JSON object."""
    first = next((line for line in lines if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def read_rows(path: str, config: Any, trained_instruction: str = "") -> list[dict[str, Any]]:
    """Rows to predict: the built-in examples, instruction JSON lines, or plain text lines (the examples and
    plain lines get the instruction the model was trained with, the seed's when none was recorded)."""
    instruction = trained_instruction or NER_INSTRUCTION
    if not path:
        names = {"instruct": config.instruct_column, "query": config.query_column, "answer": config.response_column}
        return [{names[k]: instruction if k == "instruct" else v for k, v in r.items()} for r in EXAMPLES]
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: file not found; pass --predict_path=<JSON lines or one sentence per line>")
    lines = read_lines(file, DataError)
    if is_json_lines(lines):
        return load_data(file, (config.instruct_column,), optional=(config.query_column,))
    rows = []
    for line in lines:
        if line.strip():
            row = ner_row(line.strip(), instruction=instruction)
            rows.append({config.instruct_column: row["instruct"], config.query_column: row["query"]})
    if not rows:
        raise DataError(f"{file}: no text; write one sentence per line")
    return rows


def show(rows: list[dict[str, Any]], predictions: list[str], config: Any) -> None:
    for row, pred in zip(rows, predictions, strict=True):
        print("=" * 100)
        text = row[config.instruct_column] + (row.get(config.query_column) or "")
        print("文本 >>> ", json.dumps(text, ensure_ascii=False))
        print("预测 >>> ", pred)
        if config.response_column in row:
            print("真实 >>> ", row[config.response_column])


def write_tagged(path: str, rows: list[dict[str, Any]], predictions: list[str], config: Any) -> None:
    lines = []
    for row, answer in zip(rows, predictions, strict=True):
        text = (row.get(config.query_column) or "").removeprefix(QUERY_PREFIX)
        record = {"text": text, "answer": answer, "entities": answer_entities(text, answer)}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    atomic_write_text(path, "".join(lines))


def main(argv: list[str] | None = None) -> list[str]:
    config = resolve_config(sys.argv[1:] if argv is None else argv, PREDICT_DEFAULTS, __doc__, __file__)
    print_config(config)
    if config.output_path:  # checked before the model loads
        check_output_file(config.output_path, "output_path", [config.predict_path, config.train_args_path])
    spec = spec_from_config(config)
    rows = read_rows(config.predict_path, config, spec.instruction)
    if config.max_rows > 0:
        rows = rows[: config.max_rows]
    predictions, _ = engine_answer_rows(rows, config, spec)
    if config.output_path:
        write_tagged(config.output_path, rows, predictions, config)
    else:
        show(rows, predictions, config)
    gold = [r.get(config.response_column) for r in rows]
    summary = f"{len(rows)} texts predicted"
    if all(g is not None for g in gold):
        m = score(gold, predictions)
        if m["f1"] is None:
            summary += f"; no entity expected or predicted (F1 undefined), exact match {m['exact_match']:.4f}"
        else:
            summary += f"; against the gold answers: precision {m['precision']:.4f} recall {m['recall']:.4f}"
            summary += f" f1 {m['f1']:.4f}"
    if config.output_path:
        found = sum(len(answer_entities("", a)) for a in predictions)
        summary += f", {found} entities; wrote {config.output_path}"
    print("=" * 100)
    print(summary)
    return predictions


if __name__ == "__main__":
    run_cli(main)
