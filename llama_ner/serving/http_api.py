"""serve.py's HTTP app: OpenAI-style endpoints, /v1/ner with entity spans, the page, request checks.

    app = create_app(Batcher(model, tokenizer, 16), tokenizer, args)   # args: serve.parse_args(...)
    uvicorn.run(app)

Generation goes through an engine: batching.Batcher (the model in this process, one worker thread,
concurrent requests batched) or vllm_engine.VllmEngine (a vLLM server); a vLLM that is down gives 503.
Every bad request gets a 4xx JSON error in OpenAI's shape that names the field.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from dataset import ALPACA, PROMPT_TEMPLATE, PromptFormat, build_prompt, without_added_bos
from llama_ner.generation.inference import ner_prompt
from llama_ner.generation.metrics import answer_entities
from llama_ner.generation.vllm_client import EngineError, EngineRefused
from llama_ner.serving.batching import Job

PAGE = Path(__file__).resolve().parent / "web" / "index.html"
MAX_BODY_BYTES = 1 << 20  # larger request bodies get 413
UNION_TAGS = {"str", "list[str]"}


# ---- request shapes ------------------------------------------------------------------------


def unicode_text(value: str) -> str:
    """JSON may carry a lone UTF-16 surrogate (\\ud800), which is no text: the tokenizer would fail on it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not text: it holds a lone UTF-16 surrogate (e.g. \\ud800); send valid Unicode") from None
    return value


Text = Annotated[StrictStr, AfterValidator(unicode_text)]


class Strict(BaseModel):
    """A request shape: an unknown field (a typo, an option this server lacks) is refused, never ignored."""

    model_config = ConfigDict(extra="forbid")


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: Text


class Sampling(Strict):
    model: StrictStr | None = None  # any id is accepted: one model is served
    max_tokens: StrictInt | None = None  # None: --max_new_tokens
    temperature: float = Field(0, ge=0, le=2, strict=True, allow_inf_nan=False)  # 0 = greedy (OpenAI's default: 1)
    top_p: float = Field(1, gt=0, le=1, strict=True, allow_inf_nan=False)
    stream: StrictBool = False
    n: Literal[1] = 1


class ChatRequest(Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]


class CompletionRequest(Sampling):
    prompt: Text | list[Text]  # an empty list is refused by the endpoint, naming what to send


class NerRequest(Strict):
    model: StrictStr | None = None
    texts: Annotated[list[Text], Field(min_length=1)]
    constrained: StrictBool = True  # answers only '没有' or distinct '实体_类型' lines grounded in the text


class ApiError(Exception):
    """A bad request: status code, message, and the field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = "authentication_error" if status == 401 else "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


def field_name(loc: tuple) -> str:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'."""
    name = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if part in UNION_TAGS or (isinstance(part, str) and "[" in part):  # the union member tried: prompt.str
            continue
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "body"


REQUESTS = {"/v1/ner": NerRequest, "/v1/chat/completions": ChatRequest, "/v1/completions": CompletionRequest}
JSON_HEADER = (
    "send a JSON object with the header Content-Type: application/json (curl: -H 'Content-Type: application/json')"
)


def validation_message(err: RequestValidationError, path: str = "") -> tuple[str, str]:
    """(message, field) of the first validation error, saying what to send instead."""
    first = err.errors()[0]
    if first["type"] == "json_invalid":
        return f"body: invalid JSON ({first.get('ctx', {}).get('error', first['msg'])})", "body"
    name = field_name(tuple(first["loc"]))
    if first["type"] == "missing":
        return f"{name}: required field missing", name
    if name == "body" and first["type"] in ("model_attributes_type", "dict_type"):
        return f"body: not a JSON object; {JSON_HEADER}", "body"
    if first["type"] == "extra_forbidden":
        known = sorted(REQUESTS[path].model_fields) if path in REQUESTS and "." not in name else []
        fields = f"; this endpoint's fields are {', '.join(known)}" if known else ""
        return f"{name}: unknown field (a typo, or an option this server does not have){fields}", name
    return f"{name}: {first['msg'].removeprefix('Value error, ')}", name


# ---- prompts and answers -------------------------------------------------------------------


