"""process.py on the annotation tools' formats: the same MSRA sentences written in each become exactly the
same instruction rows; any types with their names; the dev split; bad input named by file and line."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, import_script
from dataset import DataError
from llama_ner.annotations import read_annotated

process = import_script("process")
MSRA_BIO = ROOT / "data/msra/ori_data/msra_test_bio.txt"


@pytest.fixture(scope="module")
def msra_sentences():
    """The first 300 sentences of the official test set, read from its BIO file by a reader of our own."""
    sentences = []
    for block in MSRA_BIO.read_text(encoding="utf-8").split("\n\n")[:300]:
        pairs = [line.split("\t") for line in block.splitlines() if line.strip()]
        text = "".join(char for char, _ in pairs)
        spans, start = [], None
        for i, (_, tag) in enumerate([*pairs, ("", "O")]):
            if start is not None and not tag.startswith("I-"):
                spans.append((start, i, pairs[start][1][2:]))
                start = None
            if tag.startswith("B-"):
                start = i
        sentences.append((text, spans))
    return sentences


def write_msra(sentences):
    rows = [
        {"text": t, "entity_list": [{"entity_index": {"begin": s, "end": e}, "entity_type": k, "entity": t[s:e]}
                                    for s, e, k in spans]}
        for t, spans in sentences
    ]  # fmt: skip
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_cluener(sentences):
    rows = []
    for text, spans in sentences:
        label: dict = {}
        for s, e, k in spans:
            label.setdefault(k, {}).setdefault(text[s:e], []).append([s, e - 1])
        rows.append({"text": text, "label": label})
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_doccano(sentences):
    rows = [{"text": t, "label": [[s, e, k] for s, e, k in spans]} for t, spans in sentences]
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_doccano_entities(sentences):
    rows = [{"id": i, "text": t, "entities": [{"id": j, "start_offset": s, "end_offset": e, "label": k}
                                              for j, (s, e, k) in enumerate(spans)]}
            for i, (t, spans) in enumerate(sentences)]  # fmt: skip
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_label_studio(sentences):
    tasks = [{"id": i, "data": {"text": t}, "annotations": [{"was_cancelled": False, "result": [
        {"from_name": "label", "to_name": "text", "type": "labels",
         "value": {"start": s, "end": e, "text": t[s:e], "labels": [k]}} for s, e, k in spans]}]}
        for i, (t, spans) in enumerate(sentences)]  # fmt: skip
    return json.dumps(tasks, ensure_ascii=False, indent=2)


def write_chars(sentences, scheme, sep="\t"):
    blocks = []
    for text, spans in sentences:
        tags = ["O"] * len(text)
        for s, e, k in spans:
            if e - s == 1 and scheme != "bio":
                tags[s] = f"S-{k}"
                continue
            inside = "M" if scheme == "bmes" else "I"
            tags[s:e] = [f"B-{k}"] + [f"{inside}-{k}"] * (e - s - 1)
            if scheme != "bio":
                tags[e - 1] = f"E-{k}"
        blocks.append("".join(f"{c}{sep}{t}\n" for c, t in zip(text, tags, strict=True)))
    return "\n".join(blocks) + "\n"


WRITERS = {
    "msra": write_msra,
    "cluener": write_cluener,
    "doccano": write_doccano,
    "doccano-entities": write_doccano_entities,
    "label-studio": write_label_studio,
    "bioes": lambda s: write_chars(s, "bioes"),
    "bmes-space": lambda s: write_chars(s, "bmes", " "),
}


@pytest.mark.parametrize("name", WRITERS)
def test_each_format_gives_the_same_rows(name, msra_sentences, tmp_path):
    bio = tmp_path / "bio.txt"
    bio.write_text(write_chars(msra_sentences, "bio"), encoding="utf-8")
    other = tmp_path / f"{name}.data"
    other.write_text(WRITERS[name](msra_sentences), encoding="utf-8")
    for mode in ("train", "dev"):
        process.convert(bio, tmp_path / f"ref_{mode}.txt", mode)
        process.convert(other, tmp_path / f"{name}_{mode}.txt", mode)
        reference = (tmp_path / f"ref_{mode}.txt").read_text(encoding="utf-8")
        assert (tmp_path / f"{name}_{mode}.txt").read_text(encoding="utf-8") == reference
    assert read_annotated(other) == msra_sentences


def test_the_bio_rows_are_the_official_files(msra_sentences, tmp_path):
    """Our writer's BIO of 300 sentences is the first 300 sentences of the shipped file, byte for byte."""
    ours = write_chars(msra_sentences, "bio")
    assert MSRA_BIO.read_text(encoding="utf-8").startswith(ours.rstrip("\n"))


