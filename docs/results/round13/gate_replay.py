"""Replay gate rules over per-step traces, so rules are compared on the same text without re-decoding.

  python gate_replay.py trace OUT.json DTYPE HEAD ['{"drafter_for_head": "kwargs"}']
      decodes the first turns of 26 Spec-Bench questions (2 per category, 128 new tokens, greedy) twice with the
      head's default drafter: drafting every step, then never; records each step's (tokens gained, seconds).
  python gate_replay.py replay TRACE.json GATE.py[:kw=v,...] ...
      walks each answer with the GatedDrafter defined in GATE.py on a virtual clock: a drafted step starting at
      answer position p gains what the always-drafting step covering p had left (at least 1) and costs that step's
      seconds; a plain step costs the always-plain run's step at p. Prints the speedup over plain decoding.
"""
import importlib.util
import json
import statistics
import sys

import torch

from koala.drafters.base import Drafter


def trace(out: str, dtype: str, head: str, options: str = "{}") -> None:
    from koala.bench import load_questions
    from koala.decode import generate
    from koala.drafters.factory import drafter_for_head
    from koala.drafters.gate import GatedDrafter
    from koala.target import load_target

    torch.set_num_threads(2)
    target = load_target(dtype=dtype)
    questions, _ = load_questions("../shared/data/spec_bench/question.jsonl", 2)
    gate = drafter_for_head(head, target, **json.loads(options))
    print("plan:", gate.plan, file=sys.stderr)
    steps: list[tuple[int, float]] = []
    record = GatedDrafter._record

    def logged(self, now):
        if self.started is not None and self.steps > 1 and self.gained:
            steps.append((self.gained, now - self.started))
        record(self, now)

    GatedDrafter._record = logged
    runs = []
    for mode in ("draft", "plain"):
        GatedDrafter._choose = lambda self, drafting=mode == "draft": drafting
        for q in questions:
            steps.clear()
            generate(target, [{"role": "user", "content": q["turns"][0]}], gate, max_new_tokens=128)
            runs.append({"mode": mode, "category": q["category"], "steps": list(steps)})
    json.dump(runs, open(out, "w"))


def _gate_class(spec: str):
    path, _, options = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("gate_under_test", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    kwargs = {k: float(v) if "." in v else int(v) for k, v in (kv.split("=") for kv in options.split(",") if kv)}
    return module.GatedDrafter, kwargs


def _replay(gate_cls, kwargs, drafted: list, plain: list) -> float:
    """Seconds the gate takes over one answer."""
    starts, p = [], 0
    for gain, seconds in drafted:
        starts.append((p, gain, seconds))
        p += gain
    now = [0.0]
    gate = gate_cls(Drafter(), clock=lambda: now[0], **kwargs)  # an inner drafter that proposes nothing
    gate.reset([])
    gate.observe(torch.zeros(1, 1), [0])  # the prefill step
    pos = 0
    while pos < p:
        gate.propose([])
        if gate.drafting:
            start, gain, seconds = max(s for s in starts if s[0] <= pos)
            gain = max(1, start + gain - pos)
        else:
            gain, seconds = 1, plain[min(pos, len(plain) - 1)][1]
        now[0] += seconds
        pos += gain
        gate.observe(torch.zeros(gain, 1), [0] * gain)
    return now[0]


def replay(trace_file: str, *gates: str) -> None:
    runs = json.load(open(trace_file))
    drafted = [r for r in runs if r["mode"] == "draft"]
    plain = [r for r in runs if r["mode"] == "plain"]
    gains = [g for r in drafted for g, _ in r["steps"]]
    print(f"{trace_file}: drafted steps gain {statistics.mean(gains):.2f} tokens in "
          f"{statistics.median(s for r in drafted for _, s in r['steps']) * 1e3:.1f} ms (median), plain steps "
          f"{statistics.median(s for r in plain for _, s in r['steps']) * 1e3:.1f} ms")
    plain_s = sum(s for r in plain for _, s in r["steps"])
    always = sum(s for r in drafted for _, s in r["steps"])
    print(f"  {'drafting every step':44s} {plain_s / always:.3f}x")
    for spec in gates:
        gate_cls, kwargs = _gate_class(spec)
        by_cat: dict[str, list[float]] = {}
        total = 0.0
        for d, p in zip(drafted, plain):
            seconds = _replay(gate_cls, kwargs, d["steps"], p["steps"])
            total += seconds
            by_cat.setdefault(d["category"], []).append(sum(s for _, s in p["steps"]) / seconds)
        cats = {c: statistics.mean(v) for c, v in by_cat.items()}
        low = min(cats, key=cats.get)
        print(f"  {spec:44s} {plain_s / total:.3f}x, lowest category {cats[low]:.3f}x ({low})")


if __name__ == "__main__":
    {"trace": trace, "replay": replay}[sys.argv[1]](*sys.argv[2:])
