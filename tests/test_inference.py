"""Generation, test.py, predict.py and chat_ner.py on a LoRA that memorized 12 MSRA rows.

The metric must not be vacuous: the memorized rows score F1 >= 0.9, unseen rows score low.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import MSRA, ROOT, import_script
from dataset import build_prompt
from llama_ner.generation.generate import generate_answers
from llama_ner.generation.ner_constraint import NerConstraint, text_of_query
from llama_ner.generation.ner_grammar import TextGrammar, vocab_of
from llama_ner.io_utils import UserError
from llama_ner.model_loading import load_model
from llama_ner.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def memorized_model(memorized):
    tokenizer = load_tokenizer(memorized["base"])
    model = load_model(memorized["base"], memorized["save_dir"] / "adapter_model", "float32", "cpu", tokenizer)
    return model, tokenizer


def run_script(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=600)


def recount(records: list[dict]) -> tuple[int, int, int]:
    """tp, fp, fn recounted from test_predictions.jsonl, independently of metrics.py."""
    pattern = re.compile(r"^\s*(.+?)\s*_\s*([^_\n]+?)\s*$", re.M)
    tp = fp = fn = 0
    for r in records:
        gold, pred = set(pattern.findall(r["answer"])), set(pattern.findall(r["prediction"]))
        tp, fp, fn = tp + len(gold & pred), fp + len(pred - gold), fn + len(gold - pred)
    return tp, fp, fn


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert re.match(r"^(config |data )?error: ", last), last
    for needle in needles:
        assert needle in last, last


# ---- generation ---------------------------------------------------------------------------


def reference_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy decoding the slow, obvious way: full forward pass per token, no cache, no padding."""
    ids = tokenizer.encode(prompt, add_special_tokens=True)
    new = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_generate_matches_uncached_reference(memorized, memorized_model):
    model, tokenizer = memorized_model
    rows = [memorized["seen_rows"][0], memorized["unseen_rows"][0]]
    prompts = [build_prompt(r["instruct"], r["query"]) for r in rows]
    got = generate_answers(model, tokenizer, prompts, batch_size=2, max_new_tokens=20, progress=False)
    assert got == [reference_greedy(model, tokenizer, p, 20) for p in prompts]
    assert got[0] == rows[0]["answer"]


def test_batch_16_equals_batch_1(memorized, memorized_model):
    model, tokenizer = memorized_model
    rows = memorized["seen_rows"] + memorized["unseen_rows"][:4]
    prompts = [build_prompt(r["instruct"], r["query"]) for r in rows]
    lengths = {len(tokenizer.encode(p)) for p in prompts}
    assert len(lengths) > 8  # left padding really happens
    batched = generate_answers(model, tokenizer, prompts, batch_size=16, max_new_tokens=64, progress=False)
    single = generate_answers(model, tokenizer, prompts, batch_size=1, max_new_tokens=64, progress=False)
    assert batched == single
    assert batched[:12] == [r["answer"] for r in memorized["seen_rows"]]


def test_continuous_batching_gives_generates_answers(memorized, memorized_model, monkeypatch):
    """Batch 3 over 16 prompts whose answers end at different steps: finished answers leave the batch and
    waiting prompts join it (continuous.py), and the answers are transformers' generate's, batch by batch,
    with and without the constraint and the shared prefix's cache."""
    from llama_ner.generation import continuous

    joins = []
    join = continuous.Running.join
    monkeypatch.setattr(continuous.Running, "join", lambda self, other: joins.append(other.size) or join(self, other))
    model, tokenizer = memorized_model
    rows = memorized["seen_rows"] + memorized["unseen_rows"][:4]
    prompts = [build_prompt(r["instruct"], r["query"]) for r in rows]
    texts = [text_of_query(r["query"]) for r in rows]
    for prefix_cache in (True, False):
        for constrained in (False, True):
            answers = {}
            for way in (True, False):
                constraint = NerConstraint(tokenizer, texts, ("人名", "地名", "机构名")) if constrained else None
                answers[way] = generate_answers(model, tokenizer, prompts, 3, 64, progress=False, constraint=constraint,
                                                prefix_cache=prefix_cache, continuous=way)  # fmt: skip
            assert answers[True] == answers[False], (prefix_cache, constrained)
            assert answers[True][:12] == [r["answer"] for r in memorized["seen_rows"]]
    assert len(joins) >= 4 * 5  # prompts joined a running batch in every one of the four runs
    assert len({len(a) for a in answers[True]}) > 3  # the answers did end at different steps


