"""The OpenAI-compatible HTTP API (FastAPI) over a koala.engine.Engine.

Endpoints: POST /v1/chat/completions, POST /v1/completions (stream=true gives server-sent events in OpenAI's
chunk format ending with `data: [DONE]`), GET /v1/models, GET /health. Unknown fields, bad parameters and anything
over the server's `Limits` are refused with a 4xx and an OpenAI-style error body (every error has that shape),
never a crash. Every response carries the speculative counters (tau, target forwards) in an extra `koala` field.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException

from koala.acceptance import Sampling
from koala.data import valid_unicode
from koala.decode import Stats
from koala.drafters.base import Drafter
from koala.engine import Engine, Job, Limits, Outcome
from koala.target import Target


class APIError(Exception):
    """An error reported to the client in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class BodyLimit:
    """ASGI middleware: refuse (413) a request body over `limit` bytes before anything parses it."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"the request body is over this server's limit of {self.limit} bytes")
        declared = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            return await too_big.response()(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_big.response()(scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():  # the body once, then the real channel (it reports a disconnect)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


# ---- request schemas: unknown fields are rejected, so a typo or an unsupported option never passes silently ----

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data):
        """Clients echo answers back with null fields (refusal, tool_calls, ...): a null says nothing, so allow it."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    """Fields shared by both endpoints; None means the server's default (its --temperature etc.)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, description="extension: keep only the k most likely tokens (0 = all)")
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=0, lt=2**63)
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported (one choice per request)")
        return n

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("give at most 4 non-empty stop strings")
        return stops


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1)


def _invalid_request(exc: RequestValidationError) -> APIError:
    """One readable 400 for pydantic's error list (which field, what is wrong)."""
    parts, params = [], []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        params.append(where if where and err.get("type") != "json_invalid" else None)
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown field '{where}' (not supported by koala serve)")
        elif err.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
        elif not where:
            parts.append("the request body must be a JSON object sent with Content-Type: application/json")
        else:
            parts.append(f"{where}: {str(err.get('msg')).removeprefix('Value error, ')}")
    return APIError(400, "; ".join(parts) or "invalid request", params[0] if params else None)


def _special_texts(tokenizer) -> list[str]:
    """Texts the tokenizer turns into control tokens wherever they appear (e.g. '<|im_start|>')."""
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    return sorted({t for t in tokenizer.all_special_tokens if t} | {t.content for t in added if t.special})


