"""convert_llama_weights_to_hf.py on tiny checkpoints in Meta's layout (1 and 2 shards)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import import_script, read_hf_weights
from llama_ner.tiny_models import make_tiny_original
from llama_ner.tokenizer import load_tokenizer

convert = import_script("convert_llama_weights_to_hf")

# Meta's model-parallel layout, written out independently of llama_layout.
CONCAT_DIM = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}
HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def reference_hf(weights_dir, n_heads, n_kv) -> dict[str, torch.Tensor]:
    """Meta shards -> HF tensors, the way transformers' own converter did it (torch.load + cat + permute)."""
    shards = [torch.load(p, weights_only=True) for p in sorted(weights_dir.glob("consolidated.*.pth"))]
    out = {}
    for name in shards[0]:
        kind = name.split(".")[-2]
        full = shards[0][name] if kind not in CONCAT_DIM else torch.cat([s[name] for s in shards], CONCAT_DIM[kind])
        if kind in ("wq", "wk"):
            heads = n_heads if kind == "wq" else n_kv
            rows, cols = full.shape
            full = full.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
        if name.startswith("layers."):
            _, layer, rest = name.split(".", 2)
            hf = f"model.layers.{layer}.{HF_NAMES[rest.removesuffix('.weight')]}.weight"
        else:
            hf = HF_NAMES[name]
        out[hf] = full
    return out


@pytest.mark.parametrize("n_shards, n_kv", [(1, None), (2, None), (2, 2)])
def test_convert_equals_source_exactly(tmp_path, n_shards, n_kv):
    original = make_tiny_original(tmp_path / "orig", n_shards=n_shards, n_kv_heads=n_kv, n_layers=2)
    out = tmp_path / "hf"
    convert.main(["--input_dir", str(original), "--model_size", "7B", "--output_dir", str(out)])
    got, want = read_hf_weights(out), reference_hf(original / "7B", 4, n_kv or 4)
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == torch.float16 and torch.equal(got[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_size"] == 64 and config["num_hidden_layers"] == 2 and config["vocab_size"] == 32000
    assert config["num_key_value_heads"] == (n_kv or 4) and config["intermediate_size"] == 192
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert len(load_tokenizer(out)) == 32000


def test_converted_model_loads_strictly(tmp_path):
    from transformers import AutoModelForCausalLM

    original = make_tiny_original(tmp_path / "orig", n_shards=2)
    out = tmp_path / "hf"
    convert.main(["--input_dir", str(original), "--model_size", "7B", "--output_dir", str(out)])
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing/unexpected/mismatched keys
    assert model.dtype == torch.float16


def test_tokenizer_only(tmp_path):
    original = make_tiny_original(tmp_path / "orig")
    convert.main(["--input_dir", str(original), "--model_size", "tokenizer_only", "--output_dir", str(tmp_path / "t")])
    assert (tmp_path / "t" / "tokenizer.model").read_bytes() == (original / "tokenizer.model").read_bytes()
    assert not list((tmp_path / "t").glob("*.safetensors"))


def test_bad_inputs_refused(tmp_path, capsys):
    original = make_tiny_original(tmp_path / "orig")
    args = ["--input_dir", str(original), "--model_size", "7B", "--output_dir"]
    with pytest.raises(SystemExit, match="overlaps the input"):
        convert.main([*args, str(original / "7B" / "hf")])
    params = json.loads((original / "7B" / "params.json").read_text())
    (original / "7B" / "params.json").write_text(json.dumps(params | {"dim": 128}))
    with pytest.raises(SystemExit, match="params.json implies"):
        convert.main([*args, str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    (original / "7B" / "params.json").unlink()
    with pytest.raises(SystemExit, match="params.json not found"):
        convert.main([*args, str(tmp_path / "out")])
    shutil.rmtree(original / "7B")
    (original / "7B").mkdir()
    (original / "7B" / "params.json").write_text(json.dumps(params))
    with pytest.raises(SystemExit, match="no consolidated"):
        convert.main([*args, str(tmp_path / "out")])
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