# ---- constrained decoding (ner_constraint.py) ----------------------------------------------------


def grounded(text: str, answer: str, types: tuple[str, ...] = ("人名", "地名", "机构名")) -> bool:
    """`没有`, or distinct `entity_type` lines, each entity in the text, each type in `types` (plain string checks)."""
    lines = answer.split("\n")
    if answer == "没有":
        return True
    pairs = [line.rpartition("_") for line in lines]
    return len(set(lines)) == len(lines) and all(
        sep and kind in types and entity and entity == entity.strip() and entity in text for entity, sep, kind in pairs
    )


def test_constrained_greedy_keeps_valid_answers(memorized, memorized_model):
    """Where plain greedy decoding already gives a valid answer, the constrained answer is the same."""
    model, tokenizer = memorized_model
    rows = memorized["seen_rows"] + memorized["unseen_rows"][:4]
    prompts = [build_prompt(r["instruct"], r["query"]) for r in rows]
    texts = [text_of_query(r["query"]) for r in rows]
    plain = generate_answers(model, tokenizer, prompts, batch_size=16, max_new_tokens=64, progress=False)
    constraint = NerConstraint(tokenizer, texts, ("人名", "地名", "机构名"))
    constrained = generate_answers(model, tokenizer, prompts, 16, 64, progress=False, constraint=constraint)
    assert constrained[:12] == plain[:12] == [r["answer"] for r in memorized["seen_rows"]]
    for text, got, free in zip(texts, constrained, plain, strict=True):
        assert grounded(text, got), (text, got)
        if TextGrammar(text, constraint.types, vocab_of(tokenizer)).is_valid(free):
            assert got == free


def test_test_py_and_predict_py_constrain_by_default(memorized, tmp_path):
    """On a random model, with no --constrained flag, every answer is valid; with --constrained=false
    they are not (so the check can fail). predict.py, also without the flag, answers as test.py."""
    test_script = import_script("test")
    args = [f"--train_args_path={memorized['train_args']}", "--adapter_path=none", "--max_new_tokens=24"]
    args += ["--eval_batch_size=16"]
    results = {}
    for flags in ([], ["--constrained=false"]):
        out = tmp_path / ("default" if not flags else "false")
        metrics = test_script.main([*args, f"--dev_path={memorized['unseen']}", f"--output_dir={out}", *flags])
        saved = json.loads((out / "test_metrics.json").read_text(encoding="utf-8"))
        records = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text("utf-8").splitlines()]
        assert saved["constrained"] is (not flags) and saved["malformed"] == metrics["malformed"]
        results[out.name] = (metrics, records)
    metrics, records = results["default"]
    assert metrics["malformed"] == 0 and set(metrics["entity_types"]) == {"人名", "地名", "机构名"}  # from train_path
    assert all(grounded(text_of_query(r["query"]), r["prediction"]) for r in records)
    predicted = import_script("predict").main([*args, f"--predict_path={memorized['unseen']}"])
    assert predicted == [r["prediction"] for r in records]
    metrics, records = results["false"]
    assert metrics["malformed"] > 0
    assert not all(grounded(text_of_query(r["query"]), r["prediction"]) for r in records)


def test_test_py_takes_the_entity_types_from_the_training_data(memorized, tmp_path):
    """An adapter trained before train_args.json recorded its types: another dataset's types (药物/症状,
    from train_path's answers) are the only ones the answers use."""
    train = tmp_path / "train.txt"
    rows = [{"instruct": "x", "query": "文本：头痛", "answer": "阿司匹林_药物\n头痛_症状"}]
    train.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    train_args = json.loads(memorized["train_args"].read_text(encoding="utf-8"))
    del train_args["trained_entity_types"]
    old_args = tmp_path / "train_args.json"
    old_args.write_text(json.dumps(train_args, ensure_ascii=False), encoding="utf-8")
    args = [f"--train_args_path={old_args}", "--adapter_path=none", "--max_new_tokens=24"]
    args += [f"--train_path={train}", f"--dev_path={memorized['unseen']}", "--max_rows=6", f"--output_dir={tmp_path}"]
    metrics = import_script("test").main(args)
    saved = json.loads((tmp_path / "test_metrics.json").read_text(encoding="utf-8"))
    assert metrics["entity_types"] == saved["entity_types"] == ["药物", "症状"] and metrics["malformed"] == 0
    records = [json.loads(line) for line in (tmp_path / "test_predictions.jsonl").read_text("utf-8").splitlines()]
    types = ("药物", "症状")
    assert all(grounded(text_of_query(r["query"]), r["prediction"], types) for r in records)
    assert any(r["prediction"] != "没有" for r in records)  # typed lines were generated, not only 没有


