"""process.py: both MSRA formats, the published test-set counts, the original's rows, errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, import_script
from dataset import NER_INSTRUCTION, DataError
from llama_ner.io_utils import UserError

process = import_script("process")
ORI = ROOT / "data/msra/ori_data"
REFERENCE_ROWS = ROOT / "tests/data/msra_dev_instruct.txt"  # the original tool's output on msra_1000


def read_rows(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_official_test_set_dev_mode_counts(tmp_path):
    out = tmp_path / "dev.txt"
    counts = process.convert(ORI / "msra_test_bio.txt", out, "dev")
    rows = read_rows(out)
    assert len(rows) == 1975
    assert sum(len(r["answer"].split("\n")) for r in rows) == 5483
    # published MSRA test statistics: mentions per type
    assert (counts["地名"], counts["人名"], counts["机构名"]) == (2886, 1973, 1331)


def test_official_test_set_train_mode_keeps_every_sentence(tmp_path):
    out = tmp_path / "train.txt"
    process.convert(ORI / "msra_test_bio.txt", out, "train")
    rows = read_rows(out)
    assert len(rows) == 3442
    assert sum(len(r["query"]) - len("文本：") for r in rows) == 172601  # published character count


def test_json_lines_reproduce_the_original_tools_rows(tmp_path):
    process.convert(ORI / "msra_1000.txt", tmp_path / "train.txt", "train")
    process.convert(ORI / "msra_1000.txt", tmp_path / "dev.txt", "dev")
    reference = (REFERENCE_ROWS).read_text(encoding="utf-8").splitlines()
    ours_train = (tmp_path / "train.txt").read_text(encoding="utf-8").splitlines()
    ours_dev = (tmp_path / "dev.txt").read_text(encoding="utf-8").splitlines()
    assert set(ours_train) == set(reference)
    assert ours_dev == reference[: len(ours_dev)]  # the reference lists entity rows first, in order
    assert all(json.loads(line)["answer"] != "没有" for line in ours_dev)


def test_row_shape_and_answer_order(tmp_path):
    process.convert(ORI / "msra_1000.txt", tmp_path / "dev.txt", "dev")
    row = read_rows(tmp_path / "dev.txt")[1]
    assert row["instruct"] == NER_INSTRUCTION == read_rows(REFERENCE_ROWS)[1]["instruct"]
    assert row["query"].startswith("文本：")
    assert row["answer"].split("\n")[0] == "北京_地名"


def test_bio_distinct_pairs_in_first_appearance_order(tmp_path):
    bio = tmp_path / "x.bio"
    lines = [
        "北\tB-LOC",
        "京\tI-LOC",
        "和\tO",
        "张\tB-PER",
        "三\tI-PER",
        "去\tO",
        "北\tB-LOC",
        "京\tI-LOC",
        "",
        "好\tO",
        "",
        "",
    ]
    bio.write_text("\n".join(lines), encoding="utf-8")
    process.convert(bio, tmp_path / "o.txt", "train")
    rows = read_rows(tmp_path / "o.txt")
    assert [r["answer"] for r in rows] == ["北京_地名\n张三_人名", "没有"]
    assert rows[0]["query"] == "文本：北京和张三去北京"


def test_bio_adjacent_entities_and_stray_inside_tag(tmp_path):
    """An I- that continues no B- (the full MSRA train set has six, where a blank line cuts an entity) is an
    error naming its line; --loose_tags starts an entity there."""
    bio = tmp_path / "x.bio"
    bio.write_text("中\tB-ORG\n共\tI-ORG\n李\tB-PER\n四\tI-PER\n沪\tI-LOC\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"x.bio:5: I-LOC continues no B-LOC.*--loose_tags=true"):
        process.convert(bio, tmp_path / "o.txt", "train")
    assert not (tmp_path / "o.txt").exists()
    process.convert(bio, tmp_path / "o.txt", "train", loose_tags=True)
    assert read_rows(tmp_path / "o.txt")[0]["answer"] == "中共_机构名\n李四_人名\n沪_地名"


@pytest.mark.parametrize(
    "content,where",
    [
        ('{"text": "ab", "entity_list": []}\n{"text": "x"\n', ":2"),
        (
            '{"text": "ab", "entity_list": [{"entity_index": {"begin": 0, "end": 1}, "entity_type": "LOC", '
            '"entity": "b"}]}\n',
            ":1",
        ),
        (
            '{"text": "ab", "entity_list": [{"entity_index": {"begin": 1, "end": 3}, "entity_type": "MISC", '
            '"entity": "b"}]}\n',  # past the end of its text (an unknown type, MISC, keeps its name)
            ":1",
        ),
        ("北\tB-LOC\n京I-LOC\n", ":2"),  # neither a tab nor a space after the character
        ("北\tB-LOC\n京\tX-LOC\n", ":2"),
    ],
)
def test_malformed_input_names_file_and_line(tmp_path, content, where):
    bad = tmp_path / "bad.txt"
    bad.write_text(content, encoding="utf-8")
    out = tmp_path / "out.txt"
    with pytest.raises(DataError) as err:
        process.convert(bad, out, "train")
    assert f"bad.txt{where}" in str(err.value)
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]  # nothing half-written


def test_cli_end_to_end_and_bad_mode(tmp_path):
    out = tmp_path / "dev.txt"
    run = subprocess.run(
        [sys.executable, "process.py", f"--in_file={ORI / 'msra_1000.txt'}", f"--out_file={out}", "--mode=dev"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "344 rows" in run.stdout and len(read_rows(out)) == 344
    run = subprocess.run(
        [sys.executable, "process.py", f"--in_file={ORI / 'msra_1000.txt'}", f"--out_file={out}", "--mode=test"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "mode" in run.stderr and "Traceback" not in run.stderr


def test_refuses_to_overwrite_its_input(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text((ORI / "msra_1000.txt").read_text(encoding="utf-8")[:2000].rsplit("\n", 1)[0] + "\n")
    before = src.read_bytes()
    with pytest.raises(UserError, match="input"):
        process.convert(src, src, "train")
    assert src.read_bytes() == before


def test_instruction_flag_changes_only_the_instruction(tmp_path):
    from dataset import SHORT_INSTRUCTION

    seed, short, own = (tmp_path / f"{name}.txt" for name in ("seed", "short", "own"))
    process.convert(ORI / "msra_1000.txt", seed, "dev")
    process.convert(ORI / "msra_1000.txt", short, "dev", "short")
    process.convert(ORI / "msra_1000.txt", own, "dev", "标出人名。")
    for path, instruction in ((seed, NER_INSTRUCTION), (short, SHORT_INSTRUCTION), (own, "标出人名。")):
        rows = read_rows(path)
        assert {r["instruct"] for r in rows} == {instruction}
        assert [(r["query"], r["answer"]) for r in rows] == [(r["query"], r["answer"]) for r in read_rows(seed)]
    with pytest.raises(DataError, match="instruction is empty"):
        process.convert(ORI / "msra_1000.txt", tmp_path / "x.txt", "dev", " ")


def test_the_trained_instruction_is_what_plain_sentences_are_asked_with(tmp_path):
    """train_args.json's ner_instruction (the one the training rows share) reaches test/predict's and
    chat/serve's prompts for plain sentences; without it, the seed's instruction as before."""
    import argparse

    from config_utils import Config
    from dataset import SHORT_INSTRUCTION, prompt_format, shared_instruction
    from llama_ner.generation.inference import ner_prompt
    from llama_ner.generation.loading import add_model_args, spec_from_args, spec_from_config

    rows = [{"instruct": SHORT_INSTRUCTION}] * 3 + [{"instruct": "other"}]
    assert shared_instruction(rows) == SHORT_INSTRUCTION
    assert ner_prompt("北京", prompt_format("raw")) == f"{NER_INSTRUCTION}\n文本：北京\n"
    trained = {"model_dir": "m", "save_dir": "s", "response_column": "answer", "constrained": False}
    config = Config({**trained, "prompt_template": "raw", "ner_instruction": SHORT_INSTRUCTION})
    assert ner_prompt("北京", spec_from_config(config).prompt_format(None)) == f"{SHORT_INSTRUCTION}\n文本：北京\n"
    (tmp_path / "train_args.json").write_text(json.dumps({"prompt_template": "raw", "ner_instruction": "标出人名。"}))
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    args = parser.parse_args(["--base_model", "m", "--lora_model", str(tmp_path)])
    assert ner_prompt("北京", spec_from_args(args, with_types=False).prompt_format(None)) == "标出人名。\n文本：北京\n"
