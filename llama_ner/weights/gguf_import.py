"""Read a GGUF of architecture `llama` (llama.cpp's file) back into a Hugging Face folder.

    check_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")                   # header only: architecture, completeness
    import_gguf(gguf, Path("model_hub/smollm2-135m-instruct"), torch.float32)

transformers dequantizes the tensors (Q4_1, Q8_0, F16, ...) and maps the names and the rotary
layout back to Hugging Face's; it refuses to save such a model (GgufHfQuantizer), so the weights are
copied into a plain LlamaForCausalLM of the same config and saved from there. The tokenizer
(tokenizer.json, its chat template) is the one transformers builds from the GGUF's vocabulary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llama_ner.io_utils import ModelLoadError


def check_gguf(path: Path) -> dict[str, Any]:
    """The GGUF's metadata (architecture, name, tensor count), after checking that its header parses, its
    architecture is llama and every tensor's bytes lie inside the file: a cut download is one line."""
    from gguf import GGUFReader

    if not path.is_file():
        raise ModelLoadError(f"{path}: file not found; pass --gguf with the .gguf to import")
    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # the reader raises ValueError/IndexError/struct errors on bad or cut files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"{path}: not a complete GGUF file ({reason}); download it again (or check that it is a .gguf)"
        ) from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise ModelLoadError(
                f"{path}: truncated ({size} bytes, tensor {tensor.name} ends past it); download it again"
            )
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(
            f"{path}: architecture {arch!r}; only llama GGUFs (LlamaForCausalLM: LLaMA, Chinese-LLaMA, "
            "SmolLM2, TinyLlama, Llama-3-style) import"
        )
    return {"architecture": arch, "name": field_value(reader, "general.name"), "tensors": len(reader.tensors)}


def field_value(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    return field.contents() if field is not None else None


def import_gguf(gguf: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """Write out_dir (which the caller makes atomic): safetensors, config.json, generation_config.json and the
    tokenizer's files."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = LlamaForCausalLM(config).to(dtype)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
