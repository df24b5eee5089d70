"""The OpenAI-compatible HTTP API (FastAPI) over a koala.serve.Engine.

Endpoints: POST /v1/chat/completions, POST /v1/completions (stream=true gives server-sent events in OpenAI's
chunk format ending with `data: [DONE]`), GET /v1/models, GET /health. Unknown fields and bad parameters are
refused with a 4xx and an OpenAI-style error body, never a crash. Every response carries the speculative counters
(tau, target forwards) in an extra `koala` field.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from koala.acceptance import Sampling
from koala.data import valid_unicode
from koala.decode import Stats
from koala.drafters.base import Drafter
from koala.serve import Engine, Job
from koala.target import Target


class APIError(Exception):
    """An error reported to the client in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


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


def create_app(target: Target, drafter: Drafter | None = None, defaults: Sampling = Sampling(),
               max_tokens: int = 256, rule: str = "auto", model_name: str | None = None,
               max_tokens_cap: int | None = None, max_prompt_tokens: int | None = None) -> FastAPI:
    """The FastAPI app serving `target`; `defaults` and `max_tokens` apply to requests that leave them out.

    Hard limits a request cannot exceed (400 otherwise, as vLLM answers): `max_tokens_cap` new tokens (default
    `max_tokens`), `max_prompt_tokens` prompt tokens (default: the context), prompt + max_tokens <= the context.
    """
    cap = max_tokens_cap or max_tokens
    prompt_cap = min(max_prompt_tokens or target.max_length, target.max_length)
    engine = Engine(target, drafter, rule)
    served = model_name or Path(target.name).name or target.name

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()  # stop the generation in flight so the process exits promptly

    app = FastAPI(title="koala", description="OpenAI-compatible speculative decoding server", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _failed(_: Request, exc: Exception) -> JSONResponse:  # a bug or e.g. out of GPU memory: still JSON
        return JSONResponse(APIError(500, f"generation failed: {exc}").body(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(_invalid_request(exc).body(), status_code=400)

    def make_job(req: _Common, ids: list[int], limit: int | None) -> Job:
        if req.model not in (None, served):
            raise APIError(404, f"model '{req.model}' is not served here; this server serves '{served}'",
                           "model", "model_not_found")
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
        return Job(ids, sampling, limit, req.seed, req.stop)

    def encode(prompt: str | list[dict], chat: bool) -> list[int]:
        texts = [prompt] if isinstance(prompt, str) else [str(m.get("content", "")) for m in prompt]
        if not valid_unicode(texts):
            raise APIError(400, "the content is not valid Unicode (a lone surrogate such as \\ud800)", "messages")
        try:
            return engine.encoder.encode(prompt, chat=chat)
        except ValueError as e:
            raise APIError(400, str(e)) from e

    def koala_stats(stats: Stats) -> dict:
        return {"drafter": engine.drafter.name, "tau": round(stats.tau, 4), "target_forwards": stats.target_forwards,
                "new_tokens": stats.new_tokens, "tokens_per_s": round(stats.tokens_per_s, 2)}

    def usage(job: Job, stats: Stats) -> dict:
        return {"prompt_tokens": len(job.ids), "completion_tokens": stats.new_tokens,
                "total_tokens": len(job.ids) + stats.new_tokens}

    async def respond(job: Job, req: _Common, chat: bool):
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": served}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(events(job, head, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            out = await engine.submit(job)
        finally:
            job.cancelled.set()  # if this handler is cancelled (client gone), the worker stops early
        choice = {"message": {"role": "assistant", "content": out.text}} if chat else {"text": out.text}
        return {**head, "object": kind, "choices": [{"index": 0, **choice, "finish_reason": out.finish_reason}],
                "usage": usage(job, out.stats), "koala": koala_stats(out.stats)}

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
                yield event([choice(None, out.finish_reason)], koala=koala_stats(out.stats))
                if include_usage:
                    yield event([], usage=usage(job, out.stats))
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # a client that disconnects stops its generation (or skips it if still queued)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        job = make_job(req, encode(messages, chat=True), req.max_completion_tokens or req.max_tokens)
        return await respond(job, req, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        job = make_job(req, encode(req.prompt, chat=False), req.max_tokens)
        return await respond(job, req, chat=False)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served, "object": "model", "created": 0, "owned_by": "koala"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served, "drafter": engine.drafter.name, "pending": engine.pending}

    return app


