"""Pure functions of llama_layout and the streaming readers/writers (weights.tensor_read, tensor_write)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from llama_ner.weights.llama_layout import (
    HF_TO_META,
    config_to_params,
    hf_to_meta_name,
    llama_intermediate_size,
    merge_lora_weight,
    meta_to_hf_name,
    params_to_config,
    parse_adapter_key,
    permute,
    shard_pieces,
    split_sizes,
    unpermute,
)
from llama_ner.weights.model_files import checksum_verdict
from llama_ner.weights.tensor_io import TensorInfo
from llama_ner.weights.tensor_read import SafetensorsFile, TorchZipFile
from llama_ner.weights.tensor_write import SafetensorsShards, TorchZipWriter, plan_shards


def meta_rotary(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Meta's llama/model.py apply_rotary_emb: consecutive pairs (2i, 2i+1) as complex numbers."""
    head_dim = x.shape[-1]
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).double() / head_dim))
    cis = torch.polar(torch.ones(len(pos), head_dim // 2, dtype=torch.float64), torch.outer(pos.double(), freqs))
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * cis).flatten(-2)


def hf_rotary(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """transformers' rotate_half convention: dims i and i + head_dim/2 rotate together."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    head_dim = x.shape[-1]
    freqs = torch.outer(pos.double(), 1.0 / (theta ** (torch.arange(0, head_dim, 2).double() / head_dim)))
    emb = torch.cat([freqs, freqs], dim=-1)
    q, _ = apply_rotary_pos_emb(x.double(), x.double(), emb.cos(), emb.sin(), unsqueeze_dim=0)
    return q


@pytest.mark.parametrize("n_heads, n_kv", [(4, 4), (4, 2)])
def test_permute_turns_meta_rotary_into_hf_rotary(n_heads, n_kv):
    """Attention scores from Meta's weights with Meta's rotary equal those from permuted weights with HF's."""
    torch.manual_seed(0)
    dim, head_dim, seq = 32, 8, 5
    wq, wk = torch.randn(n_heads * head_dim, dim), torch.randn(n_kv * head_dim, dim)
    x, pos = torch.randn(seq, dim), torch.arange(seq)

    def scores(q_w, k_w, rotary):
        q = rotary((x @ q_w.T).view(seq, n_heads, head_dim).transpose(0, 1), pos)
        k = rotary((x @ k_w.T).view(seq, n_kv, head_dim).transpose(0, 1), pos)
        k = k.repeat_interleave(n_heads // n_kv, dim=0)
        return q @ k.transpose(-1, -2)

    meta = scores(wq, wk, meta_rotary)
    hf = scores(permute(wq, n_heads), permute(wk, n_kv), hf_rotary)
    torch.testing.assert_close(hf, meta)
    assert not torch.allclose(scores(wq, wk, hf_rotary), meta)  # without the permutation they differ
    assert torch.equal(unpermute(permute(wq, n_heads), n_heads), wq)


def test_key_map_round_trip():
    for hf_template, meta_template in HF_TO_META.items():
        hf = hf_template.format(7)
        assert hf_to_meta_name(hf) == meta_template.format(7)
        assert meta_to_hf_name(hf_to_meta_name(hf)) == hf
    assert hf_to_meta_name("model.layers.12.mlp.down_proj.weight") == "layers.12.feed_forward.w2.weight"
    with pytest.raises(KeyError):
        hf_to_meta_name("model.layers.0.self_attn.rotary_emb.inv_freq")


def test_merge_lora_weight_by_hand():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float16)
    a = torch.tensor([[1.0, 0.0]])  # r=1, in=2
    b = torch.tensor([[2.0], [1.0]])  # out=2, r=1
    # B @ A = [[2, 0], [1, 0]]; scale 0.5 -> [[1, 0], [0.5, 0]]
    merged = merge_lora_weight(w, a, b, 0.5)
    assert merged.dtype == torch.float32
    assert torch.equal(merged, torch.tensor([[2.0, 2.0], [3.5, 4.0]]))
    # fan_in_fan_out: the weight is stored (in, out), so the delta is transposed
    assert torch.equal(merge_lora_weight(w, a, b, 0.5, fan_in_fan_out=True), torch.tensor([[2.0, 2.5], [3.0, 4.0]]))


@pytest.mark.parametrize(
    "params, inter",
    [
        ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-6}, 11008),
        ({"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-6}, 13824),
        ({"dim": 6656, "multiple_of": 256, "n_heads": 52, "n_layers": 60, "norm_eps": 1e-6}, 17920),
        (
            {
                "dim": 8192,
                "multiple_of": 4096,
                "ffn_dim_multiplier": 1.3,
                "n_heads": 64,
                "n_kv_heads": 8,
                "n_layers": 80,
                "norm_eps": 1e-5,
            },
            28672,
        ),
    ],
)
def test_params_config_round_trip(params, inter):
    config = params_to_config(params, 32000)
    assert config["intermediate_size"] == inter
    assert config["num_key_value_heads"] == params.get("n_kv_heads", params["n_heads"])
    back = config_to_params(config)
    assert params_to_config(back, 32000) == config


@pytest.mark.parametrize("inter", [168, 172, 192, 5504])
def test_config_to_params_finds_any_intermediate(inter):
    config = {"hidden_size": 64 if inter < 1000 else 2048, "intermediate_size": inter}
    config |= {"num_attention_heads": 4, "num_hidden_layers": 2, "rms_norm_eps": 1e-6}
    params = config_to_params(config)
    assert llama_intermediate_size(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")) == inter


def test_parse_adapter_key():
    old = "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
    assert parse_adapter_key(old) == ("model.layers.3.self_attn.q_proj.weight", "lora_A")
    new = "base_model.model.model.layers.3.mlp.down_proj.lora_B.default.weight"
    assert parse_adapter_key(new) == ("model.layers.3.mlp.down_proj.weight", "lora_B")
    assert parse_adapter_key("base_model.model.lm_head.weight") == ("lm_head.weight", "full")
    saved = "base_model.model.model.embed_tokens.modules_to_save.default.weight"
    assert parse_adapter_key(saved) == ("model.embed_tokens.weight", "saved")
    saved = "base_model.model.model.embed_tokens.modules_to_save.weight"  # peft 0.21 strips the adapter name
    assert parse_adapter_key(saved) == ("model.embed_tokens.weight", "saved")
    original = "base_model.model.model.embed_tokens.original_module.weight"
    assert parse_adapter_key(original) == ("model.embed_tokens.weight", "ignore")
    with pytest.raises(ValueError, match="unsupported"):
        parse_adapter_key("base_model.model.model.embed_tokens.lora_embedding_A.default")


def test_split_sizes():
    assert split_sizes(49954, 2) == [24977, 24977]
    assert split_sizes(49953, 2) == [24976, 24977]
    assert split_sizes(10, 1) == [10]


def test_shard_pieces_split_as_meta_does():
    full = torch.arange(5 * 3).view(5, 3)
    rows = shard_pieces("output.weight", full, 2)  # split along dim 0, remainder to the last shard
    assert [p.shape for p in rows] == [(2, 3), (3, 3)] and torch.equal(torch.cat(rows), full)
    cols = shard_pieces("layers.0.attention.wo.weight", full.T, 2)  # along dim 1
    assert [p.shape for p in cols] == [(3, 2), (3, 3)] and torch.equal(torch.cat(cols, 1), full.T)
    assert all(p is full for p in shard_pieces("layers.0.ffn_norm.weight", full, 3))  # replicated


def test_checksum_verdict():
    tokenizer = "e2676d4ca29ca1750f6ff203328d73b189321dc5776ceede037cbd36541d70c0"
    verdict, message = checksum_verdict("x/tokenizer.model", tokenizer, "Chinese-LLaMA tokenizer.model")
    assert verdict == "ok" and "Chinese-LLaMA tokenizer.model" in message
    verdict, message = checksum_verdict("x/tokenizer.model", "0" * 64, "Chinese-LLaMA tokenizer.model")
    assert verdict == "mismatch" and message.startswith("WARNING") and "re-download" in message.lower()
    assert checksum_verdict("x/adapter_model.bin", "0" * 64, None)[0] == "unknown"


def sample_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    shared = torch.arange(20, dtype=torch.float32)
    return {
        "half": torch.randn(3, 4).half(),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "transposed": torch.randn(4, 3).T,  # non-contiguous
        "view": shared[2:7],  # offset into a shared storage
        "view2": shared.view(4, 5)[1:, 1:3],
        "scalar": torch.tensor(3.0),
        "long": torch.arange(6).view(2, 3),
    }


def test_torch_zip_reader_matches_torch_load(tmp_path):
    state = sample_state()
    torch.save(state, tmp_path / "x.bin")
    reader = TorchZipFile(tmp_path / "x.bin")
    assert sorted(reader.keys()) == sorted(state)
    for name, tensor in state.items():
        got = reader.read(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
        assert reader.info(name) == TensorInfo(tensor.dtype, tuple(tensor.shape))


def test_torch_zip_writer_is_read_by_torch_load(tmp_path):
    state = {k: v.contiguous() for k, v in sample_state().items()}
    entries = [(k, TensorInfo(v.dtype, tuple(v.shape))) for k, v in state.items()]
    with TorchZipWriter(tmp_path / "y.pth", entries) as writer:
        for name in reversed(list(state)):  # any order
            writer.write(name, state[name])
    for mmap in (False, True):
        loaded = torch.load(tmp_path / "y.pth", weights_only=True, mmap=mmap)
        assert list(loaded) == list(state)
        for name, tensor in state.items():
            assert torch.equal(loaded[name], tensor), name
    with pytest.raises(ValueError, match="never written"):
        TorchZipWriter(tmp_path / "z.pth", entries).close()


def test_safetensors_shards(tmp_path):
    state = {k: v.contiguous() for k, v in sample_state().items()}
    entries = [(k, TensorInfo(v.dtype, tuple(v.shape))) for k, v in state.items()]
    shards = plan_shards(entries, 40)
    assert len(shards) > 1 and sum(len(s) for s in shards) == len(entries)
    with SafetensorsShards(tmp_path, shards) as writer:
        for name, tensor in state.items():
            writer.write(name, tensor)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(info.nbytes for _, info in entries)
    for name, tensor in state.items():
        with safe_open(tmp_path / index["weight_map"][name], "pt") as f:  # the reference reader
            assert f.metadata() == {"format": "pt"}
            assert torch.equal(f.get_tensor(name), tensor)
        assert torch.equal(SafetensorsFile(tmp_path / index["weight_map"][name]).read(name), tensor)
    with pytest.raises(ValueError, match="planned"):
        with SafetensorsShards(tmp_path / "again", shards) as writer:
            (tmp_path / "again").mkdir()
            writer.write("bf16", state["bf16"])  # out of order
