"""`koala bench`: Spec-Bench-style speed comparison of decoding methods on MT-bench-form question files.

Definitions (as in Spec-Bench): every method is warmed up before timing; methods are interleaved per question so
they share the machine's noise; speedup = mean over questions of (tokens/s / vanilla's tokens/s on the same
question); tau = new tokens per target forward (bonus token included); exact_match = share of questions whose
output is token-identical to vanilla's (only reported when greedy, where lossless methods must match).
Multi-turn questions are answered turn by turn, each turn's prompt holding the method's own earlier answers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from koala.acceptance import Sampling
from koala.args import add_target_args, non_negative_float, non_negative_int, positive_int, probability
from koala.build import target_from_args
from koala.decode import Stats, stream_tokens
from koala.drafters import Drafter, PromptLookupDrafter
from koala.kinds.base import dtype_name
from koala.target import Target, device_name, resolve_dtype, sync

BASELINE = "vanilla"
BUILTIN = ("vanilla", "hf-generate", "hf-stock", "hf-prompt-lookup", "pld")
def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise ValueError(text)
    return text == "on"


HEAD_OPTIONS = {"tree": str, "depth": int, "top_k": int, "total_tokens": str, "gate": _on_off, "lookup": int}
PLD_OPTIONS = {"max_ngram": int, "num_tokens": int, "min_ngram": int}
HF_PLD_OPTIONS = {"num_tokens": int, "max_ngram": int}


@dataclass
class Run:
    """One generation: its tokens, wall seconds, target forwards (None if unknown) and accepted draft lengths."""

    tokens: list[int]
    seconds: float
    forwards: int | None
    accepted_lengths: list[int] = field(default_factory=list)


# (prompt ids, sampling, max new tokens, seed) -> Run
Runner = Callable[[list[int], Sampling, int, int | None], Run]


@dataclass
class MethodSpec:
    """A parsed --method NAME=SPEC: a builtin kind or a head directory, plus its options."""

    name: str
    kind: str  # one of BUILTIN, or "head"
    options: dict = field(default_factory=dict)
    path: str | None = None
    dtype: str | None = None  # None: the target's (--dtype); else this method runs on a copy in that dtype


def _parse_options(text: str, allowed: dict[str, type], what: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in allowed:
            raise ValueError(f"Bad option {item!r} for {what}; expected KEY=VALUE with KEY in {sorted(allowed)}.")
        try:
            out[key] = allowed[key](value.strip())
        except ValueError:
            raise ValueError(f"Option {key} of {what} needs a {allowed[key].__name__}, got {value!r}.") from None
    return out


def parse_method(text: str) -> MethodSpec:
    """'NAME=SPEC' or just 'SPEC'; SPEC is a builtin (vanilla, hf-generate, hf-stock, hf-prompt-lookup, pld) or a head
    directory, optionally followed by ':key=value,...' (heads: tree, depth, top_k, total_tokens, gate=on|off,
    lookup=N: prompt lookup of n-grams of at least N tokens first, the head where it finds none, 0 = head alone;
    pld: max_ngram, num_tokens, min_ngram; hf-prompt-lookup: num_tokens, max_ngram; every method: dtype=D, run
    on a copy of the target in dtype D)."""
    name, sep, spec = text.partition("=")
    if not sep or ":" in name or "/" in name:  # no NAME given: the spec names itself
        name, spec = "", text
    spec, _, opts = spec.partition(":")
    spec = spec.strip()
    if not spec:
        raise ValueError(f"Empty method spec in {text!r}; use NAME=SPEC, e.g. pld or heads/x:tree=dynamic.")
    if spec in BUILTIN:
        allowed = {"pld": PLD_OPTIONS, "hf-prompt-lookup": HF_PLD_OPTIONS}.get(spec, {})
        options = _parse_options(opts, {**allowed, "dtype": str}, spec)
        return MethodSpec(name.strip() or spec, spec, options, dtype=options.pop("dtype", None))
    if not Path(spec).is_dir():
        raise ValueError(f"Method {text!r}: {spec!r} is neither one of {BUILTIN} nor an existing head directory.")
    options = _parse_options(opts, {**HEAD_OPTIONS, "dtype": str}, spec)
    return MethodSpec(name.strip() or Path(spec).name, "head", options, spec, options.pop("dtype", None))


def _koala_runner(target: Target, drafter: Drafter) -> Runner:
    def run(ids: list[int], sampling: Sampling, max_new: int, seed: int | None) -> Run:
        stats = Stats()
        sync(target.device)
        start = time.perf_counter()
        tokens = [t for new in stream_tokens(target, ids, drafter, sampling, max_new, stats, seed=seed) for t in new]
        sync(target.device)
        return Run(tokens, time.perf_counter() - start, stats.target_forwards, list(stats.accepted_lengths))

    run.plan = None if drafter.plan is None else str(drafter.plan)  # what a head drafts here, for the report
    return run


def _hf_runner(target: Target, extra: dict, model: torch.nn.Module | None = None) -> Runner:
    """transformers' own generate on the target's model (or `model`); forwards are counted with a forward hook."""
    model = target.model if model is None else model
    forwards = [0]

    def count(*_):
        forwards[0] += 1

    def run(ids: list[int], sampling: Sampling, max_new: int, seed: int | None) -> Run:
        x = torch.tensor([ids], dtype=torch.long, device=target.device)
        kw = dict(max_new_tokens=min(max_new, target.max_length - len(ids)), eos_token_id=sorted(target.eos_ids),
                  pad_token_id=target.tokenizer.pad_token_id or min(target.eos_ids),
                  attention_mask=torch.ones_like(x), **extra)
        if sampling.greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
            if seed is not None:
                torch.manual_seed(seed)
        forwards[0] = 0
        hook = model.register_forward_hook(count)
        try:
            sync(target.device)
            start = time.perf_counter()
            out = model.generate(x, **kw)
            sync(target.device)
            seconds = time.perf_counter() - start
        finally:
            hook.remove()
        return Run(out[0, len(ids):].tolist(), seconds, forwards[0])

    return run


def build_runner(spec: MethodSpec, target: Target) -> Runner:
    """A callable generating with this method on `target`."""
    o = spec.options
    if spec.kind == "vanilla":
        return _koala_runner(target, Drafter())
    if spec.kind == "pld":
        return _koala_runner(target, PromptLookupDrafter(**o))
    if spec.kind == "hf-generate":
        return _hf_runner(target, {})
    if spec.kind == "hf-stock":  # generate on a copy without koala's kernels: what plain transformers gives
        return _hf_runner(target, {}, target.stock_model())
    if spec.kind == "hf-prompt-lookup":
        return _hf_runner(target, {"prompt_lookup_num_tokens": o.get("num_tokens", 10),
                                   **({"max_matching_ngram_size": o["max_ngram"]} if "max_ngram" in o else {})})
    from koala.drafters.factory import drafter_for_head

    drafter = drafter_for_head(spec.path, target, tree=o.get("tree"), depth=o.get("depth"), top_k=o.get("top_k"),
                               total_tokens=o.get("total_tokens", "auto"), gate=o.get("gate", True),
                               **({"lookup": o["lookup"]} if "lookup" in o else {}))
    return _koala_runner(target, drafter)


def load_questions(path: str | Path, limit_per_category: int | None = None,
                   skip_per_category: int = 0) -> tuple[list[dict], int]:
    """MT-bench-form questions ({"question_id","category","turns":[...]}): per category, the first
    `limit_per_category` after the first `skip_per_category`.

    Returns (questions, number of malformed lines skipped)."""
    path = Path(path)
    if limit_per_category is not None and limit_per_category < 1:
        raise ValueError(f"--limit-per-category must be at least 1, got {limit_per_category}.")
    if not path.is_file():
        raise FileNotFoundError(f"Question file {path} does not exist.")
    questions, bad, seen = [], 0, defaultdict(int)
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                q = json.loads(line)
                turns = q["turns"]
                ok = isinstance(turns, list) and turns and all(isinstance(t, str) and t.strip() for t in turns)
            except (json.JSONDecodeError, KeyError, TypeError):
                ok = False
            if not ok:
                bad += 1
                continue
            cat = str(q.get("category", "default"))
            seen[cat] += 1
            if seen[cat] <= skip_per_category or (limit_per_category is not None
                                                  and seen[cat] > skip_per_category + limit_per_category):
                continue
            questions.append({"question_id": q.get("question_id", len(questions)), "category": cat, "turns": turns})
    if not questions and skip_per_category and seen:
        raise ValueError(f"{path} has no questions past the first {skip_per_category} of a category; lower "
                         f"--skip-per-category.")
    if not questions:
        raise ValueError(f"{path} holds no usable questions ({bad} malformed lines); each line needs "
                         '{"question_id", "category", "turns": ["..."]}.')
    return questions, bad


def answer(target: Target, runner: Runner, turns: list[str], sampling: Sampling, max_new: int,
           seed: int | None) -> list[Run]:
    """Answer a multi-turn question turn by turn; each prompt holds this method's own earlier answers."""
    messages, runs = [], []
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        run = runner(target.encode(messages), sampling, max_new, None if seed is None else seed + i)
        messages.append({"role": "assistant", "content": target.decode(run.tokens)})
        runs.append(run)
    return runs


