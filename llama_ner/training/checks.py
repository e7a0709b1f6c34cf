"""The trainers' checks before any model loads (data, model folder, save_dir, LoRA targets, quantization)
and the DeepSpeed config and precision they resolve.

    rows = check_inputs(args)                       # every user error, before any model is loaded
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from config_utils import Config, ConfigError, load_config, print_config
from dataset import load_data, prompt_format
from llama_ner.io_utils import check_output_dir_path
from llama_ner.model_loading import check_quantization, check_vocab_fits
from llama_ner.training.checkpoints import ADAPTER_DIR
from llama_ner.training.model import load_train_tokenizer
from llama_ner.training.processes import is_main_process, train_device
from llama_ner.weights.model_files import adapter_weights_file, check_model_files, read_model_config

TEST_FILE = Path(__file__).resolve().parents[2] / "data/msra/instruct_data/dev.txt"  # the official MSRA test set


def check_inputs(args: Config) -> tuple[list[dict], list[dict]]:
    """Read and check every input (data, model dir, adapter, DeepSpeed JSON) before any model loads.

    Returns (train_rows, dev_rows); dev_rows is empty when dev_path is "".
    """
    columns, optional = (args.instruct_column, args.response_column), (args.query_column,)
    train_rows = load_data(args.train_path, columns, args.response_column, optional)
    dev_rows = load_data(args.dev_path, columns, args.response_column, optional) if args.dev_path else []
    if args.dev_max_rows > 0:
        dev_rows = dev_rows[: args.dev_max_rows]
    if args.eval_f1_rows:
        validation_rows(args, train_rows)
    check_model_files(args.model_dir)
    if args.peft_path:
        adapter_weights_file(args.peft_path)
    check_tokenizer(args)
    check_kbit(args, read_deepspeed_json(args.deepspeed_json_path))
    check_save_dir(args)
    check_lora_targets(args)
    return train_rows, dev_rows


def validation_rows(args: Config, train_rows: list[dict]) -> list[dict]:
    """The first eval_f1_rows rows of eval_f1_path: not the test set, not the dev-loss file, none trained on."""
    path = Path(args.eval_f1_path)
    for key, other in (("the test set test.py scores", TEST_FILE), ("dev_path", Path(args.dev_path or ""))):
        if path.is_file() and other.is_file() and path.samefile(other):
            raise ConfigError(
                f"eval_f1_path={path} is {key} ({other}): choosing the adapter by it would tune on it; split a "
                "validation file off the training data (bench/real_model.py does: a share of train_full.txt)"
            )
    columns, optional = (args.instruct_column, args.response_column), (args.query_column,)
    rows = load_data(path, columns, args.response_column, optional)[: args.eval_f1_rows]
    trained = {(row.get(args.query_column) or "", row[args.instruct_column]) for row in train_rows}
    seen = sum((row.get(args.query_column) or "", row[args.instruct_column]) in trained for row in rows)
    if seen:
        raise ConfigError(
            f"eval_f1_path={path}: {seen} of its first {len(rows)} rows are also in train_path={args.train_path}; "
            "validation rows must be ones the model never trains on"
        )
    if (
        args.zero_stage == 3
        or read_deepspeed_json(args.deepspeed_json_path).get("zero_optimization", {}).get("stage") == 3
        and args.zero_stage < 0
    ):
        raise ConfigError(
            "eval_f1_rows with ZeRO-3: rank 0 generates alone and needs the whole model; use zero_stage=1 or 2"
        )
    return rows


def resolve_autocast(setting: Any, precision: str, cuda: bool | None = None) -> bool:
    """bf16_autocast: auto is on when training in fp32 where bf16 kernels exist; true there too, else an error."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if precision != "fp32" or setting is False:
        return False  # fp16/bf16 training already computes in 16 bits
    if bf16_supported(cuda) if cuda else cpu_has_bf16_kernels():
        return True
    if setting is True:
        raise ConfigError("bf16_autocast=true, but torch has no bf16 kernels on this device: pass bf16_autocast=auto")
    return False


def check_tokenizer(args: Config) -> None:
    """The tokenizer loads, fits the embedding rows (config.json), and has a chat template if
    prompt_template=chat asks for one."""
    tokenizer = load_train_tokenizer(args)
    check_vocab_fits(tokenizer, read_model_config(args.model_dir)["vocab_size"], args.model_dir)
    prompt_format(args.prompt_template, tokenizer)


def check_save_dir(args: Config) -> None:
    """save_dir must be a directory path, and no input may lie in a folder that saving replaces or deletes
    (adapter_model, the Trainer's rotated checkpoint-N, DeepSpeed's checkpoints)."""
    save_dir = check_output_dir_path(args.save_dir, "save_dir").resolve()
    for key in ("model_dir", "peft_path", "train_path", "dev_path", "deepspeed_json_path"):
        value = getattr(args, key)
        path = Path(value).resolve() if value else None
        if path is None or save_dir not in path.parents:
            continue
        top = path.relative_to(save_dir).parts[0]
        if top in (ADAPTER_DIR, "deepspeed_checkpoint") or top.startswith("checkpoint-"):
            raise ConfigError(
                f"{key}={value} is inside {Path(args.save_dir) / top}, which training replaces or deletes: "
                "choose another save_dir (or copy the input elsewhere first)"
            )


