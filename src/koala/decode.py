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
from transformers import DynamicCache

from koala.acceptance import Accepted, Sampling, accept_greedy, accept_sampling, accept_typical, probs_from_logits
from koala.drafters.base import Drafter
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


@torch.inference_mode()  # the cache holds inference tensors, which may only be edited in place in this mode
def keep_paths(cache: DynamicCache, lengths: list[int], width: int, kept: list[list[int]]) -> list[int]:
    """Compact a batched cache after verification and return the new per-row lengths.

    Row b keeps its history [0, lengths[b]) and the block columns width + kept[b][j], moved in order to
    lengths[b] + j; the cache is then cut to the longest row, so it never holds more than the longest sequence.
    """
    moves = [(b, width + node, n + j) for b, (n, nodes) in enumerate(zip(lengths, kept))
             for j, node in enumerate(nodes) if width + node != n + j]  # (row, from column, to column)
    new = [n + len(nodes) for n, nodes in zip(lengths, kept)]
    end = max(new)
    for layer in cache.layers:
        if moves:
            r, s, d = torch.tensor(moves, dtype=torch.long, device=layer.keys.device).T
            layer.keys[r, :, d, :] = layer.keys[r, :, s, :]
            layer.values[r, :, d, :] = layer.values[r, :, s, :]
        layer.keys = layer.keys[..., :end, :]
        layer.values = layer.values[..., :end, :]
    return new


def keep_path(cache: DynamicCache, base: int, nodes: list[int]) -> None:
    """One sequence: keep positions [0, base) and the accepted tree nodes (block columns base + node), in order."""
    keep_paths(cache, [base], base, [nodes])


@torch.inference_mode()
def drop_rows(cache: DynamicCache, keep: list[int], length: int) -> None:
    """Keep only the batch rows `keep` of the cache, cut to `length` columns (finished sequences stop costing)."""
    for layer in cache.layers:
        idx = torch.tensor(keep, dtype=torch.long, device=layer.keys.device)
        layer.keys = layer.keys[idx, :, :length]
        layer.values = layer.values[idx, :, :length]


@torch.inference_mode()
def add_rows(cache: DynamicCache, count: int) -> None:
    """Append `count` empty rows (valid length 0) to the cache, for sequences joining a running batch."""
    for layer in cache.layers:
        if layer.is_initialized:
            layer.keys = torch.cat([layer.keys, layer.keys.new_zeros(count, *layer.keys.shape[1:])])
            layer.values = torch.cat([layer.values, layer.values.new_zeros(count, *layer.values.shape[1:])])


def _accept(tree: DraftTree, logits: torch.Tensor, sampling: Sampling, rule: str,
            generator: torch.Generator | None) -> Accepted:
    if sampling.greedy:
        return accept_greedy(tree, logits)
    probs = probs_from_logits(logits, sampling).cpu()
    if rule == "typical":
        return accept_typical(tree, probs, generator=generator)
    return accept_sampling(tree, probs, generator)


def stream_tokens(target: Target, prompt_ids: list[int], drafter: Drafter | None = None,
                  sampling: Sampling = Sampling(), max_new_tokens: int = 256, stats: Stats | None = None,
                  rule: str = "auto", seed: int | None = None,
                  should_stop: Callable[[], bool] | None = None) -> Iterator[list[int]]:
    """Yield the newly committed token ids after every target forward; fill `stats` as it goes.

    rule "auto" is lossless (exact match when greedy, speculative sampling otherwise); "typical" is Medusa's
    lossy typical acceptance and only differs when sampling.
    """
    stats = stats if stats is not None else Stats()
    for new in stream_batch(target, [prompt_ids], [drafter or Drafter()], sampling, max_new_tokens, [stats], rule,
                            seed, should_stop):
        yield new[0]


def _check(target: Target, prompts: Sequence[list[int]], drafters: Sequence[Drafter], rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"Unknown acceptance rule {rule!r}; choose one of {RULES}.")
    if not prompts:
        raise ValueError("No prompts given: give at least one.")
    for i, ids in enumerate(prompts):
        which = "The prompt" if len(prompts) == 1 else f"Prompt {i}"
        if not ids:
            raise ValueError(f"{which} is empty: give at least one token.")
        if len(ids) >= target.max_length:
            raise ValueError(f"{which} has {len(ids)} tokens but the target's context holds "
                             f"{target.max_length}; shorten it.")
    if isinstance(drafters, Drafter) or len(drafters) != len(prompts):
        raise ValueError(f"Give one drafter per prompt ({len(prompts)}); drafters keep per-sequence state.")
    if len({id(d) for d in drafters}) != len(drafters):
        raise ValueError("The same drafter instance appears twice; give each prompt its own (e.g. a factory).")


