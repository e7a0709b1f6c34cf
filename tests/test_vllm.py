"""The vLLM engine, for real: vLLM's CPU build (.venv-vllm, `make vllm`) started by serve.py, test.py and
predict.py, against the hf engine on the same model. Greedy fp32 answers must be equal, constrained or not.

vLLM's CPU attention takes head sizes of 32 and more, so these tests have their own tiny model (hidden 64,
2 heads) and a LoRA memorized on it, as conftest's `memorized`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import MSRA, ROOT, import_script, write_rows
from llama_ner.generation.vllm_process import DEFAULT_VENV_PYTHON, group_alive

HAVE_VLLM = DEFAULT_VENV_PYTHON.is_file() or bool(os.environ.get("VLLM_PYTHON"))
TYPES = ("人名", "地名", "机构名")
TOKENS = 48  # max_new_tokens on both engines


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> dict:
    """A head-size-32 tiny Alpaca model, a LoRA memorized on 12 MSRA rows, and 12 unseen rows."""
    from dataset import load_data
    from llama_ner.tiny_models import make_tiny_model
    from memorize import train_memorized_lora

    if not HAVE_VLLM:
        pytest.skip("vLLM is not installed: run 'make vllm' (make test does)")
    work = tmp_path_factory.mktemp("vllm")
    base = make_tiny_model(work / "tiny", "alpaca", num_attention_heads=2)
    rows = load_data(MSRA)
    unseen = [r for r in rows[100:] if r["answer"] != "没有"][:12]
    seen = write_rows(work / "seen.txt", rows[:12])
    save_dir, _ = train_memorized_lora(base, rows[:12], work / "run", seen, epochs=120)
    dev = write_rows(work / "dev.txt", rows[:12] + unseen)
    texts = [r["query"].removeprefix("文本：") for r in rows[:12] + unseen]
    adapter = save_dir / "adapter_model"
    return {"base": base, "adapter": adapter, "train_args": adapter / "train_args.json", "dev": dev, "texts": texts}


@pytest.fixture(scope="module")
def hf_reference(model) -> dict:
    """The hf engine's answers in this process: constrained and plain NER, and a plain completion."""
    from llama_ner.generation.generate import generate_answers
    from llama_ner.generation.inference import ner_answers
    from llama_ner.model_loading import load_model
    from llama_ner.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model["base"])
    lm = load_model(model["base"], model["adapter"], "float32", "cpu", tokenizer, 0)
    return {
        "constrained": ner_answers(lm, tokenizer, model["texts"], 16, TOKENS, types=TYPES),
        "plain": ner_answers(lm, tokenizer, model["texts"], 16, TOKENS),
        "completion": generate_answers(lm, tokenizer, ["北京是"], 1, 12, progress=False)[0],
        "tokenizer": tokenizer,
    }


def serve_argv(model: dict, *extra: str) -> list[str]:
    argv = ["--base_model", str(model["base"]), "--lora_model", str(model["adapter"]), "--only_cpu"]
    return [*argv, "--max_new_tokens", str(TOKENS), *extra]


@pytest.fixture(scope="module")
def served(model):
    """serve.py --engine vllm (it starts vLLM) and serve.py --engine hf, on the same model."""
    from serve import ServerProcess

    with ServerProcess(serve_argv(model, "--engine", "vllm")) as vllm, ServerProcess(serve_argv(model)) as hf:
        yield {"vllm": vllm, "hf": hf, "engine_url": engine_url(vllm)}


def engine_url(server) -> str:
    line = next(line for line in server.lines if line.startswith("engine: vLLM at "))
    return line.split()[3].rstrip(",")


def vllm_processes(port_flag: str) -> list[int]:
    """Pids of live processes whose command line holds `port_flag` (vLLM's `--port N`)."""
    found = []
    for cmdline in os.listdir("/proc"):
        if not cmdline.isdigit():
            continue
        try:
            args = open(f"/proc/{cmdline}/cmdline", "rb").read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "vllm.entrypoints.openai.api_server" in args and port_flag in " ".join(args):
            found.append(int(cmdline))
    return found


def ner(url: str, texts: list[str], constrained: bool = True) -> list[str]:
    response = httpx.post(url + "/v1/ner", json={"texts": texts, "constrained": constrained}, timeout=300)
    assert response.status_code == 200, response.text
    return [r["answer"] for r in response.json()["results"]]


# ---- unit: reading vLLM's log, its flags ------------------------------------------------------

