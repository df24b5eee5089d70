"""Drafting plans chosen by measurement: which tree shape, depth and size to draft on THIS device, or none at all.

A speculative step costs T_verify(n) + T_draft(plan) and yields 1 + E[accepted] tokens; a plain step costs T(0)
and yields one. Both costs are timed here: verification as target forwards of 1 + n tokens over CONTEXT cached
tokens, drafting as the head's real `observe` + `propose` for each candidate plan on synthetic features.
`choose_plan` takes the candidate with the most expected tokens per second, E[accepted] coming from the acceptance
model of koala.drafters.trees (per-depth rates from the head's training manifest). "No draft" is a candidate
whenever the caller left the tree shape open, so a head is used only where the measurements say it pays.

Timings are cached under the koala cache dir per device + model (+ head) with when they were taken and how noisy
they were. A noisy measurement (another job on the CPU) is used for this run but never saved, and a saved one
expires after MAX_AGE_DAYS, so one bad measurement cannot decide forever. A draft profile also times a plain forward
and is read relative to it, so a machine that was evenly slow while one profile was taken cannot tip the choice.
"""
from __future__ import annotations

import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from koala import cpu_kernels
from koala.atomic import write_json_atomic
from koala.drafters.trees import Acceptance, expected_accepted, is_measured
from koala.home import cache_dir
from koala.invariant_linear import bf16_backend
from koala.target import Target, device_name, sync
from koala.tree import DraftTree, verify_inputs

DEFAULT_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
CONTEXT = 128  # cached tokens the timed forwards attend to
MAX_SPREAD = 1.2  # typical median / fastest run above this: the machine was busy, do not save
MAX_AGE_DAYS = 7
# A larger plan must beat the smallest near-best one by this fraction of expected tokens/s when the acceptance
# model is a guess from training rates, which overstate a head in the loop. Round 11 (fp32, 26 Spec-Bench
# questions, one run): EAGLE's 12-node depth-2 tree, 0.4% ahead of a 4-node depth-1 tree by the model, ran 1.22x
# vanilla (0.87x in one category) while EAGLE-KOALA's 4-node depth-1 tree ran 1.37x.
PLAN_MARGIN = 0.03
# ... and by this fraction when `koala calibrate` measured the acceptance in the loop: only timing noise is left to
# guard against. Round 23 (bf16, 26 questions, three runs each): a calibrated eagle3 head whose 2-node tree the
# model put 2.3% ahead of a chain of 1 ran 2.3% faster with it (1.38x against 1.35x vanilla; 16 of 26 questions).
MEASURED_MARGIN = 0.01
REFERENCE = "plain"  # the draft profile's own timing of a plain target forward
FORWARD_VERSION = 2  # bump when KOALA changes how the target's forward runs: saved profiles are then not reused
DRAFT_VERSION = 2  # bump when measure_draft changes what it times: saved draft profiles are then not reused


@dataclass(frozen=True)
class Plan:
    """How to draft: tree shape ("none", "chain", "static" or "dynamic"), depth and nodes verified per step."""

    tree: str
    depth: int = 0
    total_tokens: int = 0

    @property
    def key(self) -> str:
        return f"{self.tree}:{self.depth}:{self.total_tokens}"

    def __str__(self) -> str:
        if self.tree == "none":
            return "no drafting"
        if self.tree == "chain":
            return f"a chain of {self.depth}"
        return f"a {self.tree} tree of {self.total_tokens} nodes, depth {self.depth}"


NO_DRAFT = Plan("none")


@dataclass
class Timings:
    seconds: dict  # the fastest run per key
    spread: float  # the typical (median over keys) ratio of a key's median run to its fastest: ~1 when idle


