"""The training config: TRAIN_DEFAULTS (each key's meaning is the comment beside it) and
`parse_train_args`, which resolves a command line against it and refuses values that cannot be right.

    args = parse_train_args({**TRAIN_DEFAULTS, "save_dir": "./checkpoint/msra/x/"}, __doc__)

No torch here: the trainers read their command line (and answer --help) before loading it.
"""

from __future__ import annotations

from typing import Any

from config_utils import FALSE_WORDS, TRUE_WORDS, Config, ConfigError, ConfigParser, require
from dataset import PROMPT_TEMPLATES

LORA_TARGETS = ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]

TRAIN_DEFAULTS: dict[str, Any] = {
    "data_name": "msra",  # dataset name; test.py/predict.py read it from train_args.json
    "model_dir": "./model_hub/chinese-alpaca-7b",  # merged Hugging Face model to tune
    "peft_path": "",  # continue training this LoRA (e.g. chinese-alpaca-lora-7b) instead of a new one
    "lora_r": 8,  # LoRA rank
    "lora_alpha": 32,  # LoRA scale numerator (scale = lora_alpha / lora_r)
    "lora_dropout": 0.1,  # dropout on the LoRA input
    "lora_target_modules": LORA_TARGETS,  # projections that get a LoRA; q_proj,v_proj also works
    "prompt_template": "alpaca",  # alpaca (the seed's prompt), chat (the tokenizer's chat template), raw (as is)
    "max_seq_length": 128 + 64,  # prompt + answer tokens; long queries are cut, answers kept whole
    "pad_to_multiple_of": 1,  # pad each batch to a multiple of this (8 suits fp16 tensor cores); 1 = its longest row
    "instruct_column": "instruct",  # instruction column of the data
    "query_column": "query",  # query column (optional per row)
    "response_column": "answer",  # answer column
    "train_path": "data/msra/instruct_data/train.txt",  # training data, JSON lines
    "dev_path": "data/msra/instruct_data/dev.txt",  # dev data for the dev loss; "" for none
    "dev_max_rows": 256,  # dev rows used for the dev loss (0: all)
    "train_batch_size": 12,  # batch per process (DeepSpeed's train_micro_batch_size_per_gpu)
    "eval_batch_size": 12,  # dev batch per process
    "gradient_accumulation_steps": 1,  # micro-batches per optimizer step
    "num_train_epochs": 1,  # passes over the training data
    "learning_rate": None,  # peak learning rate; None: deepspeed.json's optimizer lr (1e-5)
    "warmup_ratio": 0.0,  # share of the steps spent warming the learning rate up from 0
    "max_grad_norm": 1.0,  # gradient clipping (DeepSpeed's gradient_clipping)
    "zero_stage": -1,  # ZeRO stage 0-3; -1: deepspeed.json's (1)
    "deepspeed_json_path": "deepspeed.json",  # DeepSpeed config; batch/lr/clip/precision filled from here
    "bf16_autocast": "auto",  # bf16 matmuls, fp32 weights; auto: on in fp32 training where bf16 kernels exist
    "group_by_length": True,  # batches of rows of similar length (batch order still shuffled): little padding computed
    "train_minutes": 0.0,  # stop and save after this many training minutes; the rate decays over them; 0: no limit
    "eval_f1_path": "",  # validation rows (not the test set), scored as test.py scores at each save and the end
    "eval_f1_rows": 0,  # score the first N rows of eval_f1_path; the best-F1 adapter becomes adapter_model; 0: off
    "eval_f1_max_new_tokens": 128,  # generation limit of the validation answers
    "gradient_checkpointing": False,  # recompute activations in backward: less memory, ~30% slower
    "quantization_bit": 0,  # 0: base in the training dtype; 4: NF4 base (QLoRA), 8: LLM.int8 base (bitsandbytes)
    "log_steps": 10,  # print the mean loss every N optimizer steps
    "save_steps": 50,  # save the adapter (and the resume state) every N optimizer steps
    "eval_steps": 50,  # dev loss every N optimizer steps (0: only at the end)
    "seed": 42,  # data order, LoRA init, dropout
    "resume": False,  # continue from save_dir's last save instead of starting over
    "ddp_timeout": 300,  # seconds a process waits for the others (joining, then each exchange) before failing
    "local_rank": -1,  # set by the deepspeed launcher; leave it
}


def parse_train_args(
    defaults: dict[str, Any], description: str, argv: list[str] | None = None, source: str = ""
) -> Config:
    """Resolve the command line against `defaults`; values that cannot be right fail here.

    `source`: the calling script's file; --help shows the comments of its defaults and of TRAIN_DEFAULTS.
    """
    args = ConfigParser(defaults, description, [__file__, source] if source else [__file__]).parse_main(argv)
    positive = ("lora_r", "lora_alpha", "max_seq_length", "pad_to_multiple_of", "train_batch_size", "eval_batch_size")
    positive += ("gradient_accumulation_steps", "num_train_epochs", "log_steps", "save_steps", "ddp_timeout")
    positive += ("eval_f1_max_new_tokens",)
    require(args, positive, non_negative=("dev_max_rows", "eval_steps", "max_grad_norm", "eval_f1_rows"))
    check_budget_and_validation(args)
    if not 0 <= args.lora_dropout < 1:
        raise ConfigError(f"lora_dropout={args.lora_dropout} must be in [0, 1)")
    if not 0 <= args.warmup_ratio < 1:
        raise ConfigError(f"warmup_ratio={args.warmup_ratio} must be in [0, 1)")
    if args.prompt_template not in PROMPT_TEMPLATES:
        raise ConfigError(f"prompt_template={args.prompt_template!r}: use one of {', '.join(PROMPT_TEMPLATES)}")
    if args.zero_stage not in (-1, 0, 1, 2, 3):
        raise ConfigError(f"zero_stage={args.zero_stage} must be 0, 1, 2, 3 or -1 (deepspeed.json's)")
    if args.learning_rate is not None and (
        isinstance(args.learning_rate, bool)
        or not isinstance(args.learning_rate, (int, float))
        or args.learning_rate <= 0
    ):
        raise ConfigError(f"learning_rate={args.learning_rate!r} must be a positive number, e.g. learning_rate=3e-4")
    if isinstance(args.lora_target_modules, str):
        args.lora_target_modules = [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]
    if not args.lora_target_modules:
        raise ConfigError("lora_target_modules is empty: name at least one projection, e.g. q_proj,v_proj")
    return args


def check_budget_and_validation(args: Config) -> None:
    """train_minutes, bf16_autocast and the validation keys must make sense together."""
    minutes = args.train_minutes
    if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or minutes < 0:
        raise ConfigError(f"train_minutes={minutes!r} must be a positive number of minutes (0: no limit)")
    if isinstance(args.bf16_autocast, str) and args.bf16_autocast.lower() in TRUE_WORDS | FALSE_WORDS:
        args.bf16_autocast = args.bf16_autocast.lower() in TRUE_WORDS
    if args.bf16_autocast not in ("auto", True, False):
        raise ConfigError(f"bf16_autocast={args.bf16_autocast!r}: use auto, true or false")
    if args.eval_f1_rows and not args.eval_f1_path:
        raise ConfigError(
            f"eval_f1_rows={args.eval_f1_rows} needs a validation file: pass eval_f1_path=<instruction JSON lines "
            "split off the training data> (never the test set)"
        )
    if args.eval_f1_path and not args.eval_f1_rows:
        raise ConfigError(f"eval_f1_path={args.eval_f1_path} is set but eval_f1_rows=0: pass eval_f1_rows=N (e.g. 200)")