def chat_prompt(messages: list[ChatMessage], fmt: PromptFormat = ALPACA, tokenizer: Any = None) -> str:
    """The prompt in the model's format: for one user message exactly chat_ner.py --with_prompt's (`build_prompt`).

    Alpaca: earlier turns go between the template's first line and the last instruction; a system
    message replaces the first line. chat: the tokenizer's chat template over all messages. raw: the
    messages' text, one a line. The last message must be the user's.
    """
    if messages[-1].role != "user":
        raise ApiError(400, f"messages[{len(messages) - 1}].role: the last message must be the user's", "messages")
    if fmt.name == "chat":
        turns = [{"role": m.role, "content": m.content} for m in messages]
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return without_added_bos(tokenizer, text)
    if fmt.name == "raw":
        return "\n".join(m.content for m in messages) + fmt.tail
    head = PROMPT_TEMPLATE.partition("### Instruction:")[0]
    system = [m.content for m in messages if m.role == "system"]
    history = "".join(
        f"### Instruction:\n{m.content}\n\n" if m.role == "user" else f"### Response: {m.content}\n\n"
        for m in messages[:-1]
        if m.role != "system"
    )
    last = build_prompt(messages[-1].content)[len(head) :]
    return ("\n".join(system) + "\n\n" if system else head) + history + last


# ---- the app -------------------------------------------------------------------------------