def _time_round_robin(jobs: dict[Hashable, Callable[[], None]], repeats: int, device: torch.device,
                      between: Callable[[], None] | None = None) -> Timings:
    """Run every job once per round (round 0 warms kernels and allocators up), so a burst of load from another
    process hits all keys alike; keep each key's fastest run and report how far the runs typically strayed.
    `between`, if given, runs untimed before every job."""
    runs: dict[Hashable, list[float]] = {k: [] for k in jobs}
    for rep in range(repeats + 1):
        for k, job in jobs.items():
            if between is not None:
                between()
            sync(device)
            start = time.perf_counter()
            job()
            sync(device)
            if rep:
                runs[k].append(time.perf_counter() - start)
    spread = statistics.median(statistics.median(r) / max(min(r), 1e-9) for r in runs.values())
    return Timings({k: min(r) for k, r in runs.items()}, spread)


def _forward_jobs(target: Target, sizes: Sequence[int], context: int = CONTEXT) -> dict[int, Callable[[], None]]:
    """One job per n (0 = plain): a verify forward of the pending token + n tree tokens over `context` cached
    tokens."""
    device = target.device
    context = min(context, target.max_length - max(sizes, default=0) - 2)
    if context < 1:
        raise ValueError(f"The target's context ({target.max_length}) is too short to verify {max(sizes)} tokens.")
    gen = torch.Generator().manual_seed(0)
    vocab = target.lm_head.weight.shape[0]
    cache = target.new_cache()
    prefix = torch.randint(vocab, (context,), generator=gen).to(device)
    target.hidden(prefix[None], torch.arange(context, device=device)[None], cache)

    def job(ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None) -> Callable[[], None]:
        def run() -> None:
            target.logits(target.hidden(ids, pos, cache, mask)[0])
            cache.crop(context - cache.get_seq_length())  # negative = tokens to drop
        return run

    jobs = {}
    for n in (0, *sorted(set(sizes))):
        tree = DraftTree.chain(torch.randint(vocab, (n,), generator=gen)) if n else DraftTree.empty()
        jobs[n] = job(*verify_inputs(torch.randint(vocab, (1,), generator=gen).to(device), tree, context,
                                     target.dtype))
    return jobs


@torch.inference_mode()
def measure_latency(target: Target, sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 3,
                    context: int = CONTEXT) -> Timings:
    """Seconds of one verify forward (pending token + n tree tokens) over `context` cached tokens, per n (0 =
    plain), made non-decreasing in n (more tokens never cost less)."""
    timings = _time_round_robin(_forward_jobs(target, sizes, context), repeats, target.device)
    floor = 0.0
    for n in sorted(timings.seconds):
        floor = timings.seconds[n] = max(floor, timings.seconds[n])
    return timings


@torch.inference_mode()
def measure_draft(target: Target, build: Callable[[Plan], object], plans: Sequence[Plan],
                  repeats: int = 3) -> Timings:
    """Seconds per step a drafter built by `build(plan)` spends in `observe` (two newly committed tokens) plus
    `propose`, after ingesting CONTEXT tokens of synthetic target features, per plan, each right after an untimed
    plain target forward; and under REFERENCE, that forward timed in the same rounds, the clock these costs are read
    on (see draft_profile)."""
    device, dtype = target.device, target.dtype
    d, vocab = target.config.hidden_size, target.lm_head.weight.shape[0]

    def job(plan: Plan) -> Callable[[], None]:
        drafter = build(plan)
        width = d * max(1, len(drafter.feature_layers))  # EAGLE-3 heads read several target layers
        gen = torch.Generator().manual_seed(0)
        context = torch.randn(CONTEXT, width, generator=gen).to(device, dtype)
        context_ids = torch.randint(vocab, (CONTEXT,), generator=gen).tolist()
        step = torch.randn(2, width, generator=gen).to(device, dtype)
        step_ids = torch.randint(vocab, (2,), generator=gen).tolist()
        drafter.reset(context_ids)
        drafter.observe(context, context_ids)

        def run() -> None:
            drafter.observe(step, step_ids)
            drafter.propose(context_ids)
        return run

    jobs: dict[Hashable, Callable[[], None]] = {plan: job(plan) for plan in plans}
    jobs[REFERENCE] = forward = _forward_jobs(target, ())[0]
    # each draft step follows a target forward, as in the decode loop: timed back to back, the first plan after the
    # reference forward cost 1.6-1.8% of a forward more than the same work timed later (round 23, eagle3, bf16)
    return _time_round_robin(jobs, repeats, device, between=forward)


