"""QLoRA: LoRA training and evaluation on a 4-bit (or 8-bit) bitsandbytes base, on tiny models.

bitsandbytes runs its 4-bit and 8-bit layers on the CPU, so the real code path (transformers'
BitsAndBytesConfig, peft's prepare_model_for_kbit_training, DeepSpeed) is exercised here. The
training runs share test_train.py's helpers and fixtures (DeepSpeed's ops build among them).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import ROOT, import_script, write_rows
from dataset import load_data
from llama_ner.io_utils import ModelLoadError
from llama_ner.model_loading import load_model
from llama_ner.tokenizer import load_tokenizer
from llama_ner.training.model import TrainCollate, build_model, causal_lm_loss
from memorize import train_memorized_lora
from test_train import (  # noqa: F401 - fixtures used by name
    DS_JSON,
    MSRA,
    PYTHON,
    bf16_json,
    check_adapter,
    deepspeed_cmd,
    deepspeed_ops,
    logits_change,
    ops_ready,
    rows12,
    run,
    script_stopped_before_model,
    train_args,
)


@pytest.mark.parametrize("bits", [4, 8])
def test_kbit_base_quantizes_the_projections_only_and_trains_the_lora(tiny_alpaca, bits):
    import bitsandbytes as bnb

    args = train_args([f"model_dir={tiny_alpaca}", f"quantization_bit={bits}", "lora_dropout=0"])
    model = build_model(args, load_tokenizer(tiny_alpaca), "bf16")
    llama = model.base_model.model
    for name, module in llama.named_modules():
        if name.endswith("_proj") and not name.split(".")[-1].startswith("lora"):
            layer = getattr(module, "base_layer", module)
            assert isinstance(layer, bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt), name
    q_proj = llama.model.layers[0].self_attn.q_proj.base_layer
    if bits == 4:  # NF4 with double quantization, computing in the training dtype
        state = q_proj.weight.quant_state
        assert state.quant_type == "nf4" and state.nested and q_proj.compute_dtype == torch.bfloat16
        assert q_proj.weight.dtype == torch.uint8 and q_proj.weight.numel() * 2 == 64 * 64  # two weights per byte
    else:
        assert q_proj.weight.dtype == torch.int8
    for module, kind in ((llama.model.embed_tokens, torch.nn.Embedding), (llama.lm_head, torch.nn.Linear)):
        assert type(module) is kind and module.weight.dtype == torch.bfloat16  # unquantized, training dtype
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)
    batch = TrainCollate(train_args([]), load_tokenizer(tiny_alpaca)).collate_fn(load_data(MSRA)[:2])
    causal_lm_loss(model, batch).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)


NEVER_MAPPED = """
import sys
from pathlib import Path

import bitsandbytes.functional
import torch
from transformers import AutoModelForCausalLM

from llama_ner.model_loading import load_base, pretrained_kwargs

base = sys.argv[1]
files = [str(f.resolve()) for f in Path(base).glob("*.safetensors")]
quantize, mapped = bitsandbytes.functional.quantize_4bit, []

def watched(*args, **kwargs):
    maps = Path("/proc/self/maps").read_text()
    mapped.append(any(f in maps for f in files))
    return quantize(*args, **kwargs)