class Limits:
    """Authorization and body size, checked before a request reaches its endpoint (pure ASGI)."""

    def __init__(self, app: Any, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")  # raw header bytes; serve.py keeps keys ASCII
            if not hmac.compare_digest(given, b"Bearer " + self.api_key.encode("ascii")):
                response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'")
                return await response(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:  # read the whole body (a client still sending would miss an early answer)
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= MAX_BODY_BYTES:
                chunks.append(chunk)
            more = message.get("more_body", False)
        if size > MAX_BODY_BYTES:
            response = error_response(413, f"body: larger than {MAX_BODY_BYTES} bytes; send fewer or shorter texts")
            return await response(scope, receive, send)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()  # waits for the disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def create_app(engine: Any, tokenizer: Any, args: argparse.Namespace) -> Any:
    """The ASGI app generating with `engine` (batching.Batcher or vllm_engine.VllmEngine).

    `args.types` are the entity types of constrained /v1/ner answers (loading.spec_from_args).
    """

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()  # uvicorn's shutdown (Ctrl-C, SIGTERM) ends with the signal re-raised: stop vLLM here

    app = FastAPI(title="Chinese-Alpaca NER", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    max_positions = engine.max_positions
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.message, err.param)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, err: RequestValidationError) -> JSONResponse:
        return error_response(400, *validation_message(err, request.url.path))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        if err.detail == "There was an error parsing the body":  # FastAPI's words for a body that is not UTF-8
            return error_response(400, f"body: not UTF-8; encode the JSON body as UTF-8 ({JSON_HEADER})", "body")
        return error_response(err.status_code, f"{request.url.path}: {err.detail}")

    @app.exception_handler(EngineError)
    async def engine_down(request: Request, err: EngineError) -> JSONResponse:
        print(f"error: {request.url.path}: {err}", file=sys.stderr, flush=True)
        if isinstance(err, EngineRefused):  # up, but it refused what this server sent: not the client's fault
            return error_response(502, f"the generation engine refused the request: {err}")
        return error_response(503, f"the generation engine is down: {err}")

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        print(f"error: {request.url.path}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return error_response(500, "internal error; the server log has the details")

    def max_tokens(request: Sampling) -> int:
        value = args.max_new_tokens if request.max_tokens is None else request.max_tokens
        if not 1 <= value <= args.max_new_tokens:
            raise ApiError(400, f"max_tokens: {value} is not between 1 and {args.max_new_tokens}", "max_tokens")
        return value

    def check_count(items: list[str], name: str, noun: str) -> None:
        if len(items) > args.max_texts:
            raise ApiError(400, f"{name}: {len(items)} {noun}; at most {args.max_texts} per request", name)

    def check_length(prompt: str, new_tokens: int, name: str, fix: str = "shorten it or lower max_tokens") -> int:
        """Prompt tokens; an error when prompt + new tokens exceed the model's positions."""
        count = len(tokenizer.encode(prompt, add_special_tokens=True))
        if max_positions and count + new_tokens > max_positions:
            raise ApiError(
                400,
                f"{name}: the prompt is {count} tokens; with {new_tokens} new tokens that exceeds the model's "
                f"{max_positions} positions; {fix}",
                name,
            )
        return count

    def settings(request: Sampling) -> dict[str, Any]:
        if request.temperature == 0:
            return {}
        return {"do_sample": True, "temperature": float(request.temperature), "top_p": float(request.top_p), "top_k": 0}

    def usage(prompt_tokens: int, answers: list[str], limit: int) -> tuple[dict[str, int], list[str]]:
        """Token usage and each answer's finish reason; answers are counted by re-tokenizing their text."""
        counts = [min(limit, len(tokenizer.encode(a, add_special_tokens=False))) for a in answers]
        reasons = ["length" if c >= limit else "stop" for c in counts]
        used = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(counts)}
        return {**used, "total_tokens": prompt_tokens + sum(counts)}, reasons

    @app.get("/health", response_model=None)
    async def health() -> dict[str, Any] | JSONResponse:
        state = {"queued": engine.queued(), "running": engine.running}
        why = await asyncio.get_running_loop().run_in_executor(None, engine.down)
        if why is not None:
            return JSONResponse({"status": "engine_down", "error": why, "model": args.model_name}, status_code=503)
        return {"status": "ok", "model": args.model_name, **state, **engine.stats}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": args.model_name, "object": "model", "created": created, "owned_by": "local"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/ner")
    async def ner(request: NerRequest) -> dict[str, Any]:
        check_count(request.texts, "texts", "texts")
        for i, text in enumerate(request.texts):
            if not text.strip():
                raise ApiError(400, f"texts[{i}]: empty text", f"texts[{i}]")
            fix = "shorten the text (or start the server with a lower --max_new_tokens)"
            check_length(ner_prompt(text, args.fmt), args.max_new_tokens, f"texts[{i}]", fix)
        settings = {"types": args.types} if request.constrained else {}  # inference.ner_answers' constraint
        settings["fmt"] = args.fmt
        settings["window_chars"] = getattr(args, "window_chars", 0)  # texts longer than the trained ones: windows
        answers = await engine.submit(Job("ner", list(request.texts), args.max_new_tokens, settings))
        results = [
            {"text": t, "answer": a, "entities": answer_entities(t, a)}
            for t, a in zip(request.texts, answers, strict=True)
        ]
        return {"model": args.model_name, "results": results}

    async def complete(prompts: list[str], request: Sampling, field: str) -> tuple[list[str], dict, list[str]]:
        limit = max_tokens(request)
        prompt_tokens = sum(check_length(p, limit, field) for p in prompts)
        answers = await engine.submit(Job("text", prompts, limit, settings(request)))
        return answers, *usage(prompt_tokens, answers, limit)

    def stream(prompt: str, request: Sampling, field: str, chunk: Any) -> StreamingResponse:
        """Server-sent events: chunk(text, finish_reason) for each piece, then [DONE]."""
        limit = max_tokens(request)
        check_length(prompt, limit, field)

        async def events() -> AsyncIterator[str]:
            loop = asyncio.get_running_loop()
            pieces: asyncio.Queue[str | None] = asyncio.Queue()
            job = Job(
                "text", [prompt], limit, settings(request), lambda d: loop.call_soon_threadsafe(pieces.put_nowait, d)
            )
            task = asyncio.ensure_future(engine.submit(job))
            task.add_done_callback(lambda _: pieces.put_nowait(None))
            yield sse(chunk("", None))
            sent = ""
            while (piece := await pieces.get()) is not None:
                sent += piece
                yield sse(chunk(piece, None))
            try:
                answer = task.result()[0]
            except Exception as err:
                print(f"error: streaming: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                message = "internal error; the server log has the details"
                if isinstance(err, EngineError):
                    message = f"the generation engine is down: {err}"
                yield sse({"error": {"message": message, "type": "server_error"}})
                return
            if answer.startswith(sent) and len(answer) > len(sent):
                yield sse(chunk(answer[len(sent) :], None))
            yield sse(chunk("", usage(0, [answer], limit)[1][0]))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: ChatRequest) -> dict[str, Any] | StreamingResponse:
        prompt = chat_prompt(request.messages, args.fmt, tokenizer)
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "created": now, "model": args.model_name}
        if request.stream:

            def chunk(text: str, reason: str | None) -> dict[str, Any]:
                delta = {"role": "assistant", "content": text} if reason is None else {}
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
                return {**head, "object": "chat.completion.chunk", "choices": [choice]}

            return stream(prompt, request, "messages", chunk)
        answers, used, reasons = await complete([prompt], request, "messages")
        message = {"role": "assistant", "content": answers[0]}
        choice = {"index": 0, "message": message, "finish_reason": reasons[0], "logprobs": None}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": used}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: CompletionRequest) -> dict[str, Any] | StreamingResponse:
        prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
        if not prompts:
            raise ApiError(400, "prompt: an empty list; send a string or a list of one or more strings", "prompt")
        check_count(prompts, "prompt", "prompts")
        ident, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": ident, "created": now, "model": args.model_name}
        if request.stream:
            if len(prompts) > 1:
                raise ApiError(400, "prompt: streaming takes one prompt", "prompt")

            def chunk(text: str, reason: str | None) -> dict[str, Any]:
                choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
                return {**head, "object": "text_completion", "choices": [choice]}

            return stream(prompts[0], request, "prompt", chunk)
        answers, used, reasons = await complete(prompts, request, "prompt")
        choices = [
            {"index": i, "text": a, "finish_reason": r, "logprobs": None}
            for i, (a, r) in enumerate(zip(answers, reasons, strict=True))
        ]
        return {**head, "object": "text_completion", "choices": choices, "usage": used}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    return Limits(app, args.api_key)


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