def _load(file: Path) -> dict | None:
    """A saved profile's seconds, or None when it is missing, damaged or older than MAX_AGE_DAYS."""
    try:
        data = json.loads(file.read_text())
        if time.time() - float(data["measured_at"]) > MAX_AGE_DAYS * 86400:
            return None
        return {str(k): float(v) for k, v in data["seconds"].items()}
    except (OSError, json.JSONDecodeError, KeyError, ValueError, TypeError, AttributeError):
        return None


def _save(file: Path, timings: Timings, about: dict) -> None:
    """Write the profile atomically; a noisy one is not saved, and an unwritable cache only costs time."""
    if timings.spread > MAX_SPREAD:
        print(f"koala: note: timings varied {timings.spread:.2f}x between runs (is another job using this machine?);"
              f" the drafting plan uses them for this run only.", file=sys.stderr)
        return
    data = {**about, "measured_at": time.time(), "spread": round(timings.spread, 4),
            "seconds": {str(k.key if isinstance(k, Plan) else k): v for k, v in timings.seconds.items()}}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(file, data)
    except OSError:
        pass


def _profile_file(kind: str, parts: list) -> Path:
    return cache_dir() / "plans" / f"{kind}-{hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]}.json"


def _target_key(target: Target) -> list:
    cfg = target.config
    return [device_name(target.device), target.name, type(target.model).__name__, cfg.hidden_size,
            cfg.num_hidden_layers, str(target.dtype), getattr(cfg, "_attn_implementation", None),
            target.identity["lm_head_sha256"], CONTEXT, FORWARD_VERSION,
            [cpu_kernels.version(), bf16_backend(), target.coded_linears, target.fused is not None]
            if target.device.type == "cpu" else None]


def latency_profile(target: Target, sizes: Sequence[int] = DEFAULT_SIZES, refresh: bool = False) -> dict[int, float]:
    """measure_latency, cached per device + target + sizes."""
    sizes = sorted({int(s) for s in sizes})
    file = _profile_file("verify", _target_key(target) + [sizes])
    saved = None if refresh else _load(file)
    if saved is not None and all(str(n) in saved for n in (0, *sizes)):
        return {n: saved[str(n)] for n in (0, *sizes)}
    timings = measure_latency(target, sizes)
    _save(file, timings, {"device": device_name(target.device), "target": target.name})
    return dict(timings.seconds)


def draft_profile(target: Target, head_key: str, build: Callable[[Plan], object], plans: Sequence[Plan],
                  plain: float, refresh: bool = False) -> dict[Plan, float]:
    """measure_draft, cached per device + target + head (`head_key`, e.g. a hash of its weights) + plans, and read
    on the clock of the verify profile: each cost is scaled by `plain` (that profile's plain forward) over the plain
    forward timed beside the head. A machine that ran slower (or faster) while one of the two profiles was taken
    then shifts both alike instead of making drafting look dear (or cheap): round 20, a draft profile taken in a
    slow spell of this VM priced an EAGLE-KOALA step at 8.1 ms (2.2-2.5 ms re-timed), its runs so evenly slow that
    their spread (1.20) did not flag them, and the planner dropped the head."""
    plans = sorted(set(plans), key=lambda p: p.key)
    file = _profile_file("draft", _target_key(target) + [head_key, [p.key for p in plans], DRAFT_VERSION])
    saved = None if refresh else _load(file)
    if saved is not None and all(k in saved for k in (REFERENCE, *(p.key for p in plans))):
        seconds, reference = {p: saved[p.key] for p in plans}, saved[REFERENCE]
    else:
        timings = measure_draft(target, build, plans)
        _save(file, timings, {"device": device_name(target.device), "target": target.name, "head": head_key})
        reference = timings.seconds.pop(REFERENCE)
        seconds = timings.seconds
    scale = plain / reference
    if max(scale, 1 / scale) > MAX_SPREAD:
        print(f"koala: note: a plain forward took {1 / scale:.2f}x its verify profile's time while the head's draft"
              f" cost was timed (a busy or drifting machine); the draft costs are scaled to match.", file=sys.stderr)
    return {p: t * scale for p, t in seconds.items()}


