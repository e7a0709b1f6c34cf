"""Generation on a vLLM OpenAI server: prompts sent as the token ids the transformers engine would generate
from, answers decoded from the ids vLLM returns, NER answers constrained and checked token by token.

    client = VllmClient("http://127.0.0.1:8000", "ner", tokenizer)
    answers = client.ner_answers(prompt_ids(tokenizer, prompts, 2048, 256), 256, NerConstraint(tokenizer, texts))

A constrained NER answer goes to vLLM with its language as a structured-outputs grammar (the GBNF of
ner_constraint.gbnf, for xgrammar), or (grammar=False) as a plain greedy request. Either way the answer is
then walked token by token through the same `TextGrammar` the transformers engine masks with (a grammar
cannot forbid a repeated line): at the first token that engine would not have allowed, vLLM is asked for
one token with `allowed_token_ids` set to what that engine allows there, then (grammar=False) for plain
greedy tokens again, checked the same way, and so on. Where the model's own best token is allowed, the
masked choice is that token, so greedy answers are those of `inference.ner_answers` (fp32) both ways;
the ways differ only in speed (docs/vllm.md).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from dataset import ALPACA, PromptFormat
from llama_ner.generation.ner_constraint import NerConstraint, gbnf
from llama_ner.generation.ner_grammar import State, TextGrammar

MAX_IN_FLIGHT = 64  # requests sent at once; vLLM batches them (continuous batching)


class EngineError(RuntimeError):
    """vLLM cannot be reached, or failed a request: the server answers 503."""


class EngineRefused(EngineError):
    """vLLM answered 4xx: it refused this request (e.g. a grammar its backend cannot compile)."""


class VllmClient:
    """One vLLM server and the model id to ask for (the LoRA's id, or the base's)."""

    def __init__(
        self, url: str, model: str, tokenizer: Any, api_key: str | None = None, grammar: bool = True, timeout: int = 600
    ) -> None:
        import httpx

        self.url, self.model, self.tokenizer = url.rstrip("/"), model, tokenizer
        self.grammar = grammar  # constrained answers: grammar first (True), or plain greedy first
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=MAX_IN_FLIGHT)
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, limits=limits)
        # constrained answers: checked, of those redone past a token the grammar let through, tokens so redone
        self.checks = {"constrained_answers": 0, "answers_corrected": 0, "tokens_corrected": 0}
        self.checks_lock = threading.Lock()  # ner_answers counts from many threads

    def count(self, key: str, n: int = 1) -> None:
        with self.checks_lock:
            self.checks[key] += n

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        try:
            response = self.http.request(method, path, json=body)
        except httpx.HTTPError as err:
            raise EngineError(f"vLLM at {self.url} cannot be reached ({type(err).__name__}: {err})") from None
        if response.status_code != 200:
            kind = EngineRefused if 400 <= response.status_code < 500 else EngineError
            raise kind(f"vLLM at {self.url} answered {response.status_code}: {error_text(response.text)}")
        return response.json()

    # ---- generation

    def complete(self, prompt: list[int], max_tokens: int, **params: Any) -> tuple[list[int], str]:
        """Greedy (unless params say otherwise) new token ids for one prompt, and vLLM's finish reason."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **params}
        body |= {"return_token_ids": True, "stop_token_ids": [self.tokenizer.eos_token_id]}
        choice = self.request("POST", "/v1/completions", body)["choices"][0]
        return list(choice["token_ids"]), choice["finish_reason"]

    def stream(self, prompt: list[int], max_tokens: int, **params: Any) -> Iterator[list[int]]:
        """The new token ids of one prompt as vLLM generates them, a chunk at a time."""
        import httpx

        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **params}
        body |= {"return_token_ids": True, "stop_token_ids": [self.tokenizer.eos_token_id], "stream": True}
        try:
            with self.http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    raise EngineError(f"vLLM answered {response.status_code}: {error_text(response.read().decode())}")
                for line in response.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        choices = json.loads(line[6:]).get("choices") or [{}]
                        yield list(choices[0].get("token_ids") or [])
        except httpx.HTTPError as err:
            raise EngineError(f"vLLM at {self.url} cannot be reached ({type(err).__name__}: {err})") from None

    def answers(self, prompts: list[list[int]], max_tokens: int, **params: Any) -> list[str]:
        """The decoded answer of every prompt, all in flight at once."""
        with ThreadPoolExecutor(min(MAX_IN_FLIGHT, len(prompts) or 1)) as pool:
            outputs = list(pool.map(lambda p: self.complete(p, max_tokens, **params)[0], prompts))
        return [decode_answer(self.tokenizer, ids) for ids in outputs]

    def ner_answers(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        constraint: NerConstraint | None = None,
        progress: Any = None,
    ) -> list[str]:
        """The answer of every NER prompt (prompt i's text is constraint.texts[i]); greedy, as the transformers
        engine's, constrained unless `constraint` is None. `progress`: a tqdm bar to advance per answer."""

        def one(i: int) -> str:
            answer = self.ner_answer(prompts[i], max_new_tokens, constraint, i)
            if progress is not None:
                progress.update(1)
            return answer

        with ThreadPoolExecutor(min(MAX_IN_FLIGHT, len(prompts) or 1)) as pool:
            return list(pool.map(one, range(len(prompts))))

    def ner_answer(self, prompt: list[int], max_new_tokens: int, constraint: NerConstraint | None, i: int) -> str:
        if constraint is None:
            return decode_answer(self.tokenizer, self.complete(prompt, max_new_tokens)[0])
        constraint.texts[i] = constraint.texts[i][: len(prompt) * constraint.vocab.longest]  # as processor() cuts
        grammar = constraint.grammar(i)
        first = {"structured_outputs": {"grammar": gbnf(constraint.texts[i], constraint.types)}} if self.grammar else {}
        try:
            ids, _ = self.complete(prompt, max_new_tokens, **first)
        except EngineRefused as err:  # the check below keeps the answer exact without the grammar too
            if not first:
                raise
            print(f"warning: vLLM refused the NER grammar ({err}); answer {i} is checked token by token instead")
            ids, _ = self.complete(prompt, max_new_tokens)
            first = {}
        kept, state = allowed_prefix(grammar, ids)
        eos = self.tokenizer.eos_token_id
        self.count("constrained_answers")
        self.count("answers_corrected", len(kept) < len(ids))
        while len(kept) < max_new_tokens and (not kept or kept[-1] != eos):
            # the token the hf engine's mask would pick here, then (plain first) greedy again up to the next miss
            allowed = grammar.allowed_ids(state).tolist()
            token = self.complete(prompt + kept, 1, allowed_token_ids=allowed)[0][0]
            state = grammar.step(state, token)
            kept.append(token)
            self.count("tokens_corrected")
            if not first and token != eos and len(kept) < max_new_tokens:
                more = self.complete(prompt + kept, max_new_tokens - len(kept))[0]
                more, state = allowed_prefix(grammar, more, state)
                kept += more
        answer = decode_answer(self.tokenizer, kept)
        return constraint.finish(i, answer, eos not in kept)


