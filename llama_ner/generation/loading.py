"""How the inference scripts get their model: one ModelSpec says what to load, one function loads it.

    spec = spec_from_config(config)     # test.py, predict.py: train_args.json + the command line's keys
    spec = spec_from_args(args)         # chat_ner.py, serve.py: --base_model, --lora_model, ... (add_model_args)
    model, tokenizer = load(spec)       # files checked, tokenizer, base, vocabulary, adapter
    fmt = spec.prompt_format(tokenizer)

Every default that a trained run decides (the base's bit width, the prompt template and instruction, the
entity types, the window length) is taken here, once: from the config keys, which already hold the run's
train_args.json, or from the train_args.json inside --lora_model. The vLLM path starts from the same spec.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config_utils import Config, ConfigError, load_config
from dataset import PromptFormat, prompt_format

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelSpec:
    base: str  # Hugging Face model folder (a merged model when adapter is None)
    adapter: str | None  # LoRA folder; None: the base alone
    tokenizer: str  # tokenizer folder
    dtype: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU), float16, bfloat16, float32
    device: str | None = None  # cpu, cuda, cuda:N; None: cuda when available, else cpu
    bits: int = 0  # the base in 4 or 8 bits (bitsandbytes); 0: not quantized
    prompt_template: str = "alpaca"  # alpaca, chat or raw: the prompt the adapter was trained with
    instruction: str = ""  # the NER instruction it was trained with; '' = the seed's
    entity_types: tuple[str, ...] | None = None  # of constrained answers; None: answers are not constrained
    window_chars: int = 0  # longer texts are answered in windows of this many characters; 0: never split
    visible_gpus: str | None = None  # CUDA_VISIBLE_DEVICES set before torch looks; None: left as it is

    def prompt_format(self, tokenizer: Any) -> PromptFormat:
        return prompt_format(self.prompt_template, tokenizer, self.instruction)


def spec_from_config(config: Config) -> ModelSpec:
    """test.py's and predict.py's spec: model_dir, adapter_path ('' = save_dir/adapter_model, none = no adapter),
    tokenizer_path, dtype, device, quantization_bit, and the trained run's prompt, types and window length.
    A training config gives the spec test.py would build for its run (training's validation by F1)."""
    get = lambda key, default="": getattr(config, key, default)  # noqa: E731 (a training config lacks some keys)
    adapter_path = get("adapter_path")
    adapter = None if adapter_path.lower() == "none" else adapter_path or str(Path(config.save_dir) / "adapter_model")
    types = None
    if get("constrained", True):
        trained = get("trained_entity_types")
        types = entity_types(get("entity_types"), get("train_path"), config.response_column, trained)
    return ModelSpec(
        base=config.model_dir,
        adapter=adapter,
        tokenizer=get("tokenizer_path") or config.model_dir,
        dtype=get("dtype", "auto"),
        device=None if get("device") in ("", "auto") else get("device"),
        bits=get("quantization_bit", 0),
        prompt_template=get("prompt_template", "alpaca"),  # alpaca before train_args.json held it
        instruction=get("ner_instruction"),
        entity_types=types,
        window_chars=window_limit(config),
    )


def window_limit(config: Config) -> int:
    """window_chars as a number of characters (auto: train_args.json's trained_text_chars; 0: never split)."""
    value = str(getattr(config, "window_chars", "auto")).strip().lower()
    if value == "auto":
        return int(getattr(config, "trained_text_chars", 0) or 0)
    if not value.isdigit():
        raise ConfigError(f"window_chars={value!r}: use auto (the trained texts' length), 0 (never split) or a number")
    return int(value)


def spec_from_args(args: argparse.Namespace, with_types: bool = True) -> ModelSpec:
    """chat_ner.py's and serve.py's spec from the `add_model_args` flags; what they leave open comes from the
    train_args.json that training saves inside --lora_model. `with_types`: resolve the entity types too."""
    trained = adapter_train_args(args.lora_model)
    types = None
    if with_types:
        column, recorded = trained.get("response_column", "answer"), trained.get("trained_entity_types", "")
        types = entity_types(args.entity_types, trained.get("train_path"), column, recorded)
    return ModelSpec(
        base=args.base_model,
        adapter=args.lora_model,
        tokenizer=tokenizer_dir(args),
        dtype=args.dtype,
        device="cpu" if args.only_cpu else None,
        bits=base_bits(args, trained),
        prompt_template=args.prompt_template or trained.get("prompt_template", "alpaca"),
        instruction=trained.get("ner_instruction", ""),
        entity_types=types,
        window_chars=int(trained.get("trained_text_chars") or 0),  # none recorded before training wrote it
        visible_gpus="" if args.only_cpu else args.gpus,
    )


def adapter_train_args(lora_model: str | None) -> dict[str, Any]:
    """The train_args.json that training saves inside the adapter folder, or {} (no LoRA, or none saved)."""
    trained = Path(lora_model or "") / "train_args.json"
    return load_config(trained) if lora_model and trained.is_file() else {}


def entity_types(given: str, train_path: str | None, column: str, trained: str) -> tuple[str, ...]:
    """--entity_types, else those the adapter was trained on (trained_entity_types, else its train_path's
    answers), else MSRA's (ner_constraint.load_entity_types, imported here: that module imports torch)."""
    from llama_ner.generation.ner_constraint import load_entity_types

    return load_entity_types(given, train_path, column, trained=trained)


def tokenizer_dir(args: argparse.Namespace) -> str:
    """--tokenizer_path, else the adapter's own tokenizer when it ships one, else the base model's."""
    if args.tokenizer_path:
        return args.tokenizer_path
    if args.lora_model and any((Path(args.lora_model) / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        return args.lora_model
    return args.base_model


def base_bits(args: argparse.Namespace, trained: dict[str, Any]) -> int:
    """The base's bit width, printed with its source: --load_in_kbits, else the quantization_bit the LoRA was
    trained with, so a QLoRA adapter runs on the base it learned on."""
    recorded = trained.get("quantization_bit")
    if args.load_in_kbits is not None:
        bits, source = (0 if args.load_in_kbits == 16 else args.load_in_kbits), "--load_in_kbits"
    elif recorded is not None:
        bits = recorded
        source = f"quantization_bit in {Path(args.lora_model) / 'train_args.json'}; --load_in_kbits overrides it"
    else:
        bits, source = 0, "default"
    print(f"base model: {f'{bits}-bit (bitsandbytes)' if bits else 'not quantized'} ({source})")
    return bits


def check_files(spec: ModelSpec) -> None:
    """config.json and the weight files' headers of the base, the adapter's folder: one line naming what is
    missing or cut, before torch loads (also for a vLLM started here, which would fail minutes later)."""
    from llama_ner.weights.model_files import adapter_weights_file, check_model_files

    check_model_files(spec.base)
    if spec.adapter:
        adapter_weights_file(spec.adapter)


def load(spec: ModelSpec) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode, tokenizer): the device and files checked, the tokenizer, the base (quantized to spec.bits),
    its embeddings grown to a larger sentencepiece tokenizer, the adapter fitted to it and attached."""
    if spec.visible_gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = spec.visible_gpus  # torch reads it at its first CUDA call
    check_gpu_visible(spec.device)
    check_files(spec)
    from llama_ner.model_loading import load_model
    from llama_ner.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(spec.tokenizer)
    print(f"Vocab of the tokenizer: {len(tokenizer)}")
    print(f"loading {spec.base}" + (f" + adapter {spec.adapter}" if spec.adapter else " (no adapter)"))
    model = load_model(spec.base, spec.adapter, spec.dtype, spec.device, tokenizer, spec.bits)
    print(f"Vocab of the model: {model.get_input_embeddings().weight.shape[0]}")
    return model, tokenizer


def check_gpu_visible(device: str | None) -> None:
    """A cuda or cuda:N device that this machine does not have fails here, before any file is read."""
    if device and device.startswith("cuda"):
        import torch

        index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            visible = f"GPUs cuda:0 to cuda:{count - 1}" if count else "no CUDA GPU"
            raise ConfigError(f"device={device}: this machine has {visible}; pass --device=cpu or a GPU it has")


def none_or_path(value: str) -> str | None:
    """--lora_model none (any case, or empty) means no adapter, as --help says."""
    return None if value.strip().lower() in ("", "none") else value


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model flags of chat_ner.py and serve.py (the seed's names), read by spec_from_args."""
    parser.add_argument("--base_model", required=True, help="Hugging Face model directory (merged Chinese-Alpaca)")
    parser.add_argument("--lora_model", default=None, type=none_or_path,
                        help="LoRA adapter directory; none = the base model alone")  # fmt: skip
    parser.add_argument("--tokenizer_path", default=None, help="default: lora_model if it has one, else base_model")
    parser.add_argument("--gpus", default="0", help="CUDA_VISIBLE_DEVICES")
    parser.add_argument("--only_cpu", action="store_true", help="run on the CPU even when a GPU exists")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), float16, bfloat16, float32")
    parser.add_argument(
        "--load_in_kbits", type=int, choices=[4, 8, 16], default=None,
        help="base in 4 or 8 bits (bitsandbytes), 16: not quantized; default: the LoRA's train_args.json "
        "quantization_bit (as it was trained), else 16",
    )  # fmt: skip
    parser.add_argument("--prompt_template", default=None, choices=["alpaca", "chat", "raw"],
                        help="default: the LoRA's train_args.json prompt_template, else alpaca")  # fmt: skip
    parser.add_argument("--entity_types", default="", help="types of constrained NER answers, e.g. 人名,地名; "
                        "default: those in the LoRA's training data (its train_args.json), else MSRA's")  # fmt: skip
