"""Draft only while drafting pays, judged by measured tokens per second of this very generation.

A speculative step costs verify(n) + draft and gains (accepted + 1) tokens; a plain step costs verify(0) and gains
one. Which is faster depends on the machine, its load, the head and the text, so `GatedDrafter` times both kinds of
step online (wall time from one `propose` to the next: target forward, acceptance, cache bookkeeping, drafting).

A drafted step is all-or-nothing (a 2-node tree gains 1 or 2 tokens), so a few misses in a row say little. Each
kind's rate is therefore a ratio of decayed sums (tokens over seconds, not an average of per-step rates), and the
gate stops drafting only when even an optimistic drafting rate, the mean gain plus `doubt` standard errors, is below
the plain rate: one slow step of a costly head is enough, a run of misses of a head that pays on average is not.
After a loss it decodes plainly for a while, then probes with a fresh start, backing off (exponentially, up to
`max_backoff` plain steps) while drafting keeps losing, and it refreshes the plain rate every `plain_probe` drafted
steps. So a head costs a few percent (the probes) where it does not help and keeps nearly all its gain where it does.

While gated off, the target features of committed tokens are buffered and handed to the inner drafter in one
`observe` call when drafting resumes (an EAGLE head then ingests them in one forward instead of one per step).
"""
from __future__ import annotations

import time

import torch

from koala.drafters.base import Drafter
from koala.tree import DraftTree


class GatedDrafter(Drafter):
    def __init__(self, inner: Drafter, doubt: float = 1.0, min_var: float = 0.25, memory: float = 0.9,
                 plain_probe: int = 32, first_backoff: int = 8, max_backoff: int = 128, proven_after: int = 8,
                 clock=time.perf_counter) -> None:
        self.inner = inner
        self.name = inner.name
        self.doubt, self.min_var, self.memory = doubt, min_var, memory
        self.plain_probe, self.first_backoff, self.max_backoff = plain_probe, first_backoff, max_backoff
        self.proven_after = proven_after  # drafted steps without a loss before the backoff starts over
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
        self.sums = {True: [0.0] * 4, False: [0.0] * 4}  # decayed steps, tokens, tokens^2, seconds per kind
        self.drafting = False  # the kind of the step in flight
        self.started: float | None = None
        self.gained = 0
        self.steps = 0
        self.plain_left = 2  # measure plain steps first (after the prefill step, which is never counted)
        self.burst = 0  # drafted steps since drafting last (re)started
        self.since_plain = 0
        self.backoff = self.first_backoff
        self.buffer: list[tuple[torch.Tensor, list[int]]] = []
        self.draft_steps = self.plain_steps = 0

    def rate(self, drafting: bool, doubt: float = 0.0) -> float | None:
        """Tokens per second of this kind of step (None before one was timed), plus `doubt` standard errors."""
        steps, tokens, squares, seconds = self.sums[drafting]
        if not steps:
            return None
        var = max(squares / steps - (tokens / steps) ** 2, self.min_var)
        return (tokens + doubt * (var * steps) ** 0.5) / seconds

    def _record(self, now: float) -> None:
        if self.started is not None and self.steps > 1 and self.gained:
            new = (1.0, self.gained, self.gained ** 2, max(now - self.started, 1e-9))
            self.sums[self.drafting] = [self.memory * old + x for old, x in zip(self.sums[self.drafting], new)]

    def _drafting_loses(self, doubt: float) -> bool:
        """Whether drafting is slower than plain steps even with its mean gain raised by `doubt` standard errors."""
        draft, plain = self.rate(True, doubt), self.rate(False)
        return draft is not None and plain is not None and draft < plain

    def _choose(self) -> bool:
        """Whether the next step drafts."""
        if self.plain_left:
            self.plain_left -= 1
            return False
        if self.burst:
            if self._drafting_loses(self.doubt):  # decode plainly for a while, then probe afresh
                self.plain_left = self.backoff - 1
                self.backoff = min(2 * self.backoff, self.max_backoff)
                self.burst = 0
                self.sums[True] = [0.0] * 4
                return False
            if self.burst >= self.proven_after and not self._drafting_loses(0.0):  # proven, not lucky once
                self.backoff = self.first_backoff
            if self.since_plain >= self.plain_probe:  # refresh the plain rate now and then
                self.since_plain = 0
                return False
        self.burst += 1
        self.since_plain += 1
        return True

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
