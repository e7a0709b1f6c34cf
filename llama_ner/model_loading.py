"""Loading a model for training or inference: device, dtype, quantization, the LoRA's fit to its base.

model = load_model("model_hub/chinese-alpaca-7b", adapter_path="checkpoint/msra/train_trainer/adapter_model")
"""

from __future__ import annotations

import contextlib
import ctypes
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llama_ner.io_utils import ModelLoadError, read_json_object
from llama_ner.tokenizer import LlamaSentencePieceTokenizer, is_sentencepiece
from llama_ner.weights.llama_layout import parse_adapter_key
from llama_ner.weights.model_files import adapter_weights_file, check_model_dir
from llama_ner.weights.tensor_read import open_tensor_file

QUANTIZATION_BITS = (0, 4, 8)  # quantization_bit: 0 = none, 4 = NF4 (QLoRA), 8 = LLM.int8 (bitsandbytes)


UNQUANTIZED_MODULES = ["embed_tokens", "lm_head"]  # kept in the model dtype when the rest is quantized


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """'auto'/None: fp16 on CUDA, fp32 on CPU (fp16 matmuls are slow or missing there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.startswith("cuda") else torch.float32
    names = {
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float32": torch.float32,
        "fp32": torch.float32,
    }
    if dtype not in names:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use auto, float16, bfloat16 or float32")
    return names[dtype]


def expected_weight_shape(model: torch.nn.Module, name: str) -> tuple[int, ...] | None:
    """Shape of the base weight `name` from its module (Linear, Embedding; also 4-bit Linear); None if absent."""
    try:
        module = model.get_submodule(name.removesuffix(".weight"))
    except AttributeError:
        return None
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return (module.out_features, module.in_features)
    if isinstance(module, torch.nn.Embedding):
        return (module.num_embeddings, module.embedding_dim)
    weight = getattr(module, "weight", None)
    return tuple(weight.shape) if weight is not None else None


def check_adapter_fits(model: torch.nn.Module, adapter_dir: str | Path, model_dir: str | Path) -> None:
    """Every tensor of the LoRA fits the base model (hidden size, vocabulary), checked from the file's header.

    Without this, peft reports a size mismatch as a long traceback after loading everything.
    """
    file = adapter_weights_file(adapter_dir)
    config_file = Path(adapter_dir) / "adapter_config.json"
    config = read_json_object(config_file, error=ModelLoadError)
    rank, ranks = config.get("r"), config.get("rank_pattern") or {}
    reader = open_tensor_file(file)
    for key in reader.keys():
        try:
            name, kind = parse_adapter_key(key)
        except ValueError:
            continue  # a LoRA variant the merge does not implement; peft checks it
        if kind == "ignore":
            continue
        want = expected_weight_shape(model, name)
        got = reader.info(key).shape
        if kind == "lora_A" and isinstance(rank, int) and not ranks and got[0] != rank:
            raise ModelLoadError(
                f"{config_file}: r is {rank} but {file.name} holds rank-{got[0]} tensors ({key}): the config belongs "
                "to another adapter; copy the adapter_config.json saved with these weights"
            )
        if want is None:
            raise ModelLoadError(f"{file}: {key} is for {name}, which {model_dir} lacks: an adapter for another model")
        fits = {"lora_A": got[-1:] == want[-1:], "lora_B": got[:1] == want[:1]}.get(kind, tuple(got) == want)
        if fits:
            continue
        if name.endswith(("embed_tokens.weight", "lm_head.weight")) and got[1:] == want[1:]:
            raise ModelLoadError(
                f"{file}: the adapter's {name} has {got[0]} rows (vocabulary) but {model_dir} with this tokenizer has "
                f"{want[0]}: pass the tokenizer and base model the adapter was trained with"
            )
        raise ModelLoadError(
            f"{file}: {key} has shape {tuple(got)}, which does not fit {name} {want} of {model_dir}: "
            "the adapter was trained on a model of another size; pass its own base model (train_args.json's model_dir)"
        )


def check_vocab_fits(tokenizer: Any, rows: int, model_dir: str | Path) -> None:
    """A tokenizer.json tokenizer must fit the embedding: ids past its rows would index nothing. (Rows past the
    tokenizer are padding, as many such models have; a sentencepiece tokenizer larger than the model is the
    Chinese vocabulary extension, which match_vocab grows the embeddings for.)"""
    if not is_sentencepiece(tokenizer) and len(tokenizer) > rows:
        raise ModelLoadError(
            f"{model_dir}: the tokenizer has {len(tokenizer)} tokens but the model only {rows} embedding rows "
            "(config.json vocab_size): pass the tokenizer that came with this model"
        )


def match_vocab(model: torch.nn.Module, tokenizer: Any) -> None:
    """Grow the embeddings to a sentencepiece tokenizer (as the original scripts do); refuse to shrink them.
    A tokenizer.json model keeps its rows (extra rows are padding)."""
    rows = model.get_input_embeddings().weight.shape[0]
    check_vocab_fits(tokenizer, rows, getattr(model.config, "_name_or_path", "the model"))
    if not is_sentencepiece(tokenizer):
        return
    if len(tokenizer) > rows:
        print(f"resizing embeddings {rows} -> {len(tokenizer)} to match the tokenizer")
        model.resize_token_embeddings(len(tokenizer))
    elif len(tokenizer) < rows:
        raise ModelLoadError(
            f"tokenizer has {len(tokenizer)} tokens but the model {rows}: pass the tokenizer that came "
            "with the model (--tokenizer_path), e.g. Chinese-Alpaca's 49954-token one"
        )


def check_quantization(bits: int, device: str, key: str = "quantization_bit") -> None:
    """Refuse, before any model loads, a bit width that bitsandbytes cannot run on `device`."""
    if bits not in QUANTIZATION_BITS:
        raise ModelLoadError(f"{key}={bits}: use 0 (no quantization), 4 (NF4, QLoRA) or 8 (LLM.int8)")
    if not bits:
        return
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnb
    except ImportError as err:
        raise ModelLoadError(f"{key}={bits} needs bitsandbytes ({err}): pip install bitsandbytes==0.50.2") from None
    probe = torch.ones(64, 64, dtype=torch.float16, device=device)
    try:  # the operation the 4-bit or 8-bit layers will run, on a 64 x 64 block
        if bits == 4:
            bnb.quantize_4bit(probe, quant_type="nf4")
        else:
            bnb.int8_vectorwise_quant(probe)
    except Exception as err:  # bitsandbytes reports a missing backend in many ways
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"{key}={bits}: bitsandbytes {bitsandbytes.__version__} cannot quantize on {device} ({reason}); "
            f"use {key}=0" + ("" if bits == 8 else " or 8")
        ) from None


def keep_off_cpu_packing(model: torch.nn.Module) -> None:
    """bitsandbytes 0.50 repacks a 4-bit layer for its AVX512-BF16 CPU kernel at the first no-grad forward, and
    that repacking fails unless out_features % 32 == 0 and in_features % 64 == 0 (training never repacks, so
    it works). Such layers take bitsandbytes' plain CPU path instead; the others keep the fast one."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and (module.out_features % 32 or module.in_features % 64):
            module.support_avx512bf16_for_cpu = False


