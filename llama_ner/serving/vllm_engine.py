"""serve.py's engine on vLLM: the jobs batching.Batcher runs on the model in this process, sent to a vLLM server.

    engine = VllmEngine(VllmClient(url, "ner", tokenizer), max_positions=2048, server=server)
    answers = await engine.submit(Job("ner", texts, 256, {"types": types, "fmt": fmt}))

Every input is its own vLLM request, all in flight at once: vLLM batches them with whatever else is
running (continuous batching), so a request never waits for another's batch. Prompts are the token ids
the hf engine generates from, so greedy answers are its answers. `down()` tells when the vLLM this
process started has exited, or the one at --engine_url stops answering: requests then fail with
EngineError (503) and /health says so.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from dataset import ALPACA
from llama_ner.generation.inference import ner_prompt
from llama_ner.generation.ner_constraint import NerConstraint
from llama_ner.generation.vllm_client import (
    MAX_IN_FLIGHT,
    EngineError,
    EngineRefused,
    VllmClient,
    decode_answer,
    prompt_ids,
)
from llama_ner.generation.vllm_process import VllmServer
from llama_ner.generation.windows import answer_in_windows
from llama_ner.serving.batching import DeltaStreamer, Job


class VllmEngine:
    """The Batcher's interface (submit, queued, running, stats, max_positions) over a vLLM server."""

    def __init__(self, client: VllmClient, max_positions: int | None, server: VllmServer | None = None) -> None:
        self.client, self.server, self.max_positions = client, server, max_positions
        self.tokenizer = client.tokenizer
        self.pool = ThreadPoolExecutor(MAX_IN_FLIGHT, thread_name_prefix="vllm")
        self.running, self.closed = 0, False
        self.failure = ""  # the one line of a request the vLLM started here failed with (5xx)
        self.counts = {"engine": "vllm", "engine_url": client.url, "requests": 0}

    def queued(self) -> int:
        return 0  # vLLM queues, not this process

    def down(self) -> str | None:
        """Why the engine cannot serve now, or None."""
        if self.failure:
            return self.failure
        if self.server is not None and not self.server.alive():
            code = self.server.proc.returncode
            return f"vLLM exited (code {code}); its log is {self.server.log_path}; restart serve.py"
        try:
            ok = self.client.http.get("/health", timeout=5).status_code == 200
        except Exception as err:  # noqa: BLE001 - any failure to reach it is the answer
            return f"vLLM at {self.client.url} does not answer ({type(err).__name__})"
        return None if ok else f"vLLM at {self.client.url} is not healthy"

    @property
    def stats(self) -> dict[str, Any]:
        """For /health: requests taken, and how often the token-by-token check corrected the grammar."""
        return {**self.counts, **self.client.checks}

    def close(self) -> None:
        """Stop the vLLM this process started (every process of it); once."""
        if self.server is not None and not self.closed:
            self.closed = True
            print("stopping vLLM", flush=True)
            self.server.stop()

    async def submit(self, job: Job) -> list[str]:
        """The job's answers, one per input."""
        if self.server is not None and not self.server.alive():
            raise EngineError(self.down() or "vLLM exited")
        self.running += len(job.inputs)
        self.counts["requests"] += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, self.run, job)
        except EngineError as err:
            if self.server is not None and not isinstance(err, EngineRefused):
                self.failure = str(self.server.request_failed(err))
                raise EngineError(self.failure) from None
            raise
        finally:
            self.running -= len(job.inputs)

    def ner(self, job: Job, pieces: list[tuple[int, str]]) -> list[str]:
        """inference.ner_answers' answers from vLLM for the job's texts (or their windows)."""
        texts, fmt = [piece for _, piece in pieces], job.settings.get("fmt", ALPACA)
        prompts = [ner_prompt(text, fmt) for text in texts]
        ids = prompt_ids(self.tokenizer, prompts, self.max_positions, job.max_new_tokens, fmt)
        types = job.settings.get("types")
        constraint = NerConstraint(self.tokenizer, texts, types) if types else None
        return self.client.ner_answers(ids, job.max_new_tokens, constraint)

    def run(self, job: Job) -> list[str]:
        if job.kind == "ner":
            return answer_in_windows(job.inputs, job.settings.get("window_chars", 0), lambda p: self.ner(job, p))
        ids = prompt_ids(self.tokenizer, job.inputs, self.max_positions, job.max_new_tokens)
        params = sampling(job.settings)
        if job.on_delta is None:
            return self.client.answers(ids, job.max_new_tokens, **params)
        streamer = DeltaStreamer(self.tokenizer, job.on_delta)
        streamer.prompt_seen = True
        new: list[int] = []
        for chunk in self.client.stream(ids[0], job.max_new_tokens, **params):
            new += chunk
            streamer.put(np.array(chunk, dtype=np.int64))
        return [decode_answer(self.tokenizer, new)]


def sampling(settings: dict[str, Any]) -> dict[str, Any]:
    """http_api's generate() settings as vLLM request fields (empty: greedy)."""
    if not settings.get("do_sample"):
        return {}
    return {"temperature": settings["temperature"], "top_p": settings["top_p"]}
