"""Tokenizer parity with sentencepiece, the published checksums, 2023-era tokenizer folders."""

import hashlib
import json

import pytest
import sentencepiece as spm

from conftest import ROOT
from llama_ner.io_utils import ModelLoadError
from llama_ner.tokenizer import build_chinese_sp_model, load_tokenizer, save_tokenizer

LLAMA_SP = ROOT / "model_hub/tokenizer.model"
CHINESE_SP = ROOT / "model_hub/chinese_sp.model"
CHINESE_LLAMA_SHA256 = "e2676d4ca29ca1750f6ff203328d73b189321dc5776ceede037cbd36541d70c0"
CHINESE_ALPACA_SHA256 = "2d967e855b1213a439df6c8ce2791f869c84b4f3b6cfacf22b86440b8192a2f8"
MSRA = ROOT / "tests/data/msra_dev_instruct.txt"


def msra_texts(n=300):
    rows = [json.loads(line) for line in MSRA.read_text(encoding="utf-8").splitlines()[:n]]
    return [r["instruct"] + "\n" + r["query"] for r in rows] + [r["answer"] for r in rows]


@pytest.mark.parametrize(
    "add_pad,sha,size", [(False, CHINESE_LLAMA_SHA256, 49953), (True, CHINESE_ALPACA_SHA256, 49954)]
)
def test_built_tokenizer_is_the_published_file(add_pad, sha, size):
    data = build_chinese_sp_model(LLAMA_SP, CHINESE_SP, add_pad=add_pad)
    assert hashlib.sha256(data).hexdigest() == sha
    sp = spm.SentencePieceProcessor(model_proto=data)
    assert sp.get_piece_size() == size


def test_ids_equal_sentencepiece_on_msra(alpaca_tokenizer_dir):
    tokenizer = load_tokenizer(alpaca_tokenizer_dir)
    sp = spm.SentencePieceProcessor(model_file=str(alpaca_tokenizer_dir / "tokenizer.model"))
    texts = msra_texts() + ["了我们", "hello world\n\n  two spaces", "１２３ abc 中文"]
    for text in texts:
        assert tokenizer.encode(text) == [1] + sp.encode(text), text
        assert tokenizer.encode(text, add_special_tokens=False) == sp.encode(text)


def test_batch_call_and_decode_round_trip(alpaca_tokenizer_dir):
    tokenizer = load_tokenizer(alpaca_tokenizer_dir)
    texts = msra_texts(20)
    batch = tokenizer(texts)["input_ids"]
    assert [ids[0] for ids in batch] == [1] * len(texts)
    for text, ids in zip(texts, batch, strict=True):
        assert tokenizer.decode(ids, skip_special_tokens=True) == text  # newlines (byte pieces) come back


def test_special_ids(alpaca_tokenizer_dir, chinese_tokenizer_dir):
    alpaca = load_tokenizer(alpaca_tokenizer_dir)
    assert (len(alpaca), alpaca.bos_token_id, alpaca.eos_token_id, alpaca.pad_token_id) == (49954, 1, 2, 49953)
    chinese = load_tokenizer(chinese_tokenizer_dir)
    assert (len(chinese), chinese.eos_token_id, chinese.pad_token_id) == (49953, 2, 0)
    llama = load_tokenizer(LLAMA_SP)
    assert len(llama) == 32000


def test_2023_folder_with_added_tokens_json(tmp_path):
    """A 49953-piece tokenizer.model plus added_tokens.json {"[PAD]": 49953}, as some LoRAs ship."""
    (tmp_path / "tokenizer.model").write_bytes(build_chinese_sp_model(LLAMA_SP, CHINESE_SP))
    (tmp_path / "added_tokens.json").write_text('{"[PAD]": 49953}')
    (tmp_path / "special_tokens_map.json").write_text(
        '{"bos_token": {"content": "<s>"}, "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "[PAD]"}'
    )
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer", "legacy": true}')
    tokenizer = load_tokenizer(tmp_path)
    assert (len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id) == (49954, 49953, 2)
    save_tokenizer(tokenizer, tmp_path / "copy")
    assert json.loads((tmp_path / "copy/added_tokens.json").read_text()) == {"[PAD]": 49953}
    again = load_tokenizer(tmp_path / "copy")
    assert (len(again), again.pad_token_id) == (49954, 49953)


def test_added_tokens_json_from_another_tokenizer_is_refused(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(LLAMA_SP.read_bytes())
    (tmp_path / "added_tokens.json").write_text('{"[PAD]": 49953}')
    with pytest.raises(ModelLoadError, match="added_tokens.json"):
        load_tokenizer(tmp_path)


def test_missing_tokenizer_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer.model"):
        load_tokenizer(tmp_path)
