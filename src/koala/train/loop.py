"""The training loop: set a run up (new, from --init, or resumed exactly), then per step the supervised loss of the
head's kind, KOALA's adversarial update when on, a guarded optimizer step, logging, held-out evaluation and
checkpoints; at the end the head, its manifest and the curves."""
from __future__ import annotations

import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from koala.adversarial import Discriminator, d_loss, g_loss
from koala.heads import HeadConfig, draft_vocab_from_counts
from koala.heads.checkpoint import build_head, load_head, save_head
from koala.hidden_cache import Batch, HiddenCache
from koala.invariant_linear import bf16_units
from koala.kinds import kind
from koala.losses import DraftVocab, StepOut
from koala.train.checkpoint import CKPT, load_checkpoint, save_checkpoint
from koala.train.config import TrainConfig
from koala.train.data import BatchStream, coverage, greedy_counts, split_indices, windows
from koala.train.report import append_jsonl, plot_metrics

PLAN_AFTER = 20  # steps measured before --max-minutes fixes the number of steps
PLAN_MARGIN = 0.8  # share of --max-minutes the planned steps may fill
REPLAN_UNTIL = 0.4  # then re-plan at each held-out evaluation while the run is this far into its steps
REPLAN_PAST = 0.9  # and at a later one where the pace so far would end past this share of --max-minutes


def head_step(head, batch: Batch, vocab: DraftVocab, cfg: TrainConfig, want_drafts: bool = False,
              train: bool = True, measure: bool = True) -> StepOut:
    """One supervised forward of the run's head kind; measure=False skips the acc@k argmax (unlogged steps)."""
    return kind(cfg.head).train_step(head, batch, vocab, cfg, want_drafts, train, measure)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr at max_steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def _backward_or_poison(loss: torch.Tensor, params: list) -> None:
    """Backward a finite loss; for a non-finite one set NaN gradients instead, so the step is skipped (on every
    process, after the gradient all-reduce) rather than applied."""
    if bool(torch.isfinite(loss)):
        loss.backward()
    else:
        for p in params:
            p.grad = torch.full_like(p, float("nan"))


def _finite_grads(params) -> bool:
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


def _sync_grads(accelerator, params) -> None:
    """Average gradients over processes (one flat all-reduce: what DDP does, without wrapping the head)."""
    if accelerator is None or accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
    off = 0
    for p, g in zip(params, grads):
        p.grad = flat[off:off + g.numel()].view_as(p).clone()
        off += g.numel()


def evaluate(head, source, batches: list[list], vocab: DraftVocab, cfg: TrainConfig, device) -> dict:
    """Held-out supervised loss parts and acc@k: top-1 agreement with the target's own argmax (no noise, no
    adversarial term)."""
    head.eval()
    tot, parts, acc = 0.0, {}, [[0, 0] for _ in range(cfg.depth)]
    with torch.no_grad():
        for idx in batches:
            out = head_step(head, source.batch(idx).to(device), vocab, cfg, train=False)
            tot += float(out.loss)
            for k, v in out.parts.items():
                parts[k] = parts.get(k, 0.0) + v / len(batches)
            for i, (c, n) in enumerate(out.acc):
                acc[i][0] += c
                acc[i][1] += n
    head.train()
    return {"loss": tot / max(1, len(batches)), **parts,
            **{f"acc@{i + 1}": (c / n if n else 0.0) for i, (c, n) in enumerate(acc)}}


def _init_head(cfg: TrainConfig, target):
    """The head `cfg.init` names, checked to be the kind, K and head count this run trains."""
    init = load_head(cfg.init, target)
    got, want = (init.cfg.kind, init.cfg.layers, init.cfg.num_heads), (cfg.head, cfg.layers, cfg.num_heads)
    if got != want:
        raise ValueError(f"--init {cfg.init} is a {got[0]} head with K={got[1]} and {got[2]} heads, but this run "
                         f"trains a {want[0]} head with K={want[1]} and {want[2]} heads.")
    return init.float()


