"""dataset.py: loading errors, the prompt, collate shapes, labels and truncation."""

import json
from types import SimpleNamespace

import pytest

from conftest import ROOT
from dataset import IGNORE_INDEX, PROMPT_TEMPLATE, DataError, NerCollate, build_prompt, load_data
from llama_ner.tokenizer import load_tokenizer

MSRA = ROOT / "tests/data/msra_dev_instruct.txt"
COLUMNS = ("instruct", "query", "answer")


def collate_args(max_seq_length=256, multiple=1):
    return SimpleNamespace(
        instruct_column="instruct",
        query_column="query",
        response_column="answer",
        max_seq_length=max_seq_length,
        pad_to_multiple_of=multiple,
    )


@pytest.fixture(scope="module")
def tokenizer(alpaca_tokenizer_dir):
    return load_tokenizer(alpaca_tokenizer_dir)


@pytest.fixture(scope="module")
def rows():
    return load_data(MSRA, COLUMNS)[:8]


def test_prompt_is_the_alpaca_template():
    assert build_prompt("指令", "文本：abc") == PROMPT_TEMPLATE.format(instruction="指令\n文本：abc")
    assert build_prompt("指令") == PROMPT_TEMPLATE.format(instruction="指令")
    assert build_prompt("x").endswith("### Response: ")


def test_load_data_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "d.txt"
    bad.write_text('{"instruct": "a", "query": "b", "answer": "c"}\n{"instruct": "a"\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.txt:2"):
        load_data(bad, COLUMNS)
    bad.write_text('{"instruct": "a", "query": "b", "answer": "c"}\n\n{"instruct": "a", "query": "b"}\n')
    with pytest.raises(DataError, match=r"d.txt:3: missing column 'answer'"):
        load_data(bad, COLUMNS)
    bad.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_data(bad, COLUMNS)
    with pytest.raises(DataError, match="not found"):
        load_data(tmp_path / "nope.txt", COLUMNS)


def test_collate_labels_mask_prompt_and_padding(tokenizer, rows):
    batch = NerCollate(collate_args(), tokenizer).collate_fn(rows)
    input_ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert input_ids.shape == labels.shape == mask.shape
    for i, row in enumerate(rows):
        prompt_ids = tokenizer.encode(build_prompt(row["instruct"], row["query"]))
        answer_ids = tokenizer.encode(row["answer"], add_special_tokens=False) + [2]
        n = len(prompt_ids) + len(answer_ids)
        assert input_ids[i, :n].tolist() == prompt_ids + answer_ids
        assert labels[i, : len(prompt_ids)].eq(IGNORE_INDEX).all()
        assert labels[i, len(prompt_ids) : n].tolist() == answer_ids  # the answer and </s> are learned
        assert labels[i, n:].eq(IGNORE_INDEX).all() and mask[i, n:].eq(0).all() and mask[i, :n].eq(1).all()
        assert input_ids[i, n:].eq(tokenizer.pad_token_id).all()


def test_batch_padded_to_its_own_longest_row(tokenizer, rows):
    collate = NerCollate(collate_args(), tokenizer)
    lengths = [len(collate.encode(r)[0]) for r in rows]
    assert collate.collate_fn(rows)["input_ids"].shape[1] == max(lengths)
    assert collate.collate_fn(rows[:1])["input_ids"].shape[1] == lengths[0]
    width = NerCollate(collate_args(multiple=8), tokenizer).collate_fn(rows)["input_ids"].shape[1]
    assert width % 8 == 0 and max(lengths) <= width < max(lengths) + 8


def test_multiple_of_8_never_exceeds_max_seq_length(tokenizer, rows):
    batch = NerCollate(collate_args(max_seq_length=101, multiple=8), tokenizer).collate_fn(rows)
    assert batch["input_ids"].shape[1] == 101


def test_truncation_cuts_the_query_and_keeps_the_answer(tokenizer, rows):
    row = max(rows, key=lambda r: len(r["query"]))
    answer_ids = tokenizer.encode(row["answer"], add_special_tokens=False) + [2]
    full = len(NerCollate(collate_args(), tokenizer).encode(row)[0])
    for limit in (full - 5, full - 20):
        batch = NerCollate(collate_args(max_seq_length=limit), tokenizer).collate_fn([json.dumps(row)])
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        assert len(ids) <= limit and ids[0] == 1
        assert ids[len(ids) - len(answer_ids) :] == answer_ids
        assert [x for x in labels if x != IGNORE_INDEX] == answer_ids
        prompt = tokenizer.decode(ids[: len(ids) - len(answer_ids)], skip_special_tokens=True)
        assert prompt.endswith("### Response: ")  # the template's end is intact
        query = prompt.split("文本：")[1].split("\n\n###")[0]
        assert 0 < len(query) < len(row["query"]) - 3 and row["query"].startswith("文本：" + query)


def test_truncation_ends_when_the_instruction_alone_is_too_long(tokenizer, rows):
    limit = 40  # the instruction alone is ~90 tokens
    batch = NerCollate(collate_args(max_seq_length=limit), tokenizer).collate_fn(rows)
    assert batch["input_ids"].shape[1] <= limit
    for i, row in enumerate(rows):
        answer_ids = tokenizer.encode(row["answer"], add_special_tokens=False) + [2]
        learned = [x for x in batch["labels"][i].tolist() if x != IGNORE_INDEX]
        assert learned == answer_ids[: limit - 1]


def test_training_config_pads_to_a_multiple(tokenizer, rows):
    from llama_ner.training.model import TrainCollate
    from llama_ner.training.train_config import TRAIN_DEFAULTS, parse_train_args

    args = parse_train_args(TRAIN_DEFAULTS, "", ["pad_to_multiple_of=8", "max_seq_length=256"])
    batch = TrainCollate(args, tokenizer).collate_fn(rows)
    longest = max(len(NerCollate(args, tokenizer).encode(r)[0]) for r in rows)
    assert batch["input_ids"].shape[1] % 8 == 0 and longest <= batch["input_ids"].shape[1] < longest + 8


def test_inference_cuts_long_inputs_as_training_does(tokenizer, rows, capsys):
    from llama_ner.generation.generate import encode_prompts
    from llama_ner.io_utils import UserError

    short, long = rows[0], dict(rows[1], query=rows[1]["query"] * 50)
    prompts = [build_prompt(r["instruct"], r["query"]) for r in (short, long)]
    ids = encode_prompts(300, tokenizer, prompts, max_new_tokens=100)
    assert ids[0] == tokenizer.encode(prompts[0]) and len(ids[1]) == 200
    answer_ids = tokenizer.encode(long["answer"], add_special_tokens=False) + [2]
    trained, _ = NerCollate(collate_args(max_seq_length=200 + len(answer_ids)), tokenizer).encode(long)
    assert ids[1] == trained[:200]  # the very prompt training would have seen with that budget
    assert "1 input(s) longer than the model takes were cut to 200 tokens" in capsys.readouterr().err
    with pytest.raises(UserError, match="max_new_tokens=300 leaves no room"):
        encode_prompts(300, tokenizer, prompts, max_new_tokens=300)
