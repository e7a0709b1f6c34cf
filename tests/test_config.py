"""config_utils: flattening, the three override spellings, typing, unknown keys, save/load."""

import json
import subprocess
import sys

import pytest

from config_utils import ConfigError, ConfigParser, load_config, save_config
from conftest import ROOT

DEFAULTS = {
    "data_name": "msra",
    "lora_r": 8,
    "learning_rate": 3e-4,
    "gradient_checkpointing": False,
    "lora_target_modules": ["q_proj", "v_proj"],
    "optimizer": {"adam": {"lr": 5e-3, "betas": [0.9, 0.95]}},
    "peft_path": None,
}


def parse(*argv):
    return ConfigParser(DEFAULTS).parse(list(argv))


def test_defaults_flatten_nested_keys():
    args = parse()
    assert args.optimizer_adam_lr == 5e-3
    assert args.optimizer_adam_betas == [0.9, 0.95]
    assert args.lora_r == 8 and args.data_name == "msra"


@pytest.mark.parametrize("argv", [["lora_r=16"], ["--lora_r=16"], ["--lora_r", "16"]])
def test_three_spellings(argv):
    assert parse(*argv).lora_r == 16


def test_nested_override_and_value_with_equals():
    args = parse("--optimizer_adam_lr=1e-4", "data_name=a=b")
    assert args.optimizer_adam_lr == 1e-4
    assert args.data_name == "a=b"


def test_int_stays_int_and_float_accepts_int_text():
    args = parse("lora_r=4", "learning_rate=1")
    assert args.lora_r == 4 and isinstance(args.lora_r, int)
    assert args.learning_rate == 1.0 and isinstance(args.learning_rate, float)


def test_int_rejects_float_text():
    with pytest.raises(ConfigError, match="lora_r"):
        parse("lora_r=1.5")


@pytest.mark.parametrize("text,value", [("true", True), ("YES", True), ("1", True), ("False", False), ("no", False)])
def test_bool_words(text, value):
    assert parse(f"gradient_checkpointing={text}").gradient_checkpointing is value


def test_bool_rejects_other_words():
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        parse("gradient_checkpointing=maybe")


def test_string_that_looks_like_a_number_stays_a_string():
    assert parse("data_name=2023").data_name == "2023"


def test_lists_by_literal_or_commas():
    assert parse("lora_target_modules=['q_proj']").lora_target_modules == ["q_proj"]
    assert parse("lora_target_modules=q_proj,k_proj").lora_target_modules == ["q_proj", "k_proj"]


def test_none_default_infers_type():
    assert parse("peft_path=./lora").peft_path == "./lora"
    assert parse("peft_path=3").peft_path == 3


def test_unknown_key_names_close_matches_and_exits_2():
    with pytest.raises(ConfigError) as err:
        parse("lora_rr=4")
    assert err.value.code == 2
    assert "lora_rr" in str(err.value) and "lora_r" in str(err.value)


def test_deepspeed_and_torchrun_local_rank_spellings():
    parser = ConfigParser({"local_rank": -1})
    assert parser.parse(["--local_rank=1"]).local_rank == 1
    assert parser.parse(["--local-rank=1"]).local_rank == 1


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("--help")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for key in ("data_name", "optimizer_adam_lr", "peft_path"):
        assert key in out


def test_save_and_load_round_trip(tmp_path):
    args = parse("lora_r=32", "data_name=中文")
    save_config(args, tmp_path / "train_args.json")
    loaded = load_config(tmp_path / "train_args.json")
    assert loaded == args.to_dict()
    assert ConfigParser(loaded).parse([]).lora_r == 32


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{\n  'x': 1\n}")
    with pytest.raises(ConfigError, match=r"bad.json:\d+"):
        load_config(bad)


def test_saved_file_is_json_with_every_key(tmp_path):
    save_config(parse(), tmp_path / "a.json")
    assert set(json.loads((tmp_path / "a.json").read_text())) == set(parse().to_dict())


def test_help_shows_each_keys_meaning_from_the_comment_beside_its_default(capsys):
    from llama_ner.training.train_config import TRAIN_DEFAULTS, parse_train_args

    with pytest.raises(SystemExit) as exit_info:
        parse_train_args({**TRAIN_DEFAULTS, "save_dir": "x"}, "", ["--help"], source=str(ROOT / "train_deepspeed.py"))
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    lines = out.splitlines()
    lora_r = next(i for i, line in enumerate(lines) if line.split()[:1] == ["lora_r"])
    assert lines[lora_r + 1].strip() == "LoRA rank" and "8 (int)" in lines[lora_r]
    assert "recompute activations in backward" in out  # every key, from train_config.py's dict


HELP_WITHOUT_TORCH = """
import runpy, sys
sys.argv = [*sys.argv[1:], "--help"]
try:
    if sys.argv[0].endswith(".py"):
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:  # python -m PACKAGE.MODULE
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as stop:
    assert stop.code in (0, None), stop.code
print("torch imported" if "torch" in sys.modules else "torch not imported")
"""


@pytest.mark.parametrize(
    "script, meaning",
    [
        ("process.py", "dev: keep only sentences with entities"),
        ("test.py", "evaluate only the first N rows of dev_path"),
        ("predict.py", "generation stops at </s> or after this many tokens"),
        ("train_trainer.py", "LoRA scale numerator"),
        ("train_deepspeed.py", "adapter: save_dir/adapter_model"),
        ("convert_llama_weights_to_hf.py", "holds tokenizer.model and <model_size>/"),
        ("merge_llama_with_chinese_lora.py", "LoRA folder(s), comma-separated, in order"),
        ("export_gguf.py", "the .gguf to write"),
        ("chat_ner.py", "each input is a sentence"),
        ("serve.py", "inputs generated together"),
        ("llama_ner.generation.ner_constraint", "the sentence to label"),
    ],
)
def test_help_answers_before_torch_is_imported(script, meaning):
    out = help_without_torch(script)
    assert meaning in out


def help_without_torch(*argv: str) -> str:
    """`python SCRIPT ARGV... --help`'s output; checks that it exits 0 without importing torch."""
    cmd = [sys.executable, "-c", HELP_WITHOUT_TORCH, *argv]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "torch not imported"
    return proc.stdout


@pytest.mark.parametrize("script", ["test.py", "predict.py"])
def test_help_with_a_train_args_json_shows_the_training_keys_meanings(script, tmp_path):
    """With a real train_args.json, --help lists its training keys too, each with the comment from train_config.py."""
    from llama_ner.training.train_config import TRAIN_DEFAULTS

    train_args = tmp_path / "train_args.json"
    train_args.write_text(json.dumps({**TRAIN_DEFAULTS, "save_dir": str(tmp_path)}), encoding="utf-8")
    lines = help_without_torch(script, f"--train_args_path={train_args}").splitlines()
    meanings = {}
    for line, below in zip(lines, lines[1:], strict=False):
        if line.split()[:1] and line.split()[0] in TRAIN_DEFAULTS:
            meanings[line.split()[0]] = below.strip()
    assert meanings["lora_r"] == "LoRA rank"
    assert meanings["model_dir"] == "merged Hugging Face model to tune"
    assert meanings["train_path"] == "training data, JSON lines"
