"""Convert Meta's original LLaMA checkpoint to a Hugging Face LlamaForCausalLM directory (fp16).

    python convert_llama_weights_to_hf.py --input_dir model_hub --model_size 7B --output_dir model_hub/7B-hf
    python convert_llama_weights_to_hf.py --input_dir model_hub --model_size tokenizer_only --output_dir model_hub/tok

Reads `input_dir/tokenizer.model` and `input_dir/<model_size>/consolidated.*.pth` + `params.json`.
Geometry comes from params.json and the shard count from the files present, so any checkpoint
in Meta's layout converts. Streams: shards are read tensor by tensor, output written layer by
layer; memory stays near one (full) tensor. Output appears only once complete.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tqdm import tqdm

from config_utils import answer_help_first
from llama_ner.io_utils import atomic_dir, read_json_object, run_cli

MODEL_SIZES = ["7B", "13B", "30B", "33B", "65B", "tokenizer_only"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", required=True, help="holds tokenizer.model and <model_size>/")
    parser.add_argument("--model_size", required=True, choices=MODEL_SIZES)
    parser.add_argument("--output_dir", required=True, help="new Hugging Face model directory")
    parser.add_argument("--max_position_embeddings", type=int, default=2048, help="LLaMA 1 was trained on 2048")
    parser.add_argument("--max_shard_size", default="2GB", help="largest safetensors shard")
    parser.add_argument("--strict", action="store_true", help="sha256 mismatches are errors, not warnings")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    return parser.parse_args(argv)


if __name__ == "__main__":  # answer --help before torch loads (seconds)
    answer_help_first(parse_args)

import torch

from llama_ner.io_utils import ModelLoadError
from llama_ner.tokenizer import load_tokenizer, save_tokenizer
from llama_ner.weights.llama_layout import (
    expected_shapes,
    hf_sort_key,
    meta_shard_dim,
    meta_to_hf_name,
    params_to_config,
    permute,
    rotary_heads,
)
from llama_ner.weights.model_files import MODEL_SIZE_BY_DIM, check_output_dir, report_checksums, tokenizer_claim
from llama_ner.weights.tensor_io import TensorInfo
from llama_ner.weights.tensor_read import TorchZipFile
from llama_ner.weights.tensor_write import SafetensorsShards, parse_size, plan_shards, print_summary


def find_tokenizer(input_dir: Path, weights_dir: Path) -> Path:
    for path in (input_dir / "tokenizer.model", weights_dir / "tokenizer.model"):
        if path.is_file():
            return path
    raise ModelLoadError(f"{input_dir / 'tokenizer.model'} not found: put LLaMA's tokenizer.model in --input_dir")


def read_params(weights_dir: Path) -> dict:
    path = weights_dir / "params.json"
    fix = "--input_dir/--model_size must point at Meta's checkpoint folder"
    params = read_json_object(path, fix, ModelLoadError)
    missing = [k for k in ("dim", "n_heads", "n_layers", "norm_eps", "multiple_of") if k not in params]
    if missing:
        raise ModelLoadError(f"{path}: missing {', '.join(missing)}; use the params.json that came with the weights")
    return params


def open_shards(weights_dir: Path) -> list[TorchZipFile]:
    files = sorted(weights_dir.glob("consolidated.*.pth"))
    if not files:
        raise ModelLoadError(f"{weights_dir}: no consolidated.*.pth; download Meta's weights into this folder")
    return [TorchZipFile(f) for f in files]  # each header read, sizes checked: a cut download stops here


def check_geometry(shards: list[TorchZipFile], shapes: dict[str, tuple[int, ...]]) -> None:
    """Every tensor params.json implies is in every shard and assembles to the implied shape."""
    for name, want in shapes.items():
        for shard in shards:
            if name not in shard.keys():
                raise ModelLoadError(f"{shard.path}: no {name}; params.json does not describe these weights")
        got = list(shards[0].info(name).shape)
        split = meta_shard_dim(name)
        if split is not None:
            got[split] = sum(shard.info(name).shape[split] for shard in shards)
        if tuple(got) != want:
            raise ModelLoadError(
                f"{name}: weights give shape {tuple(got)} but params.json implies {want} with {len(shards)} shard(s); "
                "use the params.json and consolidated.*.pth from the same download"
            )


def assemble(shards: list[TorchZipFile], name: str) -> torch.Tensor:
    """One full Meta tensor from its model-parallel pieces."""
    split = meta_shard_dim(name)
    if split is None:
        first = shards[0].read(name)
        for shard in shards[1:]:
            if not torch.equal(shard.read(name), first):
                raise ModelLoadError(f"{shard.path}: replicated {name} differs from shard 0; a corrupted shard?")
        return first
    return torch.cat([shard.read(name) for shard in shards], dim=split)


def to_hf(name: str, tensor: torch.Tensor, config: dict) -> tuple[str, torch.Tensor]:
    hf_name = meta_to_hf_name(name)
    heads = rotary_heads(hf_name, config)
    if heads is not None:
        tensor = permute(tensor, heads)
    return hf_name, tensor.to(torch.float16)


def write_config(out: Path, config: dict) -> None:
    from transformers import GenerationConfig, LlamaConfig

    LlamaConfig(**config).save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(out)


def convert(
    input_dir: Path, model_size: str, output_dir: Path, max_shard_size: str = "2GB", max_positions: int = 2048
) -> list[Path]:
    """Write the HF directory; returns the files written."""
    weights_dir = input_dir / model_size
    tokenizer = load_tokenizer(find_tokenizer(input_dir, weights_dir))
    if model_size == "tokenizer_only":
        with atomic_dir(output_dir) as tmp:
            save_tokenizer(tokenizer, tmp)
        return sorted(output_dir.iterdir())
    params, shards = read_params(weights_dir), open_shards(weights_dir)
    if "tok_embeddings.weight" not in shards[0].keys():
        raise ModelLoadError(f"{shards[0].path}: no tok_embeddings.weight; not a Meta LLaMA checkpoint")
    vocab = shards[0].info("tok_embeddings.weight").shape[0]
    shapes = expected_shapes(params, vocab)
    check_geometry(shards, shapes)
    config = params_to_config(params, vocab, max_positions)
    entries = sorted(
        ((meta_to_hf_name(n), TensorInfo(torch.float16, s)) for n, s in shapes.items()), key=lambda e: hf_sort_key(e[0])
    )
    hf_to_meta = {meta_to_hf_name(n): n for n in shapes}
    with atomic_dir(output_dir) as tmp:
        with SafetensorsShards(tmp, plan_shards(entries, parse_size(max_shard_size))) as out:
            for hf_name, _ in tqdm(entries, desc="converting", unit="tensor"):
                out.write(*to_hf(hf_to_meta[hf_name], assemble(shards, hf_to_meta[hf_name]), config))
        write_config(tmp, config)
        save_tokenizer(tokenizer, tmp)
    return sorted(output_dir.iterdir())


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.time()
    input_dir, output_dir = Path(args.input_dir), Path(args.output_dir)
    weights_dir = input_dir / args.model_size
    if not input_dir.is_dir():
        raise ModelLoadError(f"--input_dir {input_dir} is not a directory")
    if args.max_position_embeddings <= 0:
        raise ModelLoadError(f"--max_position_embeddings {args.max_position_embeddings} must be > 0")
    parse_size(args.max_shard_size)
    check_output_dir(output_dir, [weights_dir, input_dir / "tokenizer.model"], args.overwrite)
    tokenizer_file = find_tokenizer(input_dir, weights_dir)
    files = [(tokenizer_file, tokenizer_claim(len(load_tokenizer(tokenizer_file))))]
    if args.model_size != "tokenizer_only":
        open_shards(weights_dir)  # damaged files fail here, before minutes of hashing
        size = MODEL_SIZE_BY_DIM.get(read_params(weights_dir).get("dim"))
        size = size if size in ("7B", "13B") else None  # the sizes with published checksums
        files += [(p, f"LLaMA-{size} {p.name}" if size else None) for p in sorted(weights_dir.glob("consolidated.*"))]
    report_checksums(files, args.strict)
    written = convert(input_dir, args.model_size, output_dir, args.max_shard_size, args.max_position_embeddings)
    print_summary(str(output_dir), written, start)


if __name__ == "__main__":
    run_cli(main)
