"""The one decode loop. Each step: the drafter proposes a tree, ONE target forward scores the pending tokens plus
every tree node, an acceptance rule picks a path, the KV cache keeps exactly that path, and the target's own next
token (the bonus) becomes the pending token of the next step. The prompt is simply the first step's pending tokens,
and vanilla decoding is a drafter that proposes nothing. Several sequences decode together in the same loop
(`stream_batch`): one forward per step for all of them, each with its own tree, acceptance and cache length.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from koala.acceptance import Accepted, Sampling, accept_greedy, accept_sampling, accept_typical, probs_from_logits
from koala.drafters.base import Drafter
from koala.kvcache import add_rows, drop_rows, keep_paths
from koala.target import Target
from koala.tree import DraftTree, batch_verify_inputs

RULES = ("auto", "typical")


@dataclass
class Stats:
    """Per-generation counters. tau = new tokens / target forwards (bonus token included, as in Spec-Bench)."""

    new_tokens: int = 0
    target_forwards: int = 0
    drafted_tokens: int = 0
    seconds: float = 0.0
    accepted_lengths: list[int] = field(default_factory=list)  # draft tokens accepted per step

    @property
    def tau(self) -> float:
        return self.new_tokens / max(self.target_forwards, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"new_tokens": self.new_tokens, "target_forwards": self.target_forwards, "tau": self.tau,
                "seconds": self.seconds, "tokens_per_s": self.tokens_per_s}


@dataclass
class Result:
    text: str
    tokens: list[int]
    stats: Stats


def _accept(tree: DraftTree, logits: torch.Tensor, sampling: Sampling, rule: str,
            generator: torch.Generator | None) -> Accepted:
    if sampling.greedy:
        return accept_greedy(tree, logits)
    probs = probs_from_logits(logits, sampling).cpu()
    if rule == "typical":
        return accept_typical(tree, probs, generator=generator)
    return accept_sampling(tree, probs, generator)


def check_prompt(target: Target, ids: list[int], which: str = "The prompt") -> None:
    if not ids:
        raise ValueError(f"{which} is empty: give at least one token.")
    if len(ids) >= target.max_length:
        raise ValueError(f"{which} has {len(ids)} tokens but the target's context holds {target.max_length}; "
                         f"shorten it.")


@dataclass
class Request:
    """What one sequence asks of the loop. rule "auto" is lossless (exact match when greedy, speculative sampling
    otherwise); "typical" is Medusa's lossy typical acceptance and only differs when sampling."""

    ids: list[int]  # the prompt's token ids
    drafter: Drafter = field(default_factory=Drafter)
    sampling: Sampling = Sampling()
    max_new_tokens: int = 256
    rule: str = "auto"
    seed: int | None = None


@dataclass(eq=False)  # compared by identity: a row is one sequence in flight
class Row:
    """One sequence's state in the decode loop."""

    request: Request
    ids: list[int]  # prompt + committed tokens
    pending: torch.Tensor  # tokens the next forward feeds (the prompt, then the last bonus token)
    budget: int  # new tokens it may still reach in total (max_new_tokens, cut by the context)
    generator: torch.Generator | None
    stats: Stats
    started: float
    length: int = 0  # valid columns in its cache row
    finished: bool = False
    cancelled: bool = False


