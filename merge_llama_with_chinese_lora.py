"""Merge Chinese-LLaMA/Alpaca LoRA(s) into a Hugging Face LLaMA: extend the vocabulary, add B@A, write.

    python merge_llama_with_chinese_lora.py --base_model model_hub/7B-hf \
        --lora_model model_hub/chinese-llama-plus-lora-7b,model_hub/chinese-alpaca-plus-lora-7b \
        --output_type huggingface --output_dir model_hub/chinese-alpaca-7b
    python merge_llama_with_chinese_lora.py --base_model model_hub/7B-hf --lora_model model_hub/chinese-alpaca-lora-7b \
        --output_type pth --output_dir model_hub/chinese-alpaca-7b-pth

Streams tensor by tensor: each output tensor is read from the base (or the last LoRA that saved
a full copy of it, i.e. embed_tokens/lm_head), gets `lora_alpha / r * B @ A` of every LoRA in
order added in fp32, is cast to fp16 once and written. Memory stays near one tensor whatever
the depth; no peft or transformers model is built. Output appears only once complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from config_utils import answer_help_first
from llama_ner.io_utils import atomic_dir, atomic_write_text, read_json_object, run_cli

EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base_model", required=True, help="Hugging Face LLaMA directory")
    parser.add_argument("--lora_model", required=True, help="LoRA folder(s), comma-separated, in order")
    parser.add_argument("--output_type", default="pth", choices=["pth", "huggingface", "gguf"], help="output format")
    parser.add_argument("--output_dir", required=True, help="new directory for the merged model")
    parser.add_argument("--offload_dir", default=None, help="accepted for compatibility; not needed (streaming)")
    parser.add_argument("--max_shard_size", default="2GB", help="largest safetensors shard (huggingface output)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"],
                        help="dtype of the merged weights (huggingface output; pth and gguf are float16)")  # fmt: skip
    parser.add_argument("--strict", action="store_true", help="sha256 mismatches are errors, not warnings")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    parser.add_argument("--verbose", action="store_true", help="print what happens to every tensor")
    return parser.parse_args(argv)


if __name__ == "__main__":  # answer --help before torch loads (seconds)
    answer_help_first(parse_args)

import torch

from llama_ner.io_utils import ModelLoadError
from llama_ner.tokenizer import LlamaSentencePieceTokenizer, is_sentencepiece, load_tokenizer, save_tokenizer
from llama_ner.weights.llama_gguf import GGUF_FILE_NAME, write_gguf
from llama_ner.weights.llama_layout import (
    IGNORED_HF_SUFFIXES,
    META_SHARDS_BY_DIM,
    config_to_params,
    hf_sort_key,
    hf_to_meta_name,
    merge_lora_weight,
    parse_adapter_key,
    rotary_heads,
    shard_pieces,
    unpermute,
)
from llama_ner.weights.model_files import (
    MODEL_SIZE_BY_DIM,
    check_model_files,
    check_output_dir,
    read_model_config,
    report_checksums,
    tokenizer_claim,
)
from llama_ner.weights.tensor_io import TensorInfo
from llama_ner.weights.tensor_read import TensorSource
from llama_ner.weights.tensor_write import SafetensorsShards, TorchZipWriter, parse_size, plan_shards, print_summary


@dataclass
class Lora:
    """One LoRA folder, read lazily: which base weights it replaces (full copies) and which it adds B@A to."""

    path: Path
    adapter_file: Path
    tokenizer: LlamaSentencePieceTokenizer
    scale: float
    fan_in_fan_out: bool
    source: TensorSource
    full: dict[str, str] = field(default_factory=dict)  # base weight name -> adapter key
    pairs: dict[str, tuple[str, str]] = field(default_factory=dict)  # base weight name -> (A key, B key)

    @property
    def tokens(self) -> int:
        return len(self.tokenizer)

    def rows(self, name: str) -> int | None:
        return self.source.info(self.full[name]).shape[0] if name in self.full else None


def lora_scale(config: dict, where: Path) -> tuple[float, bool]:
    """(scale, fan_in_fan_out) from adapter_config.json; refuses LoRA variants a plain merge would get wrong."""
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ModelLoadError(f"{where}: peft_type {config.get('peft_type')} is not LORA; only LoRA adapters merge here")
    for key in ("use_dora", "rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ModelLoadError(f"{where}: {key} is set; only plain LoRA merges here (merge with peft instead)")
    if "r" not in config or "lora_alpha" not in config:
        raise ModelLoadError(f"{where}: needs r and lora_alpha; use the adapter_config.json saved with the adapter")
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return scale, bool(config.get("fan_in_fan_out", False))


def lora_tokenizer_dir(path: Path, base_dir: Path | None) -> Path:
    """The folder of the tokenizer a LoRA was trained with: its own (the published Chinese LoRAs ship one), else
    the base model's (an adapter trained here kept the base's vocabulary)."""
    if any((path / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        return path
    if base_dir is not None and any((base_dir / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        print(f"{path}: no tokenizer of its own; using {base_dir}'s (the adapter kept the base's vocabulary)")
        return base_dir
    raise ModelLoadError(
        f"{path}: no tokenizer.model or tokenizer.json (nor in the base model): each LoRA folder needs the tokenizer "
        "it was trained with (copy the base model's if the LoRA kept its vocabulary)"
    )


def load_lora(path: Path, base_dir: Path | None = None) -> Lora:
    if not path.is_dir():
        raise ModelLoadError(f"--lora_model {path} is not a directory; pass the LoRA folder(s), comma-separated")
    config_file = path / "adapter_config.json"
    scale, fan_in_fan_out = lora_scale(
        read_json_object(config_file, "the LoRA folder needs it", ModelLoadError), config_file
    )
    adapter = next((path / n for n in ADAPTER_FILES if (path / n).is_file()), None)
    if adapter is None:
        raise ModelLoadError(f"{path}: no adapter_model.bin or adapter_model.safetensors; finish the download")
    tokenizer = load_tokenizer(lora_tokenizer_dir(path, base_dir))
    lora = Lora(path, adapter, tokenizer, scale, fan_in_fan_out, TensorSource([adapter]))
    pending: dict[str, dict[str, str]] = {}
    saved: set[str] = set()  # trained copies (modules_to_save) win over plain ones
    for key in lora.source.keys():
        try:
            name, kind = parse_adapter_key(key)
        except ValueError as err:
            raise ModelLoadError(f"{adapter}: {err}") from None
        if kind == "saved" or (kind == "full" and name not in saved):
            lora.full[name] = key
            saved |= {name} if kind == "saved" else set()
        elif kind in ("lora_A", "lora_B"):
            pending.setdefault(name, {})[kind] = key
    for name, keys in pending.items():
        if set(keys) != {"lora_A", "lora_B"}:
            raise ModelLoadError(f"{adapter}: {name} has {sorted(keys)} but needs lora_A and lora_B; a damaged file?")
        lora.pairs[name] = (keys["lora_A"], keys["lora_B"])
    return lora


def check_vocab(base_rows: int, loras: list[Lora]) -> int:
    """The final vocabulary size; refuses shrinking (wrong order) and adapters paired with another tokenizer."""
    vocab = base_rows
    for lora in loras:
        if not is_sentencepiece(lora.tokenizer):  # a tokenizer.json model keeps its rows (some are padding)
            if lora.tokens > vocab:
                raise ModelLoadError(
                    f"{lora.path}: its tokenizer has {lora.tokens} tokens, more than the model's {vocab} rows: "
                    "it belongs to another model"
                )
            continue
        for name in (EMBED, LM_HEAD):
            rows = lora.rows(name)
            if rows is not None and rows != lora.tokens:
                raise ModelLoadError(
                    f"{lora.path}: the adapter's {name} has {rows} rows but the tokenizer.model there has "
                    f"{lora.tokens} tokens: the folder holds another model's tokenizer; "
                    "put back the one published with this LoRA"
                )
        if lora.tokens < vocab:
            raise ModelLoadError(
                f"{lora.path}: its tokenizer has {lora.tokens} tokens, fewer than the {vocab} before it: the LoRAs are "
                "in the wrong order; list Chinese-LLaMA-Plus before Chinese-Alpaca-Plus in --lora_model"
            )
        if lora.tokens > vocab and (lora.rows(EMBED) is None or lora.rows(LM_HEAD) is None):
            raise ModelLoadError(
                f"{lora.path}: its tokenizer grows the vocabulary to {lora.tokens} but the adapter saved no "
                "embed_tokens/lm_head for the new tokens; use the tokenizer that was trained with this LoRA"
            )
        vocab = lora.tokens
    return vocab


@dataclass
class Step:
    """How one output tensor is made: read `start` from `source`, then add each (lora, A key, B key)."""

    name: str
    info: TensorInfo
    source: TensorSource
    start: str
    deltas: list[tuple[Lora, str, str]]
    origin: str = "base"

    def describe(self) -> str:
        adds = " ".join(f"+ B@A of {lora.path.name} (scale {lora.scale:g})" for lora, _, _ in self.deltas)
        return f"{self.name}: {self.origin} {adds}".rstrip()


def plan(base: TensorSource, loras: list[Lora], dtype: torch.dtype = torch.float16) -> list[Step]:
    """One Step per output tensor, every shape checked before anything is written."""
    for lora in loras:
        for name in list(lora.full) + list(lora.pairs):
            if name not in base:
                raise ModelLoadError(f"{lora.adapter_file}: targets {name}, which the base model lacks; wrong base?")
    steps = []
    for name in sorted(base.keys(), key=hf_sort_key):
        source, start, deltas, origin = base, name, [], "base"
        for lora in loras:
            if name in lora.full:
                source, start, deltas, origin = lora.source, lora.full[name], [], f"copy from {lora.adapter_file}"
            if name in lora.pairs:
                deltas.append((lora, *lora.pairs[name]))
        shape = source.info(start).shape
        base_shape = base.info(name).shape
        if name not in (EMBED, LM_HEAD) and shape != base_shape:
            raise ModelLoadError(f"{origin}: {name} has shape {shape}, the base {base_shape}; a LoRA for another size?")
        for lora, a_key, b_key in deltas:
            (r, cols), (rows, r2) = lora.source.info(a_key).shape, lora.source.info(b_key).shape
            fits = (cols, rows) if lora.fan_in_fan_out else (rows, cols)
            if r != r2 or fits != tuple(shape):
                raise ModelLoadError(
                    f"{lora.adapter_file}: {a_key} {(r, cols)} / B {(rows, r2)} do not fit {name} {tuple(shape)}; "
                    "this LoRA was trained on another model size"
                )
        steps.append(Step(name, TensorInfo(dtype, tuple(shape)), source, start, deltas, origin))
    return steps


def check_changes_something(lora: Lora) -> None:
    """A LoRA with no saved weights and every B zero (an untrained adapter) would change nothing."""
    if lora.full:
        return
    for _, b_key in lora.pairs.values():
        if lora.source.read(b_key).any():
            return
    raise ModelLoadError(
        f"{lora.adapter_file}: this LoRA changes nothing (every lora_B is zero, no saved weights): "
        "an untrained adapter? pass the trained one"
    )


def merged_tensor(step: Step) -> torch.Tensor:
    """The step's output in its dtype (fp16 by default): deltas summed in fp32, cast once."""
    weight = step.source.read(step.start)
    if not step.deltas:
        return weight.to(step.info.dtype)
    weight = weight.float()
    for lora, a_key, b_key in step.deltas:
        a, b = lora.source.read(a_key), lora.source.read(b_key)
        weight = merge_lora_weight(weight, a, b, lora.scale, lora.fan_in_fan_out)
    return weight.to(step.info.dtype)


