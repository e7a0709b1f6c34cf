"""serve.py started for real (uvicorn, a free port) on the memorized tiny adapter.

Clients: httpx, the official openai client, and headless Debian chromium for the page.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import html
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import httpx
import pytest

from conftest import ROOT
from dataset import build_prompt
from llama_ner.generation.metrics import parse_entities

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="session")
def server(memorized):
    from serve import ServerProcess

    adapter = str(memorized["save_dir"] / "adapter_model")
    argv = ["--base_model", str(memorized["base"]), "--lora_model", adapter, "--only_cpu"]
    with ServerProcess([*argv, "--max_texts", "8", "--api_key", KEY]) as running:
        yield running


@pytest.fixture(scope="session")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=300) as c:
        yield c


@pytest.fixture(scope="session")
def openai_client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


def ner(client: httpx.Client, texts: list[str]) -> list[dict]:
    response = client.post("/v1/ner", json={"texts": texts})
    assert response.status_code == 200, response.text
    return response.json()["results"]


def occurrences(text: str, entity: str) -> list[list[int]]:
    """Every [start, end) of entity in text (overlapping too), by brute force."""
    return [[i, i + len(entity)] for i in range(len(text)) if text.startswith(entity, i)]


# ---- unit: entity spans -----------------------------------------------------------------------


def test_entities_in_answer_order_with_every_span():
    from llama_ner.generation.metrics import answer_entities as entities

    answer = "北京_地名\n上海_地名\n没有\n不是实体\n北京_地名\n京_地名"
    assert entities("北京和北京", answer) == [
        {"text": "北京", "type": "地名", "spans": [[0, 2], [3, 5]]},
        {"text": "上海", "type": "地名", "spans": []},
        {"text": "京", "type": "地名", "spans": [[1, 2], [4, 5]]},
    ]
    assert entities("aaa", "aa_人名") == [{"text": "aa", "type": "人名", "spans": [[0, 2], [1, 3]]}]


# ---- the API ----------------------------------------------------------------------------------


def test_health_and_models(server, openai_client):
    health = httpx.get(server.url + "/health").json()  # no key needed
    assert health["status"] == "ok" and health["model"] == "chinese-alpaca-ner"
    assert [m.id for m in openai_client.models.list()] == ["chinese-alpaca-ner"]


def test_ner_answers_equal_test_py(client, ner_reference):
    results = ner(client, ner_reference["texts"])
    assert [r["answer"] for r in results] == ner_reference["answers"]
    for text, result in zip(ner_reference["texts"], results, strict=True):
        assert result["text"] == text
        pairs = {(e["text"], e["type"]) for e in result["entities"]}
        assert pairs == parse_entities(result["answer"])
        for e in result["entities"]:
            assert e["spans"] == occurrences(text, e["text"])
            assert all(text[s:t] == e["text"] for s, t in e["spans"])
    assert results[0]["entities"] and all(e["spans"] for e in results[0]["entities"])  # a memorized row


def test_ner_constrained_by_default(client, memorized):
    """/v1/ner decodes under the NER constraint unless "constrained": false: the same answers as
    inference.ner_answers with and without the training data's types, on unseen texts."""
    from llama_ner.generation.inference import ner_answers
    from llama_ner.generation.ner_constraint import load_entity_types
    from llama_ner.model_loading import load_model
    from llama_ner.tokenizer import load_tokenizer

    texts = [r["query"].removeprefix("文本：") for r in memorized["unseen_rows"][:4]]
    constrained = [r["answer"] for r in ner(client, texts)]
    response = client.post("/v1/ner", json={"texts": texts, "constrained": False})
    plain = [r["answer"] for r in response.json()["results"]]
    tokenizer = load_tokenizer(memorized["base"])
    model = load_model(memorized["base"], memorized["save_dir"] / "adapter_model", "float32", "cpu", tokenizer)
    assert plain == ner_answers(model, tokenizer, texts)
    assert constrained == ner_answers(model, tokenizer, texts, types=load_entity_types("", memorized["seen"]))
    for text, answer in zip(texts, constrained, strict=True):
        lines = answer.split("\n")
        assert answer == "没有" or len(set(lines)) == len(lines), answer
        for entity, _, kind in (line.rpartition("_") for line in lines if answer != "没有"):
            assert entity in text and kind in ("人名", "地名", "机构名"), answer


