"""Models with their own tokenizer.json (byte-level BPE, a chat template): SmolLM2-135M-Instruct's tokenizer on
tiny random models, through every script: ids against the `tokenizers` library itself, the chat prompt against
the tokenizer's own chat template, a memorized LoRA through test.py / predict.py / chat_ner.py / the merge,
and the exported GGUF in llama.cpp."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import MSRA, ROOT, greedy_ids, import_script, llama_cpp_greedy, write_rows
from dataset import ALPACA, build_prompt, encode_example, load_data, prompt_format
from llama_ner.tiny_models import make_tiny_model
from llama_ner.tokenizer import load_tokenizer, token_bytes

ENGLISH = ["The capital of France is Paris.", "In 2023, 12345 apples cost $3.50!", "  two  spaces\n\nnew lines"]


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir):
    return load_tokenizer(smollm2_tokenizer_dir)


def msra_texts(n: int) -> list[str]:
    return [r["query"] for r in load_data(MSRA)[:n]]


def test_ids_equal_the_tokenizers_library(tokenizer, smollm2_tokenizer_dir):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(smollm2_tokenizer_dir / "tokenizer.json"))
    texts = msra_texts(200) + ENGLISH
    assert [tokenizer.encode(t) for t in texts] == [reference.encode(t).ids for t in texts]
    # special tokens come from tokenizer_config.json: no BOS is added, EOS and pad are <|im_end|>
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert tokenizer.eos_token_id == reference.token_to_id("<|im_end|>") == 2


def test_token_bytes_spell_the_text(tokenizer):
    spelled = token_bytes(tokenizer)
    for text in msra_texts(50) + ENGLISH:
        assert b"".join(spelled[i] for i in tokenizer.encode(text, add_special_tokens=False)) == text.encode()
    assert spelled[tokenizer.eos_token_id] is None


def test_chat_prompt_is_the_chat_template(tokenizer):
    """Training's text and ids (prompt + answer + EOS) are the chat template's for the two-turn conversation."""
    fmt = prompt_format("chat", tokenizer)
    for row in load_data(MSRA)[:20]:
        prompt = build_prompt(row["instruct"], row["query"], fmt)
        user = f"{row['instruct']}\n{row['query']}"
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": row["answer"]}]
        reference = tokenizer.apply_chat_template(turns, tokenize=False)
        assert reference.startswith(prompt + row["answer"] + tokenizer.eos_token)
        ids, labels = encode_example(tokenizer, prompt, row["answer"], 1024, fmt.tail)
        assert ids == tokenizer.encode(prompt + row["answer"] + tokenizer.eos_token)
        assert ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id


def test_long_chat_prompts_lose_the_query_end_not_the_template(tokenizer):
    fmt = prompt_format("chat", tokenizer)
    row = load_data(MSRA)[0]
    prompt = build_prompt(row["instruct"], row["query"], fmt)
    ids, labels = encode_example(tokenizer, prompt, row["answer"], 120, fmt.tail)
    assert len(ids) <= 120
    text = tokenizer.decode(ids)
    assert text.endswith(fmt.tail + row["answer"] + tokenizer.eos_token) and text.startswith(fmt.head)


def test_chat_needs_a_chat_template(alpaca_tokenizer_dir):
    from config_utils import ConfigError

    with pytest.raises(ConfigError, match="has no chat template"):
        prompt_format("chat", load_tokenizer(alpaca_tokenizer_dir))
    assert prompt_format("alpaca") is ALPACA


# ---- a tiny random model with this tokenizer, through every script ------------------------------------


@pytest.fixture(scope="module")
def bpe_memorized(tmp_path_factory) -> dict:
    """A LoRA trained hard (prompt_template=chat) on 12 rows of a tiny model with SmolLM2's tokenizer."""
    from memorize import train_memorized_lora

    work = tmp_path_factory.mktemp("bpe")
    base = make_tiny_model(work / "tiny-smollm2", "smollm2")
    rows = sorted(load_data(MSRA)[:40], key=lambda r: len(r["query"]))[:6]  # short rows: the chat prompt is long
    seen = write_rows(work / "seen.txt", rows)
    save_dir, losses = train_memorized_lora(base, rows, work / "run", seen, epochs=150, prompt_template="chat")
    assert losses[-1] < losses[0]
    return {"base": base, "rows": rows, "seen": seen, "train_args": save_dir / "adapter_model" / "train_args.json"}


def test_test_py_and_predict_py_answer_the_memorized_rows(bpe_memorized, tmp_path):
    args = [f"--train_args_path={bpe_memorized['train_args']}", f"--dev_path={bpe_memorized['seen']}",
            "--max_new_tokens=64"]  # fmt: skip
    metrics = import_script("test").main([*args, f"--output_dir={tmp_path}"])
    assert metrics["f1"] == 1.0, metrics
    free = import_script("test").main([*args, f"--output_dir={tmp_path / 'free'}", "--constrained=false"])
    assert free["f1"] == 1.0, free
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(r["query"].removeprefix("文本：") + "\n" for r in bpe_memorized["rows"][:3]))
    predicted = import_script("predict").main([args[0], args[2], f"--predict_path={texts}"])
    assert predicted == [r["answer"] for r in bpe_memorized["rows"][:3]]