LOG = """\
(APIServer pid=1534) WARNING 12-03 17:04:08 [system_utils.py:255] This can cause fd limit errors like `OSError: [Errno 24] Too many open files`.
(EngineCore pid=1546) INFO 12-03 17:04:22 [utils.py:347] Using LBHNC KV cache layout.
(Worker pid=1558) ERROR 12-03 17:04:46 [multiproc_executor.py:1063]     raise ValueError(
(Worker pid=1558) ERROR 12-03 17:04:46 [multiproc_executor.py:1063] ValueError: Available memory on node 0 (15.24/19.96 GiB) is less than requested memory for kv (5000.0 GiB).
(EngineCore pid=1546) ERROR 12-03 17:04:46 [core.py:1510] EngineCore failed to start.
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore': 1}
"""  # noqa: E501 - lines of a real vLLM log (VLLM_CPU_KVCACHE_SPACE=5000)


def test_first_error_is_the_root_cause_not_a_warning_or_the_last_line():
    from llama_ner.generation.vllm_process import first_error

    assert first_error(LOG.splitlines()).startswith("ValueError: Available memory on node 0")
    assert first_error(["OSError: [Errno 98] Address already in use"]) == "OSError: [Errno 98] Address already in use"
    assert first_error(["INFO all fine"]) == ""


def test_lora_rank_rounds_up_to_one_vllm_takes(tmp_path):
    from llama_ner.generation.vllm_process import VllmLaunch, served_rank, vllm_command

    assert [served_rank(r) for r in (1, 4, 8, 12, 32, 100)] == [1, 8, 8, 16, 32, 128]
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 12, "rank_pattern": {"q_proj": 24}}))
    cmd = vllm_command(VllmLaunch("base", str(tmp_path), python=sys.executable, extra_args=["--seed", "1"]), 8001)
    assert cmd[cmd.index("--max-lora-rank") + 1] == "32" and cmd[-2:] == ["--seed", "1"]
    assert cmd[cmd.index("--lora-modules") + 1] == f"ner={tmp_path}" and "--generation-config" in cmd


# ---- answers: the two engines agree ------------------------------------------------------------


@pytest.mark.parametrize("constrained", [True, False], ids=["constrained", "plain"])
def test_ner_answers_equal_the_hf_engine(served, model, hf_reference, constrained):
    key = "constrained" if constrained else "plain"
    assert ner(served["vllm"].url, model["texts"], constrained) == hf_reference[key]
    assert ner(served["hf"].url, model["texts"], constrained) == hf_reference[key]
    assert hf_reference["constrained"][:3] != ["没有"] * 3  # the memorized rows have entities


def test_a_grammar_alone_repeats_lines_and_the_check_restores_the_hf_answer(served, model, hf_reference):
    """The structured-outputs grammar cannot forbid a repeated line; the token-by-token check must catch it."""
    from llama_ner.generation.inference import ner_prompt
    from llama_ner.generation.ner_constraint import NerConstraint, gbnf
    from llama_ner.generation.vllm_client import VllmClient, allowed_prefix, prompt_ids

    tokenizer = hf_reference["tokenizer"]
    client = VllmClient(served["engine_url"], "ner", tokenizer)
    texts = model["texts"]
    ids = prompt_ids(tokenizer, [ner_prompt(t) for t in texts], 512, TOKENS)
    constraint = NerConstraint(tokenizer, texts, TYPES)
    caught = []
    for i, text in enumerate(texts):
        out, _ = client.complete(ids[i], TOKENS, structured_outputs={"grammar": gbnf(text, TYPES)})
        if len(allowed_prefix(constraint.grammar(i), out)[0]) < len(out):
            caught.append(i)
    assert caught, "no answer needed the check: the test model no longer repeats lines under the grammar"
    answers = client.ner_answers([ids[i] for i in caught], TOKENS, NerConstraint(tokenizer, [texts[i] for i in caught]))
    assert answers == [hf_reference["constrained"][i] for i in caught]
    for answer in answers:
        assert len(set(answer.splitlines())) == len(answer.splitlines())


