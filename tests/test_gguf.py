"""GGUF export, read back with gguf.GGUFReader and run by llama.cpp itself (llama-cpp-python)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, greedy_ids, import_script, llama_cpp_greedy, read_hf_weights
from llama_ner.tiny_models import make_tiny_chinese_loras, make_tiny_model
from llama_ner.tokenizer import load_tokenizer

merge = import_script("merge_llama_with_chinese_lora")
export = import_script("export_gguf")

MSRA = ROOT / "tests" / "data" / "msra_dev_instruct.txt"
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.down_proj": "ffn_down",
    "mlp.up_proj": "ffn_up",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
TOP["lm_head.weight"] = "output.weight"


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory) -> dict[str, Path]:
    """The tiny Chinese-Alpaca-Plus-shaped merge (49954 tokens), as huggingface and as gguf."""
    root = tmp_path_factory.mktemp("gguf")
    base = make_tiny_model(root / "llama-7b-hf", "llama", num_key_value_heads=2)
    loras = ",".join(map(str, make_tiny_chinese_loras(base, root)))
    out = {}
    for kind in ("huggingface", "gguf"):
        out[kind] = root / kind
        args = ["--base_model", str(base), "--lora_model", loras, "--output_type", kind, "--output_dir", str(out[kind])]
        merge.main(args)
    out["gguf_file"] = out["gguf"] / "ggml-model-f16.gguf"
    return out


def gguf_name(hf: str) -> str:
    if hf in TOP:
        return TOP[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def to_meta(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo transformers' rotary permutation (Meta's/llama.cpp's layout), written out here independently."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def read_gguf(path: Path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: (t.tensor_type, torch.from_numpy(t.data.copy())) for t in reader.tensors}
    return fields, tensors


def test_every_tensor_equals_the_merged_weights(alpaca):
    from gguf import GGMLQuantizationType

    fields, tensors = read_gguf(alpaca["gguf_file"])
    hf = read_hf_weights(alpaca["huggingface"])
    assert len(tensors) == len(hf)
    for name, weight in hf.items():
        kind, got = tensors[gguf_name(name)]
        if name.endswith("q_proj.weight"):
            weight = to_meta(weight, 4)
        elif name.endswith("k_proj.weight"):
            weight = to_meta(weight, 2)
        if weight.dim() == 1:
            assert kind == GGMLQuantizationType.F32 and torch.equal(got, weight.float()), name
        else:
            assert kind == GGMLQuantizationType.F16 and torch.equal(got, weight), name


def test_metadata_complete(alpaca):
    from gguf import TokenType

    fields, _ = read_gguf(alpaca["gguf_file"])
    config = json.loads((alpaca["huggingface"] / "config.json").read_text())
    tokenizer = load_tokenizer(alpaca["huggingface"])
    sp = tokenizer.sp_model
    expected = {
        "general.architecture": "llama",
        "general.name": "gguf",
        "general.file_type": 1,
        "llama.vocab_size": 49954,
        "llama.context_length": config["max_position_embeddings"],
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 49953,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
    for key, value in expected.items():
        assert fields[key] == value, key
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    tokens, scores, types = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    assert len(tokens) == len(scores) == len(types) == 49954
    assert tokens == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert scores == pytest.approx([sp.get_score(i) for i in range(sp.get_piece_size())])
    assert types[0] == TokenType.UNKNOWN and types[1] == types[2] == TokenType.CONTROL
    assert types[sp.piece_to_id("<0x0A>")] == TokenType.BYTE
    assert types[49953] == TokenType.USER_DEFINED and tokens[49953] == "[PAD]"
    assert types[sp.piece_to_id("北京")] == TokenType.NORMAL


def test_export_of_the_hf_directory_equals_the_merge_output(alpaca, tmp_path):
    out = tmp_path / "alpaca.gguf"
    export.main(["--model_dir", str(alpaca["huggingface"]), "--output", str(out)])
    fields, tensors = read_gguf(out)
    merged_fields, merged_tensors = read_gguf(alpaca["gguf_file"])
    assert tensors.keys() == merged_tensors.keys()
    for name, (kind, tensor) in tensors.items():
        assert kind == merged_tensors[name][0] and torch.equal(tensor, merged_tensors[name][1]), name
    fields.pop("general.name"), merged_fields.pop("general.name")
    assert fields == merged_fields
    with pytest.raises(SystemExit, match="exists"):
        export.main(["--model_dir", str(alpaca["huggingface"]), "--output", str(out)])


def test_export_refuses_another_tokenizer(alpaca, tmp_path, chinese_tokenizer_dir):
    args = ["--model_dir", str(alpaca["huggingface"]), "--output", str(tmp_path / "x.gguf")]
    with pytest.raises(SystemExit, match="49953 tokens but the model 49954"):
        export.main([*args, "--tokenizer_dir", str(chinese_tokenizer_dir)])
    assert not list(tmp_path.iterdir())


def test_interrupted_export_leaves_no_file(alpaca, tmp_path, monkeypatch):
    import llama_ner.weights.llama_gguf as llama_gguf

    def failing(name, tensor, config):
        raise KeyboardInterrupt

    monkeypatch.setattr(llama_gguf, "gguf_tensor", failing)
    with pytest.raises(KeyboardInterrupt):
        export.main(["--model_dir", str(alpaca["huggingface"]), "--output", str(tmp_path / "x.gguf")])
    assert not list(tmp_path.iterdir())


def llama_cpp_model(path: Path):
    try:
        from llama_cpp import Llama
    except ImportError:
        pytest.fail("llama_cpp is not importable: pip install llama-cpp-python (it is in requirements.txt)")
    return Llama(model_path=str(path), n_ctx=1024, n_threads=2, seed=0, verbose=False)


def msra_rows(n: int) -> list[dict]:
    with open(MSRA, encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


@pytest.mark.slow
def test_llama_cpp_tokenizes_msra_like_sentencepiece(alpaca):
    llm = llama_cpp_model(alpaca["gguf_file"])
    tokenizer = load_tokenizer(alpaca["huggingface"])
    texts = [r["query"] for r in msra_rows(200)] + [r["instruct"] + "\n" + r["answer"] for r in msra_rows(20)]
    mismatches = [t for t in texts if llm.tokenize(t.encode("utf-8"), add_bos=True) != tokenizer(t)["input_ids"]]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[0]!r}"


@pytest.mark.slow
def test_llama_cpp_greedy_continuation_equals_transformers(alpaca):
    from transformers import AutoModelForCausalLM

    llm = llama_cpp_model(alpaca["gguf_file"])
    model = AutoModelForCausalLM.from_pretrained(alpaca["huggingface"], dtype=torch.float32).eval()
    tokenizer = load_tokenizer(alpaca["huggingface"])
    for row in msra_rows(6):
        ids = tokenizer(row["query"])["input_ids"]
        assert llama_cpp_greedy(llm, ids, 16) == greedy_ids(model, ids, 16), row["query"]


@pytest.mark.slow
def test_exported_file_quantizes_with_llama_cpp(alpaca, tmp_path):
    """docs/gguf.md's quantization step: llama.cpp's own quantizer takes the file (Q8_0 here: 64-wide rows)."""
    import ctypes

    llama_cpp_model(alpaca["gguf_file"])  # fails loudly when llama_cpp is missing
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    out = tmp_path / "q8_0.gguf"
    source = str(alpaca["gguf_file"]).encode()
    assert llama_cpp.llama_model_quantize(source, str(out).encode(), ctypes.byref(params)) == 0
    assert out.stat().st_size < alpaca["gguf_file"].stat().st_size
    text = msra_rows(1)[0]["query"]
    ids = load_tokenizer(alpaca["huggingface"])(text)["input_ids"]
    assert llama_cpp_model(out).tokenize(text.encode("utf-8"), add_bos=True) == ids


def llama_accepts_grammar(llm, grammar: str) -> bool:
    """llama.cpp's own GBNF parser (the one LlamaGrammar hands the text to) takes the grammar."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode(), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


