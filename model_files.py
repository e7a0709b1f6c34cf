"""Checks on the model files a script reads and writes: published checksums, output directory, weight files
(found, complete).

Shared by the converters (convert, merge, export_gguf) and, for weight files, by training and evaluation.

    report_checksums([(Path("model_hub/tokenizer.model"), tokenizer_claim(32000))])
    check_output_dir(Path("model_hub/7B-hf"), [Path("model_hub/7B")], overwrite=False)
"""

from __future__ import annotations

from pathlib import Path

from io_utils import check_output_dir_path, read_json_object, sha256_file
from model_utils import ModelLoadError, check_model_dir, check_weight_files

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
    """Refuse an output that is a file, is, contains or lies inside an input, or would replace other files."""
    check_output_dir_path(output_dir, "--output_dir")
    out = output_dir.resolve()
    for path in inputs:
        src = path.resolve()
        if out == src or out in src.parents or src in out.parents:
            raise ModelLoadError(
                f"--output_dir {output_dir} overlaps the input {path}: choose a new directory outside the inputs"
            )
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ModelLoadError(f"--output_dir {output_dir} exists and is not empty: choose a new one or pass --overwrite")


def hf_weight_files(model_dir: Path) -> list[Path]:
    """A Hugging Face model's weight files: safetensors preferred, else pytorch_model*.bin; sharded or not."""
    for index_name, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        index = model_dir / index_name
        if index.is_file():
            weight_map = read_json_object(index, error=ModelLoadError).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ModelLoadError(f"{index}: no weight_map; damaged or incomplete, download it again")
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (model_dir / n).is_file()]
            if missing:
                raise ModelLoadError(f"{index}: lists {missing[0]} which is missing; finish the download")
            return [model_dir / n for n in names]
        files = sorted(model_dir.glob(pattern))
        if files:
            return files
    raise ModelLoadError(f"{model_dir}: no model*.safetensors or pytorch_model*.bin; pass a Hugging Face model dir")


def check_model_files(model_dir: str | Path) -> list[Path]:
    """A Hugging Face model directory that can load: config.json is JSON, and every weight file is there and
    as long as its header says (a cut download is one line naming the file). Returns the weight files."""
    files = hf_weight_files(check_model_dir(model_dir))
    check_weight_files(files)
    return files


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
