"""Hardware-aware tree size: how many draft tokens to verify per step on THIS device for THIS target.

Verifying n tree tokens costs more than a 1-token step, by a factor that depends on the hardware (a CPU pays
almost linearly, a GPU is nearly flat up to dozens of tokens). We time a few target forwards for several tree
sizes once per (device, target, sizes) and cache the profile under the koala cache dir; then pick the size that
maximises expected tokens per second = (1 + expected accepted draft tokens) / verify latency, with the acceptance
model of koala.drafters.trees (per-depth rates from the head's training manifest, or defaults).
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import DynamicCache

from koala.drafters.trees import expected_accepted
from koala.target import Target, cache_dir, device_name, sync
from koala.tree import DraftTree, verify_inputs

DEFAULT_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
CONTEXT = 128  # cached tokens the timed verify forwards attend to


def _profile_file(target: Target, sizes: Sequence[int]) -> Path:
    cfg = target.config
    key = json.dumps([device_name(target.device), target.name, type(target.model).__name__,
                      cfg.hidden_size, cfg.num_hidden_layers, str(target.dtype), target.identity["lm_head_sha256"],
                      CONTEXT, list(sizes)])
    return cache_dir() / "tree_size" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


@torch.inference_mode()
def measure_latency(target: Target, sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 3) -> dict[int, float]:
    """Seconds of one verify forward (pending token + n tree tokens) over CONTEXT cached tokens, per n (0 = plain).

    Sizes are timed round-robin and each keeps its fastest run, so a burst of load from other processes does not
    skew one size; the result is then made non-decreasing in n (more tokens never cost less).
    """
    device = target.device
    context = min(CONTEXT, target.max_length - max(sizes) - 2)
    if context < 1:
        raise ValueError(f"The target's context ({target.max_length}) is too short to verify {max(sizes)} tokens.")
    gen = torch.Generator().manual_seed(0)
    vocab = target.lm_head.weight.shape[0]
    cache = DynamicCache()
    prefix = torch.randint(vocab, (context,), generator=gen).to(device)
    target.hidden(prefix[None], torch.arange(context, device=device)[None], cache)
    inputs = {}
    for n in (0, *sorted(sizes)):
        tree = DraftTree.chain(torch.randint(vocab, (n,), generator=gen)) if n else DraftTree.empty()
        inputs[n] = verify_inputs(torch.randint(vocab, (1,), generator=gen).to(device), tree, context, target.dtype)
    best = {n: float("inf") for n in inputs}
    for rep in range(repeats + 1):  # round 0 warms up kernels and allocators
        for n, (ids, pos, mask) in inputs.items():
            sync(device)
            start = time.perf_counter()
            target.logits(target.hidden(ids, pos, cache, mask)[0])
            sync(device)
            if rep:
                best[n] = min(best[n], time.perf_counter() - start)
            cache.crop(context - cache.get_seq_length())  # negative = tokens to drop
    out, floor = {}, 0.0
    for n in sorted(best):
        floor = max(floor, best[n])
        out[n] = floor
    return out


def latency_profile(target: Target, sizes: Sequence[int] = DEFAULT_SIZES, refresh: bool = False) -> dict[int, float]:
    """measure_latency, cached on disk per device + target + sizes (a read-only cache only costs time)."""
    sizes = sorted({int(s) for s in sizes})
    file = _profile_file(target, sizes)
    if file.is_file() and not refresh:
        try:
            return {int(k): float(v) for k, v in json.loads(file.read_text())["latency"].items()}
        except (json.JSONDecodeError, KeyError, ValueError, AttributeError):
            pass  # a damaged profile is simply measured again
    latency = measure_latency(target, sizes)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"device": device_name(target.device), "target": target.name,
                                   "latency": latency}))
        tmp.replace(file)
    except OSError:
        pass
    return latency


def best_size(latency: dict[int, float], depth: int, top_k: int, acceptance: Sequence[float],
              max_nodes: int | None = None) -> int:
    """The measured tree size with the highest expected tokens per second."""
    sizes = [n for n in latency if n >= 1 and (max_nodes is None or n <= max_nodes)] or [1]
    return max(sizes, key=lambda n: (1 + expected_accepted(n, depth, top_k, acceptance)) / latency[n])


def choose_total_tokens(target: Target, depth: int, top_k: int, acceptance: Sequence[float],
                        max_nodes: int | None = None, sizes: Sequence[int] = DEFAULT_SIZES) -> int:
    """`--total-tokens auto`: the best tree size for this device, target and head acceptance."""
    return best_size(latency_profile(target, sizes), depth, top_k, acceptance, max_nodes)