def test_test_py_answers_texts_longer_than_the_trained_ones_in_windows(memorized, tmp_path, capsys):
    """Three memorized sentences in one row, longer than any the adapter was trained on (auto: train_args.json's
    trained_text_chars): each window is one sentence, and the merged answer is exactly the union of theirs."""
    seen = memorized["seen_rows"]
    parts = [seen[4], seen[9], seen[5]]  # 74, 66 and 32 characters, each ending in 。
    text = "".join(r["query"].removeprefix("文本：") for r in parts)
    answer = "\n".join(line for r in parts for line in r["answer"].split("\n"))
    dev = tmp_path / "long.txt"
    dev.write_text(json.dumps({**parts[0], "query": "文本：" + text, "answer": answer}, ensure_ascii=False) + "\n")
    train_args = json.loads(memorized["train_args"].read_text(encoding="utf-8"))
    train_args["trained_text_chars"] = 74  # as training records its longest text
    args_file = tmp_path / "train_args.json"
    args_file.write_text(json.dumps(train_args, ensure_ascii=False), encoding="utf-8")
    argv = [f"--train_args_path={args_file}", f"--dev_path={dev}", f"--output_dir={tmp_path}"]
    metrics = import_script("test").main(argv)
    assert "1 texts longer than 74 characters are answered in 3 windows" in capsys.readouterr().out
    record = json.loads((tmp_path / "test_predictions.jsonl").read_text(encoding="utf-8"))
    assert record["prediction"].split("\n") == list(dict.fromkeys(answer.split("\n")))  # in the text's order
    assert metrics["f1"] == 1.0 and metrics["span_level"]["f1"] == 1.0


def test_chat_ner_constrained(memorized, tmp_path, monkeypatch):
    """chat_ner.py --ner on a random model, sampling: valid answers with no --constrained flag (sampled
    among the allowed tokens), not with --constrained false."""
    texts = [r["query"].removeprefix("文本：") for r in memorized["unseen_rows"][:4]]
    data = tmp_path / "inputs.txt"
    data.write_text("\n".join(texts) + "\n", encoding="utf-8")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    chat = import_script("chat_ner")
    argv = ["--base_model", str(memorized["base"]), "--only_cpu", "--ner", "--data_file", str(data)]
    argv += ["--max_new_tokens", "24", "--seed", "0", "--temperature", "0.8"]
    outputs = {}
    for flags in ([], ["--constrained", "false"]):
        out = tmp_path / ("default" if not flags else "false") / "predictions.json"
        chat.main([*argv, "--predictions_file", str(out), *flags])
        outputs[out.parent.name] = [r["Output"] for r in json.loads(out.read_text(encoding="utf-8"))]
    assert all(grounded(t, a) for t, a in zip(texts, outputs["default"], strict=True)), outputs["default"]
    assert not all(grounded(t, a) for t, a in zip(texts, outputs["false"], strict=True))


# ---- test.py --------------------------------------------------------------------------------


@pytest.mark.slow
def test_test_py_scores_memorized_rows_high(memorized):
    proc = run_script("test.py", f"--train_args_path={memorized['train_args']}", "--eval_batch_size=5")
    assert proc.returncode == 0, proc.stderr
    save_dir = memorized["save_dir"]
    metrics = json.loads((save_dir / "test_metrics.json").read_text(encoding="utf-8"))
    records = [json.loads(line) for line in (save_dir / "test_predictions.jsonl").read_text("utf-8").splitlines()]
    assert metrics["f1"] >= 0.9
    assert metrics["n"] == len(records) == 12
    assert [r["query"] for r in records] == [r["query"] for r in memorized["seen_rows"]]
    assert [r["answer"] for r in records] == [r["answer"] for r in memorized["seen_rows"]]
    tp, fp, fn = recount(records)
    assert (metrics["tp"], metrics["fp"], metrics["fn"]) == (tp, fp, fn)
    assert metrics["precision"] == pytest.approx(tp / (tp + fp))
    assert metrics["recall"] == pytest.approx(tp / (tp + fn))
    assert set(metrics["per_type"]) >= {"人名", "地名", "机构名"}
    assert "micro" in proc.stdout and f"{metrics['f1']:.4f}" in proc.stdout
    spans = metrics["span_level"]  # every answered entity at every place it occurs: at least as many as pairs
    assert spans["f1"] >= 0.9 and spans["tp"] + spans["fn"] >= tp + fn and f"{spans['f1']:.4f}" in proc.stdout
    errors = json.loads((save_dir / "test_errors.json").read_text(encoding="utf-8"))
    assert set(errors) == {"missed", "wrong_type", "spurious"}
    assert sum(n for table in errors.values() for items in table.values() for _, n in items) <= fp + fn


