"""A user's own data end to end: five non-MSRA types annotated in doccano, processed with a type mapping,
memorized by the tiny model, scored 1.0 by test.py on both scores, with the types travelling in
train_args.json (the training file deleted before scoring) to test.py and to serve.py's /v1/ner."""

import json

from conftest import import_script
from dataset import answer_types, load_data

SENTENCES = [
    ("阿司匹林可以缓解头痛", [(0, 4, "DRUG"), (7, 9, "SYM")]),
    ("协和医院收治糖尿病患者", [(0, 4, "HOSP"), (6, 9, "DIS")]),
    ("华为手机在协和医院很常见", [(0, 4, "PROD"), (5, 9, "HOSP")]),
    ("布洛芬不能治糖尿病", [(0, 3, "DRUG"), (6, 9, "DIS")]),
    ("他发烧了", [(2, 4, "SYM")]),
    ("小米手环测心率", [(0, 4, "PROD")]),
]
TYPES = "DRUG=药物,SYM=症状,HOSP=医院,DIS=疾病,PROD=产品"


def test_doccano_data_with_five_types_is_memorized_and_scored(tiny_alpaca, tmp_path):
    from memorize import train_memorized_lora

    doccano = tmp_path / "mine.jsonl"
    doccano.write_text(
        "".join(json.dumps({"text": t, "label": [list(s) for s in spans]}, ensure_ascii=False) + "\n"
                for t, spans in SENTENCES),
        encoding="utf-8",
    )  # fmt: skip
    train = tmp_path / "train.txt"
    import_script("process").convert(doccano, train, "train", "short", types=TYPES)
    rows = load_data(train)
    assert answer_types(rows) == "药物,症状,医院,疾病,产品"
    assert rows[0]["instruct"] == "找出文本中的药物、症状、医院、疾病、产品。"
    dev = tmp_path / "dev.txt"
    dev.write_bytes(train.read_bytes())
    save_dir, losses = train_memorized_lora(tiny_alpaca, rows, tmp_path / "run", dev, epochs=150)
    train_args = save_dir / "adapter_model" / "train_args.json"
    assert json.loads(train_args.read_text(encoding="utf-8"))["trained_entity_types"] == "药物,症状,医院,疾病,产品"
    train_args.write_text(train_args.read_text(encoding="utf-8").replace(str(dev), str(tmp_path / "gone.txt")))
    out = tmp_path / "scores"
    metrics = import_script("test").main(
        [f"--train_args_path={train_args}", f"--dev_path={dev}", f"--output_dir={out}", "--max_new_tokens=48"]
    )
    assert metrics["entity_types"] == ["药物", "症状", "医院", "疾病", "产品"] and metrics["constrained"]
    assert metrics["f1"] == 1.0 and metrics["span_level"]["f1"] == 1.0
    assert set(metrics["span_level"]["per_type"]) == {"药物", "症状", "医院", "疾病", "产品"}
    assert metrics["span_level"]["tp"] == 10  # every annotated span, located by its answer

    from llama_ner.generation.loading import spec_from_args  # the spec chat_ner.py and serve.py build
    from serve import parse_args

    argv = ["--base_model", str(tiny_alpaca), "--lora_model", str(save_dir / "adapter_model"), "--only_cpu"]
    spec = spec_from_args(parse_args(argv))
    assert spec.entity_types == ("药物", "症状", "医院", "疾病", "产品")

    # serve.py started for real on the same adapter: /v1/ner answers in the user's types, with their spans
    import httpx

    from serve import ServerProcess

    with ServerProcess(argv) as server:
        response = httpx.post(server.url + "/v1/ner", json={"texts": [t for t, _ in SENTENCES]}, timeout=300)
    assert response.status_code == 200, response.text
    names = dict(part.split("=") for part in TYPES.split(","))
    for (text, spans), result in zip(SENTENCES, response.json()["results"], strict=True):
        found = {(s, e, entity["type"]) for entity in result["entities"] for s, e in entity["spans"]}
        assert found == {(s, e, names[tag]) for s, e, tag in spans}, (text, result)
