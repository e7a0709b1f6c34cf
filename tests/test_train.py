"""Training: the loss against the model's own, config/data errors, and real multi-process runs.

The end-to-end runs use real DeepSpeed (CPU, gloo), real `deepspeed`, `mpirun` and tiny random
models with the real 49954-token tokenizer. DeepSpeed JIT-compiles its CPU ops on first use
(~90 s, cached in ~/.cache/torch_extensions): a module fixture starts that at once in the
background, while the unit tests run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, import_script
from dataset import IGNORE_INDEX, NerCollate, load_data
from demo import hard_train_argv
from llama_ner.model_loading import load_model
from llama_ner.tiny_models import make_tiny_model
from llama_ner.tokenizer import load_tokenizer
from llama_ner.training.checkpoints import check_resume, state_to_resume
from llama_ner.training.checks import deepspeed_config, resolve_precision
from llama_ner.training.model import TrainCollate, causal_lm_loss
from llama_ner.training.processes import free_port
from llama_ner.training.train_config import LORA_TARGETS, TRAIN_DEFAULTS, parse_train_args

# One interpreter path for every run: DeepSpeed's JIT cache is keyed on the include paths, so a
# symlinked venv would rebuild the ops each time the path changes.
VENV_BIN = Path(sys.prefix).resolve() / "bin"
PYTHON = str(VENV_BIN / "python")
DS_JSON = str(ROOT / "deepspeed.json")
MSRA = ROOT / "tests" / "data" / "msra_dev_instruct.txt"
TRAIN_ARGS_KEYS = ["model_dir", "save_dir", "data_name", "max_seq_length", "instruct_column", "query_column"]
TRAIN_ARGS_KEYS += ["response_column", "dev_path", "train_batch_size", "lora_r", "lora_alpha", "lora_target_modules"]

BUILD_OPS = (
    "from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, FusedAdamBuilder, ShareMemCommBuilder\n"
    "for b in (CPUAdamBuilder, FusedAdamBuilder, ShareMemCommBuilder): b().load()\n"
)


@pytest.fixture(scope="module", autouse=True)
def deepspeed_ops():
    """Compile (or load) DeepSpeed's CPU ops in the background from the first test on."""
    proc = subprocess.Popen([PYTHON, "-c", BUILD_OPS], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    yield proc
    # Never kill a build mid-way: it would leave torch's build lock behind, and every later
    # DeepSpeed run on this machine would wait on that lock forever.
    proc.communicate(timeout=900)


@pytest.fixture
def ops_ready(deepspeed_ops):
    _, err = deepspeed_ops.communicate(timeout=600)
    assert deepspeed_ops.returncode == 0, err[-2000:]


@pytest.fixture(scope="module")
def tiny128(tmp_path_factory) -> Path:
    """2 layers, hidden 128: enough room in the logits for a LoRA to memorize 12 answers."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny128") / "model", "alpaca", hidden_size=128)


@pytest.fixture(scope="module")
def rows12(tmp_path_factory) -> Path:
    """12 MSRA dev rows: 10 with short entity answers, 2 without entities."""
    rows = load_data(MSRA)
    short = [r for r in rows if r["answer"] != "没有" and 4 <= len(r["answer"]) <= 20 and len(r["query"]) <= 60]
    empty = [r for r in rows if r["answer"] == "没有" and len(r["query"]) <= 60]
    path = tmp_path_factory.mktemp("rows") / "rows12.txt"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in short[:10] + empty[:2]), "utf-8")
    return path


def run(cmd: list[str], timeout: int = 600) -> str:
    """Run a training command from the repo root; fail with its output's tail."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd[:4])}... exit {proc.returncode}\n{out[-4000:]}"
    return out


def deepspeed_cmd(script: str, n: int = 2, port: int = 0) -> list[str]:
    return [str(VENV_BIN / "deepspeed"), "--num_gpus", str(n), "--master_port", str(port or free_port()), script]


# ----------------------------------------------------------------------------- adapter checks


def check_adapter(adapter_dir: Path, base_dir: Path, targets: list[str] = LORA_TARGETS) -> dict:
    """The saved adapter is a real, trained LoRA for base_dir: every LoRA tensor at its shape, no base
    weights, B not zero."""
    names = {p.name for p in adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "train_args.json"} <= names, names
    assert not names & {"model.safetensors", "pytorch_model.bin", "adapter_model.bin"}, names
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    train_args = json.loads((adapter_dir / "train_args.json").read_text("utf-8"))
    assert all(key in train_args for key in TRAIN_ARGS_KEYS), sorted(set(TRAIN_ARGS_KEYS) - set(train_args))
    trained_types = train_args["trained_entity_types"].split(",")  # MSRA rows: constrained answers use these
    assert trained_types and set(trained_types) <= {"人名", "地名", "机构名"}, trained_types
    config = json.loads((base_dir / "config.json").read_text())
    hidden, inter, r = config["hidden_size"], config["intermediate_size"], train_args["lora_r"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    out_in = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden)}
    out_in |= {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    expected = {}
    for i in range(config["num_hidden_layers"]):
        for t in targets:
            prefix = f"base_model.model.model.layers.{i}.{'self_attn' if t[0] in 'qkvo' else 'mlp'}.{t}"
            expected[f"{prefix}.lora_A.weight"] = (r, out_in[t][1])
            expected[f"{prefix}.lora_B.weight"] = (out_in[t][0], r)
    assert set(weights) == set(expected)  # nothing missing and no base/full-model weights
    for name, tensor in weights.items():  # full shapes: not ZeRO-3's empty partitions
        assert tuple(tensor.shape) == expected[name] and torch.isfinite(tensor).all(), name
        if ".lora_B." in name:
            assert tensor.abs().max() > 0, f"{name} is still zero: the adapter was saved untrained"
    return weights


def logits_change(base_dir: Path, adapter_dir: Path) -> None:
    """Base + adapter (loaded by peft) gives other logits than the base, and B @ A matches the saved tensors."""
    ids = torch.tensor([[1, 29871, 30662, 30675, 2]])
    base = load_model(base_dir, device="cpu", dtype="float32")
    with torch.no_grad():
        base_logits = base(ids).logits
    tuned = load_model(base_dir, adapter_path=adapter_dir, device="cpu", dtype="float32")
    with torch.no_grad():
        tuned_logits = tuned(ids).logits
    assert not torch.allclose(base_logits, tuned_logits, atol=1e-4)
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    live = tuned.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    saved_b = saved["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    torch.testing.assert_close(live, saved_b.to(live.dtype))  # peft loads a bf16 adapter into fp32 LoRA weights


def greedy_answers(base_dir: Path, adapter_dir: Path, rows: list[dict]) -> list[str]:
    from dataset import build_prompt

    tokenizer = load_tokenizer(base_dir)
    model = load_model(base_dir, adapter_path=adapter_dir, device="cpu", dtype="float32")
    answers = []
    for row in rows:
        ids = tokenizer(build_prompt(row["instruct"], row["query"]), return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=2, pad_token_id=0)
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


# ----------------------------------------------------------------------------- unit tests


def train_args(argv: list[str]):
    return parse_train_args({**TRAIN_DEFAULTS, "save_dir": "x"}, "", argv)


def collate_args(max_seq_length: int = 192):
    return train_args([f"max_seq_length={max_seq_length}"])


@pytest.mark.parametrize("max_seq_length", [192, 100])
def test_label_only_loss_equals_the_models_own_loss_row_by_row(tiny_alpaca, max_seq_length):
    tokenizer = load_tokenizer(tiny_alpaca)
    model = load_model(tiny_alpaca, device="cpu", dtype="float32")
    rows = load_data(MSRA)[:6]
    args = collate_args(max_seq_length)
    batch = TrainCollate(args, tokenizer).collate_fn(rows)
    assert (batch["attention_mask"][:, -1] == 1).all()  # left-aligned: every row ends at the last column
    with torch.no_grad():
        ours = causal_lm_loss(model, batch)
        total, count = 0.0, 0
        for row in rows:  # reference: the model's own loss on each unpadded row, token-weighted
            ids, labels = NerCollate(args, tokenizer).encode(row)
            n = sum(label != IGNORE_INDEX for label in labels[1:])
            total += model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item() * n
            count += n
        right_padded = NerCollate(args, tokenizer).collate_fn(rows)
        full = model(**right_padded).loss
    torch.testing.assert_close(ours, torch.tensor(total / count), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(causal_lm_loss(model, right_padded), full, rtol=1e-5, atol=1e-5)


def test_deepspeed_config_is_filled_from_the_config(tmp_path):
    base = {**TRAIN_DEFAULTS, "save_dir": "x", "deepspeed_json_path": DS_JSON}
    args = parse_train_args(base, "", ["train_batch_size=3", "gradient_accumulation_steps=2", "max_grad_norm=0.5"])
    ds = deepspeed_config(args, "fp32")
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["lr"] == 1e-5  # learning_rate=None: the file's
    assert ds["fp16"]["enabled"] is False and ds["zero_optimization"]["stage"] == 1
    assert "auto" not in json.dumps(ds)
    args = parse_train_args(base, "", ["learning_rate=3e-3", "zero_stage=3"])
    ds = deepspeed_config(args, "fp16")
    assert ds["optimizer"]["params"]["lr"] == 3e-3 and ds["fp16"]["enabled"] is True
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert resolve_precision({"fp16": {"enabled": True}}, cuda=False) == "fp32"
    assert resolve_precision({"fp16": {"enabled": True}}, cuda=True) == "fp16"
    assert resolve_precision({"bf16": {"enabled": True}}, cuda=False) == "bf16"
    auto_lr = tmp_path / "ds.json"
    auto_lr.write_text(json.dumps({"optimizer": {"type": "Adam", "params": {"lr": "auto"}}}))
    with pytest.raises(SystemExit, match="pass learning_rate"):
        deepspeed_config(parse_train_args({**base, "deepspeed_json_path": str(auto_lr)}, "", []), "fp32")


def test_hard_train_argv_parses():
    argv = hard_train_argv("m", "t.txt", "out", train_batch_size=2)
    args = parse_train_args({**TRAIN_DEFAULTS, "save_dir": "x"}, "", argv)
    assert args.train_batch_size == 2 and args.learning_rate == 3e-3 and args.dev_path == ""
    assert args.lora_target_modules == LORA_TARGETS


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    good = tmp_path / "good.txt"
    good.write_text(MSRA.read_text("utf-8").splitlines()[0] + "\n", "utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", "utf-8")
    bad_line = tmp_path / "bad.txt"
    bad_line.write_text(good.read_text("utf-8") + '{"instruct": "x", \n', "utf-8")
    no_answer = tmp_path / "no_answer.txt"
    no_answer.write_text('{"instruct": "x", "query": "y"}\n', "utf-8")
    return {
        "unknown key": (["lora_rank=8"], "unknown key 'lora_rank'; did you mean"),
        "missing file": ([f"train_path={tmp_path / 'nope.txt'}"], "nope.txt: file not found"),
        "empty file": ([f"train_path={empty}"], "empty.txt: no rows"),
        "bad JSON line": ([f"train_path={bad_line}"], "bad.txt:2: not valid JSON"),
        "missing column": ([f"dev_path={no_answer}", f"train_path={good}"], "no_answer.txt:1: missing column 'answer'"),
        "bad type": (["lora_r=eight"], "lora_r='eight' is not an int"),
        "no model": ([f"train_path={good}", "dev_path=", f"model_dir={tmp_path}"], "no config.json"),
    }


def script_stopped_before_model(script: str, monkeypatch: pytest.MonkeyPatch):
    """The trainer module, made to fail the test if its main() gets past the input checks."""
    module = import_script(script)

    def must_not_run(*args, **kwargs):
        raise AssertionError("got past the input checks")

    monkeypatch.setattr(module, "init_distributed", must_not_run)
    monkeypatch.setattr(module, "build_model", must_not_run)
    return module


@pytest.mark.parametrize("script", ["train_trainer", "train_deepspeed"])
@pytest.mark.parametrize(
    "case", ["unknown key", "missing file", "empty file", "bad JSON line", "missing column", "bad type", "no model"]
)
def test_bad_config_fails_before_any_model_loads(tmp_path, monkeypatch, tiny_alpaca, script, case):
    module = script_stopped_before_model(script, monkeypatch)
    argv, message = bad_inputs(tmp_path)[case]
    argv = [f"model_dir={tiny_alpaca}", f"save_dir={tmp_path / 'out'}", f"deepspeed_json_path={DS_JSON}", *argv]
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as err:
        module.main()
    assert err.value.code == 2 and message in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.fixture(scope="module")
def bf16_json(tmp_path_factory) -> Path:
    """deepspeed.json switched to bf16 as a user would: fp16 section removed, bf16 enabled."""
    ds = json.loads(Path(DS_JSON).read_text("utf-8"))
    del ds["fp16"]
    ds["bf16"] = {"enabled": True}
    path = tmp_path_factory.mktemp("ds") / "deepspeed_bf16.json"
    path.write_text(json.dumps(ds, indent=2), "utf-8")
    return path


@pytest.mark.parametrize("script", ["train_trainer", "train_deepspeed"])
def test_bf16_where_unsupported_fails_before_any_model_loads(tmp_path, monkeypatch, tiny_alpaca, bf16_json, script):
    import llama_ner.training.checks as checks

    module = import_script(script)

    def must_not_run(*args, **kwargs):
        raise AssertionError("got past the precision check")

    monkeypatch.setattr(checks, "bf16_supported", lambda cuda: False)  # e.g. a V100
    monkeypatch.setattr(module, "init_distributed", must_not_run)
    monkeypatch.setattr(module, "build_model", must_not_run)
    argv = [f"model_dir={tiny_alpaca}", f"train_path={MSRA}", "dev_path=", f"save_dir={tmp_path / 'out'}"]
    monkeypatch.setattr(sys, "argv", [script, *argv, f"deepspeed_json_path={bf16_json}"])
    with pytest.raises(SystemExit) as err:
        module.main()
    assert err.value.code == 2 and "deepspeed.json enables bf16, but" in str(err.value)
    if not torch.cuda.is_available():  # the advice for this machine: fp32, since fp16 needs CUDA
        assert 'set "bf16": {"enabled": false} to train in fp32' in str(err.value)
    assert not (tmp_path / "out").exists()


def test_bf16_unsupported_advice_fits_the_device(monkeypatch):
    import llama_ner.training.checks as checks

    monkeypatch.setattr(checks, "bf16_supported", lambda cuda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla V100")
    with pytest.raises(SystemExit) as gpu:
        resolve_precision({"bf16": {"enabled": True}}, cuda=True)
    assert "this GPU (Tesla V100)" in str(gpu.value) and "Ampere" in str(gpu.value)
    assert '"fp16": {"enabled": true} instead' in str(gpu.value)
    with pytest.raises(SystemExit) as cpu:
        resolve_precision({"bf16": {"enabled": True}}, cuda=False)
    assert 'set "bf16": {"enabled": false} to train in fp32 (fp16 needs a CUDA GPU)' in str(cpu.value)
    assert "Ampere" not in str(cpu.value) and '"fp16": {"enabled": true}' not in str(cpu.value)


def test_bf16_reaches_deepspeed_and_the_trainer_alike(bf16_json):
    """deepspeed.json's bf16 and the Trainer's flags agree (the shipped file enables fp16: it must go off);
    without CUDA the Trainer is told it runs on the CPU, or it refuses bf16 (issue 16)."""
    trainer = import_script("train_trainer")
    args = train_args([f"deepspeed_json_path={DS_JSON}", "ddp_timeout=7"])
    ds = deepspeed_config(args, "bf16")
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    training_args = trainer.training_arguments(args, ds, "bf16", evaluate=False)
    assert training_args.bf16 and not training_args.fp16
    assert training_args.use_cpu == (not torch.cuda.is_available())
    assert training_args.ddp_timeout == 7
    ds = deepspeed_config(train_args([f"deepspeed_json_path={bf16_json}"]), "fp32")
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False


def test_bad_key_is_one_line_and_exit_2():
    proc = subprocess.run([PYTHON, "train_trainer.py", "lora_rr=4"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("config error: unknown key 'lora_rr'; did you mean lora_r"), proc.stderr


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_deepspeed_two_ranks_zero3_memorizes_12_rows(ops_ready, tiny128, rows12, tmp_path):
    """deepspeed --num_gpus 2, ZeRO-3 (partitioned parameters): the gathered adapter reproduces the answers."""
    save_dir = tmp_path / "run"
    argv = hard_train_argv(tiny128, rows12, save_dir, train_batch_size=2, zero_stage=3)  # 70 epochs, 3 steps each
    port = free_port()
    out = run([*deepspeed_cmd("train_deepspeed.py", port=port), *argv, f"deepspeed_json_path={DS_JSON}"])
    assert "step 210/210" in out and "done: 210 steps" in out
    left = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))  # DeepSpeed's CPU allreduce
    assert not left, f"{left}: 66 MB of RAM each, left behind by the run"
    adapter = save_dir / "adapter_model"
    check_adapter(adapter, tiny128)
    logits_change(tiny128, adapter)
    state = json.loads((adapter / "resume_state.json").read_text())
    assert state["global_step"] == state["total_steps"] == 210 and state["world_size"] == 2
    rows = load_data(rows12)
    assert greedy_answers(tiny128, adapter, rows) == [r["answer"] for r in rows]


@pytest.mark.slow
def test_trainer_two_ranks_zero3_saves_the_trained_adapter(ops_ready, tiny_alpaca, rows12, tmp_path):
    """deepspeed --num_gpus 2 train_trainer.py, ZeRO-3: our gathered adapter equals the Trainer's own copy."""
    save_dir = tmp_path / "run"
    argv = [f"model_dir={tiny_alpaca}", f"train_path={rows12}", f"dev_path={rows12}", f"save_dir={save_dir}"]
    argv += ["train_batch_size=2", "num_train_epochs=2", "save_steps=3", "eval_steps=3", "learning_rate=1e-3"]
    argv += [f"deepspeed_json_path={DS_JSON}", "lora_dropout=0", "zero_stage=3"]
    out = run([*deepspeed_cmd("train_trainer.py"), *argv])
    assert "done: 6 steps" in out and "eval_loss" in out
    adapter = save_dir / "adapter_model"
    weights = check_adapter(adapter, tiny_alpaca)
    logits_change(tiny_alpaca, adapter)
    hf_copy = load_file(save_dir / "checkpoint-6" / "adapter_model.safetensors")
    assert set(hf_copy) == set(weights)
    for name in weights:
        torch.testing.assert_close(weights[name], hf_copy[name])
    train_args = json.loads((adapter / "train_args.json").read_text())
    assert train_args["save_dir"] == str(save_dir) and train_args["lora_r"] == 8


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_trainer", "train_deepspeed"])
def test_bf16_on_the_cpu_trains_and_records_it(ops_ready, tiny_alpaca, rows12, bf16_json, tmp_path, script):
    """deepspeed.json with bf16 on a machine without CUDA: both trainers train in bf16 (README's promise)."""
    save_dir = tmp_path / "run"
    argv = [PYTHON, f"{script}.py", f"model_dir={tiny_alpaca}", f"train_path={rows12}", "dev_path="]
    argv += [f"save_dir={save_dir}", "train_batch_size=4", "learning_rate=1e-3", "lora_dropout=0", "log_steps=1"]
    out = run([*argv, f"deepspeed_json_path={bf16_json}"])
    assert "done: 3 steps" in out
    adapter = save_dir / "adapter_model"
    weights = check_adapter(adapter, tiny_alpaca)  # saved, every LoRA tensor, B trained away from its zero init
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}  # the weights DeepSpeed trained were bf16
    assert json.loads((adapter / "train_args.json").read_text("utf-8"))["precision"] == "bf16"
    logits_change(tiny_alpaca, adapter)


@pytest.mark.slow
def test_deepspeed_under_mpirun_zero2(ops_ready, tiny_alpaca, rows12, tmp_path):
    save_dir = tmp_path / "run"
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", f"MASTER_PORT={free_port()}"]
    cmd += [PYTHON, "train_deepspeed.py", f"model_dir={tiny_alpaca}", f"train_path={rows12}", f"dev_path={rows12}"]
    cmd += [f"save_dir={save_dir}", "train_batch_size=2", "num_train_epochs=1", "zero_stage=2", "learning_rate=1e-3"]
    cmd += ["eval_steps=3", "log_steps=1", f"deepspeed_json_path={DS_JSON}"]
    out = run(cmd)
    assert "step 3/3" in out and "dev loss" in out
    adapter = save_dir / "adapter_model"
    check_adapter(adapter, tiny_alpaca)
    state = json.loads((adapter / "resume_state.json").read_text())
    assert state["world_size"] == 2 and state["train_args"]["zero_stage"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_deepspeed", "train_trainer"])
def test_killed_run_resumes_from_its_last_save(ops_ready, tiny_alpaca, rows12, tmp_path, script):
    save_dir = tmp_path / "run"
    argv = [PYTHON, f"{script}.py", f"model_dir={tiny_alpaca}", f"train_path={rows12}", "dev_path="]
    argv += [f"save_dir={save_dir}", "train_batch_size=2", "num_train_epochs=4", "save_steps=4", "log_steps=1"]
    argv += [f"deepspeed_json_path={DS_JSON}", "learning_rate=1e-3"]
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    state_file = save_dir / "adapter_model" / "resume_state.json"
    deadline = time.time() + 300
    while not state_file.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run, right after its first save
    proc.wait()
    log.close()
    saved = json.loads(state_file.read_text())
    assert 4 <= saved["global_step"] < 24 and saved["total_steps"] == 24, saved
    assert set(saved) == {"global_step", "total_steps", "world_size", "checkpoint", "train_args"}  # both trainers
    assert (save_dir / saved["checkpoint"]).is_dir() and saved["train_args"]["save_dir"] == str(save_dir)
    out = run([*argv, "resume=true"])
    assert f"resuming from {save_dir} at step {saved['global_step']}/24" in out  # both trainers
    if script == "train_deepspeed":
        tags = [p.name for p in (save_dir / "deepspeed_checkpoint").iterdir() if p.is_dir()]
        assert tags == ["global_step24"]  # older optimizer states are removed once superseded
    assert "done: 24 steps" in out
    assert json.loads(state_file.read_text())["global_step"] == 24
    check_adapter(save_dir / "adapter_model", tiny_alpaca)


@pytest.mark.slow  # starts each trainer (DeepSpeed's process group, its CPU ops)
@pytest.mark.parametrize("script", ["train_deepspeed", "train_trainer"])
def test_resume_with_other_settings_is_refused_with_one_message(ops_ready, tiny_alpaca, rows12, tmp_path, script):
    """Both trainers read the same resume_state.json and refuse a changed key before loading the model."""
    save_dir = tmp_path / "run"
    argv = [f"model_dir={tiny_alpaca}", f"train_path={rows12}", "dev_path=", f"save_dir={save_dir}"]
    argv += [f"deepspeed_json_path={DS_JSON}", "train_batch_size=2"]
    saved = {**train_args(argv).to_dict(), "lora_r": 4, "precision": "fp32"}
    # the state file alone, no optimizer checkpoint beside it: the settings are checked first all the same
    write_state(save_dir, {**state_of(saved, 4, 24), "checkpoint": "checkpoint-4"})
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    cmd = [PYTHON, f"{script}.py", *argv, "lora_r=8", "resume=true"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    fix = "pass lora_r=4 or start over with resume=false"
    assert last == f"config error: resume: lora_r was 4 in the saved run, now 8; {fix}"
    assert "trainable params" not in proc.stdout  # refused before the model was built


def state_of(saved_args: dict, step: int, total: int) -> dict:
    return {"global_step": step, "total_steps": total, "world_size": 1, "checkpoint": "x", "train_args": saved_args}


def write_state(save_dir: Path, state: dict) -> None:
    (save_dir / "adapter_model").mkdir(parents=True)
    (save_dir / "adapter_model" / "resume_state.json").write_text(json.dumps(state))


def resume_args(save_dir: Path, *argv: str):
    args = train_args([f"save_dir={save_dir}", "resume=true", *argv])
    args.precision = "fp32"  # set by the trainers from deepspeed.json
    return args


@pytest.mark.parametrize(
    "key, saved_value, message",
    [
        ("quantization_bit", 4, "quantization_bit was 4 in the saved run, now 0; pass quantization_bit=4 or"),
        ("precision", "bf16", "precision was 'bf16' in the saved run, now 'fp32'; train in bf16 again"),
        ("seed", 7, "seed was 7 in the saved run, now 42; pass seed=7 or start over with resume=false"),
        # the saved optimizer and scheduler would ignore a new rate; train_args.json would record a lie
        ("learning_rate", 0.001, "learning_rate was 0.001 in the saved run, now 0.005; pass learning_rate=0.001"),
        ("prompt_template", "chat", "prompt_template was 'chat' in the saved run, now 'alpaca'"),
    ],
)
def test_resume_refuses_another_quantization_or_precision(monkeypatch, tmp_path, key, saved_value, message):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = resume_args(tmp_path, *(["learning_rate=5e-3"] if key == "learning_rate" else []))
    write_state(tmp_path, state_of({**args.to_dict(), key: saved_value}, 4, 24))
    with pytest.raises(SystemExit, match=re.escape(message)) as err:
        state_to_resume(args)
    assert err.value.code == 2


def test_resume_with_the_same_settings_continues_and_without_a_state_starts_over(monkeypatch, tmp_path, capsys):
    """The one place both trainers get their resume state from, and the one line each case prints."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = resume_args(tmp_path / "run", "quantization_bit=4")
    assert state_to_resume(args) is None
    assert (
        capsys.readouterr().out
        == f"resume: nothing saved in {tmp_path / 'run' / 'adapter_model'} yet; starting from step 0\n"
    )
    write_state(tmp_path / "run", state_of(args.to_dict(), 4, 24))
    assert state_to_resume(args)["global_step"] == 4
    assert capsys.readouterr().out == f"resuming from {tmp_path / 'run'} at step 4/24\n"
    args.resume = False
    assert state_to_resume(args) is None and capsys.readouterr().out == ""


def test_trainer_refuses_a_resume_state_without_its_checkpoint(tmp_path):
    """train_trainer.py: a resume state but no finished checkpoint-N is an error, not a silent restart."""
    trainer = import_script("train_trainer")
    (tmp_path / "checkpoint-8").mkdir()  # being written when the run was killed: no trainer_state.json yet
    with pytest.raises(SystemExit, match="holds no finished checkpoint-N .* start over with resume=false"):
        trainer.checkpoint_to_resume(tmp_path)
    for step in (4, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert trainer.checkpoint_to_resume(tmp_path) == str(tmp_path / "checkpoint-12")


@pytest.mark.slow  # starts each trainer (imports, input checks) once, both at a time
def test_a_process_left_alone_fails_within_ddp_timeout_with_what_to_check(ops_ready, tiny_alpaca, rows12, tmp_path):
    """One host, no root: the master waiting for a rank that never comes (train_trainer), and a rank
    whose master nobody runs (train_deepspeed), each give up after ddp_timeout with the one line."""
    started = []
    for script, rank in (("train_trainer", 0), ("train_deepspeed", 1)):
        port = free_port()
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
        env["MASTER_PORT"] = str(port)
        argv = [f"model_dir={tiny_alpaca}", f"train_path={rows12}", "dev_path=", f"save_dir={tmp_path / script}"]
        cmd = [PYTHON, f"{script}.py", *argv, f"deepspeed_json_path={DS_JSON}", "ddp_timeout=3"]
        with open(tmp_path / f"{script}.log", "w") as log:  # stderr only: the one line comes last
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
        started.append((script, rank, port, proc))
    for script, rank, port, proc in started:
        proc.wait(timeout=300)
        err = (tmp_path / f"{script}.log").read_text()
        assert proc.returncode == 2, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith(
            f"error: rank {rank} of 2 could not join the other processes at "
            f"MASTER_ADDR:MASTER_PORT=127.0.0.1:{port} within ddp_timeout=3s ("
        ), last
        assert "--node_rank" in last and "GLOO_SOCKET_IFNAME" in last
        assert not (tmp_path / script).exists()


def test_check_resume_names_the_process_count(monkeypatch):
    args = train_args(["model_dir=m"])
    state = {"world_size": 2, "train_args": args.to_dict()}
    monkeypatch.setenv("WORLD_SIZE", "2")  # the process count, as a launcher sets it
    check_resume(state, args)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SystemExit, match="world_size was 2 in the saved run, now 1; start 2 processes"):
        check_resume(state, args)


def lora_grads(model_dir: Path, batch: dict, **overrides) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss, LoRA gradients, and how often the decoder layers' attention ran in one training step."""
    from llama_ner.training.model import build_model

    argv = [f"model_dir={model_dir}", "lora_dropout=0", *[f"{k}={v}" for k, v in overrides.items()]]
    model = build_model(train_args(argv), load_tokenizer(model_dir), "fp32")
    model.train()
    calls = []
    for layer in model.base_model.model.model.layers:  # a pre-hook: a recompute may stop before a module ends
        layer.self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    loss = causal_lm_loss(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(calls)


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(tiny_alpaca):
    batch = TrainCollate(collate_args(), load_tokenizer(tiny_alpaca)).collate_fn(load_data(MSRA)[:3])
    loss, grads, forwards = lora_grads(tiny_alpaca, batch)
    loss_ckpt, grads_ckpt, forwards_ckpt = lora_grads(tiny_alpaca, batch, gradient_checkpointing=True)
    assert (forwards, forwards_ckpt) == (2, 4)  # 2 layers; checkpointing runs each again in backward
    torch.testing.assert_close(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and any(g.abs().max() > 0 for g in grads.values())
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ckpt[name], rtol=1e-4, atol=1e-6)


def test_peft_path_continues_training_an_existing_lora(tiny_alpaca, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llama_ner.training.model import build_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    existing = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_alpaca), config)
    existing.save_pretrained(tmp_path / "lora")
    saved = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    argv = [f"model_dir={tiny_alpaca}", f"peft_path={tmp_path / 'lora'}", "lora_r=64"]  # lora_r: the LoRA's own wins
    model = build_model(train_args(argv), load_tokenizer(tiny_alpaca), "fp32")
    trainable = {n.replace(".default", ""): p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(saved)
    for name, tensor in saved.items():
        torch.testing.assert_close(trainable[name].detach(), tensor)