@dataclass
class QuestionResult:
    """One method on one question: all turns' tokens, the median seconds over runs, forwards, acceptances."""

    category: str
    tokens: list[list[int]]
    seconds: float
    forwards: int | None
    accepted_lengths: list[int]

    @property
    def new_tokens(self) -> int:
        return sum(map(len, self.tokens))

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tau(self) -> float | None:
        return self.new_tokens / self.forwards if self.forwards else None


def run_bench(target: Target, questions: list[dict], methods: dict[str, Runner], sampling: Sampling,
              max_new_tokens: int, runs: int = 1, seed: int = 0, warmup: int = 1,
              progress: Iterable | None = None, skipped: dict | None = None,
              on_question: Callable[[dict, dict[str, QuestionResult]], None] | None = None,
              ) -> dict[str, list[QuestionResult]]:
    """Time every method on every question, interleaving methods per question (rotating their order).

    A question that any method cannot answer (e.g. longer than the target's context) is left out for every
    method and recorded in `skipped` (question id -> reason); `on_question` sees each finished question."""
    if runs < 1:
        raise ValueError("--runs must be at least 1.")
    names = list(methods)
    for q in questions[:warmup]:
        for name in names:
            answer(target, methods[name], q["turns"][:1], sampling, min(max_new_tokens, 32), seed)
    out: dict[str, list[QuestionResult]] = {n: [] for n in names}
    for qi, q in enumerate(progress if progress is not None else questions):
        order = names[qi % len(names):] + names[:qi % len(names)]
        per: dict[str, list[list[Run]]] = defaultdict(list)
        try:
            for _ in range(runs):
                for name in order:
                    per[name].append(answer(target, methods[name], q["turns"], sampling, max_new_tokens,
                                            seed + 1000 * qi))
        except ValueError as e:  # bad input for the target (too long, empty...): skip it, never the whole run
            if skipped is not None:
                skipped[str(q["question_id"])] = str(e)
            continue
        done = {}
        for name in names:
            first = per[name][0]
            seconds = statistics.median(sum(r.seconds for r in rs) for rs in per[name])
            forwards = None if any(r.forwards is None for r in first) else sum(r.forwards for r in first)
            done[name] = QuestionResult(q["category"], [r.tokens for r in first], seconds, forwards,
                                        [a for r in first for a in r.accepted_lengths])
            out[name].append(done[name])
        if on_question is not None:
            on_question(q, done)
    return out