def check_lora_targets(args: Config) -> None:
    """Every lora_target_modules name must match a layer of the model: peft would skip a typo silently.

    The model is built on the meta device (no memory, no weights read) from config.json.
    """
    if args.peft_path:
        return  # the LoRA's own targets are used
    from transformers import AutoConfig, AutoModelForCausalLM

    config_file = Path(args.model_dir) / "config.json"
    try:
        config = AutoConfig.from_pretrained(args.model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, OSError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{config_file}: transformers cannot build a model from it ({reason})") from None
    layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    for target in args.lora_target_modules:
        if not any(name == target or name.endswith("." + target) for name in layers):
            existing = sorted({name.rsplit(".", 1)[-1] for name in layers})
            raise ConfigError(
                f"lora_target_modules: {target!r} matches no layer of {args.model_dir}; its layers are "
                f"{', '.join(existing)} (e.g. lora_target_modules=q_proj,v_proj)"
            )


def check_kbit(args: Config, ds_config: dict[str, Any]) -> None:
    """quantization_bit must be 0/4/8, runnable by bitsandbytes here, and not under ZeRO-3."""
    stage = args.zero_stage if args.zero_stage >= 0 else ds_config.get("zero_optimization", {}).get("stage", 0)
    if args.quantization_bit and stage == 3:
        raise ConfigError(
            f"quantization_bit={args.quantization_bit} with ZeRO-3: ZeRO-3 partitions every parameter, and "
            "bitsandbytes' packed 4/8-bit weights cannot be partitioned; use zero_stage=1 or 2 (the frozen "
            "quantized base is small, only the LoRA's optimizer state is sharded)"
        )
    check_quantization(args.quantization_bit, train_device())


def read_deepspeed_json(path: str | Path) -> dict[str, Any]:
    return load_config(path, fix="pass deepspeed_json_path=<the DeepSpeed config file>")


def resolve_precision(ds_config: dict[str, Any], cuda: bool | None = None) -> str:
    """'fp16', 'bf16' or 'fp32' from deepspeed.json's fp16/bf16 sections; fp16 needs CUDA.

    bf16 on hardware without it (a pre-Ampere GPU, a CPU torch has no bf16 kernels for) is a
    ConfigError, raised before any model loads, whose advice fits the device.
    """
    cuda = torch.cuda.is_available() if cuda is None else cuda
    fp16 = ds_config.get("fp16", {}).get("enabled", False)
    bf16 = ds_config.get("bf16", {}).get("enabled", False)
    if bf16 is True:
        if bf16_supported(cuda):
            return "bf16"
        if cuda:
            raise ConfigError(
                f"deepspeed.json enables bf16, but this GPU ({torch.cuda.get_device_name()}) cannot train in bf16 "
                '(GPUs need Ampere or newer): set "bf16": {"enabled": false} and "fp16": {"enabled": true} instead'
            )
        raise ConfigError(
            "deepspeed.json enables bf16, but torch cannot compute in bf16 on this CPU: set "
            '"bf16": {"enabled": false} to train in fp32 (fp16 needs a CUDA GPU)'
        )
    if fp16 in (True, "auto"):
        if cuda:
            return "fp16"
        if is_main_process():
            print("note: deepspeed.json asks for fp16, which needs CUDA; training in fp32 on the CPU")
    return "fp32"


def cpu_has_bf16_kernels() -> bool:
    """The CPU computes bf16 in hardware (AVX512-BF16 or AMX): elsewhere torch emulates it, slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_supported(cuda: bool) -> bool:
    """The Hugging Face Trainer's own test, so the two trainers accept the same machines."""
    from transformers.utils import is_torch_bf16_available_on_device, is_torch_bf16_gpu_available

    return is_torch_bf16_gpu_available() if cuda else is_torch_bf16_available_on_device("cpu")


def deepspeed_config(args: Config, precision: str) -> dict[str, Any]:
    """deepspeed.json with every value the trainers also know filled from `args`.

    Batch size, accumulation, clipping, learning rate and precision come from one place, so
    the HF Trainer and DeepSpeed cannot disagree. learning_rate=None keeps the file's lr.
    """
    ds = read_deepspeed_json(args.deepspeed_json_path)
    ds.pop("train_batch_size", None)  # derived by DeepSpeed: micro batch * accumulation * processes
    ds["train_micro_batch_size_per_gpu"] = args.train_batch_size
    ds["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    ds["gradient_clipping"] = args.max_grad_norm
    params = ds.setdefault("optimizer", {"type": "Adam"}).setdefault("params", {})
    file_lr = params.get("lr", "auto")
    if args.learning_rate is None and not isinstance(file_lr, (int, float)):
        raise ConfigError(f"{args.deepspeed_json_path}: optimizer lr is {file_lr!r}: pass learning_rate=<float>")
    params["lr"] = float(args.learning_rate if args.learning_rate is not None else file_lr)
    for key, default in (("betas", [0.9, 0.999]), ("eps", 1e-8), ("weight_decay", 0.0)):
        if params.get(key, "auto") == "auto":
            params[key] = default
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": precision == "fp16"}
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": precision == "bf16"}
    zero = ds.setdefault("zero_optimization", {})
    if args.zero_stage >= 0:
        zero["stage"] = args.zero_stage
    if zero.get("stage", 0) == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # else HF saves an empty adapter
    ds.setdefault("steps_per_print", 10**9)  # the trainers print their own losses
    return ds


def print_run_config(args: Config) -> None:
    if is_main_process():
        print_config(args)