class Decoder:
    """Owns a batch of sequences decoding together: `add` a request at any time, `step` runs ONE target forward
    for every live row (each with its own pending tokens, draft tree, acceptance and cache length; see
    `batch_verify_inputs`) and returns each row's newly committed ids. Finished and cancelled rows leave the batch;
    with `max_batch`, at most that many decode at once and waiting rows join (their prompt forward rides along with
    the others' step) as soon as rows free up. Stats.seconds counts from the row's `add`.
    """

    def __init__(self, target: Target, max_batch: int | None = None) -> None:
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}.")
        self.target, self.max_batch = target, max_batch
        self.cache = target.new_cache()
        self.live: list[Row] = []  # rows in the cache, in cache-row order
        self.waiting: list[Row] = []  # rows not in the cache yet, in order of arrival
        self.width = 0  # the cache's columns

    @property
    def busy(self) -> bool:
        return bool(self.live or self.waiting)

    def add(self, request: Request, stats: Stats | None = None) -> Row:
        """Queue a sequence; it joins the batch at the next step with room. Raises ValueError on bad input."""
        ids, t = request.ids, self.target
        check_prompt(t, ids)
        if request.rule not in RULES:
            raise ValueError(f"Unknown acceptance rule {request.rule!r}; choose one of {RULES}.")
        if any(r.request.drafter is request.drafter for r in self.live + self.waiting):
            raise ValueError("The same drafter instance appears twice; give each sequence its own (Drafter.fork).")
        generator = None if request.seed is None else torch.Generator().manual_seed(request.seed)
        row = Row(request, list(ids), torch.tensor(ids, dtype=torch.long, device=t.device),
                  min(request.max_new_tokens, t.max_length - len(ids)), generator, stats or Stats(),
                  time.perf_counter())
        request.drafter.reset(row.ids)
        if row.budget > 0:
            self.waiting.append(row)
        else:
            row.finished = True
        return row

    def cancel(self, row: Row) -> None:
        """Stop a sequence; it leaves the batch at the next step (a waiting one never starts)."""
        row.cancelled = True

    def _leave(self, stay: list[Row]) -> None:
        if len(stay) < len(self.live):
            keep = [r for r, row in enumerate(self.live) if row in stay]
            self.live = [self.live[r] for r in keep]
            drop_rows(self.cache, keep, max((row.length for row in self.live), default=0))
        self.width = max((row.length for row in self.live), default=0)

    def _join(self) -> None:
        for row in [r for r in self.live + self.waiting if r.cancelled]:
            row.finished = True
        self.waiting = [r for r in self.waiting if not r.cancelled]
        self._leave([r for r in self.live if not r.cancelled])
        room = (self.max_batch or len(self.live) + len(self.waiting)) - len(self.live)
        if self.waiting and room > 0:
            joining, self.waiting = self.waiting[:room], self.waiting[room:]
            add_rows(self.cache, len(joining))
            self.live += joining

    def _tree(self, row: Row) -> DraftTree:
        if not row.length:  # a row with nothing cached yet brings its prompt, without a tree
            return DraftTree.empty()
        tree = row.request.drafter.propose(row.ids)
        if len(tree) and max(tree.depth) > self.target.max_length - row.length - row.pending.numel() - 1:
            return DraftTree.empty()  # too close to the context limit to verify a tree
        return tree

    def step(self) -> list[tuple[Row, list[int]]]:
        """One target forward for every live row: each row's newly committed ids (possibly none)."""
        self._join()
        if not self.live:
            return []
        target = self.target
        trees = [self._tree(row) for row in self.live]
        input_ids, pos, mask = batch_verify_inputs([row.pending for row in self.live], trees,
                                                   [row.length for row in self.live], self.width, target.dtype)
        layers = sorted({i for row in self.live for i in row.request.drafter.feature_layers})
        hidden, aux = target.features(input_ids, pos, self.cache, mask, tuple(layers))
        ms = [row.pending.numel() for row in self.live]
        parts = [hidden[r, m - 1:m + len(t)] for r, (m, t) in enumerate(zip(ms, trees))]
        logits = target.logits(parts[0] if len(parts) == 1 else torch.cat(parts)).split([len(x) for x in parts])
        out, kept = [], []
        for r, (row, tree, m) in enumerate(zip(self.live, trees, ms)):
            req, st = row.request, row.stats
            acc = _accept(tree, logits[r], req.sampling, req.rule, row.generator)
            kept.append(list(range(m)) + [m + i for i in acc.path])
            accepted = tree.tokens[acc.path].tolist() + [acc.next_token]
            st.target_forwards += 1
            st.drafted_tokens += len(tree)
            st.accepted_lengths.append(len(acc.path))
            new = accepted[:row.budget - st.new_tokens]
            stop = next((i for i, t in enumerate(new) if t in target.eos_ids), None)
            if stop is not None:
                new = new[:stop + 1]
            feats = _row_features(req.drafter.feature_layers, hidden[r], aux, r, layers)
            committed = feats[kept[r]] if acc.path else feats[:m]
            req.drafter.observe(committed, row.ids[len(row.ids) - m + 1:] + accepted)
            row.ids += new
            st.new_tokens += len(new)
            st.seconds = time.perf_counter() - row.started
            row.finished = stop is not None or st.new_tokens >= row.budget
            row.pending = torch.tensor([acc.next_token], dtype=torch.long, device=target.device)
            out.append((row, new))
        for row, length in zip(self.live, keep_paths(self.cache, [row.length for row in self.live], self.width,
                                                     kept)):
            row.length = length
        self._leave([row for row in self.live if not row.finished])
        return out


def _row_features(wanted: tuple[int, ...], hidden: torch.Tensor, aux: torch.Tensor | None, r: int,
                  layers: list[int]) -> torch.Tensor:
    """Row r's features for a drafter reading `wanted` target layers (its final hidden states if none), cut from
    `aux`, the inputs to `layers` concatenated for the whole batch."""
    if not wanted:
        return hidden
    d = hidden.shape[-1]
    if list(wanted) == layers:
        return aux[r]
    return torch.cat([aux[r, :, layers.index(i) * d:(layers.index(i) + 1) * d] for i in wanted], dim=-1)


def stream_tokens(target: Target, prompt_ids: list[int], drafter: Drafter | None = None,
                  sampling: Sampling = Sampling(), max_new_tokens: int = 256, stats: Stats | None = None,
                  rule: str = "auto", seed: int | None = None,
                  should_stop: Callable[[], bool] | None = None) -> Iterator[list[int]]:
    """Yield the newly committed token ids after every target forward; fill `stats` as it goes."""
    decoder = Decoder(target)
    decoder.add(Request(prompt_ids, drafter or Drafter(), sampling, max_new_tokens, rule, seed), stats)
    while decoder.busy and not (should_stop and should_stop()):
        for _, new in decoder.step():
            yield new