def stream_batch(target: Target, prompts: Sequence[list[int]], drafters: Sequence[Drafter] | None = None,
                 sampling: Sampling = Sampling(), max_new_tokens: int = 256, stats: Sequence[Stats] | None = None,
                 rule: str = "auto", seed: int | None = None, should_stop: Callable[[], bool] | None = None,
                 max_batch: int | None = None) -> Iterator[list[list[int]]]:
    """The decode loop for one or more sequences: after every target forward, yield each prompt's newly committed
    ids (an empty list while it waits or once it has finished); fill `stats` (one Stats per prompt) as it goes.

    All live sequences share ONE target forward per step: each brings its own pending tokens and draft tree,
    and its own cache row whose valid length may differ from the others' (see `batch_verify_inputs`). Finished
    sequences leave the batch; with `max_batch`, at most that many decode at once and waiting prompts join (their
    prompt forward rides along with the others' step) as soon as rows free up. With a seed, sequence b samples
    from its own generator seeded seed + b. Stats.seconds counts from the start of the whole batch.
    """
    drafters = [Drafter() for _ in prompts] if drafters is None else drafters
    _check(target, prompts, drafters, rule)
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}.")
    stats = [Stats() for _ in prompts] if stats is None else stats
    if len(stats) != len(prompts):
        raise ValueError(f"Give one Stats per prompt ({len(prompts)}), got {len(stats)}.")
    device = target.device
    ids = [list(p) for p in prompts]
    pending = [torch.tensor(p, dtype=torch.long, device=device) for p in ids]
    budgets = [min(max_new_tokens, target.max_length - len(p)) for p in ids]
    generators = [None if seed is None else torch.Generator().manual_seed(seed + b) for b in range(len(ids))]
    for drafter, p in zip(drafters, ids):
        drafter.reset(p)
    cache = DynamicCache()
    limit = max_batch or len(ids)
    waiting = [b for b in range(len(ids)) if budgets[b] > 0]  # sequences not in the cache yet, in order
    live, lengths, width = [], [], 0  # sequences in the cache's rows, their valid lengths, the cache's columns
    start = time.perf_counter()
    while (live or waiting) and not (should_stop and should_stop()):
        if waiting and len(live) < limit:
            joining, waiting = waiting[:limit - len(live)], waiting[limit - len(live):]
            add_rows(cache, len(joining))
            live, lengths = live + joining, lengths + [0] * len(joining)
        trees = []
        for b, past in zip(live, lengths):  # a row with nothing cached yet brings its prompt, without a tree
            tree = drafters[b].propose(ids[b], sampling, generators[b]) if past else DraftTree.empty()
            if len(tree) and max(tree.depth) > target.max_length - past - pending[b].numel() - 1:
                tree = DraftTree.empty()  # too close to the context limit to verify a tree
            trees.append(tree)
        input_ids, pos, mask = batch_verify_inputs([pending[b] for b in live], trees, lengths, width, target.dtype)
        hidden = target.hidden(input_ids, pos, cache, mask)
        ms = [pending[b].numel() for b in live]
        rows = [hidden[r, m - 1:m + len(t)] for r, (m, t) in enumerate(zip(ms, trees))]
        logits = target.logits(rows[0] if len(rows) == 1 else torch.cat(rows)).split([len(x) for x in rows])
        out: list[list[int]] = [[] for _ in ids]
        kept, stay = [], []
        for r, (b, tree, m) in enumerate(zip(live, trees, ms)):
            acc = _accept(tree, logits[r], sampling, rule, generators[b])
            kept.append(list(range(m)) + [m + i for i in acc.path])
            accepted = tree.tokens[acc.path].tolist() + [acc.next_token]
            st = stats[b]
            st.target_forwards += 1
            st.drafted_tokens += len(tree)
            st.accepted_lengths.append(len(acc.path))
            new = accepted[:budgets[b] - st.new_tokens]
            stop = next((i for i, t in enumerate(new) if t in target.eos_ids), None)
            if stop is not None:
                new = new[:stop + 1]
            committed = hidden[r, kept[r]] if acc.path else hidden[r, :m]
            drafters[b].observe(committed, ids[b][len(ids[b]) - m + 1:] + accepted)
            ids[b] += new
            st.new_tokens += len(new)
            st.seconds = time.perf_counter() - start
            out[b] = new
            if stop is None and st.new_tokens < budgets[b]:
                stay.append(r)
                pending[b] = torch.tensor([acc.next_token], dtype=torch.long, device=device)
        lengths = keep_paths(cache, lengths, width, kept)
        if len(stay) < len(live):
            live, lengths = [live[r] for r in stay], [lengths[r] for r in stay]
            drop_rows(cache, stay, max(lengths, default=0))
        width = max(lengths, default=0)
        yield out


def stream_text(target: Target, token_stream: Iterator[list[int]]) -> Iterator[str]:
    """Turn a token stream into text pieces, holding back incomplete multi-byte characters."""
    tokens: list[int] = []
    shown = ""
    for new in token_stream:
        tokens += new
        text = target.decode(tokens)
        if text.endswith("\ufffd"):
            continue
        if text.startswith(shown):
            piece, shown = text[len(shown):], text
            if piece:
                yield piece
    text = target.decode(tokens)
    if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown):]


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
