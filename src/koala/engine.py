"""The serving engine: one worker thread owns the model and a `Decoder`, and every request in flight decodes in the
same batch (continuous batching: a new request joins at the next step, a finished or cancelled one leaves), each with
its own drafter state, sampling and stop strings, so concurrency never changes a greedy answer. Callers (the HTTP
layer in koala.openai_api) only queue jobs, wait on futures and receive text pieces; tokenising runs on a thread of
its own. `Limits` says what a server accepts.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from koala.acceptance import Sampling
from koala.decode import Decoder, Request, Stats, TextStream
from koala.drafters.base import Drafter
from koala.target import Target


@dataclass(frozen=True)
class Limits:
    """What the server accepts; a request asking for more gets a 4xx. `koala serve` flags map onto these."""

    max_tokens_cap: int | None = None  # most new tokens per request (None: the server's default max_tokens)
    max_prompt_tokens: int | None = None  # None: the target's context
    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_stop_chars: int = 256  # per stop string (at most 4 of them)
    request_timeout: float = 600.0  # seconds from arrival; the answer is cut there (finish_reason "length")
    max_batch: int = 8  # requests decoded together
    max_waiting: int = 64  # requests queued behind a full batch; more get 503
    allow_special_tokens: bool = False  # pass special-token text in content through as control tokens
    api_key: str | None = None  # require "Authorization: Bearer <key>" on /v1/*


@dataclass(eq=False)  # compared and hashed by identity: each request is its own job
class Job:
    """One generation request, already tokenised and validated."""

    ids: list[int]
    sampling: Sampling
    max_tokens: int
    seed: int | None
    stops: list[str]
    deadline: float | None = None  # time.monotonic() past which the answer is cut
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Outcome:
    text: str
    finish_reason: str  # "stop" (end of sequence, a stop string, or cancelled) or "length"
    stats: Stats
    timed_out: bool = False


class StopScanner:
    """Cuts streamed text before the first stop string to complete, holding back a tail that might start one.

    Each stop string runs a Knuth-Morris-Pratt automaton over the text as it arrives, so scanning costs time linear
    in the text and the stop strings, however they are split into pieces.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.fail = [_prefix_function(s) for s in stops]
        self.matched = [0] * len(stops)  # characters of each stop matched at the end of the text so far
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        base, self.pending = len(self.pending), self.pending + piece
        first = None  # (end, start) in pending of the stop that completes first (the longest on a tie)
        for i, stop in enumerate(self.stops):
            fail, k = self.fail[i], self.matched[i]
            for j, c in enumerate(piece):
                while k and stop[k] != c:
                    k = fail[k - 1]
                if stop[k] == c:
                    k += 1
                if k == len(stop):
                    hit = (base + j + 1, base + j + 1 - k)
                    first = hit if first is None else min(first, hit)
                    break
            self.matched[i] = k
        if first is not None:
            out, self.pending = self.pending[:first[1]], ""
            return out, True
        keep = max(self.matched, default=0)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _prefix_function(s: str) -> list[int]:
    """fail[i]: length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class _Work:
    """A job inside the worker: its text stream, stop scanner and the future the HTTP handler waits on."""

    def __init__(self, job: Job, target: Target, on_piece: Callable[[str], None] | None) -> None:
        self.job, self.on_piece = job, on_piece
        self.text, self.scanner = TextStream(target), StopScanner(job.stops)
        self.pieces: list[str] = []
        self.stats = Stats()
        self.stopped = False  # a stop string was reached
        self.future: Future[Outcome] = Future()

    def _emit(self, text: str) -> None:
        if text:
            self.pieces.append(text)
            if self.on_piece:
                self.on_piece(text)

    def feed(self, new: list[int]) -> None:
        text, self.stopped = self.scanner.feed(self.text.feed(new))
        self._emit(text)

    def finish(self, ended: bool, timed_out: bool = False) -> None:
        if not self.stopped:
            text, self.stopped = self.scanner.feed(self.text.flush())
            self._emit(text if self.stopped else text + self.scanner.flush())
        reason = "stop" if ended or self.stopped else "length"
        self.future.set_result(Outcome("".join(self.pieces), reason, self.stats, timed_out))


class Engine:
    """Decodes every request in flight together on one worker thread (see the module docstring)."""

    def __init__(self, target: Target, drafter: Drafter | None = None, rule: str = "auto", max_batch: int = 8,
                 max_waiting: int = 64) -> None:
        self.target, self.drafter, self.rule = target, drafter or Drafter(), rule
        self.max_batch, self.max_waiting = max_batch, max_waiting
        # Fast tokenizers must not be used from two threads at once: the encoding thread has its own copy.
        self.encoder = dataclasses.replace(target, tokenizer=copy.deepcopy(target.tokenizer))
        self._encode_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="koala-encode")
        self._inbox: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._works: set[_Work] = set()  # queued or running (the event loop adds, the worker's callbacks remove)
        self._lock = threading.Lock()
        self.closed = False
        self.peak_batch = 0  # most requests decoded in one step so far
        self._thread = threading.Thread(target=self._loop, name="koala-model", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Requests queued or running."""
        return len(self._works)

    @property
    def full(self) -> bool:
        """True when a new request would wait behind `max_waiting` others."""
        return self.pending >= self.max_batch + self.max_waiting

    async def encode(self, prompt: str | list[dict], chat: bool) -> list[int]:
        """Tokenise off the event loop (a long prompt must not stall other clients)."""
        return await asyncio.get_running_loop().run_in_executor(self._encode_pool, self.encoder.encode, prompt,
                                                                chat)

    def start(self, job: Job, on_piece: Callable[[str], None] | None = None) -> Future[Outcome]:
        """Queue the job; `on_piece` receives text (on the worker thread) as it is committed."""
        if self.closed:
            raise RuntimeError("the server is shutting down")
        work = _Work(job, self.target, on_piece)
        with self._lock:
            self._works.add(work)
        work.future.add_done_callback(lambda _: self._forget(work))
        self._inbox.put(work)
        return work.future

    def _forget(self, work: _Work) -> None:
        with self._lock:
            self._works.discard(work)

    async def submit(self, job: Job, on_piece: Callable[[str], None] | None = None) -> Outcome:
        return await asyncio.wrap_future(self.start(job, on_piece))

    def run(self, job: Job, on_piece: Callable[[str], None] | None = None) -> Outcome:
        """Generate and wait (from any thread but the worker's)."""
        return self.start(job, on_piece).result()

    def shutdown(self) -> None:
        """Cut every running and queued answer short so the process can exit promptly."""
        self.closed = True
        with self._lock:
            works = list(self._works)
        for work in works:
            work.job.cancelled.set()
        self._inbox.put(None)
        self._encode_pool.shutdown(wait=False, cancel_futures=True)

    def _take(self, block: bool) -> list[_Work | None]:
        items = []
        try:
            items.append(self._inbox.get(block=block))
            while True:
                items.append(self._inbox.get_nowait())
        except queue.Empty:
            return items

    def _loop(self) -> None:
        self._reset()
        while True:
            new = self._take(block=not self._decoder.busy)
            try:
                self._admit([w for w in new if w is not None])
                self._cut()
                if None in new:  # shut down: every answer was cut above
                    return
                self._advance()
            except Exception as e:  # e.g. out of memory: fail the requests in flight, keep serving
                for work in self._rows.values():
                    if not work.future.done():
                        work.future.set_exception(e)
                self._reset()

    def _reset(self) -> None:
        self._decoder, self._rows = Decoder(self.target, self.max_batch), {}  # worker-thread state

    def _admit(self, works: list[_Work]) -> None:
        for work in works:
            job = work.job
            request = Request(job.ids, self.drafter.fork(), job.sampling, job.max_tokens, self.rule, job.seed)
            try:
                self._rows[self._decoder.add(request, work.stats)] = work
            except ValueError as e:  # a bad prompt fails its own request only
                work.future.set_exception(e)

    def _cut(self) -> None:
        """Rows whose client left or whose deadline passed leave now, with what they have."""
        now = time.monotonic()
        for row, work in list(self._rows.items()):
            timed_out = work.job.deadline is not None and now > work.job.deadline
            if work.job.cancelled.is_set() or timed_out:
                self._decoder.cancel(row)
                self._rows.pop(row).finish(ended=not timed_out, timed_out=timed_out)

    def _advance(self) -> None:
        """One decode step for every row; text to the clients; finished rows (or a stop string) leave."""
        steps = self._decoder.step()
        self.peak_batch = max(self.peak_batch, len(steps))
        for row, ids in steps:
            self._rows[row].feed(ids)
        for row in [r for r, w in self._rows.items() if r.finished or w.stopped]:
            work = self._rows.pop(row)
            if not row.finished:
                self._decoder.cancel(row)  # a stop string: the row leaves at the next step
            work.finish(ended=bool(row.ids) and row.ids[-1] in self.target.eos_ids)