def _aux_layers(cfg: TrainConfig, source, eval_source) -> list[int] | None:
    """The target layers an EAGLE-3 style head reads: those its training (and held-out) caches hold."""
    if not kind(cfg.head).aux:
        return None
    held = {tuple(getattr(s, "aux_layers", ())) for s in (source, eval_source)}
    if len(held) != 1 or not held.pop():
        raise ValueError(f"A {cfg.head} head reads the inputs to three target layers: build its training and "
                         f"held-out caches with `koala cache --aux-layers auto` (the same layers for both).")
    return list(source.aux_layers)


def _saved_run(out: Path, cfg: TrainConfig, resume: bool, main: bool, progress: bool) -> dict | None:
    """The checkpointed state to resume from (its config wins, but for --max-minutes), or None for a new run."""
    if resume and (out / CKPT / "state.json").is_file():
        saved = json.loads((out / CKPT / "state.json").read_text())
        if saved["config"]["head"] != cfg.head or saved["config"]["layers"] != cfg.layers:
            raise ValueError(f"{out / CKPT} holds a {saved['config']['head']} K={saved['config']['layers']} run; "
                             f"resume it with the same --head/--layers or use a new --out.")
        saved["config"] = TrainConfig(**{**saved["config"], "max_minutes": cfg.max_minutes})
        return saved
    if main and (out / CKPT).exists():
        raise ValueError(f"{out} already has a checkpoint; pass --resume to continue it or use a new --out.")
    if resume and main and progress:
        print(f"koala train: no checkpoint in {out} yet; starting a new run.", file=sys.stderr)
    return None


@dataclass
class Run:
    """A run in progress: what `_setup` builds and `_step` advances."""

    cfg: TrainConfig
    out: Path
    source: object
    eval_source: object
    train_idx: list[int]
    eval_idx: list[int]
    draft_vocab: list[int] | None
    eval_coverage: float
    head: torch.nn.Module
    params: list
    opt_h: torch.optim.Optimizer
    disc: Discriminator | None
    opt_d: torch.optim.Optimizer | None
    vocab: DraftVocab
    stream: BatchStream
    eval_batches: list[list]
    state: dict
    device: str
    accelerator: object
    world: int
    main: bool

    @property
    def metrics(self) -> Path:
        return self.out / "metrics.jsonl"

    def log(self, row: dict) -> None:
        if self.main:
            append_jsonl(self.metrics, row)

    def checkpoint(self) -> None:
        if self.main:
            if not all(bool(torch.isfinite(p).all()) for p in self.head.parameters()):
                self.log({"step": self.state["step"], "event": "checkpoint refused: non-finite weights"})
            else:
                save_checkpoint(self.out, self.head, self.disc, self.opt_h, self.opt_d,
                                {**self.state, "config": asdict(self.cfg), "draft_vocab": self.draft_vocab})
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