def test_chat_and_completions_with_openai_client(openai_client, memorized):
    row = memorized["seen_rows"][0]
    chat = openai_client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": f"{row['instruct']}\n{row['query']}"}], temperature=0
    )
    assert chat.choices[0].message.content == row["answer"]  # one user message = the training prompt
    assert chat.choices[0].finish_reason == "stop" and chat.usage.completion_tokens > 0
    completion = openai_client.completions.create(model="any", prompt=build_prompt(row["instruct"], row["query"]))
    assert completion.choices[0].text == row["answer"]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_streaming_equals_non_streaming(openai_client, memorized, endpoint):
    rows = [memorized["seen_rows"][1], memorized["unseen_rows"][2]]  # a memorized answer, an unknown one
    reasons, texts = [], []
    for row in rows:
        if endpoint == "chat":
            kwargs = {"messages": [{"role": "user", "content": f"{row['instruct']}\n{row['query']}"}]}
            create = openai_client.chat.completions.create
        else:
            kwargs = {"prompt": build_prompt(row["instruct"], row["query"])}
            create = openai_client.completions.create
        whole = create(model="m", max_tokens=64, **kwargs).choices[0]
        chunks = list(create(model="m", max_tokens=64, stream=True, **kwargs))
        if endpoint == "chat":
            pieces = [c.choices[0].delta.content or "" for c in chunks]
            text = whole.message.content
        else:
            pieces = [c.choices[0].text for c in chunks]
            text = whole.text
        assert "".join(pieces) == text and len([p for p in pieces if p]) > 1
        assert chunks[-1].choices[0].finish_reason == whole.finish_reason
        reasons.append(whole.finish_reason)
        texts.append(text)
    assert texts[0] == rows[0]["answer"] and reasons[0] == "stop"  # the memorized answer ends with </s>


def test_concurrent_ner_requests_are_batched(server, client, memorized):
    texts = [r["query"].removeprefix("文本：") for r in memorized["seen_rows"]] * 2  # 24 requests
    alone = {t: ner(client, [t])[0]["answer"] for t in texts[:12]}
    before = client.get("/health").json()

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=300) as c:
            return await asyncio.gather(*(c.post("/v1/ner", json={"texts": [t]}) for t in texts))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 24
    assert [r.json()["results"][0]["answer"] for r in responses] == [alone[t] for t in texts]
    assert [alone[t] for t in texts[:12]] == [r["answer"] for r in memorized["seen_rows"]]
    after = client.get("/health").json()
    assert after["requests"] - before["requests"] == 24
    assert after["batches"] - before["batches"] < 24  # several requests shared a generate call
    assert after["largest_batch_requests"] > 1


def test_health_answers_while_a_batch_runs(server, client):
    """Generation runs off the event loop: /health answers, reporting the batch, while the batch's request waits."""
    prompts = [build_prompt(f"写一篇很长的文章，第{i}篇。") for i in range(8)]  # 8 x --max_new_tokens (256)
    body = {"prompt": prompts, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        batch = pool.submit(httpx.post, server.url + "/v1/completions", json=body, headers=AUTH, timeout=300)
        during = None
        while during is None and not batch.done():
            health = client.get("/health").json()
            if health["running"]:  # set by the worker thread only while generate() runs
                during = health
        assert during is not None, "/health never answered while the batch ran"
        assert during["running"] == 8 and during["queued"] == 0
        assert batch.result().status_code == 200
    assert client.get("/health").json()["running"] == 0


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_raw_sse_stream(client, memorized, endpoint):
    """The bytes on the wire (the openai client hides them): data: events in OpenAI's chunk shape, then [DONE]."""
    row = memorized["seen_rows"][1]
    chat = endpoint == "chat/completions"
    if chat:
        body = {"messages": [{"role": "user", "content": f"{row['instruct']}\n{row['query']}"}]}
    else:
        body = {"prompt": build_prompt(row["instruct"], row["query"])}
    with client.stream("POST", f"/v1/{endpoint}", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode("utf-8")
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], raw[-200:]
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1]), raw
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    for c in chunks:
        assert c["object"] == ("chat.completion.chunk" if chat else "text_completion")
        assert c["id"] == chunks[0]["id"] and c["model"] == "chinese-alpaca-ner" and isinstance(c["created"], int)
        assert len(c["choices"]) == 1 and c["choices"][0]["index"] == 0
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons == [None] * (len(chunks) - 1) + ["stop"]
    if chat:
        assert all(c["choices"][0]["delta"]["role"] == "assistant" for c in chunks[:-1])
        assert chunks[-1]["choices"][0]["delta"] == {}
        pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    else:
        pieces = [c["choices"][0]["text"] for c in chunks]
    assert "".join(pieces) == row["answer"] and len([p for p in pieces if p]) > 1


def test_sampling(client, memorized):
    row = memorized["unseen_rows"][0]
    prompt = build_prompt(row["instruct"], row["query"])

    def choice(**sampling: float) -> dict:
        response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 32, **sampling})
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]

    sampled = choice(temperature=1, top_p=0.9)
    assert isinstance(sampled["text"], str) and sampled["finish_reason"] in ("stop", "length")
    # a nucleus of one token is the most likely token at every step, whatever the seed: greedy's answer
    assert choice(temperature=2, top_p=1e-6)["text"] == choice(temperature=0)["text"]