def allowed_prefix(grammar: TextGrammar, ids: Sequence[int], state: State | None = None) -> tuple[list[int], State]:
    """The longest start of `ids` whose every token the transformers engine's mask allows (from `state`, else the
    answer's start), and the state after it."""
    state, kept = state or State(), []
    for token in ids:
        if not np.isin(token, grammar.allowed_ids(state)):
            break
        state = grammar.step(state, token)
        kept.append(token)
        if token == grammar.vocab.eos_id:
            break
    return kept, state


def decode_answer(tokenizer: Any, ids: list[int]) -> str:
    """As generate.decode_new_tokens: the text up to the first </s>, stripped."""
    from llama_ner.generation.generate import decode_new_tokens

    return decode_new_tokens(tokenizer, ids)


def error_text(body: str) -> str:
    """vLLM's error message out of its JSON error body (else the body's start)."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:300]
    return " ".join(str(message).split())


def prompt_ids(
    tokenizer: Any, prompts: list[str], positions: int | None, max_new_tokens: int, fmt: PromptFormat = ALPACA
) -> list[list[int]]:
    """The token ids the transformers engine generates from (BOS, cut to fit `positions` with max_new_tokens)."""
    from llama_ner.generation.generate import encode_prompts

    return encode_prompts(positions, tokenizer, prompts, max_new_tokens, fmt.tail)


def connect(
    tokenizer: Any,
    base_model: str,
    adapter: str | None,
    engine_url: str = "",
    engine_model: str = "",
    api_key: str | None = None,
    launch: Any = None,
    grammar: bool = True,
) -> tuple[VllmClient, Any, int | None]:
    """(client, the VllmServer started for it or None, the positions a prompt + answer may take).

    With engine_url: that server, asked for engine_model (default: 'ner' with an adapter, else base_model).
    Else a server started from `launch` (vllm_process.VllmLaunch) for base_model + adapter.
    """
    from llama_ner.generation.vllm_process import ADAPTER_NAME, VllmServer
    from llama_ner.io_utils import UserError
    from llama_ner.weights.model_files import read_model_config

    config = read_model_config(base_model)
    positions, vocab = config.get("max_position_embeddings"), config["vocab_size"]
    if len(tokenizer) > vocab:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens, {base_model} {vocab}: vLLM cannot grow the embeddings as "
            "the hf engine does; merge the LoRA into the base first (merge_llama_with_chinese_lora.py) or use "
            "engine hf"
        )
    server = None
    if engine_url:
        url, model = engine_url, engine_model or (ADAPTER_NAME if adapter else base_model)
    else:
        server = VllmServer(launch)
        url, model = server.url, server.model_name
    client = VllmClient(url, model, tokenizer, api_key, grammar)
    try:
        cards = {card["id"]: card for card in client.request("GET", "/v1/models")["data"]}
    except EngineError as err:
        if server is not None:
            server.stop()
        raise UserError(f"{err}; is vLLM running there (engine_url)?") from None
    if model not in cards:
        if server is not None:
            server.stop()
        raise UserError(f"{url} serves {', '.join(cards)}, not {model}: pass the id to use as engine_model")
    served = [c.get("max_model_len") for c in (cards[model], cards.get(cards[model].get("parent"), {})) if c]
    served = [p for p in served if p]
    if served:
        positions = min([positions, *served]) if positions else min(served)
    return client, server, positions
