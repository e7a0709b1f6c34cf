"""LLaMA checkpoint layouts: Meta's original, Hugging Face's, GGUF's; LoRA merge arithmetic.

Pure functions shared by convert_llama_weights_to_hf.py, merge_llama_with_chinese_lora.py
and the GGUF export. Names follow a key-map table with `{}` for the layer number.

    from llama_ner.weights.llama_layout import hf_to_meta_name, unpermute, merge_lora_weight
"""

from __future__ import annotations

import re

import torch

# Hugging Face name -> Meta (consolidated.*.pth) name. `{}` is the layer number.
HF_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
}
META_TO_HF = {meta: hf for hf, meta in HF_TO_META.items()}

# Along which dim Meta splits a tensor over model-parallel shards (None: replicated).
META_SHARD_DIM = {
    "tok_embeddings": 1,
    "output": 0,
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "w1": 0,
    "w3": 0,
    "wo": 1,
    "w2": 1,
}

# Meta model-parallel shard count by hidden size (7B, 13B, 33B, 65B); others: 1.
META_SHARDS_BY_DIM = {4096: 1, 5120: 2, 6656: 4, 8192: 8}

# HF keys that carry no weights (old transformers saved the rotary buffer).
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)

_LAYER = re.compile(r"(?<=layers\.)(\d+)(?=\.)")


def _template(name: str) -> tuple[str, str | None]:
    match = _LAYER.search(name)
    if match is None:
        return name, None
    return name[: match.start()] + "{}" + name[match.end() :], match.group(1)


def map_name(name: str, table: dict[str, str]) -> str:
    """Map a tensor name through a key-map table with `{}` for the layer; KeyError if unknown."""
    template, layer = _template(name)
    if template not in table:
        raise KeyError(name)
    return table[template] if layer is None else table[template].format(layer)


def hf_to_meta_name(name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `layers.3.attention.wq.weight`; KeyError if unknown."""
    return map_name(name, HF_TO_META)


def meta_to_hf_name(name: str) -> str:
    """`layers.3.attention.wq.weight` -> `model.layers.3.self_attn.q_proj.weight`; KeyError if unknown."""
    return map_name(name, META_TO_HF)


def hf_sort_key(name: str) -> tuple:
    """Canonical order: embeddings, then layer by layer in table order, final norm, lm_head."""
    template, layer = _template(name)
    order = list(HF_TO_META)
    head = {"model.embed_tokens.weight": 0, "model.norm.weight": 2, "lm_head.weight": 3}
    if layer is None:
        return (head.get(template, 4), 0, 0, name)
    return (1, int(layer), order.index(template) if template in order else len(order), name)


def meta_shard_dim(meta_name: str) -> int | None:
    """The dim Meta splits `meta_name` along across model-parallel shards; None if replicated."""
    return META_SHARD_DIM.get(meta_name.split(".")[-2])


def split_sizes(total: int, n_shards: int) -> list[int]:
    """Even split; any remainder goes to the last shard (as the 2023 merge script did for 13B output)."""
    sizes = [total // n_shards] * n_shards
    sizes[-1] += total % n_shards
    return sizes


def shard_pieces(meta_name: str, tensor: torch.Tensor, n_shards: int) -> list[torch.Tensor]:
    """A full Meta tensor as its n_shards model-parallel pieces (split_sizes along meta_shard_dim; a
    replicated tensor is repeated)."""
    split = meta_shard_dim(meta_name)
    if split is None or n_shards == 1:
        return [tensor] * n_shards
    return list(tensor.split(split_sizes(tensor.shape[split], n_shards), dim=split))


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta wq/wk (interleaved rotary pairs) -> Hugging Face layout (rotate_half halves)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face q_proj/k_proj -> Meta's (and GGUF's) layout; the inverse of `permute`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def rotary_heads(hf_name: str, config: dict) -> int | None:
    """Heads to (un)permute a q_proj/k_proj by; None for every other tensor."""
    if hf_name.endswith("self_attn.q_proj.weight"):
        return config["num_attention_heads"]
    if hf_name.endswith("self_attn.k_proj.weight"):
        return config.get("num_key_value_heads") or config["num_attention_heads"]
    return None


def llama_intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's FeedForward hidden size: 2/3 of 4*dim, scaled, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def params_to_config(params: dict, vocab_size: int, max_position_embeddings: int = 2048) -> dict:
    """Meta params.json -> LlamaConfig keyword arguments."""
    dim, n_heads = params["dim"], params["n_heads"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": dim,
        "intermediate_size": llama_intermediate_size(dim, params["multiple_of"], params.get("ffn_dim_multiplier")),
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": params.get("n_kv_heads") or n_heads,
        "rms_norm_eps": params["norm_eps"],
        "max_position_embeddings": max_position_embeddings,
        "rope_theta": float(params.get("rope_theta", 10000.0)),
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "dtype": "float16",
    }
    return config


def hf_expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face LlamaForCausalLM tensor shapes implied by config.json (lm_head included even when tied)."""
    dim, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or dim // heads
    q_dim, kv_dim = heads * head_dim, (config.get("num_key_value_heads") or heads) * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,), "lm_head.weight": (vocab, dim)}
    for i in range(config["num_hidden_layers"]):
        layer = {"self_attn.q_proj": (q_dim, dim), "self_attn.k_proj": (kv_dim, dim), "self_attn.v_proj": (kv_dim, dim)}
        layer |= {"self_attn.o_proj": (dim, q_dim), "mlp.gate_proj": (inter, dim), "mlp.up_proj": (inter, dim)}
        layer |= {"mlp.down_proj": (dim, inter), "input_layernorm": (dim,), "post_attention_layernorm": (dim,)}
        shapes |= {f"model.layers.{i}.{name}.weight": shape for name, shape in layer.items()}
    return shapes


