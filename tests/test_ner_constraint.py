"""The NER answer constraint on the real 49954-token tokenizer: which answers and tokens it allows."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import ROOT
from dataset import build_prompt, ner_row, prompt_format
from llama_ner.generation.generate import decode_new_tokens, finished_answer
from llama_ner.generation.metrics import parse_answer
from llama_ner.generation.ner_constraint import NerConstraint, gbnf, load_entity_types, main
from llama_ner.generation.ner_grammar import State, TextGrammar, vocab_of
from llama_ner.io_utils import UserError
from llama_ner.tokenizer import is_sentencepiece, load_tokenizer

MSRA_TYPES = ("人名", "地名", "机构名")
TEXTS = [
    "因有关日寇在京掠夺文物详情，藏界较为重视，也是我们收藏北京史料中的要件之一。",
    "记者张犇在《纽约时报》New York 分社的用户A_B账号里写道：北京北京。",  # byte pieces, '_', spaces
    "他没有去过上海，\n也没有去过　广州 。",  # a line break, an ideographic space, a trailing space
]


@pytest.fixture(scope="module", params=["alpaca", "smollm2"])
def tokenizer(request, alpaca_tokenizer_dir, smollm2_tokenizer_dir):
    """Every test runs on sentencepiece (Chinese-Alpaca) and on byte-level BPE (SmolLM2's tokenizer.json)."""
    return load_tokenizer(alpaca_tokenizer_dir if request.param == "alpaca" else smollm2_tokenizer_dir)


def newline_id(tokenizer) -> int:
    return vocab_of(tokenizer).by_bytes[b"\n"][0]


def grammar(tokenizer, text: str, types=MSRA_TYPES) -> TextGrammar:
    return TextGrammar(text, types, vocab_of(tokenizer))


def independent_ok(text: str, answer: str, types=MSRA_TYPES) -> bool:
    """The rule of the issue, written with plain string operations."""
    if answer == "没有":
        return True
    lines = answer.split("\n")
    if len(set(lines)) != len(lines):
        return False
    for line in lines:
        entity, sep, kind = line.rpartition("_")
        if not (sep and kind in types and entity and entity == entity.strip() and entity in text):
            return False
        if len(entity.splitlines()) != 1:
            return False
    return True


def walk(g: TextGrammar, ids: list[int]) -> State:
    """Step through `ids`, asserting each one was allowed."""
    st = State()
    for token in ids:
        assert token in set(g.allowed_ids(st).tolist()), (token, st.line)
        st = g.step(st, token)
    return st


@pytest.mark.parametrize(
    "text, answer",
    [
        (TEXTS[0], "日_地名\n京_地名\n北京_地名"),
        (TEXTS[0], "没有"),
        (TEXTS[1], "张犇_人名\n纽约时报_机构名"),
        (TEXTS[1], "New York_地名"),
        (TEXTS[1], "A_B_人名"),  # the type is after the last '_'; the entity keeps its own
        (TEXTS[1], "北京北京_地名\n北京_地名"),
        (TEXTS[2], "没有_机构名"),  # 没有 is in this text, so it can be an entity too
        (TEXTS[2], "上海_地名\n广州_地名"),
    ],
)
def test_training_answers_are_allowed_token_by_token(tokenizer, text, answer):
    """Each answer, tokenized as training tokenizes it (leading '▁' included), passes every step."""
    g = grammar(tokenizer, text)
    assert independent_ok(text, answer) and g.is_valid(answer)
    st = walk(g, tokenizer.encode(answer, add_special_tokens=False))
    assert tokenizer.eos_token_id in g.allowed_ids(st).tolist()


@pytest.mark.parametrize(
    "text, answer",
    [
        (TEXTS[0], ""),
        (TEXTS[0], "北京"),  # no type
        (TEXTS[0], "北京_"),
        (TEXTS[0], "_地名"),  # empty entity
        (TEXTS[0], "天津_地名"),  # not in the text
        (TEXTS[0], "北京_城市"),  # not a type
        (TEXTS[0], "北京_地名\n北京_地名"),  # a line twice
        (TEXTS[0], "北京_地名\n"),
        (TEXTS[0], "没有\n北京_地名"),
        (TEXTS[0], "北京_地名\n没有"),
        (TEXTS[0], "北京_地名 "),
        (TEXTS[1], "York _地名"),  # the entity ends with a space
        (TEXTS[1], "北京_地名\n York_地名"),  # only the answer may start with a space
        (TEXTS[2], "上海，也_地名"),  # across the text's line break
        (TEXTS[2], "去过　_地名"),  # ends with an ideographic space
    ],
)
def test_invalid_answers_are_rejected(tokenizer, text, answer):
    assert not independent_ok(text, answer)
    assert not grammar(tokenizer, text).is_valid(answer)


def test_byte_fallback_pieces(tokenizer):
    """犇 has no piece: it is spelled <0xE7><0x8A><0x87>; mid-character only the next byte fits."""
    if not is_sentencepiece(tokenizer):
        pytest.skip("sentencepiece byte pieces; test_byte_level_bpe_splits_characters covers BPE")
    g = grammar(tokenizer, TEXTS[1])
    byte = {b: tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in (0xE7, 0x8A, 0x87)}
    ids = tokenizer.encode("张犇_人名", add_special_tokens=False)
    assert [byte[0xE7], byte[0x8A], byte[0x87]] == [i for i in ids if i in byte.values()]
    st = walk(g, ids[: ids.index(byte[0xE7]) + 1])
    assert g.allowed_ids(st).tolist() == [byte[0x8A]]
    start = set(g.allowed_ids(State()).tolist())
    assert byte[0xE7] in start and byte[0x8A] not in start  # a continuation byte cannot start an entity


def test_byte_level_bpe_splits_characters(smollm2_tokenizer_dir):
    """In byte-level BPE one Chinese character may take two tokens (北 = e5 8c | 97) and one token may span two
    characters: mid-character, only tokens that continue it inside the text are allowed."""
    tokenizer = load_tokenizer(smollm2_tokenizer_dir)
    vocab = vocab_of(tokenizer)
    ids = tokenizer.encode("北京_地名", add_special_tokens=False)
    spelled = [vocab.token_bytes[i] for i in ids]
    assert b"".join(spelled) == "北京_地名".encode()
    assert any(not valid_utf8(b) for b in spelled), spelled  # a character split across tokens
    g = grammar(tokenizer, "北京是中国的首都。")
    st = walk(g, ids[:1])  # half of 北
    allowed = g.allowed_ids(st).tolist()
    assert allowed and all((spelled[0] + vocab.token_bytes[i]).startswith(b"\xe5\x8c\x97") for i in allowed)
    st = walk(g, ids)
    assert tokenizer.eos_token_id in g.allowed_ids(st).tolist()


def valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_duplicates_and_no_dead_end(tokenizer):
    """With one character and two types, after both lines only </s> is left."""
    g = grammar(tokenizer, "京", ("人名", "地名"))
    newline, eos = newline_id(tokenizer), tokenizer.eos_token_id
    st = walk(g, tokenizer.encode("京_人名", add_special_tokens=False))
    assert {newline, eos} <= set(g.allowed_ids(st).tolist())
    st = walk(g, tokenizer.encode("京_人名\n京_地名", add_special_tokens=False))
    assert g.allowed_ids(st).tolist() == [eos]
    st = walk(g, tokenizer.encode("京_人名\n京_", add_special_tokens=False))
    allowed = [g.vocab.token_bytes[i] for i in g.allowed_ids(st).tolist()]
    assert allowed and all("地名".encode().startswith(b) for b in allowed)  # 人名 is used up


def brute_force(g: TextGrammar, st: State, candidates: list[int]) -> set[int]:
    allowed = {i for i in candidates if g.advance(st, g.vocab.token_bytes[i]) is not None}
    return allowed | ({g.vocab.eos_id} if g.can_end(st) else set())


FIXED_PATHS = [
    ("京京", "京_人名\n京_地名\n京_机构名\n京京_人名"),  # 京 used with every type: only 京京 may follow
    ("甲乙", "甲_人名\n甲_地名\n甲_机构名\n甲乙_人名\n甲乙_地名\n甲乙_机构名\n乙_人名"),  # then 甲 is dead
    (TEXTS[1], "A_B_人名\nA_地名\n用户A_B_机构名\n张犇_人名"),
    (TEXTS[2], "没有_人名\n广州_地名"),
]


def test_allowed_ids_equal_brute_force(tokenizer):
    """The fast per-step lists equal a check of every token that could spell part of an answer."""
    vocab = vocab_of(tokenizer)
    rng = random.Random(0)
    paths = [(text, None) for text in TEXTS + ["京京", "甲乙"] for _ in range(3)] + FIXED_PATHS
    for text, answer in paths:
        g = grammar(tokenizer, text)
        alphabet = set((text + "".join(MSRA_TYPES) + "没有_\n ").encode())
        candidates = [i for i, b in enumerate(vocab.token_bytes) if b and set(b) <= alphabet]
        fixed = tokenizer.encode(answer, add_special_tokens=False) + [vocab.eos_id] if answer else None
        st, steps = State(), 0
        while not st.finished and steps < 60:
            allowed = set(g.allowed_ids(st).tolist())
            assert allowed == brute_force(g, st, candidates), (text, st.line, st.done)
            if fixed:
                token = fixed[steps]
                assert token in allowed
            else:
                bias = [
                    i for i in allowed if i in (vocab.eos_id, newline_id(tokenizer)) or b"_" in vocab.token_bytes[i]
                ]
                token = rng.choice(bias if bias and rng.random() < 0.3 else sorted(allowed))
            st, steps = g.step(st, token), steps + 1
        assert st.finished or not fixed


def test_processor_on_random_logits_gives_valid_answers(tokenizer):
    """A batch under random logits (an untrained model, in effect): every row ends with </s> by itself
    (close() rescues nothing here) and every answer is valid; after </s> only </s> follows."""
    rows = [json.loads(line) for line in (ROOT / "tests/data/msra_dev_instruct.txt").open(encoding="utf-8")][:5]
    texts = TEXTS + [r["query"].removeprefix("文本：") for r in rows]
    constraint = NerConstraint(tokenizer, texts, MSRA_TYPES)
    processor = constraint.processor(list(range(len(texts))), prompt_width=3)
    ids = torch.zeros(len(texts), 3, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    eos = tokenizer.eos_token_id
    for _ in range(200):
        scores = torch.randn(len(texts), len(tokenizer), generator=generator)
        scores[:, [eos, newline_id(tokenizer)]] += 2.5  # end lines and answers now and then
        ids = torch.cat([ids, processor(ids, scores).argmax(-1, keepdim=True)], dim=1)
        if (ids == eos).any(dim=1).all():
            break
    lines = 0
    for index, row in enumerate(ids[:, 3:].tolist()):
        assert eos in row, (texts[index], decode_new_tokens(tokenizer, row))
        assert set(row[row.index(eos) :]) == {eos}
        answer = decode_new_tokens(tokenizer, row)
        assert independent_ok(texts[index], answer), (texts[index], answer)
        assert parse_answer(answer)[1] == 0
        lines += 0 if answer == "没有" else len(answer.split("\n"))
    assert lines >= len(texts)  # entity lines, not only 没有: the check above is not vacuous


def test_close_drops_the_unfinished_line(tokenizer):
    constraint = NerConstraint(tokenizer, [TEXTS[0]], MSRA_TYPES)
    assert constraint.close(0, "北京_地名\n京_地") == "北京_地名"
    assert constraint.close(0, "北京_地") == "没有"
    assert constraint.close(0, "北京_地名") == "北京_地名"


def test_finish_keeps_one_type_an_entity_the_first(tokenizer):
    """Greedy answers loop over the types of one fragment; the answer returned keeps the first line's type."""
    constraint = NerConstraint(tokenizer, [TEXTS[0]], MSRA_TYPES)
    answer = "北京_地名\n北京_机构名\n京_人名\n北京_人名"
    assert constraint.finish(0, answer, cut=False) == "北京_地名\n京_人名"
    assert constraint.finish(0, answer + "\n京_地", cut=True) == "北京_地名\n京_人名"  # closed first
    assert constraint.finish(0, "北京_地", cut=True) == constraint.finish(0, "没有", cut=False) == "没有"
    # what both decoding loops return (generate.finished_answer): the ids of a looping answer and </s>
    ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert finished_answer(tokenizer, constraint, 0, ids) == "北京_地名\n京_人名"


def test_entity_types(tmp_path, capsys):
    data = tmp_path / "train.txt"
    rows = [{"instruct": "x", "answer": "阿司匹林_药物\n头痛_症状"}, {"instruct": "y", "answer": "没有"}]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert load_entity_types("", data) == ("药物", "症状")
    assert load_entity_types("人名, 地名", data) == ("人名", "地名")
    untyped = tmp_path / "untyped.txt"
    untyped.write_text(json.dumps({"instruct": "x", "answer": "没有"}) + "\n", encoding="utf-8")
    capsys.readouterr()
    for train_path, why in ((tmp_path / "missing.txt", "not found"), (untyped, "no typed answer")):
        assert load_entity_types("", train_path) == MSRA_TYPES
        warning = capsys.readouterr().err
        assert warning.startswith("warning: ") and str(train_path) in warning and why in warning
        assert "MSRA's types 人名/地名/机构名" in warning and "entity_types=A,B" in warning
    assert load_entity_types("", None) == MSRA_TYPES and "no training data given" in capsys.readouterr().out
    with pytest.raises(UserError, match="entity_types"):
        load_entity_types("人_名")


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--max_lines", "-1"], "--max_lines -1"),  # only 0 means no limit
        (["--train_path", "{missing}"], "file not found"),  # typed by the user: an error, not MSRA's types
        (["--train_path", "{gbk}"], "GB18030"),
        (["--prompt_template", "chat", "--prompt_out", "{out}"], "--tokenizer_dir"),
    ],
    ids=["negative-max-lines", "missing-train-path", "gbk-train-path", "chat-without-tokenizer"],
)
def test_gbnf_cli_refuses_what_it_cannot_honour(tmp_path, capsys, argv, words):
    from llama_ner.generation.ner_constraint import main
    from llama_ner.io_utils import run_cli

    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes(json.dumps({"instruct": "x", "answer": "北京_地名"}, ensure_ascii=False).encode("gbk") + b"\n")
    paths = {"missing": tmp_path / "missing.txt", "gbk": gbk, "out": tmp_path / "prompt.txt"}
    argv = ["--text", "北京", *(a.format(**paths) for a in argv)]
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: main(argv))
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") or last.startswith("data error: "), last
    assert words in last, last
    assert not paths["out"].exists()