# ---- bad input ---------------------------------------------------------------------------------

MESSAGE = [{"role": "user", "content": "你好"}]
BAD_REQUESTS = {
    "invalid-json": ("/v1/ner", b'{"texts": ["a"', 400, "body"),
    "not-an-object": ("/v1/ner", b'["a"]', 400, "body"),
    "texts-missing": ("/v1/ner", {}, 400, "texts"),
    "texts-not-a-list": ("/v1/ner", {"texts": "北京"}, 400, "texts"),
    "text-not-a-string": ("/v1/ner", {"texts": ["北京", 3]}, 400, "texts[1]"),
    "texts-empty": ("/v1/ner", {"texts": []}, 400, "texts"),
    "text-blank": ("/v1/ner", {"texts": ["北京", " "]}, 400, "texts[1]"),
    "too-many-texts": ("/v1/ner", {"texts": ["北京"] * 9}, 400, "texts"),
    "too-many-prompts": ("/v1/completions", {"prompt": ["你好"] * 9}, 400, "prompt"),
    "text-too-long": ("/v1/ner", {"texts": ["北京" * 400]}, 400, "texts[0]"),
    "body-over-1mb": ("/v1/ner", {"texts": ["北" * 400_000]}, 413, "body"),
    "max-tokens-negative": ("/v1/chat/completions", {"messages": MESSAGE, "max_tokens": -1}, 400, "max_tokens"),
    "max-tokens-huge": ("/v1/completions", {"prompt": "你好", "max_tokens": 10**9}, 400, "max_tokens"),
    "max-tokens-string": ("/v1/completions", {"prompt": "你好", "max_tokens": "5"}, 400, "max_tokens"),
    "unknown-role": ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    "last-not-user": (
        "/v1/chat/completions",
        {"messages": [*MESSAGE, {"role": "assistant", "content": "x"}]},
        400,
        "messages",
    ),
    "messages-empty": ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    "temperature-negative": ("/v1/chat/completions", {"messages": MESSAGE, "temperature": -1}, 400, "temperature"),
    "prompt-missing": ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    "n-above-1": ("/v1/completions", {"prompt": "你好", "n": 2}, 400, "n"),
    "constrained-not-a-bool": ("/v1/ner", {"texts": ["北京"], "constrained": "no"}, 400, "constrained"),
    # refused, never ignored: a typo, an option this server does not have
    "unknown-field": ("/v1/ner", {"texts": ["北京"], "constrainted": False}, 400, "constrainted: unknown field"),
    "stop-sequences": ("/v1/completions", {"prompt": "你好", "stop": ["。"]}, 400, "stop: unknown field"),
    "unknown-message-field": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x", "name": "a"}]},
        400,
        "name",
    ),  # fmt: skip
    # the message says what to send instead
    "lone-surrogate-text": ("/v1/ner", b'{"texts": ["\\ud800"]}', 400, "texts[0]: not text"),
    "lone-surrogate-prompt": ("/v1/completions", b'{"prompt": "a\\udfff"}', 400, "prompt: not text"),
    "lone-surrogate-message": (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
        400,
        "content: not text",
    ),  # fmt: skip
    "temperature-nan": (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        400,
        "finite number",
    ),  # fmt: skip
    "prompt-empty-list": ("/v1/completions", {"prompt": []}, 400, "send a string or a list"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_is_a_4xx_json_error(client, case):
    path, body, status, name = case
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert name in error["message"] and "Traceback" not in response.text
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    ("content", "headers", "words"),
    [
        (b"texts=abc", {"Content-Type": "application/x-www-form-urlencoded"}, "Content-Type: application/json"),
        ('{"texts": ["北京"]}'.encode("gbk"), {"Content-Type": "application/json"}, "not UTF-8"),
    ],
    ids=["curl-d-form", "gbk-body"],
)
def test_a_body_sent_the_wrong_way_says_how_to_send_it(client, content, headers, words):
    response = client.post("/v1/ner", content=content, headers=headers)
    assert response.status_code == 400 and words in response.json()["error"]["message"], response.text
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "fix"),
    [
        ("/v1/ner", {"texts": ["北京" * 400]}, "--max_new_tokens"),  # /v1/ner has no max_tokens
        ("/v1/completions", {"prompt": "北京" * 400, "max_tokens": 200}, "lower max_tokens"),
    ],
)
def test_too_long_input_names_the_right_knob(client, path, body, fix):
    response = client.post(path, json=body)
    assert response.status_code == 400 and fix in response.json()["error"]["message"], response.text
    if path == "/v1/ner":
        assert "max_tokens" not in response.json()["error"]["message"].replace("--max_new_tokens", "")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_api_key_required(server, headers):
    response = httpx.post(server.url + "/v1/ner", json={"texts": ["北京"]}, headers=headers)
    assert response.status_code == 401
    assert "API key" in response.json()["error"]["message"]
    assert httpx.get(server.url + "/v1/models", headers=headers).status_code == 401


