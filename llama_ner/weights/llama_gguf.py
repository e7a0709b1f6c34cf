"""Write a LLaMA as one GGUF file (what llama.cpp loads today), one tensor at a time.

    from llama_ner.weights.llama_gguf import write_gguf
    write_gguf(path, entries, produce, config, tokenizer)   # entries: [(hf_name, TensorInfo)], in order

Architecture `llama`; hyperparameters from the HF config; matrices fp16, norms fp32; q/k back
in Meta's rotary layout (the inverse of the HF permutation, as llama.cpp expects); the
SentencePiece vocabulary with scores and token types (normal, control, byte, unknown,
user-defined for added tokens such as Chinese-Alpaca's `[PAD]`), bos/eos/unk/pad ids, add-bos.
The header (with every tensor's shape) is written first, then each tensor as it is produced.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from llama_ner.io_utils import atomic_path
from llama_ner.weights.llama_layout import map_name, rope_theta, rotary_heads, unpermute
from llama_ner.weights.tensor_io import TensorInfo

if TYPE_CHECKING:
    from gguf import GGUFWriter

    from llama_ner.tokenizer import LlamaSentencePieceTokenizer

# HF name -> GGUF name (llama.cpp's LLM_ARCH_LLAMA tensor names). `{}` is the layer number.
HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.self_attn.q_proj.weight": "blk.{}.attn_q.weight",
    "model.layers.{}.self_attn.k_proj.weight": "blk.{}.attn_k.weight",
    "model.layers.{}.self_attn.v_proj.weight": "blk.{}.attn_v.weight",
    "model.layers.{}.self_attn.o_proj.weight": "blk.{}.attn_output.weight",
    "model.layers.{}.mlp.gate_proj.weight": "blk.{}.ffn_gate.weight",
    "model.layers.{}.mlp.down_proj.weight": "blk.{}.ffn_down.weight",
    "model.layers.{}.mlp.up_proj.weight": "blk.{}.ffn_up.weight",
    "model.layers.{}.input_layernorm.weight": "blk.{}.attn_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blk.{}.ffn_norm.weight",
}
GGUF_FILE_NAME = "ggml-model-f16.gguf"


def hf_to_gguf_name(name: str) -> str:
    """`model.layers.3.mlp.down_proj.weight` -> `blk.3.ffn_down.weight`; KeyError if unknown."""
    return map_name(name, HF_TO_GGUF)


def gguf_tensor(name: str, tensor: torch.Tensor, config: dict) -> np.ndarray:
    """An HF tensor as GGUF stores it: q/k in Meta's layout, 1-D (norms) fp32, matrices fp16."""
    heads = rotary_heads(name, config)
    if heads is not None:
        tensor = unpermute(tensor, heads)
    dtype = torch.float32 if tensor.dim() == 1 else torch.float16
    return tensor.to(dtype).contiguous().numpy()


def gguf_vocab(tokenizer: LlamaSentencePieceTokenizer, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    """(pieces, scores, token types) for every id below n_vocab, from sentencepiece itself."""
    from gguf import TokenType

    sp = tokenizer.sp_model
    pieces, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(TokenType.BYTE)
        elif sp.is_unused(i):
            types.append(TokenType.UNUSED)
        else:
            types.append(TokenType.NORMAL)
    added = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in tokenizer.get_added_vocab()}
    if tokenizer.pad_token not in (None, tokenizer.unk_token):
        added[tokenizer.pad_token] = tokenizer.pad_token_id  # Chinese-Alpaca's [PAD] lives in tokenizer.model
    for token, token_id in sorted(added.items(), key=lambda item: item[1]):
        if token_id < len(pieces):
            if types[token_id] == TokenType.NORMAL:
                types[token_id] = TokenType.USER_DEFINED
            continue
        while len(pieces) < token_id:
            pieces.append(f"[PAD{len(pieces)}]".encode())
            scores.append(-1000.0)
            types.append(TokenType.USER_DEFINED)
        pieces.append(token.encode("utf-8"))
        scores.append(-1000.0)
        types.append(TokenType.USER_DEFINED)
    if len(pieces) > n_vocab:
        raise ValueError(f"the tokenizer has {len(pieces)} tokens but the model only {n_vocab} embedding rows")
    while len(pieces) < n_vocab:  # embedding rows beyond the tokenizer (padding)
        pieces.append(f"[PAD{len(pieces)}]".encode())
        scores.append(-1000.0)
        types.append(TokenType.USER_DEFINED)
    return pieces, scores, [int(t) for t in types]


def add_metadata(
    writer: GGUFWriter, config: dict, tokenizer: LlamaSentencePieceTokenizer, n_vocab: int, name: str
) -> None:
    from sentencepiece import sentencepiece_model_pb2

    heads = config["num_attention_heads"]
    writer.add_name(name)
    writer.add_file_type(1)  # LLAMA_FTYPE_MOSTLY_F16
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    pieces, scores, types = gguf_vocab(tokenizer, n_vocab)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.sp_model.serialized_model_proto())
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    writer.add_remove_extra_whitespaces(proto.normalizer_spec.remove_extra_whitespaces)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token not in (None, tokenizer.unk_token):
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def write_gguf(
    path: str | Path,
    entries: list[tuple[str, TensorInfo]],
    produce: Callable[[str], torch.Tensor],
    config: dict,
    tokenizer: LlamaSentencePieceTokenizer,
    name: str = "",
    progress: Callable = iter,
) -> Path:
    """Write `path` (atomically): metadata, then each entry's tensor from produce(hf_name), in order."""
    from gguf import GGUFWriter

    path = Path(path)
    n_vocab = dict(entries)["model.embed_tokens.weight"].shape[0]
    writer = GGUFWriter(None, "llama")
    add_metadata(writer, config, tokenizer, n_vocab, name or path.stem)
    for tensor_name, info in entries:
        dtype = np.dtype(np.float32 if len(info.shape) == 1 else np.float16)
        writer.add_tensor_info(hf_to_gguf_name(tensor_name), info.shape, dtype, dtype.itemsize * math.prod(info.shape))
    with atomic_path(path) as tmp:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        try:
            for tensor_name, _ in progress(entries):
                writer.write_tensor_data(gguf_tensor(tensor_name, produce(tensor_name), config))
        finally:
            writer.close()
    return path