@pytest.mark.slow
def test_gbnf_constrains_llama_cpp(alpaca, tmp_path):
    """`python -m llama_ner.generation.ner_constraint --text T --out F --prompt_out P` (no line limit, the
    default): llama.cpp parses F, and the tiny random model's answers under it are valid. GBNF cannot forbid a repeated
    line (docs/gguf.md says so): repeats are allowed, every line is checked on its own, strictly."""
    from llama_cpp import LlamaGrammar

    from dataset import build_prompt, ner_row
    from llama_ner.generation.metrics import ENTITY_TYPES
    from llama_ner.generation.ner_constraint import gbnf
    from llama_ner.generation.ner_grammar import TextGrammar, vocab_of

    llm = llama_cpp_model(alpaca["gguf_file"])
    vocab = vocab_of(load_tokenizer(alpaca["huggingface"]))
    assert not llama_accepts_grammar(llm, 'root ::= "a" b')  # an undefined rule: the check can fail
    texts = ["北京是中国的首都。", '记者张犇在New York 分社说："A_B"。'] + [r["query"][3:] for r in msra_rows(3)]
    cli = [
        sys.executable,
        "-m",
        "llama_ner.generation.ner_constraint",
        "--text",
        texts[1],
        "--out",
        str(tmp_path / "ner.gbnf"),
    ]
    proc = subprocess.run([*cli, "--prompt_out", str(tmp_path / "prompt.txt")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    assert (tmp_path / "ner.gbnf").read_text("utf-8") == gbnf(texts[1], ENTITY_TYPES)  # default: any number of lines
    row = ner_row(texts[1])
    assert (tmp_path / "prompt.txt").read_text("utf-8") == build_prompt(row["instruct"], row["query"])
    typed_answers = 0
    for text in texts:
        grammar = gbnf(text, ENTITY_TYPES)
        assert llama_accepts_grammar(llm, grammar), grammar
        row = ner_row(text)
        prompt = build_prompt(row["instruct"], row["query"])
        out = llm(prompt, grammar=LlamaGrammar.from_string(grammar), max_tokens=400, temperature=0.0)
        answer = out["choices"][0]["text"].strip()
        assert out["choices"][0]["finish_reason"] == "stop", answer
        check = TextGrammar(text, ENTITY_TYPES, vocab)
        lines = answer.split("\n")
        assert answer == "没有" or all(line != "没有" and check.is_valid(line) for line in lines), answer
        typed_answers += answer != "没有"
    assert typed_answers  # the random model wrote entity lines, not only 没有
