"""Tiny random LLaMA models with the real tokenizers, for tests, the demo and benchmarks.

    python -m llama_ner.tiny_models --out_dir model_hub/tiny-alpaca --vocab alpaca

A model's size never changes the code path, so a 2-layer, hidden-64 model exercises
everything but speed. Weights come from the library's own initializer: random norm
weights near zero would stop a LoRA from learning.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable
from pathlib import Path

from config_utils import answer_help_first
from llama_ner.io_utils import atomic_dir, check_output_dir_path, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", required=True, help="the model folder to write (replaced when it exists)")
    parser.add_argument("--vocab", default="alpaca", choices=["llama", "chinese", "alpaca", "smollm2"])
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_hidden_layers", type=int, default=2)
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":  # answer --help before torch loads (seconds)
    answer_help_first(parse_args)

import torch

from llama_ner.tokenizer import build_chinese_sp_model, load_tokenizer, save_tokenizer
from llama_ner.training.train_config import LORA_TARGETS
from llama_ner.weights.llama_layout import expected_shapes, params_to_config, shard_pieces
from llama_ner.weights.tensor_io import TensorInfo
from llama_ner.weights.tensor_write import TorchZipWriter

HUB = Path(__file__).resolve().parent.parent / "model_hub"
LLAMA_SP = HUB / "tokenizer.model"
CHINESE_SP = HUB / "chinese_sp.model"
SMOLLM2_TOKENIZER = HUB / "smollm2-tokenizer"  # SmolLM2-135M-Instruct's byte-level BPE, as import_gguf.py writes it


def write_tokenizer(out_dir: str | Path, vocab: str = "alpaca") -> Path:
    """Write a tokenizer directory: vocab 'llama' (32000), 'chinese' (49953), 'alpaca' (49954) sentencepiece,
    or 'smollm2' (49152, tokenizer.json with a chat template)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if vocab == "smollm2":
        for file in SMOLLM2_TOKENIZER.iterdir():
            (out_dir / file.name).write_bytes(file.read_bytes())
        return out_dir
    if vocab == "llama":
        data = LLAMA_SP.read_bytes()
    elif vocab in ("chinese", "alpaca"):
        data = build_chinese_sp_model(LLAMA_SP, CHINESE_SP, add_pad=vocab == "alpaca")
    else:
        raise ValueError(f"vocab must be llama, chinese, alpaca or smollm2, not {vocab!r}")
    (out_dir / "tokenizer.model").write_bytes(data)
    save_tokenizer(load_tokenizer(out_dir), out_dir)
    return out_dir


def tiny_llama_config(
    vocab_size: int,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int | None = None,
    num_key_value_heads: int | None = None,
):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 8 // 3 // 8 * 8,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads or num_attention_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
    )


def make_tiny_model(out_dir: str | Path, vocab: str = "alpaca", seed: int = 0, **geometry: int) -> Path:
    """Save a random LlamaForCausalLM (fp32 safetensors) plus its tokenizer to out_dir."""
    from transformers import LlamaForCausalLM

    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        tokenizer = load_tokenizer(write_tokenizer(tmp, vocab))
        torch.manual_seed(seed)
        config = tiny_llama_config(len(tokenizer), **geometry)
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        model = LlamaForCausalLM(config)
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)  # save_pretrained may not rewrite these; keep ours last
    return out_dir


def _randn(gen: torch.Generator, *shape: int, std: float = 0.02) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * std).half()


def make_tiny_original(
    out_dir: str | Path,
    n_shards: int = 1,
    dim: int = 64,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    multiple_of: int = 32,
    model_size: str = "7B",
    seed: int = 0,
    progress: Callable = iter,
) -> Path:
    """A random fp16 LLaMA in Meta's original layout: out_dir/tokenizer.model (the real LLaMA one)
    and out_dir/<model_size>/consolidated.NN.pth (n_shards, split as Meta splits) + params.json.
    Written tensor by tensor, so any geometry fits in memory (7B: dim 4096, 32 layers, 32 heads, 256)."""
    out_dir = Path(out_dir)
    weights = out_dir / model_size
    weights.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(LLAMA_SP.read_bytes())
    vocab = len(load_tokenizer(out_dir))
    params = {"dim": dim, "multiple_of": multiple_of, "n_heads": n_heads, "n_layers": n_layers, "norm_eps": 1e-06}
    if n_kv_heads:
        params["n_kv_heads"] = n_kv_heads
    shapes = expected_shapes(params, vocab)
    heads = ("tok_embeddings.weight", "norm.weight", "output.weight")
    order = [heads[0], *(n for n in shapes if n not in heads), *heads[1:]]  # the order random values are drawn in

    plans = [[] for _ in range(n_shards)]
    for name in order:
        pieces = shard_pieces(name, torch.empty(shapes[name], device="meta"), n_shards)
        for plan, piece in zip(plans, pieces, strict=True):
            plan.append((name, TensorInfo(torch.float16, tuple(piece.shape))))
    gen = torch.Generator().manual_seed(seed)
    with contextlib.ExitStack() as stack:
        files = [weights / f"consolidated.{i:02d}.pth" for i in range(n_shards)]
        writers = [stack.enter_context(TorchZipWriter(f, p)) for f, p in zip(files, plans, strict=True)]
        for name in progress(order):
            shape = shapes[name]
            if len(shape) == 1:  # norms near one: random values near zero would stop learning
                tensor = (1 + _randn(gen, *shape, std=0.1).float()).half()
            else:
                tensor = _randn(gen, *shape)
            for writer, piece in zip(writers, shard_pieces(name, tensor, n_shards), strict=True):
                writer.write(name, piece)
    (weights / "params.json").write_text(json.dumps(params | {"vocab_size": -1}))
    return out_dir


