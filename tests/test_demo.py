"""End to end: `demo.py --smoke` runs the whole pipeline, as a user types it, in a fresh copy of the repo."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_demo_smoke_runs_every_step_and_learns(tmp_path):
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    clone = tmp_path / "repo"
    for name in tracked:
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    run = subprocess.run([sys.executable, "demo.py", "--smoke"], cwd=clone, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for step in ("convert", "merge 2 LoRAs", "process", "train (deepspeed x2)", "test", "predict"):
        assert any(line.startswith(step) and " ok " in line for line in run.stdout.splitlines()), step
    assert (clone / "model_hub/tiny/chinese-alpaca-7b/config.json").is_file()
    assert json.loads((clone / "model_hub/tiny/chinese-alpaca-7b/config.json").read_text())["vocab_size"] == 49954
    assert (clone / "checkpoint/demo/train_trainer/adapter_model/adapter_model.safetensors").is_file()
    learned = json.loads((clone / "checkpoint/demo_memorize/train_trainer/test_metrics.json").read_text())
    assert learned["f1"] >= 0.9 and learned["n"] == 6
    assert "this F1 means nothing" in run.stdout