bitsandbytes.functional.quantize_4bit = watched
model = load_base(base, 4, torch.float32, "cpu")
ours, mapped = mapped, []  # then transformers' own way (safe_open put back), the check seeing its maps
expected = AutoModelForCausalLM.from_pretrained(base, **pretrained_kwargs(4, torch.float32, "cpu")).state_dict()
same = all(torch.equal(tensor, expected[name]) for name, tensor in model.state_dict().items())
print(f"quantized {len(ours)}, mapped while quantizing {sum(ours)}; transformers' way {sum(mapped)}; same {same}")
"""


def test_a_4bit_load_never_maps_the_checkpoint_and_gives_the_same_weights(tiny_alpaca):
    """transformers maps every shard until the last tensor is in: a 4-bit load reads tensor by tensor instead,
    so when any weight is quantized no part of the 16/32-bit checkpoint is mapped into the process (a fresh
    one: models other tests loaded keep the same files mapped)."""
    proc = subprocess.run([sys.executable, "-c", NEVER_MAPPED, str(tiny_alpaca)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = re.search(
        r"quantized (\d+), mapped while quantizing (\d+); transformers' way (\d+); same (\w+)", proc.stdout
    )
    assert counts, proc.stdout
    quantized, ours, theirs, same = counts.groups()
    assert int(quantized) > 0 and ours == "0" and int(theirs) > 0 and same == "True"


KBIT_CASES = ["bad bits", "zero3 on the command line", "zero3 in deepspeed.json", "no bitsandbytes"]
KBIT_CASES += ["device unsupported"]


def kbit_cases(monkeypatch) -> tuple[Callable[[str], None], dict[str, tuple[list[str], str]]]:
    """(a function that breaks bitsandbytes the way `case` needs, {case: (argv, expected message)})."""
    import bitsandbytes.functional

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("no 4-bit kernel for this device")

    def missing(case: str) -> None:
        if case == "no bitsandbytes":
            monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
            monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
        if case == "device unsupported":
            monkeypatch.setattr(bitsandbytes.functional, "quantize_4bit", no_kernel)

    return missing, {
        "bad bits": (["quantization_bit=3"], "quantization_bit=3: use 0 (no quantization), 4 (NF4, QLoRA) or 8"),
        "zero3 on the command line": (["quantization_bit=4", "zero_stage=3"], "quantization_bit=4 with ZeRO-3"),
        "zero3 in deepspeed.json": (["quantization_bit=8", "zero3_json"], "quantization_bit=8 with ZeRO-3"),
        "no bitsandbytes": (["quantization_bit=4"], "needs bitsandbytes"),
        "device unsupported": (["quantization_bit=4"], "cannot quantize on cpu (no 4-bit kernel for this device)"),
    }


@pytest.mark.parametrize("script", ["train_trainer", "train_deepspeed"])
@pytest.mark.parametrize("case", KBIT_CASES)
def test_bad_kbit_combinations_fail_before_any_model_loads(tmp_path, monkeypatch, tiny_alpaca, script, case):
    module = script_stopped_before_model(script, monkeypatch)
    break_it, cases = kbit_cases(monkeypatch)
    argv, message = cases[case]
    if "zero3_json" in argv:
        ds = {**json.loads(Path(DS_JSON).read_text("utf-8")), "zero_optimization": {"stage": 3}}
        (tmp_path / "ds3.json").write_text(json.dumps(ds), "utf-8")
        argv = [a for a in argv if a != "zero3_json"]
    ds_json = tmp_path / "ds3.json" if (tmp_path / "ds3.json").exists() else DS_JSON
    break_it(case)
    argv = [f"model_dir={tiny_alpaca}", f"train_path={MSRA}", "dev_path=", f"save_dir={tmp_path / 'out'}", *argv]
    monkeypatch.setattr(sys, "argv", [script, *argv, f"deepspeed_json_path={ds_json}"])
    with pytest.raises(SystemExit) as err:
        module.main()
    assert err.value.code == 2 and message in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()


def test_load_model_refuses_a_bad_bit_width(tiny_alpaca):
    with pytest.raises(ModelLoadError, match="use 0 \\(no quantization\\), 4 \\(NF4, QLoRA\\) or 8"):
        load_model(tiny_alpaca, quantization_bit=2, device="cpu")


def check_qlora_run(save_dir: Path, base: Path, precision: str) -> None:
    """A trained adapter, recorded as 4-bit, that loads with PeftModel on the unquantized base and changes it."""
    adapter = save_dir / "adapter_model"
    check_adapter(adapter, base)
    recorded = json.loads((adapter / "train_args.json").read_text("utf-8"))
    assert recorded["quantization_bit"] == 4 and recorded["precision"] == precision
    logits_change(base, adapter)  # fp32 base, no bitsandbytes: the adapter is a plain LoRA


@pytest.mark.slow
def test_qlora_two_ranks_zero2_bf16(ops_ready, tiny_alpaca, rows12, bf16_json, tmp_path):  # noqa: F811
    """deepspeed --num_gpus 2 train_deepspeed.py on a 4-bit base, ZeRO-2, bf16."""
    save_dir = tmp_path / "run"
    argv = [f"model_dir={tiny_alpaca}", f"train_path={rows12}", "dev_path=", f"save_dir={save_dir}", "zero_stage=2"]
    argv += ["quantization_bit=4", "train_batch_size=2", "learning_rate=1e-3", "lora_dropout=0", "log_steps=1"]
    out = run([*deepspeed_cmd("train_deepspeed.py"), *argv, f"deepspeed_json_path={bf16_json}"])
    assert "done: 3 steps" in out
    check_qlora_run(save_dir, tiny_alpaca, "bf16")
    assert json.loads((save_dir / "adapter_model" / "resume_state.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_qlora_trainer_one_process(ops_ready, tiny_alpaca, rows12, tmp_path):  # noqa: F811
    """python train_trainer.py on a 4-bit base with the shipped deepspeed.json (ZeRO-1; fp32 on the CPU)."""
    save_dir = tmp_path / "run"
    argv = [PYTHON, "train_trainer.py", f"model_dir={tiny_alpaca}", f"train_path={rows12}", f"dev_path={rows12}"]
    argv += [f"save_dir={save_dir}", "quantization_bit=4", "train_batch_size=4", "learning_rate=1e-3"]
    out = run([*argv, "lora_dropout=0", "eval_steps=3", f"deepspeed_json_path={DS_JSON}"])
    assert "done: 3 steps" in out and "eval_loss" in out
    check_qlora_run(save_dir, tiny_alpaca, "fp32")


# ----------------------------------------------------------------------------- memorize, evaluate, merge


@pytest.fixture(scope="module")
def memorized_4bit(tiny_alpaca, tmp_path_factory) -> dict:
    """A LoRA that memorized 6 rows on the 4-bit base (tests/memorize.py with quantization_bit=4)."""
    work = tmp_path_factory.mktemp("memorized_4bit")
    rows = load_data(MSRA)[:6]  # 6, not 12: half the logits per epoch, the slowest fixture of the suite
    seen = work / "seen.txt"
    seen.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    save_dir, losses = train_memorized_lora(tiny_alpaca, rows, work / "run", seen, quantization_bit=4)
    assert losses[-1] < losses[0]
    return {"base": tiny_alpaca, "save_dir": save_dir, "rows": rows, "seen": seen, "work": work}


def count_4bit_layers(model: torch.nn.Module) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(module, bnb.nn.Linear4bit) for module in model.modules())


PROJECTIONS_4BIT = 2 * 7  # the tiny model's 2 layers x 7 projections; embed_tokens and lm_head stay unquantized


@pytest.fixture
def loaded_models(monkeypatch) -> list[torch.nn.Module]:
    """The models test.py / predict.py load (loading.load, spied on)."""
    import llama_ner.generation.loading as loading

    models, load = [], loading.load

    def spy(spec):
        model, tokenizer = load(spec)
        models.append(model)
        return model, tokenizer

    monkeypatch.setattr(loading, "load", spy)  # inference.engine_answer_rows looks it up when it loads
    return models


@pytest.mark.slow
def test_memorized_4bit_lora_is_exact_when_evaluated_on_the_4bit_base(memorized_4bit, loaded_models, capsys):
    """test.py loads the base 4-bit by default (train_args.json says so) and reproduces every answer."""
    train_args_path = memorized_4bit["save_dir"] / "adapter_model" / "train_args.json"
    assert json.loads(train_args_path.read_text("utf-8"))["quantization_bit"] == 4
    metrics = import_script("test").main([f"--train_args_path={train_args_path}", "--max_new_tokens=64"])
    assert re.search(r"quantization_bit\s+= 4\n", capsys.readouterr().out)  # the config test.py printed
    assert count_4bit_layers(loaded_models[0]) == PROJECTIONS_4BIT
    assert metrics["f1"] == 1.0 and metrics["exact_match"] == 1.0 and metrics["n"] == len(memorized_4bit["rows"])


@pytest.mark.slow
def test_predict_py_loads_the_4bit_base_by_default_and_not_with_quantization_bit_0(memorized_4bit, loaded_models):
    train_args_path = memorized_4bit["save_dir"] / "adapter_model" / "train_args.json"
    argv = [f"--train_args_path={train_args_path}", f"--predict_path={memorized_4bit['seen']}", "--max_rows=2"]
    predict = import_script("predict")
    assert predict.main([*argv, "--max_new_tokens=64"]) == [r["answer"] for r in memorized_4bit["rows"][:2]]
    predict.main([*argv, "--max_new_tokens=1", "--quantization_bit=0"])
    assert [count_4bit_layers(m) for m in loaded_models] == [PROJECTIONS_4BIT, 0]


@pytest.mark.slow
def test_chat_ner_loads_the_4bit_base_by_default_and_not_with_load_in_kbits_16(memorized_4bit, monkeypatch, capsys):
    """chat_ner.py / serve.py (loading.spec_from_args) take quantization_bit from the LoRA's train_args.json."""
    import llama_ner.generation.inference as inference
    from llama_ner.generation.loading import load, spec_from_args

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # load sets it from --only_cpu; restored after the test
    chat = import_script("chat_ner")
    adapter = memorized_4bit["save_dir"] / "adapter_model"
    argv = ["--base_model", str(memorized_4bit["base"]), "--lora_model", str(adapter), "--only_cpu", "--ner"]
    model, tokenizer = load(spec_from_args(chat.parse_args(argv)))
    assert (
        f"base model: 4-bit (bitsandbytes) (quantization_bit in {adapter / 'train_args.json'}"
        in capsys.readouterr().out
    )
    assert count_4bit_layers(model) == PROJECTIONS_4BIT
    rows = memorized_4bit["rows"][:2]
    texts = [r["query"].removeprefix("文本：") for r in rows]
    assert inference.ner_answers(model, tokenizer, texts, max_new_tokens=64) == [r["answer"] for r in rows]
    model, _ = load(spec_from_args(chat.parse_args([*argv, "--load_in_kbits", "16"])))
    assert "base model: not quantized (--load_in_kbits)" in capsys.readouterr().out
    assert count_4bit_layers(model) == 0