def test_plain_first_check_mode_gives_the_same_answers(served, model, hf_reference):
    """vllm_constraint=check: plain greedy requests, corrected with allowed_token_ids where the mask says no."""
    from llama_ner.generation.inference import ner_prompt
    from llama_ner.generation.ner_constraint import NerConstraint
    from llama_ner.generation.vllm_client import VllmClient, prompt_ids

    tokenizer = hf_reference["tokenizer"]
    client = VllmClient(served["engine_url"], "ner", tokenizer, grammar=False)
    ids = prompt_ids(tokenizer, [ner_prompt(t) for t in model["texts"]], 512, TOKENS)
    constraint = NerConstraint(tokenizer, model["texts"], TYPES)
    assert client.ner_answers(ids, TOKENS, constraint) == hf_reference["constrained"]
    assert client.checks["answers_corrected"] > 0  # the unseen rows' plain answers leave the language


def test_a_grammar_vllm_refuses_falls_back_to_the_check(served, model, hf_reference, monkeypatch, capsys):
    from llama_ner.generation import vllm_client
    from llama_ner.generation.inference import ner_prompt
    from llama_ner.generation.ner_constraint import NerConstraint

    monkeypatch.setattr(vllm_client, "gbnf", lambda text, types: "root ::= (")  # xgrammar cannot parse it
    tokenizer = hf_reference["tokenizer"]
    client = vllm_client.VllmClient(served["engine_url"], "ner", tokenizer)
    texts = model["texts"][:3]
    ids = vllm_client.prompt_ids(tokenizer, [ner_prompt(t) for t in texts], 512, TOKENS)
    assert client.ner_answers(ids, TOKENS, NerConstraint(tokenizer, texts, TYPES)) == hf_reference["constrained"][:3]
    assert "vLLM refused the NER grammar" in capsys.readouterr().out


def test_openai_endpoints_keep_their_shape_and_answers(served, hf_reference):
    from openai import OpenAI

    results = {}
    for name in ("vllm", "hf"):
        client = OpenAI(base_url=served[name].url + "/v1", api_key="none", max_retries=0, timeout=300)
        done = client.completions.create(model="any", prompt="北京是", max_tokens=12)
        streamed = client.completions.create(model="any", prompt="北京是", max_tokens=12, stream=True)
        chat = client.chat.completions.create(model="any", messages=[{"role": "user", "content": "你好"}], max_tokens=8)
        results[name] = (done.choices[0].text, "".join(c.choices[0].text for c in streamed), chat.choices[0].message)
        assert done.usage.prompt_tokens > 0 and done.choices[0].finish_reason in ("stop", "length")
    assert results["vllm"][0] == results["vllm"][1] == hf_reference["completion"]
    assert results["vllm"] == results["hf"]
    assert httpx.get(served["vllm"].url + "/").text == httpx.get(served["hf"].url + "/").text  # the page


def test_concurrent_requests_all_answered(served, model, hf_reference):
    import concurrent.futures

    texts = model["texts"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda t: ner(served["vllm"].url, [t])[0], texts))
    assert got == hf_reference["constrained"]
    health = httpx.get(served["vllm"].url + "/health").json()
    assert health["status"] == "ok" and health["engine"] == "vllm" and health["requests"] >= len(texts)


def test_bad_requests_are_4xx_on_vllm_too(served):
    url = served["vllm"].url
    response = httpx.post(url + "/v1/ner", json={"texts": ["北京"], "constrainted": False})
    assert response.status_code == 400 and "constrainted" in response.json()["error"]["message"]
    response = httpx.post(url + "/v1/completions", json={"prompt": "北京", "max_tokens": TOKENS + 1})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"
    assert ner(url, ["北京"]) == ner(served["hf"].url, ["北京"])  # and it keeps serving


# ---- test.py and predict.py --------------------------------------------------------------------


def test_test_py_on_vllm_writes_what_hf_writes(served, model, tmp_path):
    test = import_script("test")
    args = [f"--train_args_path={model['train_args']}", f"--dev_path={model['dev']}", f"--max_new_tokens={TOKENS}"]
    metrics = {}
    for engine, extra in (("hf", []), ("vllm", ["--engine=vllm", f"--engine_url={served['engine_url']}"])):
        out = tmp_path / engine
        metrics[engine] = test.main([*args, f"--output_dir={out}", *extra])
    hf, vllm = (tmp_path / e / "test_predictions.jsonl" for e in ("hf", "vllm"))
    assert vllm.read_text(encoding="utf-8") == hf.read_text(encoding="utf-8")
    assert metrics["vllm"] == metrics["hf"]
    assert metrics["hf"]["f1"] > 0.3  # the memorized rows are found