def test_test_py_scores_unseen_rows_low(memorized, tmp_path):
    test_script = import_script("test")
    metrics = test_script.main(
        [
            f"--train_args_path={memorized['train_args']}",
            f"--dev_path={memorized['unseen']}",
            f"--output_dir={tmp_path}",
            "--max_new_tokens=32",
        ]
    )
    assert metrics["f1"] < 0.3
    records = [json.loads(line) for line in (tmp_path / "test_predictions.jsonl").read_text("utf-8").splitlines()]
    assert recount(records) == (metrics["tp"], metrics["fp"], metrics["fn"])
    assert json.loads((tmp_path / "test_metrics.json").read_text("utf-8"))["f1"] == metrics["f1"]


def test_test_py_merged_model_without_adapter(memorized, tmp_path):
    """adapter_path=none evaluates model_dir alone: the random base knows nothing."""
    metrics = import_script("test").main(
        [
            f"--train_args_path={memorized['train_args']}",
            "--adapter_path=none",
            f"--output_dir={tmp_path}",
            "--max_new_tokens=8",
            "--max_rows=4",
        ]
    )
    assert metrics["n"] == 4 and metrics["f1"] < 0.3


def test_test_py_missing_train_args(tmp_path):
    proc = run_script("test.py", f"--train_args_path={tmp_path / 'nowhere' / 'train_args.json'}")
    assert_one_line_error(proc, "train_args.json not found")


def test_test_py_missing_adapter(memorized, tmp_path):
    proc = run_script(
        "test.py",
        f"--train_args_path={memorized['train_args']}",
        f"--adapter_path={tmp_path / 'no_adapter'}",
        f"--output_dir={tmp_path}",
    )
    assert_one_line_error(proc, "no_adapter", "adapter_config.json")
    assert not (tmp_path / "test_metrics.json").exists()


def test_test_py_bad_data_line(memorized, tmp_path):
    lines = memorized["seen"].read_text(encoding="utf-8").splitlines()
    bad = tmp_path / "dev.txt"
    bad.write_text("\n".join([lines[0], lines[1], '{"instruct": "x", "answer": ', lines[2]]) + "\n", encoding="utf-8")
    proc = run_script(
        "test.py", f"--train_args_path={memorized['train_args']}", f"--dev_path={bad}", f"--output_dir={tmp_path}"
    )
    assert_one_line_error(proc, f"{bad}:3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.txt"]


def fake_train_args(tmp_path) -> str:
    """A train_args.json whose model does not exist: enough for the checks that come before loading."""
    from llama_ner.training.train_config import TRAIN_DEFAULTS

    path = tmp_path / "train_args.json"
    run = {"model_dir": str(tmp_path / "no_model"), "save_dir": str(tmp_path), "dev_path": str(MSRA)}
    path.write_text(json.dumps({**TRAIN_DEFAULTS, **run}), encoding="utf-8")
    return f"--train_args_path={path}"


@pytest.mark.parametrize("script", ["test.py", "predict.py"])
def test_a_bad_device_is_one_line_naming_the_key_and_the_valid_values(script, tmp_path):
    proc = run_script(script, fake_train_args(tmp_path), "--device=gpu0")
    assert_one_line_error(proc, "device='gpu0': use cpu, cuda, cuda:N")


@pytest.mark.parametrize("script", ["test", "predict"])
def test_a_gpu_this_machine_lacks_fails_before_loading(script, tmp_path):
    import torch

    device = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, on any machine
    with pytest.raises(UserError, match=f"device={device}: this machine has .*; pass --device=cpu"):
        import_script(script).main([fake_train_args(tmp_path), f"--device={device}"])


