"""Bad input, script by script: a one-line error (exit code 2) naming the problem, nothing written,
no input changed.

Each case is one row of CASES: (script, arguments, expected exit code, a word the message must
contain). `{name}` in an argument is a path of the `world` fixture (tiny models, adapters, data
files, damaged and misencoded copies) or `{out}`, an empty folder of the case's own. After every
case, every file of the world is unchanged (size and modification time) and `{out}` holds nothing
unless the case exits 0. Add a row for each new script or flag.

Most rows run in-process (the script's main() under io_utils.run_cli, as `python script.py` runs
it); SUBPROCESS_ROWS run for real, to show exit code 2 and no traceback from a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from safetensors.torch import load_file, save_file

from conftest import ROOT, import_script
from dataset import load_data
from llama_ner.io_utils import UserError, run_cli
from llama_ner.tiny_models import make_tiny_chinese_loras, make_tiny_model, make_tiny_original, write_tokenizer
from memorize import train_memorized_lora

MSRA_ROWS = ROOT / "tests" / "data" / "msra_dev_instruct.txt"
MSRA_BIO = ROOT / "data" / "msra" / "ori_data" / "msra_test_bio.txt"
DS_JSON = ROOT / "deepspeed.json"


class Case(NamedTuple):
    script: str  # a key of SCRIPTS
    args: list[str]
    code: int
    word: str


SCRIPTS = {
    "process": "process",
    "train_trainer": "train_trainer",
    "train_deepspeed": "train_deepspeed",
    "test": "test",
    "predict": "predict",
    "chat": "chat_ner",
    "convert": "convert_llama_weights_to_hf",
    "merge": "merge_llama_with_chinese_lora",
    "export": "export_gguf",
    "serve": "serve",
    "tiny": "llama_ner/tiny_models",
    "import": "import_gguf",
}
TRAIN = ["model_dir={tiny}", "train_path={dev}", "dev_path=", "deepspeed_json_path={ds}", "save_dir={out}/run"]
TEST = ["--train_args_path={train_args}", "--output_dir={out}", "--max_new_tokens=4"]
PREDICT = ["--train_args_path={train_args}", "--max_new_tokens=4"]
CHAT = ["--base_model", "{tiny}", "--only_cpu", "--temperature", "0", "--max_new_tokens", "4"]
CHAT_OUT = [*CHAT, "--predictions_file", "{out}/p.json"]
CONVERT = ["--input_dir", "{orig}", "--model_size", "7B", "--output_dir", "{out}/hf"]
MERGE = ["--base_model", "{tiny}", "--lora_model", "{lora}", "--output_type", "huggingface", "--output_dir", "{out}/m"]
SERVE = ["--base_model", "{tiny}", "--only_cpu", "--port", "0"]
EXPORT = ["--model_dir", "{tiny}", "--output", "{out}/x.gguf"]
NO_GEOMETRY = "config.json: missing key 'hidden_size'"  # config.json is {"model_type": "llama"}
STALE = "(process 99999999 is gone) and holds 1.5 kB"  # {stale}/.NAME.tmp-99999999 beside each output

CASES: dict[str, Case] = {
    # process.py
    "process/gbk": Case("process", ["--in_file={bio_gbk}", "--out_file={out}/x.txt"], 2, "GB18030"),
    "process/out-is-dir": Case("process", ["--in_file={bio}", "--out_file={out}"], 2, "is a directory"),
    "process/out-is-input": Case("process", ["--in_file={bio}", "--out_file={bio}"], 2, "is the input"),
    "process/out-under-file": Case("process", ["--in_file={bio}", "--out_file={bio}/x.txt"], 2, "is a file"),
    # training: every check happens before DeepSpeed starts (init_distributed is replaced by a failure)
    "train_trainer/lora-typo": Case("train_trainer", [*TRAIN, "lora_target_modules=q_proj,vv_proj"], 2, "vv_proj"),
    "train_deepspeed/lora-typo": Case("train_deepspeed", [*TRAIN, "lora_target_modules=vv_proj"], 2, "vv_proj"),
    "train_trainer/eval-batch-0": Case("train_trainer", [*TRAIN, "eval_batch_size=0"], 2, "eval_batch_size=0"),
    "train_trainer/gbk-train": Case("train_trainer", [*TRAIN, "train_path={dev_gbk}"], 2, "GB18030"),
    "train_trainer/gbk-dev": Case("train_trainer", [*TRAIN, "dev_path={dev_gbk}"], 2, "GB18030"),
    "train_trainer/broken-config": Case("train_trainer", [*TRAIN, "model_dir={tiny_bad_config}"], 2, "config.json"),
    "train_deepspeed/broken-config": Case("train_deepspeed", [*TRAIN, "model_dir={tiny_bad_config}"], 2, "config.json"),
    "train_trainer/damaged-model": Case("train_trainer", [*TRAIN, "model_dir={tiny_damaged}"], 2, "damaged"),
    "train_trainer/damaged-peft": Case("train_trainer", [*TRAIN, "peft_path={adapter_damaged}"], 2, "damaged"),
    "train_trainer/empty-peft": Case("train_trainer", [*TRAIN, "peft_path={adapter_empty}"], 2, "no adapter_model"),
    "train_trainer/save-dir-is-file": Case("train_trainer", [*TRAIN, "save_dir={dev}"], 2, "is a file"),
    "train_trainer/save-over-peft": Case(
        "train_trainer", [*TRAIN, "peft_path={adapter}", "save_dir={run}"], 2, "replace"
    ),
    "train_trainer/config-incomplete": Case("train_trainer", [*TRAIN, "model_dir={tiny_no_geometry}"], 2, NO_GEOMETRY),
    "train_trainer/config-other-model": Case("train_trainer", [*TRAIN, "model_dir={tiny_other_config}"], 2, "implies"),
    "train_trainer/shard-lacks-tensor": Case("train_trainer", [*TRAIN, "model_dir={tiny_bad_shard}"], 2, "lacks"),
    "train_deepspeed/eval-batch-0": Case("train_deepspeed", [*TRAIN, "eval_batch_size=0"], 2, "eval_batch_size=0"),
    "train_deepspeed/gbk-train": Case("train_deepspeed", [*TRAIN, "train_path={dev_gbk}"], 2, "GB18030"),
    "train_deepspeed/save-dir-is-file": Case("train_deepspeed", [*TRAIN, "save_dir={dev}"], 2, "is a file"),
    "train_deepspeed/save-over-peft": Case(
        "train_deepspeed", [*TRAIN, "peft_path={adapter}", "save_dir={run}"], 2, "replace"
    ),
    "train_deepspeed/config-incomplete": Case(
        "train_deepspeed", [*TRAIN, "model_dir={tiny_no_geometry}"], 2, NO_GEOMETRY
    ),
    # models with their own tokenizer.json; the prompt format
    "train_trainer/no-tokenizer": Case("train_trainer", [*TRAIN, "model_dir={tiny_no_tokenizer}"], 2, "tokenizer.json"),
    "train_trainer/tokenizer-past-embeddings": Case(
        "train_trainer", [*TRAIN, "model_dir={tiny_bpe_too_big}"], 2, "embedding rows"
    ),
    "train_trainer/chat-without-template": Case("train_trainer", [*TRAIN, "prompt_template=chat"], 2, "chat template"),
    "train_trainer/unknown-template": Case("train_trainer", [*TRAIN, "prompt_template=vicuna"], 2, "alpaca, chat, raw"),
    "test/chat-without-template": Case("test", [*TEST, "--prompt_template=chat"], 2, "chat template"),
    # import_gguf.py
    "import/truncated": Case("import", ["--gguf", "{gguf_cut}", "--output_dir", "{out}/m"], 2, "GGUF"),
    "import/other-architecture": Case("import", ["--gguf", "{gguf_gpt2}", "--output_dir", "{out}/m"], 2, "'gpt2'"),
    "import/not-found": Case("import", ["--gguf", "{root}/none.gguf", "--output_dir", "{out}/m"], 2, "not found"),
    "import/not-gguf": Case("import", ["--gguf", "{dev}", "--output_dir", "{out}/m"], 2, "not a complete GGUF"),
    # data rows that look right and are not
    "train_trainer/answer-not-a-string": Case(
        "train_trainer", [*TRAIN, "train_path={rows_answer_int}"], 2, ":2: column"
    ),
    "train_trainer/query-not-a-string": Case("train_trainer", [*TRAIN, "train_path={rows_query_int}"], 2, "'query'"),
    "train_trainer/answer-empty": Case("train_trainer", [*TRAIN, "train_path={rows_answer_empty}"], 2, "write 没有"),
    "train_trainer/json-array": Case("train_trainer", [*TRAIN, "train_path={rows_array}"], 2, "JSON lines"),
    "train_trainer/eval-f1-without-file": Case("train_trainer", [*TRAIN, "eval_f1_rows=4"], 2, "eval_f1_path="),
    "train_trainer/eval-f1-trained-rows": Case(
        "train_trainer", [*TRAIN, "eval_f1_path={dev}", "eval_f1_rows=2"], 2, "also in train_path"
    ),
    "train_trainer/eval-f1-is-dev": Case(
        "train_trainer",
        [*TRAIN, "dev_path={named_output}", "eval_f1_path={named_output}", "eval_f1_rows=2"],
        2,
        "is dev_path",
    ),
    "train_trainer/train-minutes-negative": Case("train_trainer", [*TRAIN, "train_minutes=-1"], 2, "train_minutes"),
    "train_trainer/autocast-typo": Case("train_trainer", [*TRAIN, "bf16_autocast=maybe"], 2, "auto, true or false"),
    "train_deepspeed/eval-f1-without-file": Case("train_deepspeed", [*TRAIN, "eval_f1_rows=4"], 2, "eval_f1_path="),
    "process/empty-instruction": Case(
        "process", ["--in_file={bio}", "--out_file={out}/x.txt", "--instruction= "], 2, "instruction is empty"
    ),
    "test/answer-not-a-string": Case("test", [*TEST, "--dev_path={rows_answer_int}"], 2, ":2: column 'answer'"),
    "test/json-array": Case("test", [*TEST, "--dev_path={rows_array}"], 2, "a JSON array"),
    # test.py
    "test/eval-batch-0": Case("test", [*TEST, "--eval_batch_size=0"], 2, "eval_batch_size=0"),
    "test/engine-unknown": Case("test", [*TEST, "--engine=tgi"], 2, "engine='tgi'"),
    "test/engine-url-without-vllm": Case("test", [*TEST, "--engine_url=http://127.0.0.1:9"], 2, "engine=vllm"),
    "test/vllm-not-answering": Case("test", [*TEST, "--engine=vllm", "--engine_url=http://127.0.0.1:9"], 2, "reached"),
    "test/vllm-python-missing": Case("test", [*TEST, "--engine=vllm", "--vllm_python={out}/py"], 2, "not found"),
    "test/vllm-head-size-16": Case("test", [*TEST, "--engine=vllm"], 2, "head size 16 (hidden_size 64 / 4 heads)"),
    "predict/vllm-quantized": Case("predict", [*PREDICT, "--engine=vllm", "--quantization_bit=4"], 2, "unquantized"),
    "test/gbk-dev": Case("test", [*TEST, "--dev_path={dev_gbk}"], 2, "GB18030"),
    "test/broken-train-args": Case("test", ["--train_args_path={broken_json}"], 2, "not valid JSON"),
    "test/output-dir-is-file": Case("test", [*TEST, "--output_dir={dev}"], 2, "is a file"),
    "test/output-is-input": Case("test", [*TEST, "--dev_path={named_output}", "--output_dir={root}"], 2, "input"),
    "test/adapter-other-size": Case("test", [*TEST, "--adapter_path={adapter_wide}"], 2, "(8, 128)"),
    "test/adapter-other-vocab": Case("test", [*TEST, "--adapter_path={adapter_vocab}"], 2, "49953"),
    "test/adapter-empty": Case("test", [*TEST, "--adapter_path={adapter_empty}"], 2, "no adapter_model"),
    "test/adapter-damaged": Case("test", [*TEST, "--adapter_path={adapter_damaged}"], 2, "damaged"),
    "test/model-damaged": Case("test", [*TEST, "--model_dir={tiny_damaged}"], 2, "damaged"),
    "test/tokenizer-damaged": Case("test", [*TEST, "--tokenizer_path={tokenizer_damaged}"], 2, "damaged"),
    "test/no-room-for-input": Case("test", [*TEST, "--max_new_tokens=600", "--max_rows=1"], 2, "max_new_tokens=600"),
    "test/broken-config": Case("test", [*TEST, "--model_dir={tiny_bad_config}"], 2, "config.json"),
    "test/config-incomplete": Case("test", [*TEST, "--model_dir={tiny_no_geometry}"], 2, NO_GEOMETRY),
    "test/config-other-model": Case("test", [*TEST, "--model_dir={tiny_other_config}"], 2, "implies"),
    "test/shard-lacks-tensor": Case("test", [*TEST, "--model_dir={tiny_bad_shard}"], 2, "lacks"),
    "test/long-input-is-cut": Case("test", [*TEST, "--dev_path={long_row}"], 0, "cut to 508 tokens"),
    # predict.py
    "predict/gbk": Case("predict", [*PREDICT, "--predict_path={text_gbk}"], 2, "GB18030"),
    "predict/eval-batch-0": Case("predict", [*PREDICT, "--eval_batch_size=0"], 2, "eval_batch_size=0"),
    "predict/adapter-other-size": Case("predict", [*PREDICT, "--adapter_path={adapter_wide}"], 2, "(8, 128)"),
    "predict/long-input-is-cut": Case("predict", [*PREDICT, "--predict_path={long_text}"], 0, "cut to 508 tokens"),
    "predict/model-damaged": Case("predict", [*PREDICT, "--model_dir={tiny_damaged}"], 2, "damaged"),
    "predict/adapter-damaged": Case("predict", [*PREDICT, "--adapter_path={adapter_damaged}"], 2, "damaged"),
    "predict/adapter-other-vocab": Case("predict", [*PREDICT, "--adapter_path={adapter_vocab}"], 2, "49953"),
    "predict/broken-config": Case("predict", [*PREDICT, "--model_dir={tiny_bad_config}"], 2, "config.json"),
    "predict/config-incomplete": Case("predict", [*PREDICT, "--model_dir={tiny_no_geometry}"], 2, NO_GEOMETRY),
    "predict/config-more-layers": Case("predict", [*PREDICT, "--model_dir={tiny_more_layers}"], 2, "lack"),
    # chat_ner.py
    "chat/lora-none": Case("chat", [*CHAT_OUT, "--lora_model", "none", "--data_file", "{text}"], 0, ""),
    "chat/lora-config-other-rank": Case("chat", [*CHAT_OUT, "--lora_model", "{adapter_other_rank}"], 2, "r is 16"),
    "test/lora-config-other-rank": Case("test", [*TEST, "--adapter_path={adapter_other_rank}"], 2, "rank-"),
    "chat/lora-empty": Case("chat", [*CHAT_OUT, "--lora_model", "{adapter_empty}"], 2, "no adapter_model"),
    "chat/lora-other-size": Case("chat", [*CHAT_OUT, "--lora_model", "{adapter_wide}"], 2, "(8, 128)"),
    "chat/lora-other-vocab": Case("chat", [*CHAT_OUT, "--lora_model", "{adapter_vocab}"], 2, "49954"),
    "chat/gbk": Case("chat", [*CHAT_OUT, "--data_file", "{text_gbk}"], 2, "GB18030"),
    "chat/out-is-dir": Case("chat", [*CHAT, "--predictions_file", "{out}"], 2, "is a directory"),
    "chat/out-is-input": Case("chat", [*CHAT, "--data_file", "{text}", "--predictions_file", "{text}"], 2, "input"),
    "chat/out-beside-model-config": Case("chat", [*CHAT, "--predictions_file", "{tiny}/p.json"], 2, "input"),
    "chat/batch-size-0": Case("chat", [*CHAT_OUT, "--batch_size", "0"], 2, "--batch_size 0"),
    "chat/long-input-is-cut": Case("chat", [*CHAT_OUT, "--data_file", "{long_text}"], 0, "cut to 508"),
    "chat/out-under-file": Case("chat", [*CHAT, "--predictions_file", "{dev}/p.json"], 2, "is a file"),
    "chat/model-damaged": Case("chat", [*CHAT_OUT, "--base_model", "{tiny_damaged}"], 2, "damaged"),
    "chat/lora-damaged": Case("chat", [*CHAT_OUT, "--lora_model", "{adapter_damaged}"], 2, "damaged"),
    "chat/broken-config": Case("chat", [*CHAT_OUT, "--base_model", "{tiny_bad_config}"], 2, "config.json"),
    "chat/config-incomplete": Case("chat", [*CHAT_OUT, "--base_model", "{tiny_no_geometry}"], 2, NO_GEOMETRY),
    "chat/config-more-layers": Case("chat", [*CHAT_OUT, "--base_model", "{tiny_more_layers}"], 2, "lack"),
    # serve.py (fails before it listens)
    "serve/batch-0": Case("serve", [*SERVE, "--max_batch_size", "0"], 2, "--max_batch_size 0"),
    "serve/engine-url-with-hf": Case("serve", [*SERVE, "--engine", "hf", "--engine_url", "http://h:1"], 2, "vllm"),
    "serve/engine-url-not-a-url": Case("serve", [*SERVE, "--engine_url", "gpu-box:8000"], 2, "give a URL"),
    "serve/vllm-not-answering": Case("serve", [*SERVE, "--engine_url", "http://127.0.0.1:9"], 2, "reached"),
    "serve/vllm-quantized": Case("serve", [*SERVE, "--engine", "vllm", "--load_in_kbits", "4"], 2, "unquantized"),
    "serve/vllm-head-size-16": Case("serve", [*SERVE, "--engine", "vllm"], 2, "runs (32, 64, 80"),
    "serve/lora-empty": Case("serve", [*SERVE, "--lora_model", "{adapter_empty}"], 2, "no adapter_model"),
    "serve/lora-other-size": Case("serve", [*SERVE, "--lora_model", "{adapter_wide}"], 2, "(8, 128)"),
    "serve/model-damaged": Case("serve", [*SERVE, "--base_model", "{tiny_damaged}"], 2, "damaged"),
    "serve/broken-config": Case("serve", [*SERVE, "--base_model", "{tiny_bad_config}"], 2, "config.json"),
    "serve/config-incomplete": Case("serve", [*SERVE, "--base_model", "{tiny_no_geometry}"], 2, NO_GEOMETRY),
    "serve/lora-other-vocab": Case("serve", [*SERVE, "--lora_model", "{adapter_vocab}"], 2, "49953"),
    # convert_llama_weights_to_hf.py
    "convert/damaged-pth": Case("convert", [*CONVERT, "--input_dir", "{orig_damaged}"], 2, "damaged"),
    "convert/shard-size": Case("convert", [*CONVERT, "--max_shard_size", "2XB"], 2, "2XB"),
    "convert/output-is-file": Case("convert", [*CONVERT, "--output_dir", "{dev}", "--overwrite"], 2, "is a file"),
    "convert/stale-temporary": Case("convert", [*CONVERT, "--output_dir", "{stale}/hf"], 0, STALE),
    # merge_llama_with_chinese_lora.py
    "merge/damaged-lora": Case("merge", [*MERGE, "--lora_model", "{lora_damaged}"], 2, "damaged"),
    "merge/shard-size": Case("merge", [*MERGE, "--max_shard_size", "2XB"], 2, "2XB"),
    "merge/output-is-file": Case("merge", [*MERGE, "--output_dir", "{dev}", "--overwrite"], 2, "is a file"),
    "merge/broken-base-config": Case("merge", [*MERGE, "--base_model", "{tiny_bad_config}"], 2, "config.json"),
    "merge/damaged-base": Case("merge", [*MERGE, "--base_model", "{tiny_damaged}"], 2, "damaged"),
    "merge/base-config-incomplete": Case("merge", [*MERGE, "--base_model", "{tiny_no_geometry}"], 2, NO_GEOMETRY),
    "merge/base-config-other-model": Case("merge", [*MERGE, "--base_model", "{tiny_other_config}"], 2, "implies"),
    "merge/base-shard-lacks-tensor": Case("merge", [*MERGE, "--base_model", "{tiny_bad_shard}"], 2, "lacks"),
    "merge/stale-temporary": Case("merge", [*MERGE, "--output_dir", "{stale}/m"], 0, STALE),
    # export_gguf.py
    "export/overwrite-tokenizer": Case(
        "export", [*EXPORT, "--output", "{tiny}/tokenizer.model", "--overwrite"], 2, "input"
    ),
    "export/output-is-dir": Case("export", [*EXPORT, "--output", "{out}"], 2, "is a directory"),
    "export/broken-config": Case("export", [*EXPORT, "--model_dir", "{tiny_bad_config}"], 2, "config.json"),
    "export/damaged-weights": Case("export", [*EXPORT, "--model_dir", "{tiny_damaged}"], 2, "damaged"),
    "export/damaged-tokenizer": Case("export", [*EXPORT, "--tokenizer_dir", "{tokenizer_damaged}"], 2, "damaged"),
    "export/config-incomplete": Case("export", [*EXPORT, "--model_dir", "{tiny_no_geometry}"], 2, NO_GEOMETRY),
    "export/config-other-model": Case("export", [*EXPORT, "--model_dir", "{tiny_other_config}"], 2, "implies"),
    "export/shard-lacks-tensor": Case("export", [*EXPORT, "--model_dir", "{tiny_bad_shard}"], 2, "lacks"),
    "export/bin-shard-lacks-tensor": Case("export", [*EXPORT, "--model_dir", "{tiny_bad_bin_shard}"], 2, "lacks"),
    "export/sharded": Case("export", [*EXPORT, "--model_dir", "{tiny_sharded}"], 0, "exporting"),
    "export/stale-temporary": Case("export", [*EXPORT, "--output", "{stale}/x.gguf"], 0, STALE),
    # tiny_models.py
    "tiny/out-is-file": Case("tiny", ["--out_dir", "{dev}"], 2, "is a file"),
}
SUBPROCESS_ROWS = ["process/gbk", "chat/lora-empty", "export/overwrite-tokenizer"]


# ----------------------------------------------------------------------------- the world the cases read


def write_gbk(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("gb18030"))
    return path


def linked_copy(src: Path, dst: Path) -> Path:
    """A model folder whose files are symlinks to src's: cheap to make, then damage one file."""
    dst.mkdir(parents=True)
    for file in src.iterdir():
        (dst / file.name).symlink_to(file)
    return dst


