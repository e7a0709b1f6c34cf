"""Write a LLaMA as one GGUF file (what llama.cpp loads today), one tensor at a time.

    from llama_ner.weights.llama_gguf import write_gguf
    write_gguf(path, entries, produce, config, tokenizer)   # entries: [(hf_name, TensorInfo)], in order

Architecture `llama`; hyperparameters from the HF config; matrices fp16, norms fp32; q/k back
in Meta's rotary layout (the inverse of the HF permutation, as llama.cpp expects); the
SentencePiece vocabulary with scores and token types (normal, control, byte, unknown,
user-defined for added tokens such as Chinese-Alpaca's `[PAD]`), bos/eos/unk/pad ids, add-bos; or a
tokenizer.json's byte-level BPE (`gpt2`: tokens, merges, the pre-tokenizer llama.cpp must split with);
the chat template when the tokenizer has one.
The header (with every tensor's shape) is written first, then each tensor as it is produced.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llama_ner.io_utils import atomic_path
from llama_ner.tokenizer import is_sentencepiece
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


# tokenizer.json pre_tokenizer -> llama.cpp's tokenizer.ggml.pre (what it splits text with before BPE)
PRE_TOKENIZERS = {
    '{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}': "gpt-2",
    '{"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, '
    '{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]}': "smollm",
}


def tokenizer_pre(tokenizer: Any) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json; one we cannot name is refused
    (llama.cpp would split text otherwise than transformers, and the ids would differ)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer")
    key = json.dumps(spec)
    if key in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[key]
    if spec and spec.get("type") == "Sequence" and any(p.get("type") == "Split" for p in spec["pretokenizers"]):
        return "llama-bpe"  # Llama-3's Split regex + ByteLevel
    raise ValueError(
        f"the tokenizer's pre_tokenizer {key[:200]} has no llama.cpp name here; pass --tokenizer_pre NAME "
        "(llama.cpp's tokenizer.ggml.pre, e.g. gpt-2, llama-bpe, smollm)"
    )


def bpe_vocab(tokenizer: Any, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE tokenizer.json, padded to n_vocab."""
    from gguf import TokenType

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ValueError(f"tokenizer.json model {spec['model']['type']}: only BPE (and sentencepiece) export")
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(len(tokenizer)):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i in added:
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL if i in by_id else TokenType.UNUSED)
    if len(tokens) > n_vocab:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens but the model only {n_vocab} embedding rows")
    while len(tokens) < n_vocab:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, [int(t) for t in types], merges


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
    writer: GGUFWriter, config: dict, tokenizer: Any, n_vocab: int, name: str, pre: str | None = None
) -> None:
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
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    if is_sentencepiece(tokenizer):
        add_sentencepiece_vocab(writer, tokenizer, n_vocab)
    else:
        add_bpe_vocab(writer, tokenizer, n_vocab, pre or tokenizer_pre(tokenizer))


def add_bpe_vocab(writer: GGUFWriter, tokenizer: Any, n_vocab: int, pre: str) -> None:
    tokens, types, merges = bpe_vocab(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    adds_bos = tokenizer.bos_token_id is not None and tokenizer.encode("a")[:1] == [tokenizer.bos_token_id]
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(adds_bos)
    writer.add_add_eos_token(False)


def add_sentencepiece_vocab(writer: GGUFWriter, tokenizer: LlamaSentencePieceTokenizer, n_vocab: int) -> None:
    from sentencepiece import sentencepiece_model_pb2

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
    tokenizer: Any,
    name: str = "",
    progress: Callable = iter,
    pre: str | None = None,
) -> Path:
    """Write `path` (atomically): metadata, then each entry's tensor from produce(hf_name), in order."""
    from gguf import GGUFWriter

    path = Path(path)
    n_vocab = dict(entries)["model.embed_tokens.weight"].shape[0]
    writer = GGUFWriter(None, "llama")
    add_metadata(writer, config, tokenizer, n_vocab, name or path.stem, pre)
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