def _aggregate(results: list[QuestionResult], base: list[QuestionResult]) -> dict:
    tokens = sum(r.new_tokens for r in results)
    seconds = sum(r.seconds for r in results)
    forwards = [r.forwards for r in results]
    ratios = [r.tokens_per_s / b.tokens_per_s for r, b in zip(results, base) if b.tokens_per_s > 0]
    return {"tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "speedup": statistics.fmean(ratios) if ratios else None,
            "tau": tokens / sum(forwards) if None not in forwards and sum(forwards) else None}


def summarise(raw: dict[str, list[QuestionResult]], greedy: bool, dtypes: dict[str, str] | None = None,
              vanillas: dict[str, str] | None = None) -> dict:
    """Per-method and per-category tokens/s, speedup vs vanilla, tau and (greedy only) exact-match rate.

    With methods in several dtypes (`dtypes`: method -> dtype, `vanillas`: dtype -> its vanilla method), exact
    match is against the vanilla of the method's own dtype, and each method (and each of its categories) also gets
    its speedup over that vanilla (`speedup_same_dtype`) and over the fastest vanilla of any dtype
    (`speedup_vs_fastest_vanilla`)."""
    base = raw[BASELINE]
    dtypes, vanillas = dtypes or {}, vanillas or {}
    fastest = max(vanillas.values(), key=lambda n: _aggregate(raw[n], base)["tokens_per_s"], default=BASELINE)
    methods = {}
    for name, results in raw.items():
        entry = _aggregate(results, base)
        own = raw[vanillas.get(dtypes.get(name), BASELINE)]
        entry["exact_match"] = (statistics.fmean(r.tokens == b.tokens for r, b in zip(results, own))
                                if greedy else None)
        if dtypes:
            entry["dtype"] = dtypes[name]
            entry["speedup_same_dtype"] = _aggregate(results, own)["speedup"]
            entry["speedup_vs_fastest_vanilla"] = _aggregate(results, raw[fastest])["speedup"]
        cats = defaultdict(list)
        for i, r in enumerate(results):
            cats[r.category].append(i)
        entry["by_category"] = {c: _aggregate([results[i] for i in ix], [base[i] for i in ix])
                                for c, ix in cats.items()}
        if dtypes:  # a head's guarantee (never slower than plain decoding) is per category, in its own dtype
            for c, ix in cats.items():
                entry["by_category"][c]["speedup_same_dtype"] = _aggregate([results[i] for i in ix],
                                                                           [own[i] for i in ix])["speedup"]
        entry["questions"] = len(results)
        entry["new_tokens"] = sum(r.new_tokens for r in results)
        methods[name] = entry
    return methods


