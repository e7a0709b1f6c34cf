"""Shared fixtures: tiny random LLaMA models with the real tokenizers, built once per session."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tiny_models import make_tiny_model, write_tokenizer  # noqa: E402


def import_script(name: str):
    """Import a top-level script by path (`test.py` would clash with the stdlib `test` package)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickle look the module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def alpaca_tokenizer_dir(tmp_path_factory) -> Path:
    """Chinese-Alpaca tokenizer (49954 tokens, [PAD] = 49953)."""
    return write_tokenizer(tmp_path_factory.mktemp("alpaca_tok"), "alpaca")


@pytest.fixture(scope="session")
def chinese_tokenizer_dir(tmp_path_factory) -> Path:
    """Chinese-LLaMA tokenizer (49953 tokens)."""
    return write_tokenizer(tmp_path_factory.mktemp("chinese_tok"), "chinese")


@pytest.fixture(scope="session")
def tiny_alpaca(tmp_path_factory) -> Path:
    """A random 2-layer hidden-64 LlamaForCausalLM with the 49954-token Alpaca tokenizer. Read-only."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-alpaca", "alpaca")


def read_hf_weights(model_dir: Path) -> dict:
    """Every tensor of a sharded safetensors Hugging Face directory, read with the safetensors library."""
    import json

    from safetensors import safe_open

    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(model_dir / file, "pt") as f:
            tensors |= {k: f.get_tensor(k) for k in f.keys()}
    assert set(tensors) == set(index["weight_map"])
    return tensors
