"""`koala serve`: an OpenAI-compatible HTTP server (chat + text completions, streaming or not).

The model runs one request at a time on a single worker thread: requests wait in that worker's queue rather than
being dropped, and the event loop stays free to accept, validate and stream. Each request gets its own decode
(fresh KV cache, drafter reset), so concurrency never changes an answer. The HTTP layer (FastAPI, an optional
extra) lives in koala.openai_api and is imported only when the server starts, so the CLI works without it.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import ipaddress
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from koala.acceptance import Sampling
from koala.args import port, positive_int
from koala.decode import Stats, stream_text, stream_tokens
from koala.drafters.base import Drafter
from koala.target import Target


@dataclass(eq=False)  # compared and hashed by identity: each request is its own job
class Job:
    """One generation request, already tokenised and validated."""

    ids: list[int]
    sampling: Sampling
    max_tokens: int
    seed: int | None
    stops: list[str]
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Outcome:
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    stats: Stats


class StopScanner:
    """Cuts streamed text at the first stop string, holding back a tail that might be the start of one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.pending = stops, ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Engine:
    """Runs jobs one at a time on a single worker thread; its executor queue is the request queue."""

    def __init__(self, target: Target, drafter: Drafter | None = None, rule: str = "auto") -> None:
        self.target, self.drafter, self.rule = target, drafter or Drafter(), rule
        # Fast tokenizers must not be used from two threads at once: the event loop encodes with its own copy.
        self.encoder = dataclasses.replace(target, tokenizer=copy.deepcopy(target.tokenizer))
        self._jobs: set[Job] = set()  # queued or running, so shutdown can stop them
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="koala-model")

    def run(self, job: Job, on_piece: Callable[[str], None] | None = None) -> Outcome:
        """Generate on the calling thread (the worker); `on_piece` receives text as it is committed."""
        stats, tokens, scanner, pieces = Stats(), [], StopScanner(job.stops), []
        if job.cancelled.is_set():  # the client left while the job was queued
            return Outcome("", "stop", stats)

        def token_stream():
            for new in stream_tokens(self.target, job.ids, self.drafter, job.sampling, job.max_tokens, stats,
                                     self.rule, job.seed, should_stop=job.cancelled.is_set):
                tokens.extend(new)
                yield new

        def emit(text: str) -> None:
            if text:
                pieces.append(text)
                if on_piece:
                    on_piece(text)

        stopped = False
        for piece in stream_text(self.target, token_stream()):
            text, stopped = scanner.feed(piece)
            emit(text)
            if stopped:
                break
        if not stopped:
            emit(scanner.flush())
        ended = stopped or bool(tokens and tokens[-1] in self.target.eos_ids) or job.cancelled.is_set()
        return Outcome("".join(pieces), "stop" if ended else "length", stats)

    @property
    def pending(self) -> int:
        """Requests queued or running."""
        return len(self._jobs)

    async def submit(self, job: Job, on_piece: Callable[[str], None] | None = None) -> Outcome:
        """Queue the job behind the others and wait for it."""
        self._jobs.add(job)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self.run, job, on_piece)
        finally:
            self._jobs.discard(job)

    def shutdown(self) -> None:
        """Stop the running generation and drop the queued ones, so the process can exit promptly."""
        for job in list(self._jobs):
            job.cancelled.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from koala.openai_api import create_app
    except ImportError as e:
        raise RuntimeError("`koala serve` needs FastAPI and uvicorn: pip install 'koala[serve]'") from e

    from koala.cli import drafter_from_args, sampling_from_args, target_from_args

    if not 0 < args.port < 65536:
        raise ValueError(f"--port {args.port} is not a TCP port (1-65535).")
    if not _is_loopback(args.host):
        print(f"koala: warning: binding {args.host}: the server has no authentication; anyone who can reach "
              f"this address can use the model.", file=sys.stderr)
    target = target_from_args(args)
    app = create_app(target, drafter_from_args(args, target), sampling_from_args(args), args.max_new_tokens,
                     args.acceptance, args.model_name, args.max_tokens_cap, args.max_prompt_tokens)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def add_command(sub) -> None:
    from koala.cli import add_drafter_args, add_sampling_args, add_target_args

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the target's name)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--max-tokens-cap", type=positive_int, default=None,
                   help="most new tokens a request may ask for (default: --max-new-tokens, the default answer)")
    p.add_argument("--max-prompt-tokens", type=positive_int, default=None,
                   help="longest prompt accepted, in tokens (default: the target's context)")
    add_target_args(p)
    add_drafter_args(p)
    add_sampling_args(p)  # the defaults for requests that leave temperature/top_p/top_k/max_tokens out
    p.set_defaults(func=_serve)
