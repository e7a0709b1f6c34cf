"""What test.py and predict.py share: the trained run's config, the model, the prompts.

    config = resolve_config(sys.argv[1:], {"predict_path": ""})
    model, tokenizer = load_trained(config)
    prompts = [row_prompt(row, config) for row in rows]

The config is the training run's train_args.json (every key can be overridden on the
command line, e.g. --dev_path=...) plus the evaluation keys below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from config_utils import Config, ConfigError, ConfigParser, load_config, split_argv
from dataset import build_prompt
from model_utils import load_model, load_tokenizer

EVAL_DEFAULTS = {
    "train_args_path": "",  # '' = ./checkpoint/{data_name}/train_trainer/adapter_model/train_args.json
    "adapter_path": "",  # LoRA to apply: '' = {save_dir}/adapter_model; 'none' = model_dir is a merged model
    "tokenizer_path": "",  # '' = model_dir
    "eval_batch_size": 16,  # prompts generated together (left padding); 1 = one at a time
    "max_new_tokens": 256,  # generation stops at </s> or after this many tokens (MSRA dev: 4 answers are longer)
    "dtype": "auto",  # auto (fp16 on CUDA, fp32 on CPU), float16, bfloat16, float32
    "device": "",  # '' = cuda when available, else cpu
    "quantization_bit": 0,  # base model in 4 or 8 bits (bitsandbytes); train_args.json's value when it has one
}
REQUIRED_KEYS = ("model_dir", "save_dir", "instruct_column", "query_column", "response_column")


def default_train_args_path(data_name: str = "msra") -> str:
    return f"./checkpoint/{data_name}/train_trainer/adapter_model/train_args.json"


def train_args_path_from_argv(argv: list[str]) -> str:
    """--train_args_path if given, else the default path for --data_name (msra)."""
    pairs = dict(split_argv(argv))
    return pairs.get("train_args_path") or default_train_args_path(pairs.get("data_name", "msra"))


def resolve_config(argv: list[str], extra: dict[str, Any], description: str = "") -> Config:
    """train_args.json + EVAL_DEFAULTS + `extra`, overridden by argv. Training values win over defaults."""
    path = train_args_path_from_argv(argv)
    if ("-h" in argv or "--help" in argv) and not Path(path).is_file():
        ConfigParser({**EVAL_DEFAULTS, **extra}, description).parse(["--help"])  # prints, exits 0
    trained = load_config(path)
    missing = [key for key in REQUIRED_KEYS if key not in trained]
    if missing:
        raise ConfigError(f"{path}: missing key {missing[0]!r}; this is not a train_args.json written by training")
    defaults = {**trained, **{k: v for k, v in {**EVAL_DEFAULTS, **extra}.items() if k not in trained}}
    defaults["train_args_path"] = path
    return ConfigParser(defaults, description).parse(argv)


def adapter_dir(config: Config) -> Path | None:
    """The LoRA directory to load, or None for a merged model."""
    if config.adapter_path.lower() == "none":
        return None
    return Path(config.adapter_path or Path(config.save_dir) / "adapter_model")


def load_trained(config: Config) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, tokenizer): base model_dir + adapter, embeddings matched to the tokenizer."""
    tokenizer = load_tokenizer(config.tokenizer_path or config.model_dir)
    adapter = adapter_dir(config)
    print(f"loading {config.model_dir}" + (f" + adapter {adapter}" if adapter else " (no adapter)"))
    model = load_model(
        config.model_dir, adapter, config.dtype, config.device or None, tokenizer, config.quantization_bit
    )
    return model, tokenizer


def row_prompt(row: dict[str, Any], config: Config) -> str:
    """The training prompt of one data row."""
    return build_prompt(row[config.instruct_column], row.get(config.query_column) or "")
