"""Checks on the model files a script reads and writes: config.json (a LLaMA's geometry), published
checksums, output directory, weight files and a LoRA folder's (found, complete).

Shared by the converters (convert, merge, export_gguf) and, for weight files, by training and evaluation.

    report_checksums([(Path("model_hub/tokenizer.model"), tokenizer_claim(32000))])
    check_output_dir(Path("model_hub/7B-hf"), [Path("model_hub/7B")], overwrite=False)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from llama_ner.io_utils import (
    ModelLoadError,
    check_output_dir_path,
    read_json_object,
    report_stale_temporaries,
    sha256_file,
)
from llama_ner.weights.llama_layout import hf_expected_shapes
from llama_ner.weights.tensor_read import SafetensorsFile, TorchZipFile, open_tensor_file

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


TensorReader = SafetensorsFile | TorchZipFile

# Published sha256 of the real files (Chinese-LLaMA-Alpaca's SHA256.md).
PUBLISHED_SHA256 = {
    "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347": "LLaMA tokenizer.model",
    "700df0d3013b703a806d2ae7f1bfb8e59814e3d06ae78be0c66368a50059f33d": "LLaMA-7B consolidated.00.pth",
    "745bf4e29a4dd6f411e72976d92b452da1b49168a4f41c951cfcc8051823cf08": "LLaMA-13B consolidated.00.pth",
    "d5ccbcc465c71c0de439a5aeffebe8344c68a519bce70bc7f9f92654ee567085": "LLaMA-13B consolidated.01.pth",
    "e2676d4ca29ca1750f6ff203328d73b189321dc5776ceede037cbd36541d70c0": "Chinese-LLaMA tokenizer.model",
    "2d967e855b1213a439df6c8ce2791f869c84b4f3b6cfacf22b86440b8192a2f8": "Chinese-Alpaca tokenizer.model",
    "8c928db86b2a0cf73f019832f921eb7e1e069ca21441b4bfa12c4381c6cc46be": "Chinese-LLaMA-Plus-7B adapter_model.bin",
    "4ee0bf805c312a9a771624d481fbdb4485e1b0a70cd2a8da9f96137f177b795d": "Chinese-Alpaca-Plus-7B adapter_model.bin",
    "2a2c24d096f5d509f24946fdbd8c25e1ce4a0acb955902f7436d74c0c0379d86": "Chinese-LLaMA-7B adapter_model.bin",
    "0d9b6ed8e4a7d1ae590a16c89a452a488d66ff07e45487972f61c2b6e46e36de": "Chinese-Alpaca-7B adapter_model.bin",
    "784fcff9c4bdf4e77d442a01158e121caf8fcce0f97ffb32396fe7a3617ee7e8": "Chinese-LLaMA-Plus-13B adapter_model.bin",
    "a1fcdcb6d7e1068f925fb36ec78632c76058ba12ba352bed4d44060b8e6f4706": "Chinese-Alpaca-Plus-13B adapter_model.bin",
}
TOKENIZER_CLAIMS = {32000: "LLaMA", 49953: "Chinese-LLaMA", 49954: "Chinese-Alpaca"}  # pieces -> published name
MODEL_SIZE_BY_DIM = {4096: "7B", 5120: "13B", 6656: "33B", 8192: "65B"}


def checksum_verdict(path: str, sha256: str, claim: str | None) -> tuple[str, str]:
    """("ok" | "mismatch" | "unknown", message) for a file's sha256 against PUBLISHED_SHA256.

    `claim` names the published file this one looks like (e.g. "Chinese-LLaMA tokenizer.model"),
    or None when it looks like nothing published (a tiny test model, a user's own adapter).
    """
    known = PUBLISHED_SHA256.get(sha256)
    if known is not None:
        return "ok", f"sha256 ok   {path}: {known}"
    if claim is not None:
        return "mismatch", (
            f"WARNING: {path} looks like the published {claim} but its sha256 {sha256} matches no published "
            "file: a corrupted or partial download? Re-download it and compare with Chinese-LLaMA-Alpaca's SHA256.md"
        )
    return "unknown", f"sha256      {path}: {sha256} (not a published file)"


def report_checksums(files: list[tuple[Path, str | None]], strict: bool = False) -> None:
    """Print each input file's sha256 verdict; a mismatch warns (or, with strict, exits)."""
    mismatches = []
    for path, claim in files:
        verdict, message = checksum_verdict(str(path), sha256_file(path), claim)
        print(message, flush=True)
        if verdict == "mismatch":
            mismatches.append(str(path))
    if mismatches and strict:
        raise ModelLoadError(f"--strict: {', '.join(mismatches)} match no published sha256; re-download them")


def tokenizer_claim(pieces: int) -> str | None:
    """Which published tokenizer.model a file with this many pieces claims to be."""
    name = TOKENIZER_CLAIMS.get(pieces)
    return f"{name} tokenizer.model" if name else None


def check_output_dir(output_dir: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an output that is a file, is, contains or lies inside an input, or would replace other files.

    Leftovers of killed runs beside it are reported here, before minutes of hashing."""
    check_output_dir_path(output_dir, "--output_dir")
    report_stale_temporaries(output_dir)
    out = output_dir.resolve()
    for path in inputs:
        src = path.resolve()
        if out == src or out in src.parents or src in out.parents:
            raise ModelLoadError(
                f"--output_dir {output_dir} overlaps the input {path}: choose a new directory outside the inputs"
            )
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ModelLoadError(f"--output_dir {output_dir} exists and is not empty: choose a new one or pass --overwrite")


WEIGHT_INDEXES = (
    ("model.safetensors.index.json", "*.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
)


def weight_index_file(model_dir: Path) -> Path | None:
    """The index of a sharded checkpoint (safetensors preferred), or None when the model is not sharded."""
    return next((model_dir / name for name, _ in WEIGHT_INDEXES if (model_dir / name).is_file()), None)


def weight_map(index: Path) -> dict[str, str]:
    """tensor name -> shard file name, as the index lists them."""
    weight_map = read_json_object(index, error=ModelLoadError).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelLoadError(f"{index}: no weight_map; damaged or incomplete, download it again")
    return weight_map


def hf_weight_files(model_dir: Path) -> list[Path]:
    """A Hugging Face model's weight files: safetensors preferred, else pytorch_model*.bin; sharded or not."""
    index = weight_index_file(model_dir)
    if index is not None:
        names = sorted(set(weight_map(index).values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise ModelLoadError(f"{index}: lists {missing[0]} which is missing; finish the download")
        return [model_dir / n for n in names]
    for _, pattern in WEIGHT_INDEXES:
        files = sorted(model_dir.glob(pattern))
        if files:
            return files
    raise ModelLoadError(f"{model_dir}: no model*.safetensors or pytorch_model*.bin; pass a Hugging Face model dir")


def check_model_files(model_dir: str | Path) -> list[Path]:
    """A Hugging Face LLaMA directory that can load, from config.json and the weight files' headers alone:
    config.json holds the geometry keys, every weight file is there and as long as its header says, each
    shard holds the tensors the index places in it, and every tensor has the shape config.json implies
    (a cut or mixed download is one line naming the file). Returns the weight files."""
    model_dir = Path(model_dir)
    config = read_model_config(model_dir)
    files = hf_weight_files(model_dir)
    headers = {file: open_tensor_file(file) for file in files}  # sizes checked against the file's
    index = weight_index_file(model_dir)
    if index is not None:
        for name, shard in weight_map(index).items():
            if name not in headers[model_dir / shard].keys():
                raise ModelLoadError(
                    f"{model_dir / shard}: lacks {name}, which {index.name} places in it: the shard is damaged or "
                    "from another download; download it again"
                )
    check_shapes_match_config(model_dir, config, headers)
    return files


def check_shapes_match_config(model_dir: Path, config: dict, headers: dict[Path, TensorReader]) -> None:
    """Every LLaMA tensor is there with the shape config.json gives (lm_head may be tied), no layer beyond it."""
    config_file = model_dir / "config.json"
    expected = hf_expected_shapes(config)
    found = set()
    for file, header in headers.items():
        for name in header.keys():
            found.add(name)
            shape, want = tuple(header.info(name).shape), expected.get(name)
            if want is not None and shape != want:
                raise ModelLoadError(
                    f"{file}: {name} has shape {shape} but {config_file} implies {want}: the weights and config.json "
                    "are from different models; download the model folder again"
                )
            layer = re.match(r"model\.layers\.(\d+)\.", name)
            if layer and int(layer[1]) >= config["num_hidden_layers"]:
                raise ModelLoadError(
                    f"{file}: holds {name} but {config_file} says num_hidden_layers={config['num_hidden_layers']}: "
                    "the weights and config.json are from different models; download the model folder again"
                )
    if config.get("tie_word_embeddings"):
        found.add("lm_head.weight")
    missing = [name for name in expected if name not in found]
    if missing:
        raise ModelLoadError(
            f"{model_dir}: the weight files lack {missing[0]}"
            + (f" and {len(missing) - 1} more" if missing[1:] else "")
            + f", which {config_file} implies: an incomplete download or a config.json of another model"
        )


def input_files(folder: str | Path) -> list[Path]:
    """The files of a model, tokenizer or adapter folder that loading reads (no output may replace one)."""
    folder = Path(folder)
    if not folder.is_dir():
        return [folder]
    patterns = ("*.json", "*.model", "*.safetensors", "*.bin", "*.pth")
    files = {p for pattern in patterns for p in folder.glob(pattern)}
    return sorted(p for p in files if p.name in READ_FILES or p.suffix != ".json")


READ_FILES = {
    "config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "added_tokens.json",
    "adapter_config.json",
    "params.json",
    "train_args.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
}