def create_app(target: Target, drafter: Drafter | None = None, defaults: Sampling = Sampling(),
               max_tokens: int = 256, rule: str = "auto", model_name: str | None = None,
               limits: Limits = Limits()) -> FastAPI:
    """The FastAPI app serving `target`; `defaults` and `max_tokens` apply to requests that leave them out.

    `limits` are hard (4xx otherwise, as vLLM answers): new tokens up to `max_tokens_cap` (default `max_tokens`),
    the prompt up to `max_prompt_tokens`, prompt + max_tokens within the context, body size, message count, stop
    string length, special-token text, queue length (503), and an optional API key (401).
    """
    cap = limits.max_tokens_cap or max_tokens
    prompt_cap = min(limits.max_prompt_tokens or target.max_length, target.max_length)
    engine = Engine(target, drafter, rule, limits.max_batch, limits.max_waiting)
    served = model_name or Path(target.name).name or target.name
    specials = [] if limits.allow_special_tokens else _special_texts(target.tokenizer)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()  # stop the generation in flight so the process exits promptly

    app = FastAPI(title="koala", description="OpenAI-compatible speculative decoding server", lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response({"Retry-After": "1"} if exc.status == 503 else None)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:  # unknown path, bad method, bad body
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return APIError(exc.status_code, detail).response(exc.headers)

    @app.exception_handler(Exception)
    async def _failed(_: Request, exc: Exception) -> JSONResponse:  # a bug or e.g. out of GPU memory: still JSON
        return JSONResponse(APIError(500, f"generation failed: {exc}").body(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_invalid_request(exc).body(), status_code=400)

    def authorized(request: Request) -> None:
        if limits.api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), limits.api_key.encode()):
            raise APIError(401, "a valid API key is required: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check(req: _Common) -> None:
        """What can be refused before tokenising."""
        if req.model not in (None, served):
            raise APIError(404, f"model '{req.model}' is not served here; this server serves '{served}'",
                           "model", "model_not_found")
        if any(len(s) > limits.max_stop_chars for s in req.stop):
            raise APIError(400, f"a stop string is over this server's limit of {limits.max_stop_chars} characters",
                           "stop")
        if engine.closed:
            raise APIError(503, "the server is shutting down", code="server_shutting_down")
        if engine.full:
            raise APIError(503, f"the server is busy ({engine.pending} requests in flight); retry shortly",
                           code="server_busy")

    def make_job(req: _Common, ids: list[int], limit: int | None) -> Job:
        limit = limit or max_tokens
        if limit > cap:
            raise APIError(400, f"max_tokens is {limit} but this server allows at most {cap}", "max_tokens")
        if len(ids) >= target.max_length:
            raise APIError(400, f"the prompt is {len(ids)} tokens but the target's context holds "
                                f"{target.max_length} (prompt + answer); shorten it", "messages",
                           "context_length_exceeded")
        if len(ids) > prompt_cap:
            raise APIError(400, f"the prompt is {len(ids)} tokens but this server accepts at most {prompt_cap}; "
                                f"shorten it", "messages", "context_length_exceeded")
        if len(ids) + limit > target.max_length:
            raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({limit}) exceeds the target's "
                                f"context of {target.max_length} tokens; shorten the prompt or lower max_tokens",
                           "max_tokens", "context_length_exceeded")
        sampling = Sampling(defaults.temperature if req.temperature is None else req.temperature,
                            defaults.top_p if req.top_p is None else req.top_p,
                            defaults.top_k if req.top_k is None else req.top_k)
        return Job(ids, sampling, limit, req.seed, req.stop, time.monotonic() + limits.request_timeout)

    async def encode(prompt: str | list[dict], chat: bool) -> list[int]:
        texts = [prompt] if isinstance(prompt, str) else [str(m.get("content", "")) for m in prompt]
        if not valid_unicode(texts):
            raise APIError(400, "the content is not valid Unicode (a lone surrogate such as \\ud800)", "messages")
        special = next((s for s in specials for t in texts if s in t), None)
        if special is not None:
            raise APIError(400, f"the content contains the special token text {special!r}, which would act as a "
                                f"control token; remove it (servers started with --allow-special-tokens accept it)",
                           "messages", "special_token_in_content")
        try:
            return await engine.encode(prompt, chat)
        except ValueError as e:
            raise APIError(400, str(e)) from e

    def koala_stats(out: Outcome) -> dict:
        stats = out.stats
        return {"drafter": engine.drafter.name, "tau": round(stats.tau, 4), "target_forwards": stats.target_forwards,
                "new_tokens": stats.new_tokens, "tokens_per_s": round(stats.tokens_per_s, 2),
                "timed_out": out.timed_out}

    def usage(job: Job, stats: Stats) -> dict:
        return {"prompt_tokens": len(job.ids), "completion_tokens": stats.new_tokens,
                "total_tokens": len(job.ids) + stats.new_tokens}

    async def respond(job: Job, req: _Common, chat: bool, request: Request):
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": served}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(events(job, head, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            answer = asyncio.ensure_future(engine.submit(job))
            while not (await asyncio.wait({answer}, timeout=0.25))[0]:
                if await request.is_disconnected():  # nobody will read the answer: stop generating it
                    job.cancelled.set()
                    return Response(status_code=499)
            out = answer.result()
        finally:
            job.cancelled.set()  # if this handler is cancelled, the worker stops early
        choice = {"message": {"role": "assistant", "content": out.text}} if chat else {"text": out.text}
        return {**head, "object": kind, "choices": [{"index": 0, **choice, "finish_reason": out.finish_reason}],
                "usage": usage(job, out.stats), "koala": koala_stats(out)}

    async def events(job: Job, head: dict, chat: bool, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: pieces as the worker commits them, then finish_reason + stats, then [DONE]."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choices: list[dict], **extra) -> str:
            return f"data: {json.dumps({**head, 'object': kind, 'choices': choices, **extra})}\n\n"

        def choice(text: str | None, finish: str | None = None) -> dict:
            body = {"delta": {} if text is None else {"content": text}} if chat else {"text": text or ""}
            return {"index": 0, **body, "finish_reason": finish}

        task = asyncio.ensure_future(engine.submit(job, lambda p: loop.call_soon_threadsafe(queue.put_nowait, p)))
        task.add_done_callback(lambda _: queue.put_nowait(done))  # runs after every queued piece (same loop)
        try:
            if chat:
                yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            while (item := await queue.get()) is not done:
                yield event([choice(item)])
            try:
                out = task.result()
            except Exception as e:  # headers are sent already: report the failure in the stream itself
                yield f"data: {json.dumps(APIError(500, f'generation failed: {e}').body())}\n\n"
            else:
                yield event([choice(None, out.finish_reason)], koala=koala_stats(out))
                if include_usage:
                    yield event([], usage=usage(job, out.stats))
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # a client that disconnects stops its generation (or skips it if still queued)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(req: ChatRequest, request: Request):
        check(req)
        if len(req.messages) > limits.max_messages:
            raise APIError(400, f"{len(req.messages)} messages is over this server's limit of "
                                f"{limits.max_messages}", "messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        job = make_job(req, await encode(messages, chat=True), req.max_completion_tokens or req.max_tokens)
        return await respond(job, req, True, request)

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(req: CompletionRequest, request: Request):
        check(req)
        job = make_job(req, await encode(req.prompt, chat=False), req.max_tokens)
        return await respond(job, req, False, request)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": served, "object": "model", "created": 0, "owned_by": "koala"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served, "drafter": engine.drafter.name, "pending": engine.pending,
                "peak_batch": engine.peak_batch}

    return app