def markdown(summary: dict) -> str:
    """One table over methods, then one table per method by category."""
    def f(v, fmt="{:.2f}"):
        return "n/a" if v is None else fmt.format(v)

    s = summary["settings"]
    lines = [f"# koala bench: {summary['target']} on {summary['device']}", "",
             (f"{s['questions']} questions from `{s['questions_file']}`, max {s['max_new_tokens']} new tokens, "
             f"temperature {s['temperature']}, {s['runs']} run(s) per question (median time)."), "",
             "| method | tokens/s | speedup | lowest category | tau | exact match | drafting plan |",
             "|---|---:|---:|---:|---:|---:|---|"]
    specs = s.get("method_specs", {})
    dtypes = any("dtype" in m for m in summary["methods"].values())
    if dtypes:  # methods in several dtypes: which, and the speedups over vanilla in the same and the fastest dtype
        lines[-2:] = ["| method | dtype | tokens/s | speedup | vs same-dtype vanilla | vs fastest vanilla | "
                      "lowest category vs same-dtype vanilla | tau | exact match (same dtype) | drafting plan |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    key = "speedup_same_dtype" if dtypes else "speedup"
    for name, m in summary["methods"].items():
        cats = {c: v[key] for c, v in m["by_category"].items() if v[key] is not None}
        low = min(cats, key=cats.get, default=None)
        dtype = f"{m['dtype']} | " if dtypes else ""
        vs = f"{f(m['speedup_same_dtype'])}x | {f(m['speedup_vs_fastest_vanilla'])}x | " if dtypes else ""
        lines.append(f"| {name} | {dtype}{f(m['tokens_per_s'], '{:.1f}')} | {f(m['speedup'])}x | {vs}"
                     f"{f(cats.get(low))}x{f' ({low})' if low else ''} | {f(m['tau'])} | "
                     f"{f(m['exact_match'], '{:.0%}')} | {specs.get(name, {}).get('plan') or ''} |")
    same = " vs same-dtype vanilla |" if dtypes else ""
    for name, m in summary["methods"].items():
        lines += ["", f"## {name}", "", f"| category | tokens/s | speedup | tau |{same}",
                  "|---|---:|---:|---:|" + ("---:|" if dtypes else "")]
        for cat, c in m["by_category"].items():
            extra = f" {f(c['speedup_same_dtype'])}x |" if dtypes else ""
            lines.append(f"| {cat} | {f(c['tokens_per_s'], '{:.1f}')} | {f(c['speedup'])}x | {f(c['tau'])} |{extra}")
    return "\n".join(lines) + "\n"


def _per_dtype(target: Target, specs: list[MethodSpec]) -> tuple[dict[str, Target], dict | None, dict | None]:
    """Copies of the target for methods that name another dtype, and for each such dtype a vanilla (added to
    `specs` unless given) as its reference: (dtype -> target, method -> dtype, dtype -> its vanilla), the last two
    None when every method runs in the target's dtype."""
    main = dtype_name(target.dtype)
    targets = {main: target}
    for s in specs:
        if s.dtype is not None:
            s.dtype = dtype_name(resolve_dtype(s.dtype, target.device.type))
            if s.dtype not in targets:
                targets[s.dtype] = target.with_dtype(s.dtype)
                if not any(o.kind == BASELINE and o.dtype == s.dtype for o in specs):
                    specs.append(MethodSpec(f"{BASELINE}-{s.dtype}", BASELINE, dtype=s.dtype))
    if len({s.name for s in specs}) != len(specs):
        raise ValueError(f"Method names must be unique, got {[s.name for s in specs]}.")
    if len(targets) == 1:
        return targets, None, None
    dtypes = {s.name: s.dtype or main for s in specs}
    return targets, dtypes, {dtypes[s.name]: s.name for s in reversed(specs) if s.kind == BASELINE}


def bench(target: Target, questions_file: str | Path, specs: list[MethodSpec], out_dir: str | Path,
          sampling: Sampling = Sampling(), max_new_tokens: int = 128, runs: int = 1,
          limit_per_category: int | None = None, seed: int = 0, show_progress: bool = True) -> dict:
    """Run the benchmark and write results.json, results.md and plots into `out_dir`; returns the results."""
    from tqdm import tqdm

    questions, malformed = load_questions(questions_file, limit_per_category)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"Method names must be unique, got {names}; name them with NAME=SPEC.")
    specs = [s for s in specs if s.kind != BASELINE or s.name != BASELINE]
    if BASELINE in {s.name for s in specs}:
        raise ValueError(f"The name {BASELINE!r} is reserved for the baseline; choose another NAME.")
    specs = [MethodSpec(BASELINE, BASELINE)] + specs
    targets, dtypes, vanillas = _per_dtype(target, specs)
    methods = {s.name: build_runner(s, targets[dtypes[s.name]] if dtypes else target) for s in specs}
    bar = tqdm(questions, desc="bench", unit="q", disable=not show_progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "partial.jsonl"  # one line per finished question, so an interrupted run keeps its results
    partial.write_text("")

    def keep(q: dict, done: dict[str, QuestionResult]) -> None:
        with open(partial, "a") as f:
            f.write(json.dumps({"question_id": q["question_id"], "category": q["category"],
                                "methods": {n: {"tokens": r.tokens, "seconds": r.seconds, "forwards": r.forwards}
                                            for n, r in done.items()}}) + "\n")

    skipped: dict[str, str] = {}
    raw = run_bench(target, questions, methods, sampling, max_new_tokens, runs, seed, progress=bar,
                    skipped=skipped, on_question=keep)
    if not raw[BASELINE]:
        raise ValueError(f"No question of {questions_file} could be answered: {skipped}")
    summary = {
        "device": device_name(target.device), "target": target.name,
        "settings": {"questions_file": str(questions_file), "questions": len(questions),
                     "malformed_lines": malformed, "skipped_questions": skipped,
                     "limit_per_category": limit_per_category,
                     "max_new_tokens": max_new_tokens, "temperature": sampling.temperature,
                     "top_p": sampling.top_p, "top_k": sampling.top_k, "runs": runs, "seed": seed,
                     "torch_threads": torch.get_num_threads(),
                     "method_specs": {s.name: {"kind": s.kind, "path": s.path, "dtype": s.dtype, **s.options,
                                               "plan": getattr(methods[s.name], "plan", None)} for s in specs}},
        "methods": summarise(raw, sampling.greedy, dtypes, vanillas),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(markdown(summary))
    from koala.bench_plots import write_plots

    write_plots(summary, raw, out)
    return summary


def _bench(args: argparse.Namespace) -> int:

    specs = [parse_method(m) for m in args.method]
    if args.threads:
        torch.set_num_threads(args.threads)  # on a busy CPU, 1 thread is steadier than oversubscribed ones
    target = target_from_args(args)
    summary = bench(target, args.questions, specs, args.out, Sampling(args.temperature, args.top_p, args.top_k),
                    args.max_new_tokens, args.runs, args.limit_per_category, args.seed)
    print(markdown(summary))
    if summary["settings"]["malformed_lines"]:
        print(f"skipped {summary['settings']['malformed_lines']} malformed line(s) in {args.questions}")
    for qid, why in summary["settings"]["skipped_questions"].items():
        print(f"skipped question {qid}: {why}")
    print(f"wrote {Path(args.out) / 'results.json'}, results.md and plots")
    return 0


def add_command(sub) -> None:

    p = sub.add_parser("bench", help="Spec-Bench-style speed benchmark of decoding methods vs vanilla decoding")
    p.add_argument("--questions", required=True, help="MT-bench-form JSONL file (question_id, category, turns)")
    p.add_argument("--limit-per-category", type=positive_int, default=None, help="first N questions of each category")
    p.add_argument("--method", action="append", default=[], metavar="NAME=SPEC",
                   help="repeatable; SPEC = vanilla | hf-generate | hf-stock | hf-prompt-lookup | pld | HEAD_DIR, "
                        "optionally ':key=value,...' (heads: tree,depth,top_k,total_tokens). vanilla always runs.")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (exact-match is reported)")
    p.add_argument("--top-p", type=probability, default=1.0)
    p.add_argument("--top-k", type=non_negative_int, default=0)
    p.add_argument("--runs", type=positive_int, default=1, help="timed runs per question and method (median is kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", required=True, help="output directory for results.json, results.md and plots")
    add_target_args(p)
    p.set_defaults(func=_bench)