def test_test_py_unknown_key(memorized):
    with pytest.raises(UserError, match="eval_batch_size"):
        import_script("test").main([f"--train_args_path={memorized['train_args']}", "--eval_batchsize=4"])


# ---- predict.py -----------------------------------------------------------------------------


def test_predict_plain_text_and_json_lines(memorized, tmp_path, capsys):
    predict = import_script("predict")
    texts = [r["query"].removeprefix("文本：") for r in memorized["seen_rows"][:3]]
    plain = tmp_path / "texts.txt"
    plain.write_text("\n".join(texts) + "\n\n", encoding="utf-8")
    args = [f"--train_args_path={memorized['train_args']}", "--max_new_tokens=64"]
    assert predict.main([*args, f"--predict_path={plain}"]) == [r["answer"] for r in memorized["seen_rows"][:3]]
    out = capsys.readouterr().out
    assert out.count("文本 >>> ") == 3 and out.count("预测 >>> ") == 3 and "真实 >>> " not in out
    predictions = predict.main([*args, f"--predict_path={memorized['seen']}", "--max_rows=2"])
    out = capsys.readouterr().out
    assert predictions == [r["answer"] for r in memorized["seen_rows"][:2]]
    assert out.count("真实 >>> ") == 2 and "f1 1.0000" in out


def test_predict_tags_a_file_with_character_spans(memorized, tmp_path, capsys):
    """--output_path: one JSON line a sentence, each entity with every place it occurs (checked by slicing)."""
    predict = import_script("predict")
    rows = [r for r in memorized["seen_rows"] if r["answer"] != "没有"][:3]
    texts = [r["query"].removeprefix("文本：") for r in rows]
    plain = tmp_path / "texts.txt"
    plain.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "tagged.jsonl"
    args = [f"--train_args_path={memorized['train_args']}", "--max_new_tokens=64", f"--predict_path={plain}"]
    predict.main([*args, f"--output_path={out}"])
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in records] == texts and [r["answer"] for r in records] == [r["answer"] for r in rows]
    for record in records:
        answered = [line.rpartition("_") for line in record["answer"].splitlines()]
        assert [(e["text"], e["type"]) for e in record["entities"]] == [(a, k) for a, _, k in answered]
        for entity in record["entities"]:
            assert entity["spans"] and all(record["text"][s:e] == entity["text"] for s, e in entity["spans"])
            assert len(entity["spans"]) == record["text"].count(entity["text"])  # no repeat overlaps here
    printed = capsys.readouterr().out
    assert "文本 >>> " not in printed and f"wrote {out}" in printed
    from llama_ner.io_utils import UserError

    with pytest.raises(UserError, match="input"):  # never over the input, before any model loads
        predict.main([*args, f"--output_path={plain}"])


def test_predict_builtin_examples(memorized, memorized_model, capsys):
    """Without --predict_path: the three built-in examples, generated as generate_answers does, shown with gold."""
    predict = import_script("predict")
    predictions = predict.main(
        [f"--train_args_path={memorized['train_args']}", "--max_new_tokens=16", "--constrained=false"]
    )
    out = capsys.readouterr().out
    model, tokenizer = memorized_model
    prompts = [build_prompt(e["instruct"], e["query"]) for e in predict.EXAMPLES]
    assert predictions == generate_answers(model, tokenizer, prompts, max_new_tokens=16, progress=False)
    for example, prediction in zip(predict.EXAMPLES, predictions, strict=True):
        assert f"预测 >>>  {prediction}\n真实 >>>  {example['answer']}\n" in out
    assert "3 texts predicted; against the gold answers: precision" in out


def test_predict_bad_json_line(memorized, tmp_path):
    bad = tmp_path / "rows.txt"
    bad.write_text('{"instruct": "a", "query": "b"}\nnot json\n', encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(f"{bad}:2")):
        import_script("predict").main([f"--train_args_path={memorized['train_args']}", f"--predict_path={bad}"])


# ---- chat_ner.py ----------------------------------------------------------------------------


def chat_args(memorized, *extra: str) -> list[str]:
    """chat_ner.py --ner on the memorized adapter, without sampling options: it must decode as test.py."""
    adapter = str(memorized["save_dir"] / "adapter_model")
    return [
        "chat_ner.py",
        "--base_model",
        str(memorized["base"]),
        "--lora_model",
        adapter,
        "--only_cpu",
        "--ner",
        *extra,
    ]