def stream_batch(target: Target, prompts: Sequence[list[int]], drafters: Sequence[Drafter] | None = None,
                 sampling: Sampling = Sampling(), max_new_tokens: int = 256, stats: Sequence[Stats] | None = None,
                 rule: str = "auto", seed: int | None = None, should_stop: Callable[[], bool] | None = None,
                 max_batch: int | None = None) -> Iterator[list[list[int]]]:
    """Decode several prompts together: after every target forward, yield each prompt's newly committed ids (an
    empty list while it waits or once it has finished); fill `stats` (one Stats per prompt) as it goes. With a
    seed, prompt b samples from its own generator seeded seed + b. See `Decoder` for how the batch is run.
    """
    drafters = [Drafter() for _ in prompts] if drafters is None else drafters
    stats = [Stats() for _ in prompts] if stats is None else stats
    if not prompts:
        raise ValueError("No prompts given: give at least one.")
    if isinstance(drafters, Drafter) or len(drafters) != len(prompts):
        raise ValueError(f"Give one drafter per prompt ({len(prompts)}); drafters keep per-sequence state.")
    if len(stats) != len(prompts):
        raise ValueError(f"Give one Stats per prompt ({len(prompts)}), got {len(stats)}.")
    for b, ids in enumerate(prompts):
        check_prompt(target, ids, "The prompt" if len(prompts) == 1 else f"Prompt {b}")
    decoder = Decoder(target, max_batch)
    index = {}  # row -> prompt number (rows hash by identity)
    for b, (ids, drafter, st) in enumerate(zip(prompts, drafters, stats)):
        request = Request(ids, drafter, sampling, max_new_tokens, rule, None if seed is None else seed + b)
        index[decoder.add(request, st)] = b
    while decoder.busy and not (should_stop and should_stop()):
        out: list[list[int]] = [[] for _ in prompts]
        for row, new in decoder.step():
            out[index[row]] = new
        yield out


class TextStream:
    """Turns committed token ids into text pieces, holding back incomplete multi-byte characters.

    Only the tokens since the last emitted piece boundary are decoded again, so a long answer costs linear time.
    """

    def __init__(self, target: Target) -> None:
        self.target, self.tokens, self.shown = target, [], ""

    def feed(self, new: list[int]) -> str:
        self.tokens += new
        text = self.target.decode(self.tokens)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        piece, self.shown = text[len(self.shown):], text
        if len(self.tokens) > 8:  # keep a few tokens of context: tokenizers merge spaces across tokens
            self.tokens, self.shown = self.tokens[-4:], self.target.decode(self.tokens[-4:])
        return piece

    def flush(self) -> str:
        text = self.target.decode(self.tokens)
        piece = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.shown = text
        return piece


def stream_text(target: Target, token_stream: Iterator[list[int]]) -> Iterator[str]:
    """Text pieces of a token stream (see TextStream)."""
    text = TextStream(target)
    for new in token_stream:
        if piece := text.feed(new):
            yield piece
    if piece := text.flush():
        yield piece


def _prompt_ids(target: Target, prompt: str | list[dict] | list[int]) -> list[int]:
    return prompt if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], int)) else target.encode(prompt)


def generate(target: Target, prompt: str | list[dict] | list[int], drafter: Drafter | None = None,
             sampling: Sampling = Sampling(), max_new_tokens: int = 256, rule: str = "auto",
             seed: int | None = None) -> Result:
    """Generate a full answer. `prompt` is text (one user turn), chat messages, or token ids (used as they are)."""
    ids = _prompt_ids(target, prompt)
    stats = Stats()
    tokens = [t for new in stream_tokens(target, ids, drafter, sampling, max_new_tokens, stats, rule, seed)
              for t in new]
    return Result(target.decode(tokens), tokens, stats)


def generate_batch(target: Target, prompts: Sequence[str | list[dict] | list[int]],
                   drafters: Sequence[Drafter] | Callable[[], Drafter] | None = None, sampling: Sampling = Sampling(),
                   max_new_tokens: int = 256, rule: str = "auto", seed: int | None = None,
                   batch_size: int | None = None) -> list[Result]:
    """Generate answers to several prompts at once, batching their target forwards.

    `drafters` is one drafter per prompt, or a factory called once per prompt (None = vanilla decoding). At most
    `batch_size` prompts (default: all) decode at once; the rest join as others finish. Greedy output per prompt
    is the same as `generate`'s.
    """
    ids = [_prompt_ids(target, p) for p in prompts]
    if callable(drafters) and not isinstance(drafters, Drafter):
        drafters = [drafters() for _ in ids]
    stats = [Stats() for _ in ids]
    tokens: list[list[int]] = [[] for _ in ids]
    for step in stream_batch(target, ids, drafters, sampling, max_new_tokens, stats, rule, seed,
                             max_batch=batch_size):
        for got, new in zip(tokens, step):
            got += new
    return [Result(target.decode(t), t, st) for t, st in zip(tokens, stats)]
