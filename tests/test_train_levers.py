"""Training's levers: length-grouped batches, bf16 autocast, the time budget, validation by F1 (the best adapter).

Speed is measured in bench/ (BENCHMARKS.md), not here: these tests check what a user relies on: grouping
changes no loss, autocast really computes in bf16, a budget stops a run with a saved adapter, and the kept
adapter is the one that scored best.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from config_utils import Config, ConfigError
from conftest import ROOT
from dataset import load_data
from llama_ner.model_loading import load_model
from llama_ner.tokenizer import load_tokenizer
from llama_ner.training import checks
from llama_ner.training.checkpoints import ADAPTER_DIR, BEST_DIR, LAST_DIR, BestAdapter, save_adapter
from llama_ner.training.model import (
    LengthGroupedSampler,
    TrainCollate,
    build_model,
    causal_lm_loss,
    length_grouped_order,
)
from llama_ner.training.time_budget import TimeBudget, budget_scheduler
from llama_ner.training.train_config import TRAIN_DEFAULTS, parse_train_args

PYTHON = str(Path(sys.prefix).resolve() / "bin" / "python")
MSRA = ROOT / "tests" / "data" / "msra_dev_instruct.txt"


def train_args(argv: list[str]) -> Config:
    return parse_train_args({**TRAIN_DEFAULTS, "save_dir": "x"}, "", argv)


# ----------------------------------------------------------------------------- grouped batches


def test_grouped_order_covers_every_row_once_in_batches_of_similar_length():
    lengths = [(i * 37) % 101 for i in range(1000)]
    order = length_grouped_order(lengths, batch_size=8, processes=1, seed=0, epoch=0)
    assert sorted(order) == list(range(1000))
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in zip(*[iter(order)] * 8, strict=False)]
    assert sum(spread) / len(spread) < 5  # random batches of 8 spread over ~75 of the 0-100 lengths
    assert order == length_grouped_order(lengths, 8, 1, seed=0, epoch=0)  # reproducible: resume can skip
    assert order != length_grouped_order(lengths, 8, 1, seed=0, epoch=1)  # a new order each epoch
    assert order[:8] != sorted(order, key=lambda i: lengths[i])[:8]  # batches come in random order, not by length


def test_grouped_sampler_gives_each_process_its_slice_of_every_global_batch():
    lengths = list(range(21))
    ranks = [list(LengthGroupedSampler(lengths, 2, 2, seed=3, rank=r)) for r in (0, 1)]
    whole = list(LengthGroupedSampler(lengths, 2, 2, seed=3))
    assert len(ranks[0]) == len(ranks[1]) == 11 and len(whole) == 22  # padded as DistributedSampler pads
    assert Counter(ranks[0] + ranks[1]) == Counter(whole) and set(whole) == set(range(21))
    for g in range(0, 20, 4):  # each global batch of 4: rank 0 its first 2 rows, rank 1 the next 2
        assert whole[g : g + 4] == ranks[0][g // 2 : g // 2 + 2] + ranks[1][g // 2 : g // 2 + 2]


def test_grouped_batches_give_the_same_loss_as_ungrouped_ones(tiny_alpaca):
    """The token-weighted loss over the same 12 rows, batched by length or in file order, is the same."""
    args = train_args([f"model_dir={tiny_alpaca}", "lora_dropout=0"])
    tokenizer = load_tokenizer(tiny_alpaca)
    model = build_model(args, tokenizer, "fp32").eval()
    collate = TrainCollate(args, tokenizer)
    rows = load_data(MSRA)[:12]
    lengths = [len(r["query"]) + len(r["answer"]) for r in rows]

    def total_loss(order: list[int]) -> float:
        loss_sum = tokens = 0.0
        for start in range(0, len(order), 4):
            batch = collate.collate_fn([rows[i] for i in order[start : start + 4]])
            count = int((batch["labels"] != -100).sum())
            with torch.no_grad():
                loss_sum += causal_lm_loss(model, batch).item() * count
            tokens += count
        return loss_sum / tokens

    grouped = length_grouped_order(lengths, 4, 1, seed=0, epoch=0)
    assert grouped != list(range(12))
    assert total_loss(grouped) == pytest.approx(total_loss(list(range(12))), rel=1e-5)


# ----------------------------------------------------------------------------- bf16 autocast


def test_bf16_autocast_computes_the_projections_in_bf16(tiny_alpaca):
    args = train_args([f"model_dir={tiny_alpaca}", "lora_dropout=0"])
    tokenizer = load_tokenizer(tiny_alpaca)
    model = build_model(args, tokenizer, "fp32")
    batch = TrainCollate(args, tokenizer).collate_fn(load_data(MSRA)[:4])
    seen = []
    layer = model.base_model.model.model.layers[0].mlp.down_proj.base_layer
    layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    fp32 = causal_lm_loss(model, batch)
    bf16 = causal_lm_loss(model, batch, bf16_autocast=True)
    assert seen == [torch.float32, torch.bfloat16]
    assert bf16.dtype == torch.float32 and bf16.item() == pytest.approx(fp32.item(), rel=0.02)
    bf16.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # fp32 master weights


def test_autocast_is_on_only_in_fp32_training_where_bf16_kernels_exist(monkeypatch):
    monkeypatch.setattr(checks, "cpu_has_bf16_kernels", lambda: True)
    assert checks.resolve_autocast("auto", "fp32", cuda=False) is True
    assert checks.resolve_autocast("auto", "bf16", cuda=False) is False  # already 16-bit
    assert checks.resolve_autocast(False, "fp32", cuda=False) is False
    monkeypatch.setattr(checks, "cpu_has_bf16_kernels", lambda: False)
    assert checks.resolve_autocast("auto", "fp32", cuda=False) is False  # emulated bf16 is slower than fp32
    with pytest.raises(ConfigError, match="no bf16 kernels"):
        checks.resolve_autocast(True, "fp32", cuda=False)
    assert train_args(["bf16_autocast=false"]).bf16_autocast is False  # the command line's words for a bool


# ----------------------------------------------------------------------------- the time budget


def test_budget_rate_warms_up_then_falls_with_the_time_spent(monkeypatch):
    budget = TimeBudget(10)
    spent = {"s": 0.0}
    monkeypatch.setattr(budget, "spent", lambda: spent["s"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = budget_scheduler(optimizer, budget, warmup_steps=4)
    rates = [scheduler.get_last_lr()[0]]
    for seconds in (0, 0, 0, 150, 300, 450, 600):
        spent["s"] = seconds
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # warmup by steps, no time spent yet
    assert rates[4:] == pytest.approx([0.75, 0.5, 0.25, 0.0])  # then the share of the 600 s left
    assert budget.over() and not TimeBudget(0).over() and TimeBudget(0).share() == 0.0
    with budget.paused():
        pass
    assert budget.spent() == 600  # (the patched clock); a pause is not spent time


@pytest.mark.parametrize("script", ["train_trainer", "train_deepspeed"])
def test_a_time_budget_stops_the_run_and_saves_the_best_validated_adapter(tiny_alpaca, tmp_path, script):
    """train_minutes cuts a 1000-epoch run short with a saved adapter; eval_f1_rows scores each save by generation
    and adapter_model is the best-F1 one (validation.jsonl says which)."""
    rows = load_data(MSRA)
    train, validation = tmp_path / "train.txt", tmp_path / "validation.txt"
    train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:8]), "utf-8")
    validation.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[8:12]), "utf-8")
    save_dir = tmp_path / "run"
    cmd = [PYTHON, f"{script}.py", f"model_dir={tiny_alpaca}", f"train_path={train}", "dev_path=",
           f"save_dir={save_dir}", "train_batch_size=4", "num_train_epochs=1000", "train_minutes=0.25",
           f"eval_f1_path={validation}", "eval_f1_rows=4", "eval_f1_max_new_tokens=8", "save_steps=50",
           "learning_rate=1e-3", "log_steps=5"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "train_minutes=0.25 spent at step" in out.stdout + out.stderr
    state = json.loads((save_dir / ADAPTER_DIR / "resume_state.json").read_text())
    entries = [json.loads(line) for line in (save_dir / "validation.jsonl").read_text().splitlines()]
    assert entries and entries[-1]["step"] < 2000 == state["total_steps"]  # stopped early, by the clock
    assert all(e["n"] == 4 and 0 <= e["f1"] <= 1 for e in entries)
    assert entries[-1]["train_minutes"] >= 0.25  # the budget was spent before the stop
    best = max(reversed(entries), key=lambda e: e["f1"])
    assert state["global_step"] == best["step"]  # adapter_model is the best one
    kept = load_file(save_dir / ADAPTER_DIR / "adapter_model.safetensors")
    best_copy = load_file(save_dir / BEST_DIR / "adapter_model.safetensors")
    assert all(torch.equal(kept[k], best_copy[k]) for k in kept)
    trained = json.loads((save_dir / ADAPTER_DIR / "train_args.json").read_text())
    assert trained["train_minutes"] == 0.25 and trained["ner_instruction"] == rows[0]["instruct"]


def test_the_kept_adapter_is_the_best_scored_not_the_last(tiny_alpaca, tmp_path):
    """Three saves scored 0.2, 0.5, 0.3: adapter_model ends as the second save's weights, the last beside it."""
    args = train_args([f"model_dir={tiny_alpaca}", f"save_dir={tmp_path}"])
    model = build_model(args, load_tokenizer(tiny_alpaca), "fp32")
    scores = iter([0.2, 0.5, 0.3])
    metrics = lambda f1: {  # noqa: E731  (the keys metrics.score returns)
        "precision": f1,
        "recall": f1,
        "f1": f1,
        "exact_match": f1,
        "n": 3,
        "per_type": {"人名": {"f1": f1}},
    }
    best = BestAdapter(tmp_path, lambda m: metrics(next(scores)), TimeBudget(0))
    saved = {}
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    for step in (1, 2, 3):
        with torch.no_grad():
            lora_b.fill_(step)
        save_adapter(model, tmp_path, args, {"global_step": step})
        saved[step] = load_file(tmp_path / ADAPTER_DIR / "adapter_model.safetensors")
        best.validate(model, step, train_loss=1.0 / step)
    assert best.finish()["step"] == 2
    kept = load_file(tmp_path / ADAPTER_DIR / "adapter_model.safetensors")
    last = load_file(tmp_path / LAST_DIR / "adapter_model.safetensors")
    assert all(torch.equal(kept[k], saved[2][k]) and torch.equal(last[k], saved[3][k]) for k in kept)
    lines = [json.loads(line) for line in (tmp_path / "validation.jsonl").read_text().splitlines()]
    assert [e["f1"] for e in lines] == [0.2, 0.5, 0.3] and lines[1]["train_loss"] == 0.5
    assert load_model(tiny_alpaca, adapter_path=tmp_path / ADAPTER_DIR, device="cpu") is not None  # peft loads it


def test_validation_rows_are_never_the_test_set_nor_trained_on(tmp_path, monkeypatch):
    rows = load_data(MSRA)[:6]
    path = tmp_path / "v.txt"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[3:]), "utf-8")
    args = train_args([f"eval_f1_path={path}", "eval_f1_rows=2", "dev_path="])
    assert checks.validation_rows(args, rows[:3]) == rows[3:5]
    with pytest.raises(ConfigError, match="2 of its first 2 rows are also in train_path"):
        checks.validation_rows(args, rows)
    monkeypatch.setattr(checks, "TEST_FILE", path)
    with pytest.raises(ConfigError, match="is the test set test.py scores"):
        checks.validation_rows(args, rows[:3])