def test_chat_ner_uses_the_loras_prompt_template(bpe_memorized, tmp_path, monkeypatch):
    adapter = bpe_memorized["train_args"].parent
    data = tmp_path / "texts.txt"
    data.write_text("".join(r["query"].removeprefix("文本：") + "\n" for r in bpe_memorized["rows"][:2]))
    out = tmp_path / "p.json"
    argv = ["--base_model", str(bpe_memorized["base"]), "--lora_model", str(adapter), "--only_cpu", "--ner",
            "--data_file", str(data), "--predictions_file", str(out), "--max_new_tokens", "64"]  # fmt: skip
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    import_script("chat_ner").main(argv)
    answers = [r["Output"] for r in json.loads(out.read_text(encoding="utf-8"))]
    assert answers == [r["answer"] for r in bpe_memorized["rows"][:2]]


def test_merged_lora_answers_as_base_plus_adapter(bpe_memorized, tmp_path):
    """merge --output_type huggingface --dtype float32 (the LoRA folder has no tokenizer: the base's is used)."""
    merged = tmp_path / "merged"
    import_script("merge_llama_with_chinese_lora").main(
        ["--base_model", str(bpe_memorized["base"]), "--lora_model", str(bpe_memorized["train_args"].parent),
         "--output_type", "huggingface", "--dtype", "float32", "--output_dir", str(merged)]
    )  # fmt: skip
    assert (merged / "tokenizer.json").is_file()
    args = [f"--train_args_path={bpe_memorized['train_args']}", f"--dev_path={bpe_memorized['seen']}",
            "--max_new_tokens=64"]  # fmt: skip
    metrics = import_script("test").main(
        [*args, f"--model_dir={merged}", "--adapter_path=none", f"--output_dir={tmp_path}"]
    )
    assert metrics["f1"] == 1.0, metrics


@pytest.fixture(scope="module")
def bpe_gguf(bpe_memorized, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe_gguf") / "tiny.gguf"
    import_script("export_gguf").main(["--model_dir", str(bpe_memorized["base"]), "--output", str(out)])
    return out


@pytest.mark.slow
def test_llama_cpp_reads_the_bpe_gguf_like_transformers(bpe_memorized, bpe_gguf, tokenizer):
    """export_gguf writes tokenizer.ggml.model gpt2: llama.cpp's ids and greedy continuation are transformers'."""
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    llm = Llama(model_path=str(bpe_gguf), n_ctx=512, n_threads=2, seed=0, verbose=False)
    texts = msra_texts(100) + ENGLISH
    mismatches = [t for t in texts if llm.tokenize(t.encode(), add_bos=False, special=False) != tokenizer.encode(t)]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[0]!r}"
    assert llm.metadata["tokenizer.ggml.model"] == "gpt2" and "chat_template" in str(llm.metadata)
    model = AutoModelForCausalLM.from_pretrained(bpe_memorized["base"], dtype=torch.float32).eval()
    for text in msra_texts(4):
        ids = tokenizer.encode(text)
        assert llama_cpp_greedy(llm, ids, 12) == greedy_ids(model, ids, 12), text


def test_training_refuses_a_chat_template_the_tokenizer_lacks(tiny_alpaca, tmp_path):
    proc = subprocess.run(
        [sys.executable, "train_trainer.py", f"model_dir={tiny_alpaca}", "prompt_template=chat",
         f"train_path={MSRA}", "dev_path=", f"save_dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("config error: prompt_template=chat") and "no chat template" in last, last
    assert not (tmp_path / "run").exists()


def test_serve_answers_ner_and_chat_in_the_loras_format(bpe_memorized):
    """serve.py takes prompt_template=chat from the LoRA's train_args.json: /v1/ner gives the memorized answers,
    and a chat message goes through the tokenizer's chat template (as the NER prompt does)."""
    import httpx

    from serve import ServerProcess

    rows = bpe_memorized["rows"][:2]
    argv = ["--base_model", str(bpe_memorized["base"]), "--lora_model", str(bpe_memorized["train_args"].parent),
            "--only_cpu", "--max_new_tokens", "64"]  # fmt: skip
    with ServerProcess(argv) as server, httpx.Client(base_url=server.url, timeout=300) as client:
        texts = [r["query"].removeprefix("文本：") for r in rows]
        response = client.post("/v1/ner", json={"texts": texts})
        assert response.status_code == 200, response.text
        assert [r["answer"] for r in response.json()["results"]] == [r["answer"] for r in rows]
        chat = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": f"{rows[0]['instruct']}\n{rows[0]['query']}"}]},
        )
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["message"]["content"] == rows[0]["answer"]


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["train_trainer.py", "train_deepspeed.py"])
def test_both_trainers_train_a_tokenizer_json_model_in_the_chat_format(bpe_memorized, tmp_path, trainer):
    """One process, no launcher: the run records prompt_template=chat, and its batches are the chat template's."""
    from config_utils import load_config

    rows = write_rows(tmp_path / "rows.txt", bpe_memorized["rows"][:4])
    save_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, trainer, f"model_dir={bpe_memorized['base']}", "prompt_template=chat", f"train_path={rows}",
         "dev_path=", f"save_dir={save_dir}", "train_batch_size=4", "learning_rate=1e-3"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    recorded = load_config(save_dir / "adapter_model" / "train_args.json")
    assert (
        recorded["prompt_template"] == "chat" and (save_dir / "adapter_model" / "adapter_model.safetensors").is_file()
    )