def test_unknown_path_and_method(client):
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and "/v1/nothing" in missing.json()["error"]["message"]
    assert client.get("/v1/ner").status_code == 405


# ---- start-up errors -------------------------------------------------------------------------


def assert_exit_2(argv: list[str], *needles: str) -> None:
    proc = subprocess.run([sys.executable, "serve.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_startup_errors(tmp_path, memorized):
    assert_exit_2(["--base_model", str(tmp_path / "no_model"), "--port", "0"], "no_model")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_exit_2(["--base_model", str(memorized["base"]), "--port", str(port)], f"127.0.0.1:{port}", "--port")
    # 512 positions (tiny_models): no room left for a prompt, refused before the model loads
    argv = ["--base_model", str(memorized["base"]), "--only_cpu", "--port", "0", "--max_new_tokens", "512"]
    assert_exit_2(argv, "max_new_tokens=512", "512 positions")
    # HTTP headers are latin-1 bytes: a key of other characters could never be sent
    assert_exit_2(["--base_model", str(memorized["base"]), "--api_key", "密钥"], "--api_key", "ASCII")


# ---- the page ----------------------------------------------------------------------------------


class MarkedText(HTMLParser):
    """The characters of the page's <div id="result">, each with the types of the <mark>s around it."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.inside, self.types, self.chars = False, [], []
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "div" and ("id", "result") in attrs:
            self.inside = True
        elif self.inside and tag == "mark":
            self.types.append(dict(attrs)["data-type"])

    def handle_endtag(self, tag: str) -> None:
        if self.inside and tag == "mark":
            self.types.pop()
        elif tag == "div":
            self.inside = False

    def handle_data(self, data: str) -> None:
        if self.inside:
            self.chars += [(char, sorted(self.types)) for char in data]


def expected_marks(text: str, found: list[dict]) -> list[tuple[str, list[str]]]:
    """Each code point of text with the types of every entity span covering it."""
    return [(c, sorted(e["type"] for e in found for s, t in e["spans"] if s <= i < t)) for i, c in enumerate(text)]


def page_dom(url: str) -> str:
    """The page's DOM after its script ran, in headless chromium."""
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=60000", "--dump-dom", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"chromium exited {proc.returncode} (a lone UTF-16 surrogate in the DOM crashes it)"
    return proc.stdout


needs_chromium = pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian chromium not installed (make setup installs it)"
)


@needs_chromium
def test_page_highlights_entities_in_chromium(server, memorized):
    from llama_ner.generation.metrics import answer_entities as entities

    row = next(r for r in memorized["seen_rows"] if r["answer"] != "没有")
    text = row["query"].removeprefix("文本：")
    dom = page_dom(f"{server.url}/?text={quote(text)}#key={KEY}")
    gold = entities(text, row["answer"])
    assert MarkedText(dom).chars == expected_marks(text, gold)  # every occurrence, the text unchanged around them
    assert all(e["spans"] for e in gold)
    assert html.unescape(re.search(r'<pre id="raw">(.*?)</pre>', dom, re.S).group(1)) == row["answer"]
    assert all(f">{e['type']}</span>" in dom for e in gold)  # the legend


@needs_chromium
def test_page_nests_overlapping_entities_and_counts_code_points(tmp_path):
    """A fixed answer served to the real page: contained spans nest, a crossing span is split at the end of
    the one it starts in, and characters beyond UTF-16's first plane do not shift later marks."""
    from llama_ner.generation.metrics import answer_entities as entities
    from llama_ner.serving.http_api import PAGE

    text = "😀我在北京和日本，𠮷去了东京都。"
    answer = "日_地名\n京_地名\n北京_地名\n东京_地名\n京都_地名\n我_人名"

    class Stub(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.reply("text/html", PAGE.read_bytes())

        def do_POST(self) -> None:
            texts = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["texts"]
            results = [{"text": t, "answer": answer, "entities": entities(t, answer)} for t in texts]
            self.reply("application/json", json.dumps({"results": results}).encode())

        def reply(self, kind: str, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Stub) as stub:
        threading.Thread(target=stub.serve_forever, daemon=True).start()
        dom = page_dom(f"http://127.0.0.1:{stub.server_address[1]}/?text={quote(text)}")
        stub.shutdown()
    marked = MarkedText(dom).chars
    assert marked == expected_marks(text, entities(text, answer))
    assert marked[4] == ("京", ["地名", "地名"])  # 京 inside 北京
    assert marked[12:15] == [("东", ["地名"]), ("京", ["地名"] * 3), ("都", ["地名"])]  # 东京, 京, 京都