def test_own_types_names_and_instruction(tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [
        {"text": "阿司匹林治头痛", "label": [[0, 4, "DRUG"], [5, 7, "DIS"]]},
        {"text": "苹果手机很贵", "label": [[0, 4, "PRODUCT"]]},
    ]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    counts = process.convert(data, tmp_path / "o.txt", "train", "short", types="DRUG=药物,DIS=疾病")
    out = [json.loads(line) for line in (tmp_path / "o.txt").read_text(encoding="utf-8").splitlines()]
    assert [r["answer"] for r in out] == ["阿司匹林_药物\n头痛_疾病", "苹果手机_PRODUCT"]
    assert out[0]["instruct"] == "找出文本中的药物、疾病、PRODUCT。" and counts["types"] == ["药物", "疾病", "PRODUCT"]
    mapping = tmp_path / "types.json"
    mapping.write_text(json.dumps({"PRODUCT": "产品"}, ensure_ascii=False), encoding="utf-8")
    process.convert(data, tmp_path / "o2.txt", "train", types=str(mapping))
    assert "苹果手机_产品" in (tmp_path / "o2.txt").read_text(encoding="utf-8")


def test_msra_types_keep_the_seed_instruction(tmp_path):
    from dataset import NER_INSTRUCTION

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "北京", "label": [[0, 2, "LOC"]]}) + "\n", encoding="utf-8")
    process.convert(data, tmp_path / "o.txt", "train")
    assert json.loads((tmp_path / "o.txt").read_text(encoding="utf-8"))["instruct"] == NER_INSTRUCTION


def test_a_mapped_tag_the_data_lacks_is_a_warning(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "北京", "label": [[0, 2, "LOC"]]}) + "\n", encoding="utf-8")
    process.convert(data, tmp_path / "o.txt", "train", types="LOC=地点,GPE=政体")
    assert "names GPE, which no span" in capsys.readouterr().err
    assert "北京_地点" in (tmp_path / "o.txt").read_text(encoding="utf-8")


def test_dev_split_is_reproducible_and_disjoint(msra_sentences, tmp_path):
    bio = tmp_path / "bio.txt"
    bio.write_text(write_chars(msra_sentences * 2, "bio"), encoding="utf-8")  # every sentence twice
    outs = []
    for run in ("a", "b"):
        counts = process.convert(bio, tmp_path / f"train_{run}.txt", "train", dev_share=0.2,
                                 dev_file=tmp_path / f"dev_{run}.txt", seed=7)  # fmt: skip
        outs.append([(tmp_path / f"{part}_{run}.txt").read_text(encoding="utf-8") for part in ("train", "dev")])
    assert outs[0] == outs[1]
    train_q = {json.loads(line)["query"] for line in outs[0][0].splitlines()}
    dev_q = {json.loads(line)["query"] for line in outs[0][1].splitlines()}
    assert not train_q & dev_q
    distinct = {t for t, _ in msra_sentences}
    assert counts["dev_sentences"] == 2 * round(0.2 * len(distinct))  # a sentence's copies go to one side
    assert counts["dev_rows"] == 2 * len(dev_q)  # dev rows: the sentences with entities, as mode=dev
    other = process.convert(bio, tmp_path / "t.txt", "train", dev_share=0.2, dev_file=tmp_path / "d.txt", seed=8)
    assert other["dev_rows"] and (tmp_path / "d.txt").read_text(encoding="utf-8") != outs[0][1]


def lines_of(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)


BAD = {
    "overlap": (lines_of({"text": "北京大学", "label": [[0, 4, "ORG"], [0, 2, "LOC"]]}), ":1", "overlap"),
    "nested-cluener": (
        lines_of(
            {"text": "ab", "label": {}},
            {"text": "北京大学", "label": {"ORG": {"北京大学": [[0, 3]]}, "LOC": {"北京": [[0, 1]]}}},
        ),  # fmt: skip
        ":2",
        "overlap",
    ),
    "past-end": (lines_of({"text": "北京", "label": [[0, 5, "LOC"]]}), ":1", "outside its text of 2"),
    "stated-text": (
        json.dumps(
            [
                {
                    "data": {"text": "北京"},
                    "annotations": [{"result": [{"value": {"start": 0, "end": 1, "text": "北京", "labels": ["LOC"]}}]}],
                }
            ],
            ensure_ascii=False,
        ),  # fmt: skip
        ": task 1",
        "says '北京' but the text there is '北'",
    ),
    "inside-no-begin": ("北\tO\n京\tI-LOC\n", ":2", "continues no B-LOC"),
    "unknown-json": (lines_of({"sentence": "北京", "tags": []}), "", "none of msra"),
    "mixed": (lines_of({"text": "北京", "label": [[0, 2, "LOC"]]}, {"text": "京", "label": {}}), ":2", "one format"),
    "no-labels": (lines_of({"text": "北京", "label": []}, {"text": "上海", "label": []}), "", "no entity is labelled"),
    "underscore-tag": (lines_of({"text": "北京", "label": [[0, 2, "GEO_LOC"]]}), "", "--types=GEO_LOC="),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_annotations_name_the_line(name, tmp_path):
    content, where, message = BAD[name]
    bad = tmp_path / "bad.data"
    bad.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        process.convert(bad, tmp_path / "out.txt", "train")
    assert f"bad.data{where}" in str(err.value) and message in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.data"]  # nothing half-written


def test_cli_bad_format_and_bad_span_exit_2(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(lines_of({"text": "北京", "label": [[1, 3, "LOC"]]}), encoding="utf-8")
    for extra, message in (["--format=xml"], "format='xml'"), ([], "d.jsonl:1: span [1, 3) LOC is outside"):
        run = subprocess.run([sys.executable, "process.py", f"--in_file={data}", f"--out_file={tmp_path / 'o.txt'}",
                              *extra], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1 and not (tmp_path / "o.txt").exists()