def output_config(base_config: dict, vocab: int, dtype: str = "float16") -> dict:
    config = dict(base_config, vocab_size=vocab, dtype=dtype)
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    return config


def write_huggingface(out: Path, steps: list[Step], config: dict, max_shard_size: str, progress: Callable) -> None:
    entries = [(s.name, s.info) for s in steps]
    with SafetensorsShards(out, plan_shards(entries, parse_size(max_shard_size))) as writer:
        for step in progress(steps):
            writer.write(step.name, merged_tensor(step))
    atomic_write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def meta_pieces(name: str, tensor: torch.Tensor, config: dict, n_shards: int) -> tuple[str, list[torch.Tensor]]:
    """An HF tensor as Meta's name and its per-shard pieces (q/k back in Meta's rotary layout)."""
    heads = rotary_heads(name, config)
    if heads is not None:
        tensor = unpermute(tensor, heads)
    meta = hf_to_meta_name(name)
    return meta, shard_pieces(meta, tensor, n_shards)


def write_pth(out: Path, steps: list[Step], config: dict, progress: Callable) -> None:
    n_shards = META_SHARDS_BY_DIM.get(config["hidden_size"], 1)
    plans = [[] for _ in range(n_shards)]
    for step in steps:
        try:
            meta, pieces = meta_pieces(step.name, torch.empty(step.info.shape, device="meta"), config, n_shards)
        except KeyError:
            raise ModelLoadError(f"{step.name}: no Meta name for this tensor; use --output_type huggingface") from None
        for plan_, piece in zip(plans, pieces, strict=True):
            plan_.append((meta, TensorInfo(torch.float16, tuple(piece.shape))))
    with contextlib.ExitStack() as stack:
        files = [out / f"consolidated.{i:02d}.pth" for i in range(n_shards)]
        writers = [stack.enter_context(TorchZipWriter(f, p)) for f, p in zip(files, plans, strict=True)]
        for step in progress(steps):
            meta, pieces = meta_pieces(step.name, merged_tensor(step), config, n_shards)
            for writer, piece in zip(writers, pieces, strict=True):
                writer.write(meta, piece)
    atomic_write_text(out / "params.json", json.dumps(config_to_params(config)) + "\n")


