"""merge_llama_with_chinese_lora.py against independent references: W + alpha/r*B@A, peft, the converter."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import import_script, read_hf_weights
from llama_ner.tiny_models import make_tiny_chinese_loras, make_tiny_model
from llama_ner.tokenizer import load_tokenizer

merge = import_script("merge_llama_with_chinese_lora")
convert = import_script("convert_llama_weights_to_hf")

TEXT = "在北京举行的会议上，中国科学院的专家介绍了新的研究成果。"


def tree_hashes(*dirs: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for d in dirs for p in sorted(d.rglob("*")) if p.is_file()
    }


def run_merge(base: Path, loras: list[Path], out: Path, output_type: str = "huggingface", *extra: str) -> Path:
    merge.main(
        [
            "--base_model",
            str(base),
            "--lora_model",
            ",".join(map(str, loras)),
            "--output_type",
            output_type,
            "--output_dir",
            str(out),
            *extra,
        ]
    )
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("merge_inputs")
    base = make_tiny_model(root / "llama-7b-hf", "llama")
    llama_plus, alpaca_plus = make_tiny_chinese_loras(base, root)
    return {"root": root, "base": base, "llama_plus": llama_plus, "alpaca_plus": alpaca_plus}


@pytest.fixture(scope="module")
def merged(inputs, tmp_path_factory) -> dict:
    """One LoRA and two LoRAs, huggingface and pth; input hashes before and after."""
    before = tree_hashes(inputs["root"])
    out = tmp_path_factory.mktemp("merged")
    loras = [inputs["llama_plus"], inputs["alpaca_plus"]]
    result = {
        "one": run_merge(inputs["base"], loras[:1], out / "one"),
        "two": run_merge(inputs["base"], loras, out / "two"),
        "pth": run_merge(inputs["base"], loras, out / "pth" / "7B", "pth"),
    }
    result["hashes"] = (before, tree_hashes(inputs["root"]))
    return result


def adapter(path: Path) -> tuple[dict[str, torch.Tensor], float]:
    state = torch.load(path / "adapter_model.bin", weights_only=True)
    config = json.loads((path / "adapter_config.json").read_text())
    return state, config["lora_alpha"] / config["r"]


def base_state(base: Path) -> dict[str, torch.Tensor]:
    with safe_open(base / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def fp16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of fp16 numbers at |x| (subnormal spacing below 2**-14)."""
    _, exponent = torch.frexp(x.double())
    return torch.clamp(torch.pow(2.0, exponent.double() - 11), min=2.0**-24)


@pytest.mark.parametrize("which, n_loras", [("one", 1), ("two", 2)])
def test_weights_equal_w_plus_scaled_ba(inputs, merged, which, n_loras):
    base = base_state(inputs["base"])
    adapters = [adapter(inputs[k]) for k in ("llama_plus", "alpaca_plus")[:n_loras]]
    got = read_hf_weights(merged[which])
    assert set(got) == set(base)
    for name, w in base.items():
        want = w.double()
        prefix = "base_model.model." + name.removesuffix(".weight")
        for state, scale in adapters:
            if prefix + ".weight" in state:  # the full embed_tokens / lm_head copy replaces the weight
                want = state[prefix + ".weight"].double()
            if prefix + ".lora_A.weight" in state:
                a, b = state[prefix + ".lora_A.weight"].double(), state[prefix + ".lora_B.weight"].double()
                want = want + scale * (b @ a)
        assert got[name].dtype == torch.float16 and got[name].shape == want.shape, name
        err = (got[name].double() - want).abs()
        assert (err <= fp16_ulp(want)).all(), f"{name}: off by more than one fp16 ulp (max err {err.max():.3g})"
        if "proj" in name:
            assert not torch.equal(got[name], w.half()), f"{name} unchanged"
    vocab = 49953 if n_loras == 1 else 49954
    assert got["model.embed_tokens.weight"].shape[0] == vocab
    config = json.loads((merged[which] / "config.json").read_text())
    assert config["vocab_size"] == vocab and config["dtype"] == "float16"
    assert len(load_tokenizer(merged[which])) == vocab


def strip_2023_keys(path: Path, out: Path) -> Path:
    """A copy whose adapter_config.json today's peft reads without complaint (the merge needs no such copy)."""
    shutil.copytree(path, out)
    config = json.loads((out / "adapter_config.json").read_text())
    for key in ("enable_lora", "merge_weights"):
        config.pop(key)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits.float()