def _setup(target, source, out: Path, cfg: TrainConfig, saved: dict | None, device: str, accelerator,
           eval_source) -> Run:
    """Data split, draft vocabulary, head (fresh, from --init, or the checkpoint's), optimisers, discriminator."""
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    torch.manual_seed(cfg.seed)  # same initial weights on every process
    if eval_source is None:
        train_idx, eval_idx = split_indices(len(source), cfg.eval_sequences)
        eval_source = source
    else:
        train_idx = list(range(len(source)))
        eval_idx = split_indices(len(eval_source), cfg.eval_sequences)[1] if len(eval_source) > cfg.eval_sequences \
            else list(range(len(eval_source)))
    vocab_size = int(target.config.vocab_size)
    init = None if saved or not cfg.init else _init_head(cfg, target)
    if saved:
        draft_vocab = saved["draft_vocab"]
    elif init is not None:
        draft_vocab = init.cfg.draft_vocab
    elif cfg.draft_vocab:
        counts = greedy_counts(source, train_idx, vocab_size)
        draft_vocab = draft_vocab_from_counts(counts, cfg.draft_vocab, keep=set(target.eos_ids))
    else:
        draft_vocab = None
    hcfg = HeadConfig.for_target(target, cfg.head, cfg.layers, num_heads=cfg.num_heads, draft_vocab=draft_vocab,
                                 aux_layers=_aux_layers(cfg, source, eval_source))
    head = build_head(hcfg, target)
    if cfg.init_from_target and not saved:
        if not hasattr(head, "copy_target_layers"):
            raise ValueError(f"--init-from-target: a {cfg.head} head has no layers shaped like the target's.")
        head.copy_target_layers(target.body)
    if init is not None:
        head.load_state_dict(init.state_dict())
    head = head.to(device).float().train()
    params = [p for p in head.parameters() if p.requires_grad]
    opt_h = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    disc = opt_d = None
    if cfg.adversarial:
        embed = target.model.get_input_embeddings().weight.detach()
        embed = embed if draft_vocab is None else embed[torch.tensor(draft_vocab, device=embed.device)]
        disc = Discriminator(hcfg.hidden_size, cfg.depth, embed.to(device), cfg.adv).to(device)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.adv.d_lr, betas=(0.5, 0.999))
    torch.manual_seed(cfg.seed + rank)  # then per-process noise and context sampling
    state = {"step": 0, "lam_scale": 1.0, "blowups": 0, "skipped": 0, "empty": 0, "seconds": 0.0, "tokens": 0,
             "planned": False, "init_eval": None}
    if saved:
        state.update({k: saved[k] for k in state if k in saved})
        load_checkpoint(out, head, disc, opt_h, opt_d)
    stream = BatchStream(windows(source, train_idx, cfg.max_seq_len, cfg.depth + 1), cfg.batch_size, cfg.seed,
                         rank, world)
    eval_items = windows(eval_source, eval_idx, cfg.max_seq_len, cfg.depth + 1)
    eval_batches = [eval_items[i:i + cfg.batch_size] for i in range(0, len(eval_items), cfg.batch_size)]
    return Run(cfg, out, source, eval_source, train_idx, eval_idx, draft_vocab,
               coverage(greedy_counts(eval_source, eval_idx, vocab_size), draft_vocab), head, params, opt_h, disc,
               opt_d, DraftVocab.build(target, draft_vocab, device), stream, eval_batches, state, device,
               accelerator, world, rank == 0)


def _adversarial(run: Run, res: StepOut, lam: float, row: dict) -> torch.Tensor:
    """Update the discriminator on this batch's drafts, then return the head's loss with lambda * its G term."""
    cfg, disc = run.cfg, run.disc
    d_params = list(disc.parameters())
    for _ in range(cfg.adv.d_steps):
        run.opt_d.zero_grad(set_to_none=True)
        if res.fake is not None:
            ld = d_loss(disc, res.real, res.fake, cfg.adv)
            row["d_loss"] = float(ld.detach())
            _backward_or_poison(ld, d_params)
        _sync_grads(run.accelerator, d_params)  # every process joins, even without contexts this batch
        if _finite_grads(d_params):
            run.opt_d.step()
    if res.fake is None:
        return res.loss
    disc.requires_grad_(False)
    lg = g_loss(disc, res.fake, cfg.adv)
    disc.requires_grad_(True)
    row["g_loss"] = float(lg.detach())
    return res.loss + lam * lg if lam > 0 else res.loss


def _update(run: Run, res: StepOut, loss: torch.Tensor, step: int) -> None:
    """Backward and a guarded optimizer step: a non-finite gradient skips the update (logged), and repeated
    blow-ups halve lambda; a batch with nothing supervised is counted and learns nothing."""
    state = run.state
    run.opt_h.zero_grad(set_to_none=True)
    if res.loss.requires_grad:
        _backward_or_poison(loss, run.params)
    else:  # e.g. a window of prompt only
        state["empty"] += 1
    _sync_grads(run.accelerator, run.params)  # a poisoned (NaN) gradient anywhere makes every process skip
    norm = torch.nn.utils.clip_grad_norm_(run.params, run.cfg.grad_clip)
    if bool(torch.isfinite(norm)):
        run.opt_h.step()
        state["blowups"] = 0
        return
    run.opt_h.zero_grad(set_to_none=True)
    state["skipped"] += 1
    state["blowups"] += 1
    if state["blowups"] >= run.cfg.adv.max_blowups:
        state["lam_scale"] /= 2
        state["blowups"] = 0
    run.log({"step": step, "event": "skipped non-finite step", "lam_scale": state["lam_scale"]})