def assert_quiet_start(proc: subprocess.CompletedProcess) -> None:
    """One decoding line, and no library warnings among our lines."""
    decoding = [line for line in proc.stdout.splitlines() if line.startswith("decoding: ")]
    assert decoding == [
        "decoding: greedy, repetition_penalty 1.0, max_new_tokens 256 (as test.py; pass --temperature etc. to sample)"
    ]
    assert "warning" not in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["\n\n", ""], ids=["empty-line", "eof"])
def test_chat_interactive_stdin(memorized, ner_reference, ending):
    stdin = "\n".join(ner_reference["texts"]) + ending
    proc = run_script(*chat_args(memorized, "--interactive"), stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    responses = re.findall(r"Response:  (.*?)\n\n\n", proc.stdout, re.S)
    assert responses == ner_reference["answers"]
    assert_quiet_start(proc)


@pytest.mark.slow
def test_chat_data_file_writes_predictions(memorized, ner_reference, tmp_path):
    data = tmp_path / "inputs.txt"
    data.write_text("\n".join(ner_reference["texts"]) + "\n", encoding="utf-8")
    out = tmp_path / "out" / "predictions.json"
    proc = run_script(*chat_args(memorized, "--data_file", str(data), "--predictions_file", str(out)))
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text(encoding="utf-8"))
    assert [r["Output"] for r in results] == ner_reference["answers"]
    row = memorized["seen_rows"][0]
    assert results[0]["Input"] == build_prompt(row["instruct"], row["query"])
    settings = json.loads((out.parent / "generation_config.json").read_text(encoding="utf-8"))
    assert settings == {"num_beams": 1, "do_sample": False, "max_new_tokens": 256}
    assert_quiet_start(proc)


def test_chat_decoding_defaults():
    """--ner decodes as test.py unless sampling options are given; chat keeps the original's sampling."""
    chat_ner = import_script("chat_ner")

    def settings(*argv: str) -> dict:
        return chat_ner.generation_config(chat_ner.parse_args(["--base_model", "m", *argv]))

    assert settings("--ner") == {"num_beams": 1, "do_sample": False, "max_new_tokens": 256}
    assert settings("--ner", "--max_new_tokens", "64")["max_new_tokens"] == 64
    sampled = settings("--ner", "--temperature", "0.5")
    assert sampled == {
        "num_beams": 1,
        "do_sample": True,
        "temperature": 0.5,
        "top_k": 40,
        "top_p": 0.9,
        "max_new_tokens": 256,
    }
    assert settings("--ner", "--repetition_penalty", "1.3")["repetition_penalty"] == 1.3
    chat = {"num_beams": 1, "repetition_penalty": 1.3, "do_sample": True, "temperature": 0.2, "top_k": 40, "top_p": 0.9}
    assert settings("--with_prompt") == {**chat, "max_new_tokens": 400}
    assert chat_ner.describe_decoding(settings("--ner", "--temperature", "0.5"), True) == (
        "decoding: sampling (temperature 0.5, top_k 40, top_p 0.9), repetition_penalty 1.0, max_new_tokens 256"
    )


def test_chat_tokenizer_smaller_than_model(memorized, chinese_tokenizer_dir):
    proc = run_script(*chat_args(memorized, "--tokenizer_path", str(chinese_tokenizer_dir)), stdin="")
    assert_one_line_error(proc, "49953", "49954")


def test_chat_missing_data_file(memorized, tmp_path):
    proc = run_script(*chat_args(memorized, "--data_file", str(tmp_path / "none.txt")))
    assert_one_line_error(proc, "none.txt")


def test_chat_grows_embeddings_to_a_larger_tokenizer(tmp_path, alpaca_tokenizer_dir, monkeypatch, capsys):
    from llama_ner.tiny_models import make_tiny_model

    base = make_tiny_model(tmp_path / "tiny-chinese", "chinese")  # 49953 rows; Alpaca's tokenizer has 49954
    data = tmp_path / "inputs.txt"
    data.write_text("你好\n", encoding="utf-8")
    out = tmp_path / "predictions.json"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    argv = ["--base_model", str(base), "--tokenizer_path", str(alpaca_tokenizer_dir), "--only_cpu", "--with_prompt"]
    argv += ["--data_file", str(data), "--predictions_file", str(out), "--max_new_tokens", "4"]
    import_script("chat_ner").main(argv)
    assert "resizing embeddings 49953 -> 49954" in capsys.readouterr().out
    assert len(json.loads(out.read_text(encoding="utf-8"))) == 1