def expected_tokens(plan: Plan, top_k: int, acceptance: Acceptance) -> float:
    """Tokens one step yields on average under the acceptance model: the target's own token plus accepted drafts."""
    if plan.tree == "none":
        return 1.0
    if plan.tree == "chain":
        return 1.0 + expected_accepted(plan.depth, plan.depth, 1, acceptance)
    return 1.0 + expected_accepted(plan.total_tokens, plan.depth, top_k, acceptance)


def _verified(plan: Plan) -> int:
    """Draft tokens a step with this plan verifies."""
    return 0 if plan.tree == "none" else plan.depth if plan.tree == "chain" else plan.total_tokens


def best_plan(plans: Sequence[Plan], latency: dict[int, float], draft: dict[Plan, float], top_k: int,
              acceptance: Acceptance, margin: float | None = None) -> Plan:
    """The smallest plan (fewest verified tokens, then shallowest; the earlier on a tie) whose expected tokens per
    second are within `margin` of the best.

    Expected rates from average per-depth acceptance in training overstate what a head achieves in the loop, the
    more so the more nodes a tree stakes on them, so there a larger tree must win clearly (PLAN_MARGIN); rates
    measured in the loop need only clear timing noise (MEASURED_MARGIN). `margin` None picks by `acceptance`."""
    if margin is None:
        margin = MEASURED_MARGIN if is_measured(acceptance) else PLAN_MARGIN

    def rate(plan: Plan) -> float:
        if plan.tree == "none":
            return 1.0 / latency[0]
        return expected_tokens(plan, top_k, acceptance) / (latency[_verified(plan)] + draft[plan])

    rates = {plan: rate(plan) for plan in plans}
    best = max(rates.values())
    return min((p for p in plans if rates[p] >= (1 - margin) * best), key=lambda p: (_verified(p), p.depth))


def max_nodes(tree: str, depth: int, top_k: int) -> int:
    """The most nodes a tree of this shape can have."""
    if tree == "dynamic":
        return top_k + (depth - 1) * top_k * top_k
    if tree == "chain":
        return depth
    return sum(top_k ** d for d in range(1, depth + 1))


def candidate_plans(shapes: Sequence[str], depths: Sequence[int], top_k: int,
                    total_tokens: int | None = None, sizes: Sequence[int] = DEFAULT_SIZES) -> list[Plan]:
    """Plans to choose from, simplest first: no drafting, chains, then trees of every measured size that fits."""
    plans = []
    for shape in shapes:
        if shape == "none":
            plans.append(NO_DRAFT)
        elif shape == "chain":
            plans += [Plan("chain", d, d) for d in depths]
        elif total_tokens is not None:
            plans += [Plan(shape, d, total_tokens) for d in depths]
        else:
            plans += [Plan(shape, d, n) for d in depths for n in sizes if max(d, 2) <= n <= max_nodes(shape, d, top_k)]
    return plans


def choose_plan(target: Target, plans: Sequence[Plan], build: Callable[[Plan], object],
                head_key: Callable[[], str], top_k: int, acceptance: Acceptance) -> Plan:
    """The best of `plans` on this device: verify and draft costs measured (or read from the cache). `head_key`
    names the head for the draft profile; it is only called when there is a choice to make."""
    if len(plans) == 1:
        return plans[0]
    drafting = [p for p in plans if p.tree != "none"]
    sizes = {_verified(p) for p in drafting}
    latency = latency_profile(target, sorted(sizes))
    draft = draft_profile(target, head_key(), build, drafting, latency[0]) if drafting else {}
    return best_plan(plans, latency, draft, top_k, acceptance)