def _plan(run: Run, bar) -> None:
    """Fit the step count to --max-minutes from the measured time per step (evaluations and checkpoints
    included), so the cosine anneals before the deadline: after PLAN_AFTER steps, then again at each evaluation
    early in the run, since the first steps can be faster than the average, and at a later one when the run falls
    behind (_overruns). A plan only shortens the run, and it is checkpointed, so a resumed run follows it."""
    state, cfg = run.state, run.cfg
    per_step = state["seconds"] / state["step"]
    budget = PLAN_MARGIN * cfg.max_minutes * 60  # room for a slower stretch of the machine
    cfg.max_steps = min(cfg.max_steps, max(state["step"] + 1, int(budget / per_step)))
    state["planned"] = True
    bar.total = cfg.max_steps
    run.log({"step": state["step"], "event": "planned steps from throughput", "max_steps": cfg.max_steps,
             "s_per_step": round(per_step, 3)})


def _overruns(run: Run) -> bool:
    """At the pace so far, the planned steps would end past REPLAN_PAST of --max-minutes (a machine that got busy
    late): a shorter plan anneals early, where missing the deadline would cut the cosine off mid-schedule."""
    state, cfg = run.state, run.cfg
    return state["seconds"] / state["step"] * cfg.max_steps > REPLAN_PAST * cfg.max_minutes * 60


def use_bf16(cfg: TrainConfig, device: str) -> bool:
    """bf16 autocast: always on CUDA; on a CPU when --bf16 asks and the CPU has bf16 units, else fp32 with a
    warning (emulated bf16 would cost far more than it saves; decided per process, so a run resumed on another
    host follows that host)."""
    if device.startswith("cuda"):
        return True
    if cfg.bf16 and not bf16_units():
        warnings.warn("--bf16: this CPU has no bf16 units (AVX-512 BF16 or AMX), where torch emulates bf16 matmuls "
                      "(~45x slower training measured on an AVX2 EPYC); training in fp32 instead.", stacklevel=2)
        return False
    return cfg.bf16


def _manifest(run: Run, head_dir: Path, command: str, ended_early: bool, last_eval: dict) -> dict:
    state, source, eval_source = run.state, run.source, run.eval_source
    return {
        "command": command, "config": asdict(run.cfg), "head_dir": str(head_dir),
        "head_bytes": sum(f.stat().st_size for f in head_dir.iterdir()),
        "data": {"sequences": len(source), "train_sequences": len(run.train_idx),
                 "eval_sequences": len(run.eval_idx),
                 "source": [str(p) for p in source.paths] if isinstance(source, HiddenCache) else "online",
                 "eval_source": "split of source" if eval_source is source else [str(p) for p in eval_source.paths],
                 "draft_vocab_coverage_eval": round(run.eval_coverage, 4)},
        "steps": state["step"], "ended_early": ended_early, "tokens_seen": state["tokens"],
        "train_seconds": round(state["seconds"], 1), "skipped_steps": state["skipped"],
        "empty_batches": state["empty"], "lambda_scale": state["lam_scale"], "final_eval": last_eval,
        "init_eval": state["init_eval"],
        "draft_vocab_size": len(run.draft_vocab) if run.draft_vocab else None, "processes": run.world,
    }