def expected_shapes(params: dict, vocab: int) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) Meta tensor shapes implied by params.json (each the shape of its HF tensor)."""
    return {hf_to_meta_name(name): shape for name, shape in hf_expected_shapes(params_to_config(params, vocab)).items()}


def rope_theta(config: dict) -> float:
    """The rotary base of an HF config (transformers 5 keeps it in rope_parameters)."""
    return float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))


def config_to_params(config: dict) -> dict:
    """HF config -> Meta params.json, choosing multiple_of (or ffn_dim_multiplier) that gives back
    the config's intermediate_size."""
    dim, inter = config["hidden_size"], config["intermediate_size"]
    params = {
        "dim": dim,
        "multiple_of": 256,
        "n_heads": config["num_attention_heads"],
        "n_layers": config["num_hidden_layers"],
        "norm_eps": config["rms_norm_eps"],
        "vocab_size": -1,
    }
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    if kv != params["n_heads"]:
        params["n_kv_heads"] = kv
    if rope_theta(config) != 10000.0:
        params["rope_theta"] = rope_theta(config)
    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if llama_intermediate_size(dim, multiple_of) == inter:
            params["multiple_of"] = multiple_of
            return params
    base = int(2 * (4 * dim) / 3)
    for nudge in (0.0, 1e-9, 1e-7, 1e-5):
        multiplier = inter / base + nudge
        if llama_intermediate_size(dim, 1, multiplier) == inter:
            params["multiple_of"], params["ffn_dim_multiplier"] = 1, multiplier
            return params
    raise ValueError(f"intermediate_size {inter} cannot be expressed in params.json for dim {dim}")


def merge_lora_weight(
    w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """W + scale * B @ A computed in fp32 (returned in fp32; cast once at the end)."""
    a, b = a.float(), b.float()
    if fan_in_fan_out:  # weight stored (in, out): delta is (B @ A).T
        return torch.addmm(w.float(), a.T, b.T, alpha=scale)
    return torch.addmm(w.float(), b, a, alpha=scale)


_ADAPTER_KEY = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B)(?:\.[A-Za-z0-9_-]+)?\.weight$")
_UNSUPPORTED = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_E", "hada_", "ia3_l")


def parse_adapter_key(key: str) -> tuple[str, str]:
    """Adapter state-dict key -> (HF base weight name, kind).

    kind: "lora_A" / "lora_B"; "saved" for a trained full copy (modules_to_save); "full" for a
    plain weight copy (2023's `base_model.model.lm_head.weight`, or what today's peft stores when
    embeddings were resized); "ignore" for peft's copy of the untouched original module.
    Accepts the 2023 names and today's (adapter name such as `default` inside or stripped).
    ValueError for LoRA variants this merge does not implement.
    """
    name = key.removeprefix("base_model.model.")
    if any(tag in name for tag in _UNSUPPORTED):
        raise ValueError(f"{key}: unsupported adapter weight (only plain LoRA on linear layers can be merged)")
    match = _ADAPTER_KEY.match(name)
    if match:
        return match["module"] + ".weight", match["kind"]
    for marker, kind in ((".modules_to_save.", "saved"), (".original_module.", "ignore"), (".base_layer.", "full")):
        if marker in name:
            module, _, rest = name.partition(marker)
            return module + "." + rest.rsplit(".", 1)[-1], kind
    return name, "full"
