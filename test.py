"""Evaluate a trained LoRA: generate an answer for every dev row, score entity-level P/R/F1.

    python test.py                  # reads checkpoint/msra/train_trainer/adapter_model/train_args.json
    python test.py --train_args_path=checkpoint/msra/train_deepspeed/adapter_model/train_args.json
    python test.py --dev_path=data/msra/instruct_data/dev.txt --eval_batch_size=32 --max_rows=200

Two scores: distinct (entity, type) pairs per row (this project's F1, top level of test_metrics.json) and
span-level (`span_level`: each entity located in its text by character offsets, start, end and type
matched, as seqeval counts and as published MSRA results are reported). Writes test_predictions.jsonl
(query, answer, prediction per row), test_metrics.json (both scores, per type) and test_errors.json (per type
the most frequent missed, wrongly typed and spurious entities) into save_dir (or --output_dir).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from config_utils import ConfigError, print_config
from dataset import QUERY_PREFIX, load_data
from llama_ner.generation.inference import engine_answer_rows, resolve_config
from llama_ner.generation.loading import spec_from_config
from llama_ner.generation.metrics import error_report, format_table, score, span_score
from llama_ner.io_utils import atomic_write_text, check_output_file, run_cli

OUTPUT_FILES = ("test_predictions.jsonl", "test_metrics.json", "test_errors.json")
TEST_DEFAULTS = {
    "max_rows": 0,  # evaluate only the first N rows of dev_path; 0 = all
    "output_dir": "",  # where test_predictions.jsonl and test_metrics.json go; '' = save_dir
}


def prediction_records(rows: list[dict[str, Any]], predictions: list[str], config: Any) -> list[dict[str, str]]:
    return [
        {"query": row.get(config.query_column) or "", "answer": row[config.response_column], "prediction": pred}
        for row, pred in zip(rows, predictions, strict=True)
    ]


def write_outputs(out_dir: Path, records: list[dict[str, str]], metrics: dict[str, Any], errors: dict) -> None:
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    predictions_file, metrics_file, errors_file = (out_dir / name for name in OUTPUT_FILES)
    atomic_write_text(predictions_file, lines)
    atomic_write_text(metrics_file, json.dumps(metrics, ensure_ascii=False, indent=2) + "\n")
    atomic_write_text(errors_file, json.dumps(errors, ensure_ascii=False, indent=2) + "\n")


def warn_other_instruction(rows: list[dict[str, Any]], config: Any, trained: str) -> None:
    """Rows asked with another instruction than the model learned (the spec's, from train_args.json) score low."""
    other = sum(row[config.instruct_column] != trained for row in rows) if trained else 0
    if other:
        print(f"warning: {other} of {len(rows)} rows of {config.dev_path} have another instruction than the model "
              f"was trained with ({trained!r}); make the file with the same process.py --instruction",
              file=sys.stderr)  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    config = resolve_config(sys.argv[1:] if argv is None else argv, TEST_DEFAULTS, __doc__, __file__)
    print_config(config)
    if not config.dev_path:
        raise ConfigError(f"{config.train_args_path}: dev_path is empty; pass --dev_path=<instruction JSON lines>")
    out_dir = Path(config.output_dir or config.save_dir)
    for name in OUTPUT_FILES:  # checked before hours of generation, not after
        check_output_file(out_dir / name, "output_dir", [config.dev_path, config.train_args_path])
    columns = (config.instruct_column, config.response_column)
    rows = load_data(config.dev_path, columns, config.response_column, (config.query_column,))
    if config.max_rows > 0:
        rows = rows[: config.max_rows]
    spec = spec_from_config(config)
    warn_other_instruction(rows, config, spec.instruction)
    start = time.perf_counter()
    predictions, constraint = engine_answer_rows(rows, config, spec)
    seconds = time.perf_counter() - start
    golds = [r[config.response_column] for r in rows]
    metrics = score(golds, predictions)
    texts = [(r.get(config.query_column) or "").removeprefix(QUERY_PREFIX) for r in rows]
    metrics["span_level"] = span_score(texts, golds, predictions)
    metrics.update(dev_path=str(config.dev_path), model_dir=str(spec.base), adapter_path=str(spec.adapter or "none"))
    metrics.update(constrained=constraint is not None, entity_types=list(constraint.types) if constraint else None)
    write_outputs(out_dir, prediction_records(rows, predictions, config), metrics, error_report(golds, predictions))
    print(format_table(metrics))
    print(
        f"{len(rows)} rows in {seconds:.1f}s, model loading included ({len(rows) / seconds:.2f} rows/s, engine "
        f"{config.engine}); "
        f"wrote {', '.join(str(out_dir / name) for name in OUTPUT_FILES)}"
    )
    return metrics


if __name__ == "__main__":
    run_cli(main)
