"""Tokenizer and model loading shared by every script.

    tokenizer = load_tokenizer("model_hub/chinese-alpaca-7b")
    model = load_model("model_hub/chinese-alpaca-7b", adapter_path="checkpoint/msra/train_trainer/adapter_model")

The tokenizer runs sentencepiece itself: the Chinese LLaMA/Alpaca models were trained on
sentencepiece's ids, and transformers 5's default (a `tokenizers` BPE rebuilt from the
same file) splits some Chinese text differently (`了我们`). tests/test_tokenizer.py checks
parity on MSRA.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from sentencepiece import sentencepiece_model_pb2
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from dataset import fit_prompt
from llama_ner.io_utils import UserError, atomic_write_bytes, atomic_write_text, read_json_object
from llama_ner.weights.llama_layout import parse_adapter_key
from llama_ner.weights.tensor_io import open_tensor_file

PAD_TOKEN = "[PAD]"  # the pad piece Chinese-Alpaca appends (id 49953)
QUANTIZATION_BITS = (0, 4, 8)  # quantization_bit: 0 = none, 4 = NF4 (QLoRA), 8 = LLM.int8 (bitsandbytes)
UNQUANTIZED_MODULES = ["embed_tokens", "lm_head"]  # kept in the model dtype when the rest is quantized


class ModelLoadError(UserError):
    """A model or tokenizer directory that cannot be used."""


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


# config.json keys a LLaMA needs; a missing one would make transformers fall back to 7B's default geometry
REQUIRED_CONFIG_KEYS = {
    "hidden_size": int,
    "intermediate_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "vocab_size": int,
    "rms_norm_eps": float,
}
OPTIONAL_CONFIG_KEYS = {"num_key_value_heads": int, "head_dim": int, "max_position_embeddings": int}


def read_model_config(path: str | Path) -> dict[str, Any]:
    """config.json of a Hugging Face LLaMA directory: readable JSON holding the geometry keys, each a positive
    number; anything else is one line naming the file and the key."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"{path}: no config.json; expected a Hugging Face model directory "
            "(convert with convert_llama_weights_to_hf.py, then merge_llama_with_chinese_lora.py)"
        )
    config = read_json_object(config_file, error=ModelLoadError)
    fix = "the file is incomplete or not a LLaMA config; copy it again from where the model came from"
    for key, kind in (REQUIRED_CONFIG_KEYS | OPTIONAL_CONFIG_KEYS).items():
        if key not in config or (config[key] is None and key in OPTIONAL_CONFIG_KEYS):
            if key in REQUIRED_CONFIG_KEYS:
                raise ModelLoadError(f"{config_file}: missing key {key!r}; {fix}")
            continue
        value = config[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or value <= 0 or (kind is int and not isinstance(value, int)):
            raise ModelLoadError(f"{config_file}: {key} is {value!r}, expected a positive {kind.__name__}; {fix}")
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if heads % kv_heads or (not config.get("head_dim") and config["hidden_size"] % heads):
        raise ModelLoadError(
            f"{config_file}: hidden_size {config['hidden_size']}, num_attention_heads {heads} and "
            f"num_key_value_heads {kv_heads} do not divide; {fix}"
        )
    return config


def check_model_dir(path: str | Path) -> Path:
    """A Hugging Face model directory whose config.json holds a LLaMA's geometry (`read_model_config`)."""
    read_model_config(path)
    return Path(path)


def check_weight_files(files: list[Path]) -> None:
    """Read each weight file's header and compare the sizes it gives with the file's: a cut or damaged
    download is one line naming the file, before anything loads or is written."""
    for file in files:
        open_tensor_file(file)


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def adapter_weights_file(adapter_dir: str | Path) -> Path:
    """adapter_model.safetensors (or .bin) of a LoRA folder whose adapter_config.json is readable."""
    adapter_dir = Path(adapter_dir)
    fix = "pass the folder holding adapter_config.json and adapter_model.safetensors (e.g. save_dir/adapter_model)"
    read_json_object(adapter_dir / "adapter_config.json", fix, ModelLoadError)
    found = next((adapter_dir / n for n in ADAPTER_WEIGHTS if (adapter_dir / n).is_file()), None)
    if found is None:
        raise ModelLoadError(
            f"{adapter_dir}: no adapter_model.safetensors or adapter_model.bin: the LoRA folder has no weights; "
            "copy them from where the adapter was trained or downloaded"
        )
    check_weight_files([found])
    return found


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


def match_vocab(model: torch.nn.Module, tokenizer: LlamaSentencePieceTokenizer) -> None:
    """Grow the embeddings to the tokenizer (as the original scripts do); refuse to shrink them."""
    rows = model.get_input_embeddings().weight.shape[0]
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


def pretrained_kwargs(bits: int, dtype: torch.dtype, device: str) -> dict[str, Any]:
    """from_pretrained arguments loading the base in `dtype`, or quantized to `bits` with compute in `dtype`.

    4: NF4 with double quantization (QLoRA's recipe); 8: LLM.int8. embed_tokens and lm_head stay
    in `dtype`. Training (train_utils.build_model) and evaluation (load_model) both load this way.
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


def load_model(
    path: str | Path,
    adapter_path: str | Path | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = None,
    tokenizer: LlamaSentencePieceTokenizer | None = None,
    quantization_bit: int = 0,
) -> torch.nn.Module:
    """A causal LM (optionally with a LoRA adapter, optionally on a 4/8-bit base) in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    kwargs = pretrained_kwargs(quantization_bit, resolve_dtype(dtype, device), device)
    model = AutoModelForCausalLM.from_pretrained(check_model_dir(path), **kwargs)
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


def generate_answers(
    model: torch.nn.Module,
    tokenizer: LlamaSentencePieceTokenizer,
    prompts: list[str],
    batch_size: int = 16,
    max_new_tokens: int = 128,
    progress: bool = True,
    constraint: Any = None,
    **gen_kwargs: Any,
) -> list[str]:
    """Continue each prompt (greedy unless gen_kwargs say otherwise) and return the new text.

    Prompts are tokenized as in training (BOS, no EOS), sorted by length so a batch holds
    similar lengths, left-padded, and generated with the KV cache until `</s>` or
    max_new_tokens. Only the generated tokens up to the first `</s>` are decoded.
    `constraint` (e.g. ner_constraint.NerConstraint) limits what each answer may be: its
    `processor(indices, prompt_width)` masks the logits of a batch, its `close(index, answer)`
    finishes an answer that max_new_tokens cut.
    """
    from tqdm import tqdm
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    encoded = encode_prompts(model, tokenizer, prompts, max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = {"do_sample": False, "num_beams": 1, "use_cache": True, **gen_kwargs}
    answers: list[str] = [""] * len(prompts)
    starts = range(0, len(order), max(1, batch_size))
    for start in tqdm(starts, desc="generate", unit="batch", disable=not progress or len(starts) < 2):
        index = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in index)
        input_ids = torch.tensor([[pad_id] * (width - len(encoded[i])) + encoded[i] for i in index], device=device)
        attention_mask = torch.tensor(
            [[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in index], device=device
        )
        if constraint is not None:
            extra = list(gen_kwargs.get("logits_processor") or [])
            settings["logits_processor"] = LogitsProcessorList([*extra, constraint.processor(index, width)])
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad_id,
                **settings,
            )
        for row, i in enumerate(index):
            ids = output[row, width:].tolist()
            answers[i] = decode_new_tokens(tokenizer, ids)
            if constraint is not None and tokenizer.eos_token_id not in ids:
                answers[i] = constraint.close(i, answers[i])
    return answers


def prompt_budget(model: torch.nn.Module, max_new_tokens: int) -> int | None:
    """Tokens a prompt may have: the model's positions minus max_new_tokens (None: the model sets no limit)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is None:
        return None
    if max_new_tokens >= positions:
        raise UserError(
            f"max_new_tokens={max_new_tokens} leaves no room for the input: the model takes {positions} positions "
            "in all; lower max_new_tokens"
        )
    return positions - max_new_tokens


def encode_prompts(
    model: torch.nn.Module, tokenizer: LlamaSentencePieceTokenizer, prompts: list[str], max_new_tokens: int
) -> list[list[int]]:
    """Token ids of each prompt, cut (the query's end, as training cuts) to fit the model with max_new_tokens.

    Prints one warning naming the inputs that were cut. Every entry point that generates calls this.
    """
    budget = prompt_budget(model, max_new_tokens)
    if budget is None:
        return [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    fitted = [fit_prompt(tokenizer, p, budget) for p in prompts]
    cut = [i + 1 for i, (_, was_cut) in enumerate(fitted) if was_cut]
    if cut:
        shown = ", ".join(map(str, cut[:10])) + (", ..." if len(cut) > 10 else "")
        print(
            f"warning: {len(cut)} input(s) longer than the model takes were cut to {budget} tokens (the end of the "
            f"query dropped, as in training): the model has {budget + max_new_tokens} positions, max_new_tokens="
            f"{max_new_tokens}; input(s) {shown}",
            file=sys.stderr,
        )
    return [ids for ids, _ in fitted]


def decode_new_tokens(tokenizer: LlamaSentencePieceTokenizer, ids: list[int]) -> str:
    """Text of generated ids up to (not including) the first `</s>`, stripped."""
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