def test_logits_match_peft_with_adapters_active(inputs, merged, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([load_tokenizer(inputs["alpaca_plus"])(TEXT)["input_ids"]])
    plus = strip_2023_keys(inputs["llama_plus"], tmp_path / "plus")
    alpaca = strip_2023_keys(inputs["alpaca_plus"], tmp_path / "alpaca")
    base = AutoModelForCausalLM.from_pretrained(inputs["base"], dtype=torch.float32).eval()
    base_logits = logits(base, ids.clamp(max=31999))
    base.resize_token_embeddings(49953, mean_resizing=False)
    ref = PeftModel.from_pretrained(base, plus).eval()  # LoRA active, not merged
    ours = AutoModelForCausalLM.from_pretrained(merged["one"], dtype=torch.float32).eval()
    want, got = logits(ref, ids), logits(ours, ids)
    tol = 2e-3 * want.abs().max()
    torch.testing.assert_close(got, want, atol=tol, rtol=0)
    assert (got[..., :32000] - base_logits).abs().max() > 20 * tol  # the merge changed the model

    first = ref.merge_and_unload()  # the second LoRA applies on top of the first
    first.resize_token_embeddings(49954, mean_resizing=False)
    ref2 = PeftModel.from_pretrained(first, alpaca).eval()
    ours2 = AutoModelForCausalLM.from_pretrained(merged["two"], dtype=torch.float32).eval()
    want2, got2 = logits(ref2, ids), logits(ours2, ids)
    torch.testing.assert_close(got2, want2, atol=2e-3 * want2.abs().max(), rtol=0)
    assert (got2[..., :49953] - want).abs().max() > 20 * tol


def test_pth_converts_back_to_the_huggingface_output(merged, tmp_path):
    pth = merged["pth"]
    assert sorted(p.name for p in pth.glob("*.pth")) == ["consolidated.00.pth"]
    params = json.loads((pth / "params.json").read_text())
    assert params["dim"] == 64 and params["n_heads"] == 4 and params["n_layers"] == 2
    assert (pth / "tokenizer.model").read_bytes() == (merged["two"] / "tokenizer.model").read_bytes()
    out = tmp_path / "back"
    convert.main(["--input_dir", str(pth.parent), "--model_size", "7B", "--output_dir", str(out)])
    back, hf = read_hf_weights(out), read_hf_weights(merged["two"])
    assert set(back) == set(hf)
    for name in hf:
        assert torch.equal(back[name], hf[name]), name
    back_config = json.loads((out / "config.json").read_text())
    hf_config = json.loads((merged["two"] / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers"):
        assert back_config[key] == hf_config[key], key


def test_pth_is_meta_layout(merged):
    state = torch.load(merged["pth"] / "consolidated.00.pth", weights_only=True, mmap=True)
    hf = read_hf_weights(merged["two"])
    assert torch.equal(state["tok_embeddings.weight"], hf["model.embed_tokens.weight"])
    q = hf["model.layers.1.self_attn.q_proj.weight"]
    meta_q = q.view(4, 2, 8, 64).transpose(1, 2).reshape(64, 64)  # undo HF's rotary permutation
    assert torch.equal(state["layers.1.attention.wq.weight"], meta_q)
    assert not any("lora" in k or "inv_freq" in k for k in state)


def test_inputs_unchanged(merged):
    before, after = merged["hashes"]
    assert before == after and len(before) >= 10


def test_pytorch_bin_base_gives_the_same_result(inputs, merged, tmp_path):
    """A sharded pytorch_model-*.bin base (what 2023's converter wrote) merges to the same bytes."""
    state = base_state(inputs["base"])
    base = tmp_path / "bin-base"
    shutil.copytree(inputs["base"], base, ignore=shutil.ignore_patterns("*.safetensors"))
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, keys in halves.items():
        torch.save(
            {k: state[k] for k in keys} | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}, base / file
        )
    weight_map = {k: f for f, keys in halves.items() for k in keys}
    (base / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out = run_merge(base, [inputs["llama_plus"]], tmp_path / "out")
    got, want = read_hf_weights(out), read_hf_weights(merged["one"])
    assert all(torch.equal(got[k], want[k]) for k in want) and set(got) == set(want)


def test_todays_peft_adapter(inputs, tmp_path):
    """An adapter saved by today's peft (safetensors, its own key names) merges like the PeftModel computes."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(inputs["base"], dtype=torch.float32)
    model.resize_token_embeddings(49954, mean_resizing=False)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"])
    peft_model = get_peft_model(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.normal_(0, 0.05)
    lora_dir = tmp_path / "lora"
    peft_model.save_pretrained(lora_dir)
    shutil.copy(inputs["alpaca_plus"] / "tokenizer.model", lora_dir / "tokenizer.model")
    assert (lora_dir / "adapter_model.safetensors").is_file()
    # peft saved embed_tokens (trained) and lm_head (resized): the 32000-token base grows to 49954
    out = run_merge(inputs["base"], [lora_dir], tmp_path / "out")
    reference_base = AutoModelForCausalLM.from_pretrained(inputs["base"], dtype=torch.float32)
    reference_base.resize_token_embeddings(49954, mean_resizing=False)
    ref = PeftModel.from_pretrained(reference_base, lora_dir)
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([load_tokenizer(out)(TEXT)["input_ids"]])
    want = logits(ref.eval(), ids)
    torch.testing.assert_close(logits(ours.eval(), ids), want, atol=2e-3 * want.abs().max(), rtol=0)


def lora_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_wrong_order_refused(inputs, tmp_path):
    loras = [inputs["alpaca_plus"], inputs["llama_plus"]]
    with pytest.raises(SystemExit, match="wrong order; list Chinese-LLaMA-Plus before Chinese-Alpaca-Plus"):
        run_merge(inputs["base"], loras, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_other_models_tokenizer_refused(inputs, tmp_path):
    lora = lora_copy(inputs["llama_plus"], tmp_path / "plus")
    shutil.copy(inputs["alpaca_plus"] / "tokenizer.model", lora / "tokenizer.model")  # 49954 vs 49953 rows
    with pytest.raises(SystemExit, match="49953 rows but the tokenizer.model there has 49954"):
        run_merge(inputs["base"], [lora], tmp_path / "out")


@pytest.mark.parametrize("missing", ["adapter_model.bin", "adapter_config.json", "tokenizer.model"])
def test_missing_files_refused(inputs, tmp_path, missing):
    lora = lora_copy(inputs["llama_plus"], tmp_path / "plus")
    (lora / missing).unlink()
    with pytest.raises(SystemExit, match=missing.split(".")[0]):
        run_merge(inputs["base"], [lora], tmp_path / "out")


def test_output_inside_input_refused(inputs):
    for out in (inputs["base"], inputs["base"] / "merged", inputs["llama_plus"] / "x", inputs["root"]):
        with pytest.raises(SystemExit, match="overlaps the input"):
            run_merge(inputs["base"], [inputs["llama_plus"]], out)


def test_vocabulary_growth_without_embeddings_refused(inputs, tmp_path):
    lora = lora_copy(inputs["llama_plus"], tmp_path / "plus")
    state = torch.load(lora / "adapter_model.bin", weights_only=True)
    torch.save({k: v for k, v in state.items() if "lora_" in k}, lora / "adapter_model.bin")
    with pytest.raises(SystemExit, match="saved no embed_tokens/lm_head"):
        run_merge(inputs["base"], [lora], tmp_path / "out")


def test_lora_that_changes_nothing_refused(inputs, tmp_path):
    lora = lora_copy(inputs["alpaca_plus"], tmp_path / "zero")
    state = torch.load(lora / "adapter_model.bin", weights_only=True)
    state = {k: (torch.zeros_like(v) if "lora_B" in k else v) for k, v in state.items() if "lora_" in k}
    torch.save(state, lora / "adapter_model.bin")
    big_base = run_merge(inputs["base"], [inputs["llama_plus"], inputs["alpaca_plus"]], tmp_path / "alpaca")
    with pytest.raises(SystemExit, match="changes nothing"):
        run_merge(big_base, [lora], tmp_path / "out")


def test_checksum_mismatch_warns_and_strict_refuses(inputs, tmp_path, capsys):
    from sentencepiece import sentencepiece_model_pb2

    lora = lora_copy(inputs["llama_plus"], tmp_path / "plus")
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((lora / "tokenizer.model").read_bytes())
    proto.pieces[40000].score = -1.0  # same 49953 pieces, different bytes
    (lora / "tokenizer.model").write_bytes(proto.SerializeToString())
    run_merge(inputs["base"], [lora], tmp_path / "out")
    printed = capsys.readouterr().out
    assert "WARNING" in printed and "published Chinese-LLaMA tokenizer.model" in printed
    with pytest.raises(SystemExit, match="--strict"):
        run_merge(inputs["base"], [lora], tmp_path / "out2", "huggingface", "--strict")
    run_merge(inputs["base"], [inputs["llama_plus"]], tmp_path / "out3", "huggingface", "--strict")
    assert "sha256 ok" in capsys.readouterr().out


def test_interrupted_run_leaves_nothing_complete(inputs, tmp_path, monkeypatch):
    calls = []

    def failing(step):
        calls.append(step.name)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return original(step)

    original = merge.merged_tensor
    monkeypatch.setattr(merge, "merged_tensor", failing)
    for output_type in ("huggingface", "pth", "gguf"):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            run_merge(inputs["base"], [inputs["llama_plus"]], tmp_path / "out", output_type)
        assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_existing_output_needs_overwrite(inputs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user file")
    with pytest.raises(SystemExit, match="--overwrite"):
        run_merge(inputs["base"], [inputs["llama_plus"]], out)
    assert (out / "keep.txt").read_text() == "user file"
    run_merge(inputs["base"], [inputs["llama_plus"]], out, "huggingface", "--overwrite", "--offload_dir", "x")
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_two_shard_pth_converts_back(inputs, merged, tmp_path, monkeypatch):
    """13B-style pth (2 shards; the 49953-row output splits unevenly) round-trips through the converter."""
    monkeypatch.setitem(merge.META_SHARDS_BY_DIM, 64, 2)
    pth = run_merge(inputs["base"], [inputs["llama_plus"]], tmp_path / "pth" / "13B", "pth")
    shards = [torch.load(pth / f"consolidated.{i:02d}.pth", weights_only=True) for i in range(2)]
    assert [s["output.weight"].shape[0] for s in shards] == [24976, 24977]
    assert [s["tok_embeddings.weight"].shape[1] for s in shards] == [32, 32]
    assert torch.equal(shards[0]["norm.weight"], shards[1]["norm.weight"])
    out = tmp_path / "back"
    convert.main(["--input_dir", str(pth.parent), "--model_size", "13B", "--output_dir", str(out)])
    back, hf = read_hf_weights(out), read_hf_weights(merged["one"])
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)


def test_lora_scale():
    assert merge.lora_scale({"r": 8, "lora_alpha": 32, "enable_lora": None, "merge_weights": False}, Path("c")) == (
        4.0,
        False,
    )
    assert merge.lora_scale({"r": 16, "lora_alpha": 32, "use_rslora": True}, Path("c")) == (8.0, False)
    assert merge.lora_scale({"r": 4, "lora_alpha": 4, "fan_in_fan_out": True}, Path("c")) == (1.0, True)
    for bad in ({"r": 8, "lora_alpha": 16, "use_dora": True}, {"r": 8, "lora_alpha": 16, "peft_type": "IA3"}, {"r": 8}):
        with pytest.raises(SystemExit, match="adapter_config|LORA|lora_alpha"):
            merge.lora_scale(bad, Path("x/adapter_config.json"))


def test_checksum_claims(inputs):
    lora = merge.load_lora(inputs["llama_plus"])
    files = dict(merge.checksum_files([Path("base.safetensors")], [lora], 4096))
    assert files[Path("base.safetensors")] is None
    assert files[lora.path / "tokenizer.model"] == "Chinese-LLaMA tokenizer.model"
    assert files[lora.adapter_file] == "Chinese LoRA 7B adapter_model.bin"  # 4096 wide + Chinese embeddings
    assert dict(merge.checksum_files([], [lora], 64))[lora.adapter_file] is None  # a tiny model claims nothing
    lora.full = {}  # an adapter trained here: no saved embeddings, claims nothing
    assert dict(merge.checksum_files([], [lora], 4096))[lora.adapter_file] is None


def test_loras_built_from_the_original_checkpoint_merge(tmp_path):
    """The demo's order: original + LoRAs first (as downloaded), then convert, then merge."""
    from llama_ner.tiny_models import make_tiny_original

    original = make_tiny_original(tmp_path / "orig")
    llama_plus, alpaca_plus = make_tiny_chinese_loras(original, tmp_path)
    convert.main(["--input_dir", str(original), "--model_size", "7B", "--output_dir", str(tmp_path / "7B-hf")])
    out = run_merge(tmp_path / "7B-hf", [llama_plus, alpaca_plus], tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 49954


def test_command_line_error_is_one_line(inputs, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    cmd = [sys.executable, str(ROOT / "merge_llama_with_chinese_lora.py"), "--base_model", str(inputs["base"])]
    cmd += ["--lora_model", f"{inputs['alpaca_plus']},{inputs['llama_plus']}", "--output_dir", str(tmp_path / "o")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "wrong order" in errors[0] and "Traceback" not in result.stderr
