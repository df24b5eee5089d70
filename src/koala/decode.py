"""The one decode loop. Each step: the drafter proposes a tree, ONE target forward scores the pending tokens plus
every tree node, an acceptance rule picks a path, the KV cache keeps exactly that path, and the target's own next
token (the bonus) becomes the pending token of the next step. The prompt is simply the first step's pending tokens,
and vanilla decoding is a drafter that proposes nothing.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from koala.acceptance import Accepted, Sampling, accept_greedy, accept_sampling, accept_typical, probs_from_logits
from koala.drafters.base import Drafter
from koala.target import Target
from koala.tree import DraftTree, verify_inputs

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
def keep_path(cache: DynamicCache, base: int, nodes: list[int]) -> None:
    """Compact the cache after verification: keep positions [0, base) and the accepted tree nodes, in order."""
    k = len(nodes)
    contiguous = nodes == list(range(k))
    idx = None if contiguous else torch.tensor(nodes, dtype=torch.long) + base
    for layer in cache.layers:
        if idx is not None:
            i = idx.to(layer.keys.device)
            layer.keys[..., base:base + k, :] = layer.keys[..., i, :]
            layer.values[..., base:base + k, :] = layer.values[..., i, :]
        layer.keys = layer.keys[..., :base + k, :]
        layer.values = layer.values[..., :base + k, :]


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
    if rule not in RULES:
        raise ValueError(f"Unknown acceptance rule {rule!r}; choose one of {RULES}.")
    if not prompt_ids:
        raise ValueError("The prompt is empty: give at least one token.")
    if len(prompt_ids) >= target.max_length:
        raise ValueError(f"The prompt has {len(prompt_ids)} tokens but the target's context holds "
                         f"{target.max_length}; shorten it.")
    drafter = drafter or Drafter()
    stats = stats if stats is not None else Stats()
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    device = target.device
    cache = DynamicCache()
    ids = list(prompt_ids)
    pending = torch.tensor(ids, dtype=torch.long, device=device)
    budget = min(max_new_tokens, target.max_length - len(ids))
    drafter.reset(ids)
    start = time.perf_counter()
    first = True
    while stats.new_tokens < budget and not (should_stop and should_stop()):
        past = cache.get_seq_length()
        tree = DraftTree.empty() if first else drafter.propose(ids, sampling, generator)
        room = target.max_length - past - pending.numel()
        if len(tree) and max(tree.depth) > room - 1:
            tree = DraftTree.empty()  # too close to the context limit to verify a tree
        input_ids, pos, mask = verify_inputs(pending, tree, past, target.dtype)
        hidden = target.hidden(input_ids, pos, cache, mask)[0]
        m = pending.numel()
        logits = target.logits(hidden[m - 1:])
        acc = _accept(tree, logits, sampling, rule, generator)
        keep_path(cache, past + m, acc.path)
        accepted = tree.tokens[acc.path].tolist() + [acc.next_token]
        stats.target_forwards += 1
        stats.drafted_tokens += len(tree)
        stats.accepted_lengths.append(len(acc.path))
        new = accepted[:budget - stats.new_tokens]
        stop = next((i for i, t in enumerate(new) if t in target.eos_ids), None)
        if stop is not None:
            new = new[:stop + 1]
        committed = torch.cat([hidden[:m], hidden[m:][acc.path]]) if acc.path else hidden[:m]
        drafter.observe(committed, ids[len(ids) - m + 1:] + accepted)
        ids += new
        stats.new_tokens += len(new)
        stats.seconds = time.perf_counter() - start
        yield new
        if stop is not None:
            break
        pending = torch.tensor([acc.next_token], dtype=torch.long, device=device)
        first = False


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


def generate(target: Target, prompt: str | list[dict] | list[int], drafter: Drafter | None = None,
             sampling: Sampling = Sampling(), max_new_tokens: int = 256, rule: str = "auto",
             seed: int | None = None) -> Result:
    """Generate a full answer. `prompt` is text (one user turn), chat messages, or token ids (used as they are)."""
    ids = prompt if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], int)) else target.encode(prompt)
    stats = Stats()
    tokens = [t for new in stream_tokens(target, ids, drafter, sampling, max_new_tokens, stats, rule, seed)
              for t in new]
    return Result(target.decode(tokens), tokens, stats)
