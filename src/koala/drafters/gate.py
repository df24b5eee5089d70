"""Draft only while drafting pays, judged by measured tokens per second of this very generation.

A speculative step costs verify(n) + draft and gains (accepted + 1) tokens; a plain step costs verify(0) and gains
one. Which is faster depends on the machine, its load, the head and the text, so `GatedDrafter` times both kinds of
step online (wall time from one `propose` to the next, which covers the target forward, acceptance, cache
bookkeeping and drafting) and keeps an exponential average of tokens per second for each. It drafts while the
drafting rate is at least the plain rate; otherwise it decodes plainly and probes drafting again now and then,
backing off (exponentially, up to `max_backoff` plain steps) while drafting keeps losing. So a head can cost at
most a few percent (the probes) where it does not help, and keeps its full gain where it does.

While gated off, the target features of committed tokens are buffered and handed to the inner drafter in one
`observe` call when drafting resumes (an EAGLE head then ingests them in one forward instead of one per step).
"""
from __future__ import annotations

import time

import torch

from koala.drafters.base import Drafter
from koala.tree import DraftTree


class GatedDrafter(Drafter):
    def __init__(self, inner: Drafter, plain_probe: int = 32, first_backoff: int = 8, max_backoff: int = 128,
                 smoothing: float = 0.3, min_samples: int = 3, clock=time.perf_counter) -> None:
        self.inner = inner
        self.name = inner.name
        self.plain_probe, self.first_backoff, self.max_backoff = plain_probe, first_backoff, max_backoff
        self.smoothing, self.min_samples = smoothing, min_samples
        self.clock = clock
        self.reset([])

    def __getattr__(self, name):  # the inner drafter's settings (tree, depth, head...) stay visible
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def plan(self):  # the base class's None would hide the inner drafter's plan from __getattr__
        return self.inner.plan

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return self.inner.feature_layers

    def fork(self) -> GatedDrafter:
        new = super().fork()
        new.inner = self.inner.fork()
        return new

    def reset(self, prompt_ids: list[int]) -> None:
        self.inner.reset(prompt_ids)
        self.rate: dict[bool, float | None] = {True: None, False: None}  # tokens/s when drafting / plain
        self.samples = {True: 0, False: 0}
        self.drafting = False  # the kind of the step in flight
        self.started: float | None = None
        self.gained = 0
        self.steps = 0
        self.plain_left = 2  # measure plain steps first (after the prefill step, which is never counted)
        self.backoff = self.first_backoff
        self.since_plain = 0
        self.buffer: list[tuple[torch.Tensor, list[int]]] = []
        self.draft_steps = self.plain_steps = 0

    def _record(self, now: float) -> None:
        if self.started is not None and self.steps > 1 and self.gained:
            rate = self.gained / max(now - self.started, 1e-9)
            old = self.rate[self.drafting]
            self.rate[self.drafting] = rate if old is None else old + self.smoothing * (rate - old)
            self.samples[self.drafting] += 1

    def _choose(self) -> bool:
        if self.plain_left > 0:
            self.plain_left -= 1
            return False
        draft, plain = self.rate[True], self.rate[False]
        if draft is None or plain is None or self.samples[True] < self.min_samples:
            return True  # one noisy step never decides
        if draft >= plain:
            self.backoff = self.first_backoff
            self.since_plain += 1
            if self.since_plain >= self.plain_probe:  # refresh the plain rate now and then
                self.since_plain = 0
                self.plain_left = 0
                return False
            return True
        if self.drafting:  # drafting just lost: decode plainly for a while, then probe again
            self.plain_left = self.backoff
            self.backoff = min(self.backoff * 2, self.max_backoff)
            self.plain_left -= 1
            return False
        return True  # a plain stretch ended: probe drafting once

    def propose(self, ids: list[int]) -> DraftTree:
        now = self.clock()
        self._record(now)
        self.drafting = self._choose()
        if self.drafting:
            self.draft_steps += 1
            if self.buffer:  # the plain steps' deferred head work: not charged to this drafted step
                self._flush()
                now = self.clock()
            tree = self.inner.propose(ids)
        else:
            self.plain_steps += 1
            tree = DraftTree.empty()
        self.started = now
        return tree

    def _flush(self) -> None:
        hidden = torch.cat([h for h, _ in self.buffer])
        next_ids = [t for _, n in self.buffer for t in n]
        self.buffer = []
        self.inner.observe(hidden, next_ids)

    def observe(self, hidden: torch.Tensor, next_ids: list[int]) -> None:
        self.steps += 1
        self.gained = len(next_ids) if self.steps > 1 else 0  # the prefill step commits the prompt
        if self.steps == 1 or self.drafting:
            if self.buffer:
                self._flush()
            self.inner.observe(hidden, next_ids)
        else:
            self.buffer.append((hidden, list(next_ids)))