def test_gbnf_prompt_in_the_chat_format(tmp_path, smollm2_tokenizer_dir):
    from llama_ner.generation.ner_constraint import main

    out = tmp_path / "prompt.txt"
    main(["--text", "北京", "--prompt_out", str(out), "--prompt_template", "chat", "--tokenizer_dir",
          str(smollm2_tokenizer_dir)])  # fmt: skip
    fmt = prompt_format("chat", load_tokenizer(smollm2_tokenizer_dir))
    assert out.read_text(encoding="utf-8") == build_prompt(ner_row("北京")["instruct"], "文本：北京", fmt)


def test_gbnf_shape():
    grammar_text = gbnf('他说"北 京"', ("人名", "地名"), max_lines=3)
    lines = grammar_text.splitlines()
    assert lines[0] == 'root ::= " "? ("没有" | line ("\\n" line){0,2})'
    assert 'type ::= "人名" | "地名"' in lines
    assert 'e2 ::= "\\x22" e3?' in lines and 'e4 ::= "\\x20" e5' in lines  # quote escaped; a space cannot end
    assert "entity ::= e0 | e1 | e2 | e3 | e5 | e6" in lines
    assert gbnf("  ").splitlines() == ['root ::= " "? ("没有")']


def test_gbnf_cli_never_overwrites_its_training_data_nor_writes_into_a_directory(tmp_path):
    data = tmp_path / "train.txt"
    data.write_text(json.dumps({"instruct": "x", "answer": "北京_地名"}, ensure_ascii=False) + "\n", encoding="utf-8")
    before = data.read_bytes()
    with pytest.raises(UserError, match=r"--out .*train\.txt is the input .*train\.txt: choose another path"):
        main(["--text", "北京", "--train_path", str(data), "--out", str(data)])
    with pytest.raises(UserError, match="--prompt_out .* is the input"):
        main(["--text", "北京", "--train_path", str(data), "--prompt_out", str(tmp_path / "." / "train.txt")])
    with pytest.raises(UserError, match=f"--out {tmp_path} is a directory; pass a file path"):
        main(["--text", "北京", "--out", str(tmp_path)])
    with pytest.raises(UserError, match="--out and --prompt_out are both"):
        main(["--text", "北京", "--out", str(tmp_path / "a"), "--prompt_out", str(tmp_path / "a")])
    assert data.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["train.txt"]