def checksum_files(base_files: list[Path], loras: list[Lora], hidden: int) -> list[tuple[Path, str | None]]:
    """Input files with the published file each claims to be (None: nothing published looks like it).

    An adapter claims to be a published Chinese LoRA when it is for a 7B/13B model and carries the
    Chinese vocabulary's full embeddings; an adapter trained here on the merged model does not.
    """
    size = MODEL_SIZE_BY_DIM.get(hidden)
    size = size if size in ("7B", "13B") else None
    files = [(p, None) for p in base_files]
    for lora in loras:
        if is_sentencepiece(lora.tokenizer):
            pieces = lora.tokenizer.sp_model.get_piece_size()
            files.append((Path(lora.tokenizer.vocab_file), tokenizer_claim(pieces)))
        chinese = lora.rows(EMBED) in (49953, 49954) and lora.adapter_file.suffix == ".bin"  # not a user's own
        claim = f"Chinese LoRA {size} adapter_model.bin" if size and chinese else None
        files.append((lora.adapter_file, claim))
    return files


def merge(args: argparse.Namespace) -> list[Path]:
    base_dir, output_dir = Path(args.base_model), Path(args.output_dir)
    lora_dirs = [Path(p.strip()) for p in args.lora_model.split(",") if p.strip()]
    if not lora_dirs:
        raise ModelLoadError("--lora_model is empty: pass one LoRA folder or two, comma-separated")
    parse_size(args.max_shard_size)
    if args.dtype != "float16" and args.output_type != "huggingface":
        raise ModelLoadError(f"--dtype {args.dtype} needs --output_type huggingface ({args.output_type} is float16)")
    check_output_dir(output_dir, [base_dir, *lora_dirs], args.overwrite)
    base_config = read_model_config(base_dir)
    base_files = check_model_files(base_dir)  # headers only: sizes, the index, shapes against config.json
    base = TensorSource(base_files, IGNORED_HF_SUFFIXES)  # each header read, sizes checked before any output
    loras = [load_lora(p, base_dir) for p in lora_dirs]
    report_checksums(checksum_files(base_files, loras, base_config["hidden_size"]), args.strict)
    tied = bool(base_config.get("tie_word_embeddings")) and LM_HEAD not in base  # lm_head is embed_tokens
    if EMBED not in base or (LM_HEAD not in base and not tied):
        raise ModelLoadError(f"{base_dir}: no {EMBED} / {LM_HEAD}; not a LlamaForCausalLM checkpoint")
    if tied and any(name in lora.full or name in lora.pairs for lora in loras for name in (EMBED, LM_HEAD)):
        raise ModelLoadError(
            f"{base_dir} ties lm_head to embed_tokens, and a LoRA changes one of them: merging would untie them, "
            "which this script does not do; train the LoRA without embed_tokens/lm_head"
        )
    vocab = check_vocab(base.info(EMBED).shape[0], loras)
    for lora in loras:
        check_changes_something(lora)
    steps = plan(base, loras, getattr(torch, args.dtype))
    config = output_config(base_config, vocab, args.dtype)
    print(f"base {base_dir} ({base.info(EMBED).shape[0]} tokens) + {len(loras)} LoRA(s) -> {vocab} tokens")
    if args.verbose:
        for step in steps:
            print(step.describe())
    progress = lambda items: tqdm(items, desc="merging", unit="tensor")  # noqa: E731
    with atomic_dir(output_dir) as tmp:
        if args.output_type == "huggingface":
            write_huggingface(tmp, steps, config, args.max_shard_size, progress)
            if (base_dir / "generation_config.json").is_file():
                shutil.copyfile(base_dir / "generation_config.json", tmp / "generation_config.json")
            save_tokenizer(loras[-1].tokenizer, tmp)
        elif args.output_type == "pth":
            write_pth(tmp, steps, config, progress)
            save_tokenizer(loras[-1].tokenizer, tmp)
        else:
            by_name = {step.name: step for step in steps}
            entries = [(step.name, step.info) for step in steps]
            produce = lambda name: merged_tensor(by_name[name])  # noqa: E731
            tokenizer = loras[-1].tokenizer
            write_gguf(tmp / GGUF_FILE_NAME, entries, produce, config, tokenizer, output_dir.name, progress)
    return sorted(output_dir.iterdir())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.time()
    if args.offload_dir:
        print("note: --offload_dir is not needed and is ignored: this merge streams one tensor at a time")
    written = merge(args)
    print_summary(f"{args.output_dir} ({args.output_type})", written, start)


if __name__ == "__main__":
    run_cli(main)