@pytest.mark.slow
def test_qlora_adapter_merges_into_the_fp16_base_like_any_lora(memorized_4bit, tiny_alpaca):
    """merge_llama_with_chinese_lora.py: fp16 output equal to PeftModel on the unquantized base."""
    lora = memorized_4bit["work"] / "lora"
    shutil.copytree(memorized_4bit["save_dir"] / "adapter_model", lora)
    shutil.copy(tiny_alpaca / "tokenizer.model", lora)  # the merge reads each LoRA's tokenizer
    out = memorized_4bit["work"] / "merged"
    cmd = [sys.executable, "merge_llama_with_chinese_lora.py", "--base_model", str(tiny_alpaca)]
    proc = subprocess.run([*cmd, "--lora_model", str(lora), "--output_type", "huggingface", "--output_dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    ids = torch.tensor([[1, 29871, 30662, 30675, 2]])
    with torch.no_grad():
        merged = load_model(out, device="cpu", dtype="float32")(ids).logits
        reference = load_model(tiny_alpaca, lora, device="cpu", dtype="float32")(ids).logits
        base = load_model(tiny_alpaca, device="cpu", dtype="float32")(ids).logits
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    torch.testing.assert_close(merged, reference, rtol=0, atol=2e-2)  # fp16 rounding of the merged weights
    assert (merged - base).abs().max() > 0.1


# ----------------------------------------------------------------------------- memory benchmark


def test_peak_memory_is_split_where_the_model_is_built():
    """bench/qlora_memory.py's measure (io_utils.run_measured_phases): a 300 MB peak before the marker,
    freed, stays out of the after-marker peak, which still sees the 100 MB allocated after it."""
    sys.path.insert(0, str(ROOT / "bench"))
    import qlora_memory

    mb = 2**20
    # the child holds b a moment: the peak is sampled every 50 ms and a reaped child has none
    code = f"a = b'x' * {300 * mb}; del a; print('trainable params: 0', flush=True); b = b'y' * {100 * mb}"
    code += "; import time; time.sleep(0.5)"
    load, train, _ = qlora_memory.measure([sys.executable, "-c", code])
    assert load * 1e9 >= 300 * mb and 100 * mb <= train * 1e9 < 300 * mb, (load, train)
    with pytest.raises(SystemExit, match="failed"):  # the marker never came
        qlora_memory.measure([sys.executable, "-c", "print('no marker')"])


# ----------------------------------------------------------------------------- the recommended 7B setting


def test_4bit_with_gradient_checkpointing_recomputes_and_gives_the_same_gradients(tiny_alpaca):
    """quantization_bit=4 gradient_checkpointing=true (docs/qlora.md's 16-24 GB setting) really recomputes."""
    from test_train import collate_args, lora_grads

    batch = TrainCollate(collate_args(), load_tokenizer(tiny_alpaca)).collate_fn(load_data(MSRA)[:3])
    loss, grads, forwards = lora_grads(tiny_alpaca, batch, quantization_bit=4)
    loss_ckpt, grads_ckpt, forwards_ckpt = lora_grads(
        tiny_alpaca, batch, quantization_bit=4, gradient_checkpointing=True
    )
    assert (forwards, forwards_ckpt) == (2, 4)  # 2 layers; checkpointing runs each again in backward
    torch.testing.assert_close(loss, loss_ckpt)
    assert any(g.abs().max() > 0 for g in grads.values())
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ckpt[name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_qlora_trainer_two_ranks_with_gradient_checkpointing(ops_ready, tiny_alpaca, rows12, tmp_path):  # noqa: F811
    """deepspeed --num_gpus 2 train_trainer.py quantization_bit=4 gradient_checkpointing=true (ZeRO-1, fp32 here)."""
    save_dir = tmp_path / "run"
    argv = [f"model_dir={tiny_alpaca}", f"train_path={rows12}", "dev_path=", f"save_dir={save_dir}"]
    argv += ["quantization_bit=4", "gradient_checkpointing=true", "train_batch_size=2", "learning_rate=1e-3"]
    out = run([*deepspeed_cmd("train_trainer.py"), *argv, "lora_dropout=0", f"deepspeed_json_path={DS_JSON}"])
    assert "done: 3 steps" in out  # 12 rows / (2 processes x 2)
    check_qlora_run(save_dir, tiny_alpaca, "fp32")
    recorded = json.loads((save_dir / "adapter_model" / "train_args.json").read_text("utf-8"))
    assert recorded["gradient_checkpointing"] is True
    assert json.loads((save_dir / "adapter_model" / "resume_state.json").read_text())["world_size"] == 2


def test_4bit_generation_on_the_cpu_with_layers_its_fast_kernel_cannot_pack(tmp_path):
    """A hidden-128 model (intermediate 336: not a multiple of 32 out / 64 in): bitsandbytes' AVX512-BF16 CPU
    kernel would fail repacking those 4-bit layers at the first generation; test.py answers all the same."""
    import bitsandbytes as bnb

    from llama_ner.tiny_models import make_tiny_model

    base = make_tiny_model(tmp_path / "tiny128", "alpaca", hidden_size=128)
    rows = load_data(MSRA)[:2]
    seen = write_rows(tmp_path / "seen.txt", rows)
    save_dir, _ = train_memorized_lora(base, rows, tmp_path / "run", seen, epochs=1, quantization_bit=4)
    model = load_model(base, save_dir / "adapter_model", "float32", "cpu", quantization_bit=4)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and any(m.out_features % 32 for m in layers)  # the shapes that failed
    metrics = import_script("test").main(
        [f"--train_args_path={save_dir / 'adapter_model' / 'train_args.json'}", f"--dev_path={seen}",
         f"--output_dir={tmp_path}", "--max_new_tokens=4"]
    )  # fmt: skip
    assert metrics["n"] == 2 and metrics["malformed"] == 0