def test_predict_py_starts_its_own_vllm_and_stops_it(model, hf_reference, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(model["texts"][:4]) + "\n", encoding="utf-8")
    predict = import_script("predict")
    argv = [f"--train_args_path={model['train_args']}", f"--predict_path={texts}", f"--max_new_tokens={TOKENS}"]
    assert predict.main([*argv, "--engine=vllm"]) == hf_reference["constrained"][:4]
    out = capsys.readouterr().out
    started = next(line for line in out.splitlines() if line.startswith("starting vLLM on "))
    port = started.split()[3].rsplit(":", 1)[1]
    assert not vllm_processes(f"--port {port}")
    log = Path(started.split("(log: ", 1)[1].split(")", 1)[0])
    assert log.name.startswith("vllm-") and not log.exists()  # stopped with nothing wrong: no log left in /tmp


# ---- failures ----------------------------------------------------------------------------------


def run_serve(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "serve.py"), "--port", "0", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **env})


def test_vllm_that_cannot_load_the_model_is_one_line_and_its_log(model, tmp_path):
    """A model transformers runs and vLLM refuses: its LLaMA takes only the silu activation."""
    import shutil

    bad = shutil.copytree(model["base"], tmp_path / "gelu")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    result = run_serve(["--base_model", str(bad), "--only_cpu", "--engine", "vllm"])
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: vLLM exited with code") and "before it was ready" in last
    assert "Unsupported activation: gelu" in last  # vLLM's own reason, in the one line
    log = Path(last.rsplit("(", 1)[1].rstrip(")"))
    assert log.is_file() and "Unsupported activation: gelu" in log.read_text()  # the log it names is kept
    assert "  vllm| " in result.stderr  # and the end of its log above it
    assert "serving" not in result.stdout


def test_vllm_port_taken_names_the_port(model):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        result = run_serve(serve_argv(model, "--engine", "vllm", "--engine_port", str(port)))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert f"port {port} is taken: pick another --engine_port (0 = a free one)" in last
    assert not vllm_processes(f"--port {port}")


def test_vllm_without_memory_for_its_cache_says_so(model):
    result = run_serve(serve_argv(model, "--engine", "vllm"), VLLM_CPU_KVCACHE_SPACE="100000")
    assert result.returncode == 2
    assert "not enough memory" in result.stderr.strip().splitlines()[-1]


def test_vllm_dying_while_serving_gives_503_not_a_hang(model, hf_reference):
    """A vLLM of its own (with an API key) for serve.py --engine_url, killed with SIGKILL mid-service."""
    from llama_ner.generation.vllm_process import VllmLaunch, VllmServer
    from serve import ServerProcess

    launch = VllmLaunch(str(model["base"]), str(model["adapter"]), extra_args=["--api-key", "engine-key"])
    with VllmServer(launch) as engine:
        assert httpx.get(engine.url + "/v1/models").status_code == 401
        with ServerProcess(serve_argv(model, "--engine_url", engine.url, "--engine_api_key", "engine-key")) as server:
            assert ner(server.url, model["texts"][:2]) == hf_reference["constrained"][:2]
            os.kill(engine.proc.pid, signal.SIGKILL)
            start = time.monotonic()
            response = httpx.post(server.url + "/v1/ner", json={"texts": ["北京"]}, timeout=60)
            assert response.status_code == 503, response.text
            assert "engine is down" in response.json()["error"]["message"]
            health = httpx.get(server.url + "/health", timeout=60)
            assert health.status_code == 503 and health.json()["status"] == "engine_down"
            assert time.monotonic() - start < 60
            stream = httpx.post(server.url + "/v1/completions", json={"prompt": "北京", "stream": True}, timeout=60)
            assert "engine is down" in stream.text
        engine.stop()
        assert not group_alive(engine.proc.pid)  # its engine process, orphaned by the kill, is gone too


def test_stopping_serve_stops_vllm(served):
    """The last test of the module: SIGTERM to serve.py ends its vLLM and every process vLLM started."""
    port = engine_url(served["vllm"]).rsplit(":", 1)[1]
    assert vllm_processes(f"--port {port}")
    served["vllm"].proc.send_signal(signal.SIGTERM)
    served["vllm"].proc.wait(120)
    deadline = time.monotonic() + 60
    while vllm_processes(f"--port {port}") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not vllm_processes(f"--port {port}")
    while "stopping vLLM" not in "".join(served["vllm"].lines) and time.monotonic() < deadline:
        time.sleep(0.2)  # the reader thread may not have read serve.py's last lines yet
    assert "stopping vLLM" in "".join(served["vllm"].lines)