def with_config(src: Path, dst: Path, config: dict) -> Path:
    """src's model with another config.json."""
    linked_copy(src, dst)
    (dst / "config.json").unlink()
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def sharded(src: Path, dst: Path, drop: str | None = None, bin_format: bool = False) -> Path:
    """src's model.safetensors as two shards (or pytorch_model-*.bin) and their index; `drop`: a tensor the
    index lists but the second shard lacks (a shard of another download)."""
    dst.mkdir()
    for file in src.iterdir():
        if file.suffix != ".safetensors":
            (dst / file.name).symlink_to(file)
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), 1):
        shard_tensors = {n: tensors[n] for n in part if n != drop}
        if bin_format:
            shard = f"pytorch_model-{i:05d}-of-00002.bin"
            torch.save(shard_tensors, dst / shard)
        else:
            shard = f"model-{i:05d}-of-00002.safetensors"
            save_file(shard_tensors, dst / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, shard)
    index = "pytorch_model.bin.index.json" if bin_format else "model.safetensors.index.json"
    (dst / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def truncated(dst: Path, src: Path, keep: float = 0.6) -> Path:
    """Replace dst (a symlink or absent) by the first `keep` share of src's bytes: a cut download."""
    data = src.read_bytes()
    dst.unlink(missing_ok=True)
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


@pytest.fixture(scope="session")
def world(tiny_alpaca, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_input_world")
    lines = MSRA_ROWS.read_text(encoding="utf-8").splitlines()[:3]
    w = {"root": root, "tiny": tiny_alpaca, "ds": DS_JSON}
    w["dev"] = root / "dev.txt"
    w["dev"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    w["dev_gbk"] = write_gbk(root / "dev_gbk.txt", w["dev"].read_text(encoding="utf-8"))
    w["named_output"] = root / "test_predictions.jsonl"  # a dev file named like test.py's output
    shutil.copy(w["dev"], w["named_output"])
    bio = "".join(MSRA_BIO.read_text(encoding="utf-8").split("\n\n", 2)[:2]) + "\n\n"
    w["bio"] = root / "bio.txt"
    w["bio"].write_text(bio, encoding="utf-8")
    w["bio_gbk"] = write_gbk(root / "bio_gbk.txt", bio)
    w["text"] = root / "text.txt"
    w["text"].write_text("北京是中国的首都。\n", encoding="utf-8")
    w["text_gbk"] = write_gbk(root / "text_gbk.txt", "北京是中国的首都。\n")
    w["long_text"] = root / "long.txt"
    w["long_text"].write_text("北京是中国的首都。" * 22000 + "\n", encoding="utf-8")  # ~200,000 characters
    long_row = {**json.loads(lines[0]), "query": "文本：" + "北京是中国的首都。" * 22000}
    w["long_row"] = root / "long_row.txt"
    w["long_row"].write_text(json.dumps(long_row, ensure_ascii=False) + "\n", encoding="utf-8")
    rows = [json.loads(line) for line in lines]
    for name, bad in (("answer_int", {"answer": 5}), ("query_int", {"query": 5}), ("answer_empty", {"answer": " "})):
        w[f"rows_{name}"] = root / f"rows_{name}.txt"
        broken = [rows[0], {**rows[1], **bad}, rows[2]]
        w[f"rows_{name}"].write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in broken), encoding="utf-8"
        )
    w["rows_array"] = root / "array.txt"
    w["rows_array"].write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    w["broken_json"] = root / "train_args.json"
    w["broken_json"].write_text('{"model_dir": "x",\n', encoding="utf-8")

    # an (untrained) LoRA with train_args.json, as training saves it; and broken variants of it
    w["run"], _ = train_memorized_lora(tiny_alpaca, load_data(w["dev"]), root / "run", w["dev"], epochs=0)
    w["adapter"] = w["run"] / "adapter_model"
    w["train_args"] = w["adapter"] / "train_args.json"
    config = (w["adapter"] / "adapter_config.json").read_text()
    for name in ("adapter_empty", "adapter_wide", "adapter_vocab", "adapter_damaged"):
        w[name] = root / name
        w[name].mkdir()
        (w[name] / "adapter_config.json").write_text(config)
    (w["adapter_wide"] / "adapter_config.json").write_text(json.dumps({**json.loads(config), "r": 8}))  # its rank
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(  # trained on a hidden-128 model
        {f"{prefix}.lora_A.weight": torch.zeros(8, 128), f"{prefix}.lora_B.weight": torch.zeros(128, 8)},
        w["adapter_wide"] / "adapter_model.safetensors",
    )
    save_file(  # trained with Chinese-LLaMA's 49953-token vocabulary
        {"base_model.model.model.embed_tokens.weight": torch.zeros(49953, 64, dtype=torch.float16)},
        w["adapter_vocab"] / "adapter_model.safetensors",
    )
    truncated(w["adapter_damaged"] / "adapter_model.safetensors", w["adapter"] / "adapter_model.safetensors")
    w["adapter_other_rank"] = linked_copy(w["adapter"], root / "adapter_other_rank")  # r=16 over r=32 tensors
    (w["adapter_other_rank"] / "adapter_config.json").unlink()
    (w["adapter_other_rank"] / "adapter_config.json").write_text(json.dumps({**json.loads(config), "r": 16}))

    # model folders: damaged weights, broken config.json
    w["tiny_damaged"] = linked_copy(tiny_alpaca, root / "tiny_damaged")
    truncated(w["tiny_damaged"] / "model.safetensors", tiny_alpaca / "model.safetensors")
    w["tokenizer_damaged"] = root / "tokenizer_damaged"
    w["tokenizer_damaged"].mkdir()
    truncated(w["tokenizer_damaged"] / "tokenizer.model", tiny_alpaca / "tokenizer.model")
    w["tiny_bad_config"] = linked_copy(tiny_alpaca, root / "tiny_bad_config")
    (w["tiny_bad_config"] / "config.json").unlink()
    (w["tiny_bad_config"] / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": 64\n')
    w["tiny_no_geometry"] = with_config(tiny_alpaca, root / "tiny_no_geometry", {"model_type": "llama"})
    config = json.loads((tiny_alpaca / "config.json").read_text())
    w["tiny_other_config"] = with_config(tiny_alpaca, root / "tiny_other_config", {**config, "intermediate_size": 200})
    w["tiny_more_layers"] = with_config(tiny_alpaca, root / "tiny_more_layers", {**config, "num_hidden_layers": 3})
    w["tiny_sharded"] = sharded(tiny_alpaca, root / "tiny_sharded")
    w["tiny_bad_shard"] = sharded(tiny_alpaca, root / "tiny_bad_shard", drop="model.norm.weight")
    w["tiny_bad_bin_shard"] = sharded(tiny_alpaca, root / "tiny_bad_bin_shard", "model.norm.weight", bin_format=True)

    # tokenizer.json models: none at all; one larger than the embedding (SmolLM2's 49152 over LLaMA's 32000 rows)
    w["tiny_no_tokenizer"] = root / "tiny_no_tokenizer"
    w["tiny_no_tokenizer"].mkdir()
    for name in ("config.json", "model.safetensors"):
        (w["tiny_no_tokenizer"] / name).symlink_to(tiny_alpaca / name)
    w["tiny_bpe_too_big"] = make_tiny_model(root / "tiny_bpe_too_big", "llama")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (w["tiny_bpe_too_big"] / name).unlink(missing_ok=True)
    write_tokenizer(w["tiny_bpe_too_big"], "smollm2")
    # GGUFs: one cut short, one of another architecture
    w["gguf_gpt2"] = root / "gpt2.gguf"
    writer = GGUFWriter(str(w["gguf_gpt2"]), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    w["gguf_cut"] = truncated(root / "cut.gguf", w["gguf_gpt2"], keep=0.5)

    # leftovers of killed runs beside the outputs of the stale-temporary rows (outside root: those rows succeed)
    w["stale"] = tmp_path_factory.mktemp("stale_outputs")
    for name in ("hf", "m"):
        (w["stale"] / f".{name}.tmp-99999999").mkdir()  # no process has this id (Linux's pid_max is at most 2**22)
        (w["stale"] / f".{name}.tmp-99999999" / "part").write_bytes(bytes(1500))
    (w["stale"] / ".x.gguf.tmp-99999999").write_bytes(bytes(1500))

    # Meta's original layout (convert) and a published-style LoRA (merge), each with a cut copy
    w["orig"] = make_tiny_original(root / "orig")
    w["orig_damaged"] = root / "orig_damaged"
    (w["orig_damaged"] / "7B").mkdir(parents=True)
    (w["orig_damaged"] / "tokenizer.model").symlink_to(w["orig"] / "tokenizer.model")
    (w["orig_damaged"] / "7B" / "params.json").symlink_to(w["orig"] / "7B" / "params.json")
    truncated(w["orig_damaged"] / "7B" / "consolidated.00.pth", w["orig"] / "7B" / "consolidated.00.pth")
    _, w["lora"] = make_tiny_chinese_loras(tiny_alpaca, root / "loras")
    w["lora_damaged"] = linked_copy(w["lora"], root / "lora_damaged")
    truncated(w["lora_damaged"] / "adapter_model.bin", w["lora"] / "adapter_model.bin")
    return w


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under the folders: a replaced or rewritten input changes it."""
    files = {}
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file() and not path.is_symlink():
                stat = path.stat()
                files[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return files


def case_argv(case: Case, world: dict[str, Path], out: Path) -> list[str]:
    return [arg.format(**world, out=out) for arg in case.args]


_MODULES: dict[str, object] = {}


def script_module(script: str):
    if script not in _MODULES:
        _MODULES[script] = import_script(SCRIPTS[script])
    return _MODULES[script]


def script_command(script: str) -> list[str]:
    """How a user runs it: `SCRIPT.py` at the root, `-m llama_ner.MODULE` for the package's own command lines."""
    name = SCRIPTS[script]
    return ["-m", name.replace("/", ".")] if "/" in name else [f"{name}.py"]


def must_not_start(*args, **kwargs):
    raise AssertionError("got past the input checks")


def run_in_process(script: str, argv: list[str], monkeypatch) -> int:
    """The script's main(argv) as `python script.py` runs it: a UserError becomes one line and exit code 2."""
    module = script_module(script)
    if hasattr(module, "init_distributed"):  # a trainer that got past its checks would start DeepSpeed
        monkeypatch.setattr(module, "init_distributed", must_not_start)
    if script == "serve":  # a server that got past its checks would serve forever
        import uvicorn

        monkeypatch.setattr(uvicorn.Server, "run", must_not_start)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # chat_ner sets it
    monkeypatch.setattr(sys, "argv", [f"{SCRIPTS[script]}.py", *argv])
    try:
        run_cli(lambda: module.main(argv))
    except SystemExit as exit_info:
        return exit_info.code
    return 0


def check_message(case: Case, code: int, stderr: str) -> None:
    assert code == case.code, stderr
    assert "Traceback" not in stderr, stderr
    if case.code == 2:
        last = stderr.strip().splitlines()[-1]
        assert last.startswith(("error: ", "config error: ", "data error: ")), last
        assert case.word in last, last
    else:
        assert case.word in stderr, stderr


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, world, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(world["root"], world["tiny"])
    code = run_in_process(case.script, case_argv(case, world, out), monkeypatch)
    check_message(case, code, capsys.readouterr().err)
    assert snapshot(world["root"], world["tiny"]) == before, "an input changed or a file appeared beside the inputs"
    if case.code != 0:
        assert not any(out.iterdir()), "a failed run wrote output"


@pytest.mark.parametrize("name", SUBPROCESS_ROWS)
def test_bad_input_subprocess(name, world, tmp_path):
    case = CASES[name]
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, *script_command(case.script), *case_argv(case, world, out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    check_message(case, proc.returncode, proc.stderr)
    assert not any(out.iterdir())


# where each script's long work starts (sha256 of gigabytes, or the writing): leftovers are reported before it
LONG_WORK = {
    "convert": ("report_checksums", "hf"),
    "merge": ("report_checksums", "m"),
    "export": ("write_gguf", "x.gguf"),
}
DEFAULT_ARGS = {"convert": CONVERT, "merge": MERGE, "export": EXPORT}


@pytest.mark.parametrize("script", list(LONG_WORK))
def test_stale_temporaries_reported_before_the_long_work(script, world, tmp_path, monkeypatch, capsys):
    function, output_name = LONG_WORK[script]
    leftover = tmp_path / f".{output_name}.tmp-99999999"
    leftover.mkdir()
    (leftover / "part").write_bytes(bytes(2500))

    def stop(*args, **kwargs):
        raise UserError("stopped where the long work starts")

    monkeypatch.setattr(script_module(script), function, stop)
    argv = [arg.format(**world, out=tmp_path) for arg in DEFAULT_ARGS[script]]
    assert run_in_process(script, argv, monkeypatch) == 2
    err = capsys.readouterr().err
    assert "stopped where the long work starts" in err
    assert f"warning: {leftover} was left by an interrupted run" in err
    assert "holds 2.5 kB" in err


HELP_WITHOUT_TORCH = """import runpy, sys
sys.argv = ["llama_ner/tiny_models.py", "--help"]
try:
    runpy.run_module("llama_ner.tiny_models", run_name="__main__")
except SystemExit:
    pass
print("torch imported" if "torch" in sys.modules else "torch not imported")
"""


def test_tiny_models_help_answers_before_torch_is_imported():
    proc = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], cwd=ROOT, capture_output=True, text=True)
    assert "--out_dir" in proc.stdout, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "torch not imported"


@pytest.mark.parametrize(
    "change, word",
    [
        ({"hidden_size": "64"}, "hidden_size is '64', expected a positive int"),
        ({"num_attention_heads": 0}, "num_attention_heads is 0"),
        ({"num_hidden_layers": True}, "num_hidden_layers is True"),
        ({"rms_norm_eps": None}, "rms_norm_eps is None"),
        ({"num_key_value_heads": 2.5}, "num_key_value_heads is 2.5"),
        ({"num_attention_heads": 5, "num_key_value_heads": 5, "head_dim": None}, "do not divide"),
    ],
)
def test_config_geometry_is_checked(change, word, tiny_alpaca, tmp_path):
    from llama_ner.weights.model_files import read_model_config

    config = json.loads((tiny_alpaca / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UserError, match=re.escape(word)):
        read_model_config(tmp_path)


JOIN_ON_A_TAKEN_PORT = """
import os, sys
sys.path.insert(0, os.getcwd())
from llama_ner.io_utils import run_cli
from llama_ner.training.processes import init_distributed
run_cli(lambda: init_distributed(timeout_s=20))
"""


def test_a_port_another_training_holds_is_named_with_the_fix():
    """Rank 0 of a second training on a port a first one listens on: one line saying the port is taken and how
    to choose another (not the several-machines advice), at once rather than after ddp_timeout."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
        proc = subprocess.run([sys.executable, "-c", JOIN_ON_A_TAKEN_PORT], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"port {port} on 127.0.0.1 is taken" in last and "--master_port" in last, last
    assert "Traceback" not in proc.stderr


@pytest.fixture
def small_disks(tmp_path):
    """A 256 kB tmpfs (fills at once) and a read-only one, mounted for the test (CI runs as root)."""
    full, read_only = tmp_path / "full", tmp_path / "read_only"
    full.mkdir()
    read_only.mkdir()
    mounted = []
    try:
        for folder, options in ((full, "size=256k"), (read_only, "size=64k,ro")):
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
            if proc.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()}); needs root")
            mounted.append(folder)
        yield full, read_only
    finally:
        for folder in mounted:
            subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize(
    ("case", "disk", "words"),
    [
        ("export", "full", "No space left on device"),
        ("process", "full", "No space left on device"),
        ("export", "read_only", "read-only file system"),
        ("train_trainer", "read_only", "read-only file system"),
    ],
)
def test_a_full_or_read_only_disk_is_one_line_and_leaves_nothing(world, small_disks, case, disk, words):
    """A writer on a full disk fails in one line and removes its temporary; a read-only place is found before
    any model loads."""
    full, read_only = small_disks
    place = full if disk == "full" else read_only
    argv = {
        "export": ["export_gguf.py", "--model_dir", str(world["tiny"]), "--output", str(place / "x.gguf")],
        "process": ["process.py", f"--in_file={MSRA_BIO}", f"--out_file={place / 'train.txt'}"],
        "train_trainer": ["train_trainer.py", *(a.format(**world, out=place) for a in TRAIN)],
    }[case]
    if case == "process":  # MSRA's test set is 1.3 MB of JSON lines: more than the disk holds
        argv[1] = f"--in_file={MSRA_BIO}"
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and words.lower() in last.lower(), last
    assert "Traceback" not in proc.stderr
    assert not any(place.iterdir()), list(place.iterdir())
    if disk == "read_only":
        assert "loading" not in proc.stdout.lower() and "trainable params" not in proc.stdout


@pytest.fixture
def filling_disk(tmp_path):
    """A 1 MB tmpfs: room for the run to start, not for a rank-64 LoRA's optimizer state."""
    disk = tmp_path / "filling"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip()}); needs root")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_raw_deepspeed_on_a_disk_that_fills_while_saving_is_one_line_and_leaves_no_cut_checkpoint(world, filling_disk):
    """train_deepspeed.py's first save fills the disk inside DeepSpeed's save_checkpoint (torch's zip writer
    says only 'unexpected pos'): one line naming the checkpoint, exit 2, no partial global_step2 left."""
    argv = [a.format(**world, out=filling_disk) for a in TRAIN]
    argv += ["save_steps=2", "lora_r=64", "lora_alpha=64", "train_batch_size=1"]
    proc = subprocess.run([sys.executable, "train_deepspeed.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: writing ") and "global_step2: No space left on device" in last, last
    assert "Traceback" not in proc.stderr
    checkpoints = filling_disk / "run" / "deepspeed_checkpoint"
    assert not checkpoints.exists() or not [p for p in checkpoints.iterdir() if p.is_dir()]
    assert not (filling_disk / "run" / "adapter_model").exists()  # the adapter never names a cut checkpoint


def test_a_resume_refuses_a_cut_checkpoint(tmp_path):
    """A checkpoint folder whose optimizer share is empty, or that lacks one process's share, is not loaded."""
    train_deepspeed = import_script("train_deepspeed")
    tag = tmp_path / "global_step4"
    tag.mkdir()
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(UserError, match="incomplete .*optim_states.pt missing or empty.*resume=false"):
        train_deepspeed.check_checkpoint_complete(tag, 1)
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 10)
    with pytest.raises(UserError, match="1 optimizer shares for 2 processes"):
        train_deepspeed.check_checkpoint_complete(tag, 2)
    train_deepspeed.check_checkpoint_complete(tag, 1)  # complete: no error