def _adapter_config_2023(base: str, r: int, lora_alpha: float) -> dict:
    """adapter_config.json as peft 0.3.0.dev0 wrote it for the published Chinese LoRAs."""
    return {
        "base_model_name_or_path": base,
        "bias": "none",
        "enable_lora": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.05,
        "merge_weights": False,
        "modules_to_save": ["embed_tokens", "lm_head"],
        "peft_type": "LORA",
        "r": r,
        "target_modules": LORA_TARGETS,
        "task_type": "CAUSAL_LM",
    }


def _write_lora_2023(out_dir: Path, config: dict, vocab: str, r: int, lora_alpha: float, gen) -> Path:
    tokenizer = load_tokenizer(write_tokenizer(out_dir, vocab))
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_dim = hidden // heads * (config.get("num_key_value_heads") or heads)
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv_dim, hidden), "v_proj": (kv_dim, hidden)}
    shapes |= {"o_proj": (hidden, hidden), "gate_proj": (inter, hidden), "up_proj": (inter, hidden)}
    shapes |= {"down_proj": (hidden, inter)}
    state = {}
    for i in range(config["num_hidden_layers"]):
        for proj in LORA_TARGETS:
            rows, cols = shapes[proj]
            block = "self_attn" if proj.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{i}.{block}.{proj}"
            state[f"{prefix}.lora_A.weight"] = _randn(gen, r, cols, std=cols**-0.5)
            state[f"{prefix}.lora_B.weight"] = _randn(gen, rows, r, std=0.02)
    state["base_model.model.model.embed_tokens.weight"] = _randn(gen, len(tokenizer), hidden)
    state["base_model.model.lm_head.weight"] = _randn(gen, len(tokenizer), hidden)
    torch.save(state, out_dir / "adapter_model.bin")
    adapter_config = _adapter_config_2023("decapoda-research/llama-7b-hf", r, lora_alpha)
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return out_dir


def _base_geometry(base_dir: Path) -> dict:
    """HF config keys of a model directory: its config.json, or Meta's params.json (here or in 7B/)."""
    if (base_dir / "config.json").is_file():
        return json.loads((base_dir / "config.json").read_text())
    for params in (base_dir / "params.json", base_dir / "7B" / "params.json"):
        if params.is_file():
            return params_to_config(json.loads(params.read_text()), vocab_size=32000)
    raise FileNotFoundError(f"{base_dir}: no config.json or params.json to take the model's geometry from")


def make_tiny_chinese_loras(
    base_hf_dir: str | Path, out_dir: str | Path, r_llama: int = 8, r_alpaca: int = 64, seed: int = 0
) -> tuple[Path, Path]:
    """Two LoRAs for the model in base_hf_dir (HF config.json, or Meta's params.json: the original
    checkpoint before conversion), laid out like the published ones:
    chinese-llama-plus-lora-7b (49953 tokens, r=8, alpha 32) and chinese-alpaca-plus-lora-7b
    (49954 with [PAD], r=64, alpha 128): 2023 adapter_config.json, adapter_model.bin with 2023 key
    names and full embed_tokens/lm_head, tokenizer.model + special_tokens_map/tokenizer_config."""

    config = _base_geometry(Path(base_hf_dir))
    gen = torch.Generator().manual_seed(seed)
    out_dir = Path(out_dir)
    llama = _write_lora_2023(out_dir / "chinese-llama-plus-lora-7b", config, "chinese", r_llama, 32.0, gen)
    alpaca = _write_lora_2023(out_dir / "chinese-alpaca-plus-lora-7b", config, "alpaca", r_alpaca, 128.0, gen)
    return llama, alpaca


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_output_dir_path(args.out_dir, "--out_dir")
    make_tiny_model(
        args.out_dir,
        args.vocab,
        args.seed,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
    )
    print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    run_cli(main)