def pretrained_kwargs(bits: int, dtype: torch.dtype, device: str) -> dict[str, Any]:
    """from_pretrained arguments loading the base in `dtype`, or quantized to `bits` with compute in `dtype`.

    4: NF4 with double quantization (QLoRA's recipe); 8: LLM.int8. embed_tokens and lm_head stay
    in `dtype`. Training (training.model.build_model) and evaluation (load_model) both load this way.
    """
    if not bits:
        return {"dtype": dtype}
    check_quantization(bits, device)
    from transformers import BitsAndBytesConfig

    if bits == 4:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=UNQUANTIZED_MODULES,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTIZED_MODULES)
    return {"dtype": dtype, "quantization_config": config, "device_map": {"": device}}


def load_base(path: str | Path, bits: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The base model from its folder in `dtype`, or quantized to `bits` (pretrained_kwargs), read so that a
    quantized load never holds the whole checkpoint in 16 or 32 bits (read_tensor_by_tensor)."""
    from transformers import AutoModelForCausalLM

    reading = read_tensor_by_tensor() if bits else contextlib.nullcontext()
    with reading:
        return AutoModelForCausalLM.from_pretrained(check_model_dir(path), **pretrained_kwargs(bits, dtype, device))


@contextlib.contextmanager
def read_tensor_by_tensor() -> Iterator[None]:
    """transformers maps every safetensors shard and keeps the maps until the last tensor is loaded, so the
    whole 16-bit checkpoint ends up resident beside the 4-bit model (0.82 B params in bf16: a 3.7 GB loading
    peak for a 1.1 GB model; BENCHMARKS.md). Here it reads each tensor with pread instead, and tensors of 4 MB
    and more are allocated with mmap, so each 16/32-bit copy goes back to the system once it is quantized
    (glibc would keep many of them on its heap)."""
    import transformers.modeling_utils as modeling_utils

    open_mapped = modeling_utils.safe_open

    def open_read(filename: str, framework: str, device: str = "cpu", backend: str = "mmap") -> Any:
        backend = "pread" if device == "cpu" else backend
        return open_mapped(filename, framework=framework, device=device, backend=backend)

    libc = glibc()
    modeling_utils.safe_open = open_read
    if libc:
        libc.mallopt(M_MMAP_THRESHOLD, 4 * 2**20)
    try:
        yield
    finally:
        modeling_utils.safe_open = open_mapped
        if libc:
            libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)  # glibc's own ceiling: training's tensors stay on its heap
            libc.malloc_trim(0)


M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h)


def glibc() -> Any:
    """The C library when it is glibc (mallopt, malloc_trim), else None."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        if libc.mallopt and libc.malloc_trim:
            return libc
    return None


def load_model(
    path: str | Path,
    adapter_path: str | Path | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = None,
    tokenizer: LlamaSentencePieceTokenizer | None = None,
    quantization_bit: int = 0,
) -> torch.nn.Module:
    """A causal LM (optionally with a LoRA adapter, optionally on a 4/8-bit base) in eval mode on `device`."""
    device = device or default_device()
    model = load_base(path, quantization_bit, resolve_dtype(dtype, device), device)
    if quantization_bit == 4:
        keep_off_cpu_packing(model)
    if tokenizer is not None:
        match_vocab(model, tokenizer)
    if adapter_path:
        from peft import PeftModel

        check_adapter_fits(model, adapter_path, path)
        with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated alias; not the user's concern
            warnings.filterwarnings(
                "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
            )
            model = PeftModel.from_pretrained(model, str(adapter_path))
    if not quantization_bit:  # a quantized model is placed by device_map and refuses .to()
        model = model.to(device)
    return model.eval()
