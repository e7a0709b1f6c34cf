"""Tiny random LLaMA models with the real tokenizers, for tests, the demo and benchmarks.

    python tiny_models.py --out_dir model_hub/tiny-alpaca --vocab alpaca

A model's size never changes the code path, so a 2-layer, hidden-64 model exercises
everything but speed. Weights come from the library's own initializer: random norm
weights near zero would stop a LoRA from learning.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from io_utils import atomic_dir
from model_utils import build_chinese_sp_model, load_tokenizer, save_tokenizer

HUB = Path(__file__).resolve().parent / "model_hub"
LLAMA_SP = HUB / "tokenizer.model"
CHINESE_SP = HUB / "chinese_sp.model"


def write_tokenizer(out_dir: str | Path, vocab: str = "alpaca") -> Path:
    """Write a tokenizer directory: vocab 'llama' (32000), 'chinese' (49953) or 'alpaca' (49954)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if vocab == "llama":
        data = LLAMA_SP.read_bytes()
    elif vocab in ("chinese", "alpaca"):
        data = build_chinese_sp_model(LLAMA_SP, CHINESE_SP, add_pad=vocab == "alpaca")
    else:
        raise ValueError(f"vocab must be llama, chinese or alpaca, not {vocab!r}")
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
        model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), **geometry))
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)  # save_pretrained may not rewrite these; keep ours last
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--vocab", default="alpaca", choices=["llama", "chinese", "alpaca"])
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_hidden_layers", type=int, default=2)
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
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
    main()
