"""Tokenizers: loading and saving a model folder's tokenizer, sentencepiece (`tokenizer.model`) or a
`tokenizer.json` (byte-level BPE: Llama-3-style models, SmolLM2), and the bytes each token spells.

    tokenizer = load_tokenizer("model_hub/chinese-alpaca-7b")      # or model_hub/smollm2-135m-instruct

A folder with tokenizer.model is read with sentencepiece, whatever else it holds; one with only
tokenizer.json through transformers' `tokenizers` backend, BOS/EOS/pad from its own files.
The sentencepiece tokenizer runs sentencepiece itself: the Chinese LLaMA/Alpaca models were trained on
sentencepiece's ids, and transformers 5's default (a `tokenizers` BPE rebuilt from the same file) splits
some Chinese text differently (`了我们`). tests/test_tokenizer.py checks parity on MSRA.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sentencepiece import sentencepiece_model_pb2
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from llama_ner.io_utils import ModelLoadError, atomic_write_bytes, atomic_write_text, read_json_object

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a folder (or a tokenizer.model file): sentencepiece when tokenizer.model is there,
    else tokenizer.json; neither is one line naming the folder."""
    path = Path(path)
    if path.is_file() or (path / "tokenizer.model").is_file():
        return load_sentencepiece(path)
    if (path / "tokenizer.json").is_file():
        return load_tokenizer_json(path)
    raise ModelLoadError(
        f"{path}: no tokenizer.model (sentencepiece) or tokenizer.json found: pass the folder the model's "
        "tokenizer files are in (--tokenizer_path / tokenizer_dir), or copy them beside the weights"
    )


def load_tokenizer_json(folder: Path) -> PreTrainedTokenizerBase:
    """tokenizer.json (+ tokenizer_config.json, chat template) through transformers; pad is the tokenizer's
    own pad token, else its EOS (never a training target: labels mask padding)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # tokenizers' parse errors, a config naming an unknown class
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{folder / 'tokenizer.json'}: transformers cannot load it ({reason})") from None
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(
            f"{folder}: the tokenizer names no eos_token: set it in tokenizer_config.json (training ends every "
            "answer with it, generation stops at it)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_sentencepiece(tokenizer: Any) -> bool:
    return hasattr(tokenizer, "sp_model")


def token_bytes(tokenizer: Any) -> list[bytes | None]:
    """The bytes each id spells in generated text (None: a special or unused token, never text).

    Sentencepiece: `▁` is a space, `<0xNN>` one byte. tokenizer.json: byte-level BPE maps each of 256
    printable stand-ins back to its byte (GPT-2's table), a metaspace vocabulary like sentencepiece.
    One Chinese character may take two tokens, one token two characters: callers work on bytes.
    """
    out: list[bytes | None] = [None] * len(tokenizer)
    special = set(tokenizer.all_special_ids)
    if is_sentencepiece(tokenizer):
        sp = tokenizer.sp_model
        for i in range(sp.get_piece_size()):
            if i in special or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                continue
            piece = sp.id_to_piece(i)
            out[i] = bytes([int(piece[3:5], 16)]) if sp.is_byte(i) else piece.replace("▁", " ").encode()
        return out
    byte_level = '"ByteLevel"' in json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder"))
    decoder = {ch: b for b, ch in byte_stand_ins().items()}
    added = {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    for token, i in tokenizer.get_vocab().items():
        if i in special or i in added or i >= len(out):
            continue
        if byte_level:
            out[i] = bytes(decoder[ch] for ch in token) if all(ch in decoder for ch in token) else token.encode()
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            out[i] = bytes([int(token[3:5], 16)])
        else:
            out[i] = token.replace("▁", " ").encode()
    return out


def byte_stand_ins() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def load_sentencepiece(path: str | Path) -> LlamaSentencePieceTokenizer:
    """Load `tokenizer.model` (+ the 2023-era json files, when present) from a directory.

    eos is `</s>` (2), bos `<s>` (1); pad is `[PAD]` when the vocabulary has it (Chinese-Alpaca),
    else `<unk>` (0), which is never a training target.
    """
    path = Path(path)
    model_file = path if path.is_file() else path / "tokenizer.model"
    folder = model_file.parent
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


def save_tokenizer(tokenizer: Any, out_dir: str | Path) -> None:
    """Write tokenizer.model and the 2023-era json files that the published LoRAs ship, or a tokenizer.json
    tokenizer's own files (tokenizer.json, tokenizer_config.json, chat template)."""
    out_dir = Path(out_dir)
    if not is_sentencepiece(tokenizer):
        tokenizer.save_pretrained(str(out_dir))
        return
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
