"""GatedDrafter: drafts only while measured drafting throughput beats plain decoding; output stays lossless."""
import time

import torch

from koala.decode import generate
from koala.drafters import Drafter
from koala.drafters.gate import GatedDrafter
from koala.drafters.medusa import MedusaDrafter
from koala.heads import HeadConfig
from koala.heads.checkpoint import build_head
from koala.tree import DraftTree

PROMPT = [10, 11, 12, 13, 10, 11, 12, 13, 10, 11]


class Oracle(Drafter):
    """Proposes the true greedy continuation (right) or garbage (wrong), paying `cost` seconds per proposal."""

    def __init__(self, reference: list[int], right: bool, cost: float) -> None:
        self.full, self.right, self.cost = PROMPT + reference, right, cost
        self.observed = 0

    def propose(self, ids) -> DraftTree:
        time.sleep(self.cost)
        truth = self.full[len(ids):len(ids) + 4]
        tokens = truth if self.right else [(t + 7) % 100 + 2 for t in truth]
        return DraftTree.chain(torch.tensor(tokens, dtype=torch.long)) if tokens else DraftTree.empty()

    def observe(self, hidden, next_ids) -> None:
        self.observed += len(next_ids)


def test_gate_turns_off_a_costly_useless_drafter_and_keeps_a_good_one(llama_target):
    llama_target.eos_ids = set()  # never stop early: 60 steps to judge
    # a real target's forward costs milliseconds whatever the tree size; the tiny one costs almost nothing, which
    # would make the loop's own bookkeeping decide. Give every forward a real target's fixed cost.
    llama_target.body.register_forward_pre_hook(lambda *_: time.sleep(0.01))
    ref = generate(llama_target, PROMPT, None, max_new_tokens=60).tokens
    bad = GatedDrafter(Oracle(ref, right=False, cost=0.02))
    out = generate(llama_target, PROMPT, bad, max_new_tokens=60)
    assert out.tokens == ref
    assert bad.plain_steps > 3 * bad.draft_steps  # backed off after the probes lost
    good = GatedDrafter(Oracle(ref, right=True, cost=0.0))
    out = generate(llama_target, PROMPT, good, max_new_tokens=60)
    assert out.tokens == ref and out.stats.tau > 2.5
    assert good.draft_steps > 3 * good.plain_steps
    # features of plainly decoded tokens reach the inner drafter (buffered, then handed over at once)
    assert bad.inner.observed + sum(len(n) for _, n in bad.buffer) == len(PROMPT) + len(ref) - 1


def test_gated_medusa_is_lossless(llama_target):
    head = build_head(HeadConfig.for_target(llama_target, "medusa", 1, num_heads=2), llama_target)
    ref = generate(llama_target, PROMPT, None, max_new_tokens=40).tokens
    gated = GatedDrafter(MedusaDrafter(head, tree="chain", depth=2))
    assert generate(llama_target, PROMPT, gated, max_new_tokens=40).tokens == ref
    assert gated.depth == 2  # the inner drafter's settings stay visible


def _scripted(gains: list[int], draft_cost: float, steps: int = 300) -> GatedDrafter:
    """A gate over `steps` steps on a virtual clock: a plain step costs 1 and gains 1; the k-th drafted step costs
    `draft_cost` and gains gains[k % len(gains)]."""
    now = [0.0]
    gate = GatedDrafter(Drafter(), clock=lambda: now[0])
    gate.reset([])
    gate.observe(torch.zeros(1, 1), [0])  # the prefill step
    for _ in range(steps):
        gate.propose([])
        gain = gains[gate.draft_steps % len(gains)] if gate.drafting else 1
        now[0] += draft_cost if gate.drafting else 1.0
        gate.observe(torch.zeros(gain, 1), [0] * gain)
    return gate


def test_gate_keeps_a_head_that_pays_on_average_through_runs_of_misses():
    # draft steps cost 1.3 plain steps and gain 1.5 tokens on average, in runs of four misses: a 15% gain
    gate = _scripted([1, 1, 1, 1, 2, 2, 2, 2], draft_cost=1.3)
    assert gate.draft_steps > 0.9 * (gate.draft_steps + gate.plain_steps)


def test_gate_backs_off_a_head_that_loses_on_average():
    gate = _scripted([1, 1, 2], draft_cost=1.5)  # 1.33 tokens for 1.5 plain steps' time: 11% slower
    assert gate.plain_steps > 4 * gate.draft_steps
    costly = _scripted([2, 1], draft_cost=4.0)  # one step of a costly head is evidence enough
    assert costly.plain_steps > 15 * costly.draft_steps