def train(target, source, out: str | Path, cfg: TrainConfig, resume: bool = False, device: str | None = None,
          stop_at: int | None = None, progress: bool = True, command: str = "", accelerator=None,
          eval_source=None) -> dict:
    """Train a head on `source` (HiddenCache or OnlineSource) into `out`.

    Held-out evaluation uses `eval_source` when given (e.g. the target's answers to benchmark-style prompts),
    else a fixed split of `source`.
    Returns the manifest written to out/manifest.json plus the live "head" and "discriminator" modules (other
    processes of a multi-process run get only those and "steps").
    stop_at: end after that many steps *without* a final save, exactly like a kill (used by tests).
    """
    from tqdm import tqdm

    out = Path(out)
    device = device or str(target.device)
    main = accelerator is None or accelerator.process_index == 0
    out.mkdir(parents=True, exist_ok=True)
    saved = _saved_run(out, cfg, resume, main, progress)
    cfg = saved["config"] if saved else cfg
    run = _setup(target, source, out, cfg, saved, device, accelerator, eval_source)
    state = run.state
    bf16 = use_bf16(cfg, device)
    autocast = torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16, enabled=bf16)
    bar = tqdm(total=cfg.max_steps, initial=state["step"], disable=not (progress and main), file=sys.stderr,
               mininterval=2, unit="step")
    t0, seconds0, tokens_window, t_window = time.perf_counter(), state["seconds"], 0, time.perf_counter()
    ended_early, last_eval, eval_step = False, {}, -1
    if cfg.init and state["step"] == 0 and run.eval_batches and main:  # the warm start's own score, to beat
        state["init_eval"] = {"step": 0, "split": "eval", **evaluate(run.head, run.eval_source, run.eval_batches,
                                                                       run.vocab, cfg, device)}
        run.log(state["init_eval"])
    while state["step"] < cfg.max_steps:
        step = state["step"]
        if stop_at is not None and step >= stop_at:
            bar.close()
            return {}
        if cfg.max_minutes and (time.perf_counter() - t0) / 60 >= cfg.max_minutes:
            ended_early = True
            break
        batch = source.batch(run.stream.indices_at(step)).to(device)
        for group in run.opt_h.param_groups:
            group["lr"] = lr_at(cfg, step)
        lam = cfg.adv.lam(step, state["lam_scale"]) if run.disc is not None else 0.0
        with autocast:
            res = head_step(run.head, batch, run.vocab, cfg, want_drafts=run.disc is not None,
                            measure=(step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps)
        row: dict = {}
        loss = _adversarial(run, res, lam, row) if run.disc is not None else res.loss
        _update(run, res, loss, step)
        ntok = batch.tokens * run.world
        state["tokens"] += ntok
        tokens_window += ntok
        state["step"] = step + 1
        state["seconds"] = seconds0 + time.perf_counter() - t0
        if cfg.max_minutes and state["step"] >= PLAN_AFTER and (not state["planned"] or (
                state["step"] % cfg.eval_every == 0 and (state["step"] <= REPLAN_UNTIL * cfg.max_steps or
                                                         _overruns(run)))):
            _plan(run, bar)
        if main and (state["step"] % cfg.log_every == 0 or state["step"] == cfg.max_steps):
            now = time.perf_counter()
            tok_s = tokens_window / max(now - t_window, 1e-9)
            tokens_window, t_window = 0, now
            accs = [c / n if n else 0.0 for c, n in res.acc]
            run.log({"step": state["step"], "split": "train", "loss": float(res.loss.detach()), **res.parts, **row,
                     "lambda": lam, "lr": lr_at(cfg, step), "tok_s": round(tok_s, 1),
                     **{f"acc@{i + 1}": a for i, a in enumerate(accs)}})
            bar.set_postfix(loss=f"{float(res.loss.detach()):.3f}", acc="/".join(f"{a:.2f}" for a in accs),
                            tok_s=f"{tok_s:.0f}", **({"g": f"{row['g_loss']:.2f}"} if "g_loss" in row else {}),
                            refresh=False)
        bar.update(1)
        if run.eval_batches and main and (state["step"] % cfg.eval_every == 0):
            last_eval, eval_step = evaluate(run.head, run.eval_source, run.eval_batches, run.vocab, cfg,
                                            device), state["step"]
            run.log({"step": state["step"], "split": "eval", **last_eval})
        if state["step"] % cfg.save_every == 0 or state["step"] == cfg.max_steps:
            run.checkpoint()
    bar.close()
    if ended_early:
        run.checkpoint()
    if not main:
        return {"steps": state["step"], "head": run.head, "discriminator": run.disc}
    if run.eval_batches and eval_step != state["step"]:
        last_eval = evaluate(run.head, run.eval_source, run.eval_batches, run.vocab, cfg, device)
        run.log({"step": state["step"], "split": "eval", **last_eval})
    acc = [last_eval.get(f"acc@{i + 1}", 0.0) for i in range(cfg.depth)]
    head_dir = save_head(run.head, out / "head", extra={"acceptance": acc, "train_steps": state["step"],
                                                            "draft_vocab_coverage": round(run.eval_coverage, 4)})
    manifest = {**_manifest(run, head_dir, command, ended_early, last_eval), "autocast_bf16": bf16}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    plot_metrics(run.metrics, out / "metrics.png")
    return {**manifest, "head": run.head, "discriminator": run.disc}
