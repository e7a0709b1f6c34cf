"""Batch concurrent generation requests into one `generate_answers` call, off the event loop.

    batcher = Batcher(model, tokenizer, max_batch_size=16)
    answers = await batcher.submit(Job("ner", texts, max_new_tokens=256))
    answers = await batcher.submit(Job("text", [prompt], 64, settings, on_delta=print))  # streamed

One worker thread owns the model. It takes the oldest waiting job, adds every other waiting
job of the same kind and settings while the batch holds at most `max_batch_size` inputs,
generates them together (NER through `inference.ner_answers`, as test.py-equivalent code
does; free text through `generation.generate.generate_answers`) and hands each job its own answers.
Requests that arrive while a batch runs wait and form the next batch. Greedy answers do not
depend on the batch (left padding, fp32: tests/test_inference.py). A streamed job runs alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers.generation.streamers import BaseStreamer

from llama_ner.generation.generate import generate_answers
from llama_ner.generation.inference import ner_answers


@dataclass
class Job:
    """One request's inputs: plain sentences (kind 'ner') or prompts (kind 'text')."""

    kind: str
    inputs: list[str]
    max_new_tokens: int
    settings: dict[str, Any] = field(default_factory=dict)  # generate() keywords besides greedy's
    on_delta: Callable[[str], None] | None = None  # streaming: called (in the worker) with each new piece
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)

    def key(self) -> tuple:
        """Jobs with equal keys can share a generate call."""
        return self.kind, self.max_new_tokens, tuple(sorted(self.settings.items()))


class DeltaStreamer(BaseStreamer):
    """Calls on_delta with each new piece of text such that the pieces add up to the final stripped answer.

    The text decoded so far is stripped (the answer is); a piece ending in an unfinished
    UTF-8 byte sequence, and trailing whitespace, are held back until more text follows.
    """

    def __init__(self, tokenizer: Any, on_delta: Callable[[str], None]) -> None:
        self.tokenizer, self.on_delta = tokenizer, on_delta
        self.ids: list[int] = []
        self.sent = ""
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        eos = self.tokenizer.eos_token_id
        ids = self.ids[: self.ids.index(eos)] if eos in self.ids else self.ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        if text.endswith("\ufffd") or not text.startswith(self.sent) or len(text) == len(self.sent):
            return
        delta, self.sent = text[len(self.sent) :], text
        self.on_delta(delta)

    def end(self) -> None:
        pass


class Batcher:
    """A request queue served by one worker thread.

    For /health: `stats` counts batches, `running` is the number of inputs being generated now.
    """

    def __init__(self, model: Any, tokenizer: Any, max_batch_size: int = 16) -> None:
        self.model, self.tokenizer, self.max_batch_size = model, tokenizer, max_batch_size
        self.max_positions: int | None = getattr(model.config, "max_position_embeddings", None)
        self.waiting: list[Job] = []
        self.cond = threading.Condition()
        self.running = 0
        self.stats = {"batches": 0, "requests": 0, "largest_batch": 0, "largest_batch_requests": 0}
        threading.Thread(target=self.work, name="generate", daemon=True).start()

    async def submit(self, job: Job) -> list[str]:
        """The job's answers, one per input, once its batch ran."""
        with self.cond:
            self.waiting.append(job)
            self.cond.notify()
        return await asyncio.wrap_future(job.future)

    def queued(self) -> int:
        with self.cond:
            return len(self.waiting)

    def down(self) -> str | None:
        """Why the engine cannot serve (never: the model is in this process)."""
        return None

    def close(self) -> None:
        """Nothing to stop: the worker thread is a daemon."""

    def take(self) -> list[Job]:
        """Block until work is waiting; return the oldest job and the waiting jobs that can join it."""
        with self.cond:
            while not self.waiting:
                self.cond.wait()
            first = self.waiting.pop(0)
            batch, size = [first], len(first.inputs)
            if first.on_delta is None:
                for job in list(self.waiting):
                    if (
                        job.on_delta is None
                        and job.key() == first.key()
                        and size + len(job.inputs) <= self.max_batch_size
                    ):
                        self.waiting.remove(job)
                        batch.append(job)
                        size += len(job.inputs)
            return batch

    def work(self) -> None:
        while True:
            jobs = self.take()
            try:
                answers = self.run(jobs)
            except Exception as err:  # the requests fail, the worker lives on
                for job in jobs:
                    job.future.set_exception(err)
                continue
            start = 0
            for job in jobs:
                job.future.set_result(answers[start : start + len(job.inputs)])
                start += len(job.inputs)

    def run(self, jobs: list[Job]) -> list[str]:
        """One generate call for the jobs' inputs, in order."""
        first = jobs[0]
        inputs = [text for job in jobs for text in job.inputs]
        settings = dict(first.settings)
        if first.on_delta is not None:
            settings["streamer"] = DeltaStreamer(self.tokenizer, first.on_delta)
        start = time.perf_counter()
        generate = ner_answers if first.kind == "ner" else generate_answers
        size, tokens = self.max_batch_size, first.max_new_tokens
        self.running = len(inputs)
        try:
            answers = generate(self.model, self.tokenizer, inputs, size, tokens, progress=False, **settings)
        finally:
            self.running = 0
        seconds = time.perf_counter() - start
        self.stats["batches"] += 1
        self.stats["requests"] += len(jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(inputs))
        self.stats["largest_batch_requests"] = max(self.stats["largest_batch_requests"], len(jobs))
        print(f"batch: {len(jobs)} requests, {len(inputs)} {first.kind} inputs, {seconds:.2f}s", flush=True)
        return answers
