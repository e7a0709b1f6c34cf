"""Tokenizers: loading and saving a model folder's tokenizer.

    tokenizer = load_tokenizer("model_hub/chinese-alpaca-7b")

The sentencepiece tokenizer runs sentencepiece itself: the Chinese LLaMA/Alpaca models were trained on
sentencepiece's ids, and transformers 5's default (a `tokenizers` BPE rebuilt from the same file) splits
some Chinese text differently (`了我们`). tests/test_tokenizer.py checks parity on MSRA.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sentencepiece import sentencepiece_model_pb2
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from llama_ner.io_utils import ModelLoadError, atomic_write_bytes, atomic_write_text, read_json_object

PAD_TOKEN = "[PAD]"  # the pad piece Chinese-Alpaca appends (id 49953)


class LlamaSentencePieceTokenizer(SentencePieceBackend):
    """LLaMA tokenizer whose ids are exactly sentencepiece's, with BOS prepended."""

    def __init__(self, vocab_file: str, **kwargs: Any) -> None:
        kwargs.setdefault("bos_token", "<s>")
        kwargs.setdefault("eos_token", "</s>")
        kwargs.setdefault("unk_token", "<unk>")
        kwargs.setdefault("special_tokens_pattern", "bos")
        kwargs.setdefault("legacy", True)  # keep sentencepiece's dummy prefix, as in training
        super().__init__(vocab_file=vocab_file, **kwargs)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.sp_model.decode_pieces(tokens)  # turns byte pieces (<0x0A>) back into text


def build_chinese_sp_model(llama_model: str | Path, chinese_model: str | Path, add_pad: bool = False) -> bytes:
    """The Chinese-LLaMA tokenizer.model: LLaMA's pieces, then every new Chinese piece (score 0).

    With add_pad, `[PAD]` is appended too: that is Chinese-Alpaca's tokenizer.model.
    """
    llama = sentencepiece_model_pb2.ModelProto()
    llama.ParseFromString(Path(llama_model).read_bytes())
    chinese = sentencepiece_model_pb2.ModelProto()
    chinese.ParseFromString(Path(chinese_model).read_bytes())
    known = {p.piece for p in llama.pieces}
    new_pieces = [p.piece for p in chinese.pieces if p.piece not in known]
    if add_pad:
        new_pieces.append(PAD_TOKEN)
    for piece in dict.fromkeys(new_pieces):
        entry = sentencepiece_model_pb2.ModelProto().SentencePiece()
        entry.piece = piece
        entry.score = 0
        llama.pieces.append(entry)
    return llama.SerializeToString()


def _special(value: Any) -> str | None:
    """special_tokens_map.json values are strings or {"content": ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    """A small json file of the tokenizer's; {} when absent."""
    return read_json_object(path, error=ModelLoadError) if path.is_file() else {}


def load_tokenizer(path: str | Path) -> LlamaSentencePieceTokenizer:
    """Load `tokenizer.model` (+ the 2023-era json files, when present) from a directory.

    eos is `</s>` (2), bos `<s>` (1); pad is `[PAD]` when the vocabulary has it (Chinese-Alpaca),
    else `<unk>` (0), which is never a training target.
    """
    path = Path(path)
    model_file = path if path.is_file() else path / "tokenizer.model"
    folder = model_file.parent
    if not model_file.is_file():
        raise ModelLoadError(f"{model_file} not found: the tokenizer directory needs the sentencepiece tokenizer.model")
    special_map = _read_json(folder / "special_tokens_map.json")
    added = _read_json(folder / "added_tokens.json")
    try:
        tokenizer = LlamaSentencePieceTokenizer(str(model_file))
    except RuntimeError as err:  # sentencepiece: "could not parse ModelProto"
        reason = "sentencepiece cannot parse it" if "parse" in str(err) else str(err)
        raise ModelLoadError(f"{model_file}: damaged or incomplete ({reason}); download it again") from None
    for token, token_id in sorted(added.items(), key=lambda item: item[1]):
        existing = tokenizer.sp_model.piece_to_id(token)
        if tokenizer.sp_model.id_to_piece(existing) == token:
            continue  # already a piece (Chinese-Alpaca's tokenizer.model holds [PAD] itself)
        if token_id != len(tokenizer):
            raise ModelLoadError(
                f"{folder / 'added_tokens.json'}: {token!r} has id {token_id} but would get {len(tokenizer)}; "
                "the file does not belong to this tokenizer.model"
            )
        tokenizer.add_tokens([token], special_tokens=True)
    pad = _special(special_map.get("pad_token"))
    if pad is None and tokenizer.convert_tokens_to_ids(PAD_TOKEN) not in (None, tokenizer.unk_token_id):
        pad = PAD_TOKEN
    if pad is None:
        pad = tokenizer.unk_token
    tokenizer.pad_token = pad
    return tokenizer


def save_tokenizer(tokenizer: LlamaSentencePieceTokenizer, out_dir: str | Path) -> None:
    """Write tokenizer.model and the 2023-era json files that the published LoRAs ship."""
    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / "tokenizer.model", tokenizer.sp_model.serialized_model_proto())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if tokenizer.pad_token not in (None, tokenizer.unk_token):
        special["pad_token"] = tokenizer.pad_token
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 1000000000000000019884624838656,
        **special,
    }
    atomic_write_text(out_dir / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    sp_size = tokenizer.sp_model.get_piece_size()
    extra = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in tokenizer.get_added_vocab()}
    extra = {tok: i for tok, i in extra.items() if i >= sp_size}
    if extra:
        atomic_write_text(out_dir / "added_tokens.json", json.dumps(extra, indent=2) + "\n")
