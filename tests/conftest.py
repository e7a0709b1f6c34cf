"""Shared fixtures: tiny random LLaMA models with the real tokenizers, built once per session."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama_ner.tiny_models import make_tiny_model, write_tokenizer  # noqa: E402

MSRA = ROOT / "tests" / "data" / "msra_dev_instruct.txt"


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
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's byte-level BPE tokenizer.json (49152 tokens, chat template). Read-only."""
    return write_tokenizer(tmp_path_factory.mktemp("smollm2_tok"), "smollm2")


@pytest.fixture(scope="session")
def tiny_alpaca(tmp_path_factory) -> Path:
    """A random 2-layer hidden-64 LlamaForCausalLM with the 49954-token Alpaca tokenizer. Read-only."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-alpaca", "alpaca")


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def memorized(tiny_alpaca, tmp_path_factory) -> dict:
    """A LoRA trained hard on 12 rows (saved like training does), plus 12 unseen rows with entities."""
    from dataset import load_data
    from memorize import train_memorized_lora

    work = tmp_path_factory.mktemp("memorized")
    rows = load_data(MSRA)
    seen = write_rows(work / "seen.txt", rows[:12])
    unseen_rows = [r for r in rows[100:] if r["answer"] != "没有"][:12]
    unseen = write_rows(work / "unseen.txt", unseen_rows)
    save_dir, losses = train_memorized_lora(tiny_alpaca, rows[:12], work / "run", seen, epochs=120)
    assert losses[-1] < losses[0]
    return {
        "base": tiny_alpaca,
        "save_dir": save_dir,
        "train_args": save_dir / "adapter_model" / "train_args.json",
        "seen": seen,
        "unseen": unseen,
        "seen_rows": rows[:12],
        "unseen_rows": unseen_rows,
    }


@pytest.fixture(scope="session")
def ner_reference(memorized, tmp_path_factory) -> dict:
    """Plain sentences (2 memorized, 1 unseen) and the answers test.py and predict.py give for them (defaults)."""
    rows = memorized["seen_rows"][:2] + memorized["unseen_rows"][:1]
    texts = [r["query"].removeprefix("文本：") for r in rows]
    work = tmp_path_factory.mktemp("ner_reference")
    write_rows(work / "dev.txt", rows)
    train_args = f"--train_args_path={memorized['train_args']}"
    import_script("test").main([train_args, f"--dev_path={work / 'dev.txt'}", f"--output_dir={work}"])
    lines = (work / "test_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    answers = [json.loads(line)["prediction"] for line in lines]
    (work / "texts.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    assert import_script("predict").main([train_args, f"--predict_path={work / 'texts.txt'}"]) == answers
    assert answers[:2] == [r["answer"] for r in rows[:2]]
    return {"texts": texts, "answers": answers}


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


def greedy_ids(model, ids: list[int], n: int) -> list[int]:
    """n tokens of plain greedy decoding (no stopping rule, no cache), the reference for other engines."""
    import torch

    current, out = torch.tensor([ids]), []
    with torch.inference_mode():
        for _ in range(n):
            out.append(int(model(current).logits[0, -1].argmax()))
            current = torch.cat([current, torch.tensor([[out[-1]]])], dim=1)
    return out


def llama_cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    """n tokens of llama.cpp's greedy decoding after `ids` (it does not stop at EOS when asked for n)."""
    out = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == n:
            return out
    return out
