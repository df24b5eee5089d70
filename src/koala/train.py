"""Training draft heads (Medusa or EAGLE, K layers) by self-distillation, optionally with KOALA's adversarial term.

Inputs come from a hidden-state cache (or the target in the loop): labels are the target's own next-token
distributions, recomputed from cached final hidden states through the frozen LM head and restricted/renormalised to
the draft vocabulary. Losses:
- Medusa: head i at position t predicts token t+i+2; KL(target || head) weighted by decay**i.
- EAGLE: the head maps (feature t, token t+1) to feature t+1; SmoothL1 regression + ce_weight * KL on the logits,
  uniform noise on the input features, and `unroll` extra steps where the head reads its own predicted features
  (a training-time rehearsal of drafting, with a mask that lets each step see the real context and its own chain).
acc@k = top-1 agreement with the next tokens of the distilled data, i.e. the target's greedy choice there.

Checkpoints hold everything a run needs to continue bit-exactly (weights, optimisers, step, RNG, lambda scale);
the data order is a pure function of (seed, step), so no iterator state is stored. See docs/training.md.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from koala.adversarial import AdvConfig, Discriminator, Draft, d_loss, g_loss
from koala.args import (add_target_args, non_negative_float, non_negative_int, positive_float, positive_int,
                        target_from_args)
from koala.atomic import atomic_dir
from koala.hidden_cache import Batch, HiddenCache, OnlineSource

CKPT = "checkpoint"
PLAN_AFTER = 20  # steps measured before --max-minutes fixes the number of steps
PLAN_MARGIN = 0.8  # share of --max-minutes the planned steps may fill


@dataclass
class TrainConfig:
    head: str = "medusa"
    layers: int = 1
    num_heads: int = 4  # Medusa heads
    unroll: int = 2  # EAGLE: extra steps on its own predicted features (draft depth trained = unroll + 1)
    draft_vocab: int | None = None  # reduced vocabulary size (None = the target's full vocabulary)
    adversarial: bool = False
    adv: AdvConfig = field(default_factory=AdvConfig)
    max_steps: int = 1000
    batch_size: int = 8  # sequences per step (global, split over processes)
    max_seq_len: int = 512
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    decay: float = 0.8  # loss weight of head i / unroll step i is decay**i
    ce_weight: float = 0.1  # EAGLE: weight of the distribution loss next to the feature regression
    noise: float = 0.1  # EAGLE: uniform noise amplitude on input features
    seed: int = 0
    eval_sequences: int = 32
    eval_every: int = 100
    log_every: int = 10
    save_every: int = 100
    max_minutes: float | None = None  # stop early (with a checkpoint and a final head) after this long
    bf16: bool = False  # bf16 autocast on CPU too (always on CUDA); ~2x faster where the CPU has AMX/AVX512-BF16
    init: str | None = None  # a saved head of the same kind and K to start from (its draft vocabulary too)

    def __post_init__(self) -> None:
        if self.head not in ("medusa", "eagle"):
            raise ValueError(f"--head must be medusa or eagle, not {self.head!r}.")
        if self.layers < 1 or self.max_steps < 1 or self.batch_size < 1:
            raise ValueError("--layers, --max-steps and --batch-size must be >= 1.")
        if isinstance(self.adv, dict):
            self.adv = AdvConfig(**self.adv)

    @property
    def depth(self) -> int:
        """Tokens drafted per context that the losses cover (acc@1..acc@depth)."""
        return self.num_heads if self.head == "medusa" else self.unroll + 1


# ----------------------------------------------------------------------------------------------------- data

def windows(source, indices: list[int], max_len: int, context: int) -> list[tuple[int, int, int]]:
    """(sequence, start, stop) windows of at most max_len tokens that together train on every cached token: a
    window after the first starts `context` tokens before the previous one ended, so each (position, target
    token) pair with a gap of up to `context` lies inside one window."""
    out = []
    for i in indices:
        n, a = source.length(i), 0
        while True:
            b = min(n, a + max_len)
            out.append((i, a, b))
            if b == n:
                break
            a = b - context
    return out


def split_indices(n: int, eval_sequences: int) -> tuple[list[int], list[int]]:
    """(train, eval) sequence indices; the held-out set is fixed (independent of --seed) so runs compare."""
    g = torch.Generator().manual_seed(12345)
    perm = torch.randperm(n, generator=g).tolist()
    k = min(eval_sequences, max(n // 10, 1)) if n > 1 else 0
    return sorted(perm[k:]), sorted(perm[:k])


def epoch_batches(lengths: list[int], batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Batches (lists of item numbers) of one epoch: shuffled, grouped by similar length (less padding), in
    shuffled order."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    out = []
    group = batch * 16
    for a in range(0, len(perm), group):
        chunk = sorted(perm[a:a + group], key=lambda i: lengths[i])
        out += [chunk[b:b + batch] for b in range(0, len(chunk), batch)]
    order = torch.randperm(len(out), generator=g).tolist()
    return [out[i] for i in order]


class BatchStream:
    """The batch (of windows) for global step k, derived from (seed, k) alone: resuming needs no iterator state."""

    def __init__(self, items: list[tuple[int, int, int]], batch: int, seed: int, rank: int = 0,
                 world: int = 1) -> None:
        if len(items) < world:
            raise ValueError(f"Only {len(items)} training windows for {world} processes; use more data.")
        self.items, self.batch, self.seed = items, batch, seed
        self.rank, self.world = rank, world
        self.lengths = [b - a for _, a, b in items]
        self._epoch, self._batches = -1, []

    def per_epoch(self) -> int:
        return math.ceil(len(self.items) / self.batch)

    def indices_at(self, step: int) -> list[tuple[int, int, int]]:
        epoch, i = divmod(step, self.per_epoch())
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, epoch_batches(self.lengths, self.batch, self.seed, epoch)
        chosen = self._batches[i]
        mine = chosen[self.rank::self.world] or chosen[:1]
        return [self.items[j] for j in mine]


# ----------------------------------------------------------------------------------------------------- losses

@dataclass
class StepOut:
    """A forward pass of the head on a batch: the supervised loss, its parts, accuracies, drafts for D."""

    loss: torch.Tensor
    parts: dict[str, float]
    acc: list[tuple[int, int]]  # (correct, counted) per draft step
    real: Draft | None = None
    fake: Draft | None = None


def shifted(mask: torch.Tensor, shift: int) -> torch.Tensor:
    """out[:, t] = mask[:, t + shift] (False past the end)."""
    out = torch.zeros_like(mask)
    if shift < mask.shape[1]:
        out[:, : mask.shape[1] - shift] = mask[:, shift:]
    return out


@dataclass
class DraftVocab:
    """The label side of the draft vocabulary: the target's LM-head rows (fp32, frozen) that labels are computed
    with, and `to_draft`: target id -> draft id (-1 outside it; index -1 maps the unknown id -1 to -1)."""

    weight: torch.Tensor
    to_draft: torch.Tensor

    @classmethod
    def build(cls, target, draft_vocab: list[int] | None, device) -> "DraftVocab":
        w = target.lm_head.weight.detach().float()
        vocab = w.shape[0]
        to_draft = torch.full((vocab + 1,), -1, dtype=torch.long)
        ids = torch.arange(vocab) if draft_vocab is None else torch.tensor(draft_vocab)
        to_draft[ids] = torch.arange(len(ids))
        return cls(w[ids.to(w.device)].to(device), to_draft.to(device))

    def draft_ids(self, target_ids: torch.Tensor) -> torch.Tensor:
        return self.to_draft[target_ids]


class Labels:
    """The target's next-token distributions over the draft vocabulary, in fp32 and outside autocast, computed only
    at the positions some loss reads (`need`), with their entropies.

    The loss is the soft cross-entropy -sum p log q, which has the gradient of KL(p || q) (they differ by the
    constant entropy of p) at a fraction of the memory traffic; KL itself is reported as CE - H(p)."""

    def __init__(self, vocab: DraftVocab, hidden: torch.Tensor, need: torch.Tensor) -> None:
        rows = need.nonzero(as_tuple=True)
        self.index = torch.full(need.shape, -1, dtype=torch.long, device=hidden.device)
        self.index[rows] = torch.arange(rows[0].numel(), device=hidden.device)
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            lp = F.log_softmax(hidden[rows].float() @ vocab.weight.T, dim=-1)
            self.p = lp.exp()
            self.entropy = -(self.p * lp).sum(-1)

    def logprobs(self, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Log-probs at (b, t) (for the few contexts the discriminator sees)."""
        return self.p[self.index[b, t]].clamp_min(1e-30).log()

    def loss(self, b: torch.Tensor, t: torch.Tensor, lp: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(soft cross-entropy to train on, KL(target || head) to report), averaged over rows (b, t)."""
        rows = self.index[b, t]
        ce = -(self.p[rows] * lp).sum(-1).mean()
        return ce, float(ce.detach() - self.entropy[rows].mean())


def _sample_rows(ok: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = ok.nonzero(as_tuple=True)
    if rows[0].numel() > n:
        keep = torch.randperm(rows[0].numel(), device=ok.device)[:n].sort().values
        rows = (rows[0][keep], rows[1][keep])
    return rows


def _hits(lp: torch.Tensor, vocab: DraftVocab, greedy: torch.Tensor) -> int:
    """Rows whose top-1 draft token is the target's own argmax (a target argmax outside the draft vocabulary is a
    miss: the head can never propose it)."""
    return int((lp.argmax(-1) == vocab.draft_ids(greedy)).sum())


def medusa_step(head, batch: Batch, vocab: DraftVocab, cfg: TrainConfig, want_drafts: bool,
                measure: bool = True) -> StepOut:
    """Head i at position t predicts token t+i+2, i.e. the target's next token after position t+i+1."""
    h = batch.hidden
    H = head.cfg.num_heads
    w = [shifted(batch.loss_mask, i + 2) for i in range(H)]
    labels = Labels(vocab, h, shifted(batch.loss_mask, 1))
    rows = torch.stack(w).any(0).nonzero(as_tuple=True)
    loss, parts, acc = h.new_zeros(()), {}, []
    feats = head.features(h[rows][None])[0]  # (N, H, d): every head once, on the rows some head needs
    for i in range(H):
        keep = w[i][rows]
        if not bool(keep.any()):
            acc.append((0, 0))
            continue
        b, t = rows[0][keep], rows[1][keep]
        lp = F.log_softmax(head.lm_head(feats[keep, i]).float(), dim=-1)
        part, parts[f"kl{i + 1}"] = labels.loss(b, t + i + 1, lp)
        loss = loss + cfg.decay ** i * part
        acc.append((_hits(lp, vocab, batch.greedy[b, t + i + 1]) if measure else 0, b.numel()))
    out = StepOut(loss, parts, acc)
    if want_drafts:
        b, t = _sample_rows(torch.stack(w).all(0), cfg.adv.contexts)
        if b.numel():
            fake_lp = F.log_softmax(head.lm_head(head.features(h[b, t][None])[0]).float(), dim=-1)
            real_lp = torch.stack([labels.logprobs(b, t + i + 1) for i in range(H)], dim=1)
            out.real, out.fake = Draft(h[b, t], real_lp), Draft(h[b, t], fake_lp)
    return out


def unroll_mask(step: int, length: int, device) -> torch.Tensor:
    """(1, 1, T, (step+1)T) boolean mask for unroll step `step` >= 1: the query at t (a chain that left the real
    features at t-step) sees real positions <= t-step and, in block j, only its own chain element t-step+j."""
    t = torch.arange(length, device=device)
    blocks = [t[None, :] <= (t[:, None] - step)]
    blocks += [t[None, :] == (t[:, None] - step + j) for j in range(1, step + 1)]
    return torch.cat(blocks, dim=1)[None, None]


def eagle_step(head, batch: Batch, vocab: DraftVocab, cfg: TrainConfig, want_drafts: bool,
               train: bool = True, measure: bool = True) -> StepOut:
    """Position t maps (feature t, token t+1) to feature t+1, whose logits predict token t+2: the target's next
    token after t+1. Unroll step s reads the head's own features from step s-1."""
    from transformers import DynamicCache

    h, ids = batch.hidden, batch.ids
    B, T, d = h.shape
    labels = Labels(vocab, h, shifted(batch.loss_mask, 1))
    nxt_ids = torch.zeros_like(ids)
    nxt_ids[:, :-1] = ids[:, 1:]
    pos = torch.arange(T, device=h.device).expand(B, T)
    w = shifted(batch.loss_mask, 2)
    x = h + (torch.rand_like(h) * 2 - 1) * cfg.noise if train and cfg.noise > 0 else h
    cache = DynamicCache() if cfg.unroll > 0 else None
    loss, parts, acc, preds, weights = h.new_zeros(()), {}, [], [], []
    for s in range(cfg.unroll + 1):
        if s > 0:
            x = torch.cat([h.new_zeros(B, 1, d), preds[-1][:, :-1]], dim=1)
        mask = unroll_mask(s, T, h.device) if s > 0 else None
        g = head(x.to(head.fc.weight.dtype), nxt_ids, pos, cache=cache, attention_mask=mask).float()
        preds.append(g)
        ws = w.clone()
        ws[:, :s] = False
        weights.append(ws)
        rows = ws.nonzero(as_tuple=True)
        if rows[0].numel() == 0:
            acc.append((0, 0))
            continue
        reg = F.smooth_l1_loss(g[rows], h[rows[0], rows[1] + 1])
        lp = F.log_softmax(head.logits(g[rows].to(head.fc.weight.dtype)).float(), dim=-1)
        dist, parts[f"kl{s + 1}"] = labels.loss(rows[0], rows[1] + 1, lp)
        loss = loss + cfg.decay ** s * (reg + cfg.ce_weight * dist)
        parts[f"reg{s + 1}"] = float(reg.detach())
        acc.append((_hits(lp, vocab, batch.greedy[rows[0], rows[1] + 1]) if measure else 0, rows[0].numel()))
    out = StepOut(loss, parts, acc)
    if want_drafts:
        S = cfg.unroll + 1
        ok = torch.stack([shifted(weights[s], s) for s in range(S)]).all(0)  # every step of the chain counted
        b, t = _sample_rows(ok, cfg.adv.contexts)
        if b.numel():
            fake_f = torch.stack([preds[s][b, t + s] for s in range(S)], dim=1)
            fake_lp = F.log_softmax(head.logits(fake_f.to(head.fc.weight.dtype)).float(), dim=-1)
            real_lp = torch.stack([labels.logprobs(b, t + s + 1) for s in range(S)], dim=1)
            real_f = torch.stack([h[b, t + s + 1] for s in range(S)], dim=1)
            use = cfg.adv.use_features
            out.real = Draft(h[b, t], real_lp, real_f if use else None)
            out.fake = Draft(h[b, t], fake_lp, fake_f if use else None)
    return out


def head_step(head, batch: Batch, vocab: DraftVocab, cfg: TrainConfig, want_drafts: bool = False,
              train: bool = True, measure: bool = True) -> StepOut:
    """One supervised forward; measure=False skips the acc@k argmax (training steps that are not logged)."""
    if cfg.head == "medusa":
        return medusa_step(head, batch, vocab, cfg, want_drafts, measure)
    return eagle_step(head, batch, vocab, cfg, want_drafts, train, measure)


# ----------------------------------------------------------------------------------------------------- checkpoint

def _opt_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict, list]:
    sd = opt.state_dict()
    tensors = {f"{prefix}.{pid}.{k}": v.detach().cpu().contiguous()
               for pid, st in sd["state"].items() for k, v in st.items()}
    return tensors, sd["param_groups"]


def _load_opt(opt: torch.optim.Optimizer, prefix: str, tensors: dict, groups: list) -> None:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(out: Path, head, disc, opt_h, opt_d, state: dict) -> None:
    """Everything needed to continue bit-exactly, written to a temp dir and renamed (never half-written)."""
    from safetensors.torch import save_file

    tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    h_opt, h_groups = _opt_tensors(opt_h, "opt_head")
    tensors.update(h_opt)
    d_groups = None
    if disc is not None:
        tensors.update({f"disc.{k}": v.detach().cpu().contiguous() for k, v in disc.state_dict().items()})
        d_opt, d_groups = _opt_tensors(opt_d, "opt_disc")
        tensors.update(d_opt)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    with atomic_dir(out / CKPT) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "opt_head_groups": h_groups,
                                                    "opt_disc_groups": d_groups}))


def load_checkpoint(out: Path, head, disc, opt_h, opt_d) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(str(out / CKPT / "state.safetensors"))
    state = json.loads((out / CKPT / "state.json").read_text())
    head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    _load_opt(opt_h, "opt_head", tensors, state["opt_head_groups"])
    if disc is not None:
        disc.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("disc.")})
        _load_opt(opt_d, "opt_disc", tensors, state["opt_disc_groups"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return state


# ----------------------------------------------------------------------------------------------------- training

def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr at max_steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def greedy_counts(source, indices: list[int], vocab: int) -> torch.Tensor:
    """How often each token is the target's own argmax at a supervised position of these sequences (on
    teacher-forced text too, so the count reflects what the target says, not what the data says)."""
    counts = torch.zeros(vocab, dtype=torch.float64)
    for i in indices:
        greedy = np.asarray(source.tokens(i)[2], dtype=np.int64)
        counts += torch.bincount(torch.from_numpy(greedy[greedy >= 0]), minlength=vocab).double()
    return counts


def coverage(counts: torch.Tensor, draft_vocab: list[int] | None) -> float:
    """Share of the target's argmax tokens (by `counts`) inside the draft vocabulary: a ceiling on acc@1."""
    total = float(counts.sum())
    if draft_vocab is None or total == 0:
        return 1.0
    return float(counts[torch.tensor(draft_vocab)].sum()) / total


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
    from koala.heads.checkpoint import load_head

    init = load_head(cfg.init, target)
    got = (init.cfg.kind, init.cfg.layers, init.cfg.num_heads if cfg.head == "medusa" else None)
    want = (cfg.head, cfg.layers, cfg.num_heads if cfg.head == "medusa" else None)
    if got != want:
        raise ValueError(f"--init {cfg.init} is a {got[0]} head with K={got[1]}, but this run trains a {want[0]} "
                         f"head with K={want[1]}" + (f" and {want[2]} heads" if want[2] else "") + ".")
    return init.float()


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


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

    from koala.heads import HeadConfig
    from koala.heads.checkpoint import build_head, save_head

    out = Path(out)
    device = device or str(target.device)
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    main = rank == 0
    out.mkdir(parents=True, exist_ok=True)
    resuming = resume and (out / CKPT / "state.json").is_file()
    if resuming:
        saved = json.loads((out / CKPT / "state.json").read_text())
        if saved["config"]["head"] != cfg.head or saved["config"]["layers"] != cfg.layers:
            raise ValueError(f"{out / CKPT} holds a {saved['config']['head']} K={saved['config']['layers']} run; "
                             f"resume it with the same --head/--layers or use a new --out.")
        cfg = TrainConfig(**{**saved["config"], "max_minutes": cfg.max_minutes})
    elif main and (out / CKPT).exists():
        raise ValueError(f"{out} already has a checkpoint; pass --resume to continue it or use a new --out.")
    elif resume and main and progress:
        print(f"koala train: no checkpoint in {out} yet; starting a new run.", file=sys.stderr)

    torch.manual_seed(cfg.seed)  # same initial weights on every process
    if eval_source is None:
        train_idx, eval_idx = split_indices(len(source), cfg.eval_sequences)
        eval_source = source
    else:
        train_idx = list(range(len(source)))
        eval_idx = split_indices(len(eval_source), cfg.eval_sequences)[1] if len(eval_source) > cfg.eval_sequences \
            else list(range(len(eval_source)))
    vocab_size = int(target.config.vocab_size)
    init = None if resuming or not cfg.init else _init_head(cfg, target)
    if resuming:
        draft_vocab = saved["draft_vocab"]
    elif init is not None:
        draft_vocab = init.cfg.draft_vocab
    elif cfg.draft_vocab:
        from koala.heads import draft_vocab_from_counts

        counts = greedy_counts(source, train_idx, vocab_size)
        draft_vocab = draft_vocab_from_counts(counts, cfg.draft_vocab, keep=set(target.eos_ids))
    else:
        draft_vocab = None
    eval_coverage = coverage(greedy_counts(eval_source, eval_idx, vocab_size), draft_vocab)
    hcfg = HeadConfig.for_target(target, cfg.head, cfg.layers, num_heads=cfg.num_heads, draft_vocab=draft_vocab)
    head = build_head(hcfg, target)
    if init is not None:
        head.load_state_dict(init.state_dict())
    head = head.to(device).float().train()
    params = [p for p in head.parameters() if p.requires_grad]
    opt_h = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    vocab = DraftVocab.build(target, draft_vocab, device)

    disc = opt_d = None
    if cfg.adversarial:
        embed = target.model.get_input_embeddings().weight.detach()
        embed = embed if draft_vocab is None else embed[torch.tensor(draft_vocab, device=embed.device)]
        disc = Discriminator(hcfg.hidden_size, cfg.depth, embed.to(device), cfg.adv).to(device)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.adv.d_lr, betas=(0.5, 0.999))

    torch.manual_seed(cfg.seed + rank)  # then per-process noise and context sampling
    state = {"step": 0, "lam_scale": 1.0, "blowups": 0, "skipped": 0, "empty": 0, "seconds": 0.0, "tokens": 0,
             "planned": False}
    if resuming:
        state.update({k: saved[k] for k in state if k in saved})
        load_checkpoint(out, head, disc, opt_h, opt_d)
    stream = BatchStream(windows(source, train_idx, cfg.max_seq_len, cfg.depth + 1), cfg.batch_size, cfg.seed,
                         rank, world)
    eval_items = windows(eval_source, eval_idx, cfg.max_seq_len, cfg.depth + 1)
    eval_batches = [eval_items[i:i + cfg.batch_size] for i in range(0, len(eval_items), cfg.batch_size)]
    metrics = out / "metrics.jsonl"
    cuda = device.startswith("cuda")
    autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda or cfg.bf16)

    def checkpoint() -> None:
        if main:
            if not all(bool(torch.isfinite(p).all()) for p in head.parameters()):
                _append_jsonl(metrics, {"step": state["step"], "event": "checkpoint refused: non-finite weights"})
                return
            save_checkpoint(out, head, disc, opt_h, opt_d, {**state, "config": asdict(cfg),
                                                           "draft_vocab": draft_vocab})
        if accelerator is not None:
            accelerator.wait_for_everyone()

    bar = tqdm(total=cfg.max_steps, initial=state["step"], disable=not (progress and main), file=sys.stderr,
               mininterval=2, unit="step")
    t0, seconds0, tokens_window, t_window = time.perf_counter(), state["seconds"], 0, time.perf_counter()
    ended_early = False
    last_eval: dict = {}
    eval_step = -1
    while state["step"] < cfg.max_steps:
        step = state["step"]
        if stop_at is not None and step >= stop_at:
            bar.close()
            return {}
        if cfg.max_minutes and (time.perf_counter() - t0) / 60 >= cfg.max_minutes:
            ended_early = True
            break
        batch = source.batch(stream.indices_at(step)).to(device)
        for group in opt_h.param_groups:
            group["lr"] = lr_at(cfg, step)
        lam = cfg.adv.lam(step, state["lam_scale"]) if disc is not None else 0.0
        with autocast:
            res = head_step(head, batch, vocab, cfg, want_drafts=disc is not None,
                            measure=(step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps)
        row: dict = {}
        loss = res.loss
        if disc is not None:
            d_params = list(disc.parameters())
            for _ in range(cfg.adv.d_steps):
                opt_d.zero_grad(set_to_none=True)
                if res.fake is not None:
                    ld = d_loss(disc, res.real, res.fake, cfg.adv)
                    row["d_loss"] = float(ld.detach())
                    _backward_or_poison(ld, d_params)
                _sync_grads(accelerator, d_params)  # every process joins, even without contexts this batch
                if _finite_grads(d_params):
                    opt_d.step()
            if res.fake is not None:
                disc.requires_grad_(False)
                lg = g_loss(disc, res.fake, cfg.adv)
                disc.requires_grad_(True)
                row["g_loss"] = float(lg.detach())
                loss = res.loss + lam * lg if lam > 0 else res.loss
        opt_h.zero_grad(set_to_none=True)
        if res.loss.requires_grad:
            _backward_or_poison(loss, params)
        else:  # no supervised token in this batch (e.g. a window of prompt only): nothing to learn, counted
            state["empty"] += 1
        _sync_grads(accelerator, params)  # a poisoned (NaN) gradient anywhere makes every process skip
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        ok = bool(torch.isfinite(norm))
        if ok:
            opt_h.step()
            state["blowups"] = 0
        else:  # skip the update, log it; repeated blow-ups halve lambda
            opt_h.zero_grad(set_to_none=True)
            state["skipped"] += 1
            state["blowups"] += 1
            if state["blowups"] >= cfg.adv.max_blowups:
                state["lam_scale"] /= 2
                state["blowups"] = 0
            if main:
                _append_jsonl(metrics, {"step": step, "event": "skipped non-finite step",
                                        "lam_scale": state["lam_scale"]})
        ntok = batch.tokens * world
        state["tokens"] += ntok
        tokens_window += ntok
        state["step"] = step + 1
        state["seconds"] = seconds0 + time.perf_counter() - t0
        if cfg.max_minutes and not state["planned"] and state["step"] >= PLAN_AFTER:
            # fit the schedule to the time budget once, from measured throughput, so the cosine anneals before
            # the deadline; the plan is checkpointed, so a resumed run follows the same schedule
            per_step = state["seconds"] / state["step"]
            budget = PLAN_MARGIN * cfg.max_minutes * 60  # room for evals, checkpoints and a slower machine
            cfg.max_steps = min(cfg.max_steps, max(state["step"] + 1, int(budget / per_step)))
            state["planned"] = True
            bar.total = cfg.max_steps
            if main:
                _append_jsonl(metrics, {"step": state["step"], "event": "planned steps from throughput",
                                        "max_steps": cfg.max_steps, "s_per_step": round(per_step, 3)})
        accs = [c / n if n else 0.0 for c, n in res.acc]
        if main and (state["step"] % cfg.log_every == 0 or state["step"] == cfg.max_steps):
            now = time.perf_counter()
            tok_s = tokens_window / max(now - t_window, 1e-9)
            tokens_window, t_window = 0, now
            _append_jsonl(metrics, {"step": state["step"], "split": "train", "loss": float(res.loss.detach()), **res.parts,
                                    **row, "lambda": lam, "lr": lr_at(cfg, step), "tok_s": round(tok_s, 1),
                                    **{f"acc@{i + 1}": a for i, a in enumerate(accs)}})
            bar.set_postfix(loss=f"{float(res.loss.detach()):.3f}", acc="/".join(f"{a:.2f}" for a in accs),
                            tok_s=f"{tok_s:.0f}", **({"g": f"{row['g_loss']:.2f}"} if "g_loss" in row else {}),
                            refresh=False)
        bar.update(1)
        if eval_batches and main and (state["step"] % cfg.eval_every == 0):
            last_eval, eval_step = evaluate(head, eval_source, eval_batches, vocab, cfg, device), state["step"]
            _append_jsonl(metrics, {"step": state["step"], "split": "eval", **last_eval})
        if state["step"] % cfg.save_every == 0 or state["step"] == cfg.max_steps:
            checkpoint()
    bar.close()
    if ended_early:
        checkpoint()
    if not main:
        return {"steps": state["step"], "head": head, "discriminator": disc}
    if eval_batches and eval_step != state["step"]:
        last_eval = evaluate(head, eval_source, eval_batches, vocab, cfg, device)
        _append_jsonl(metrics, {"step": state["step"], "split": "eval", **last_eval})
    acc = [last_eval.get(f"acc@{i + 1}", 0.0) for i in range(cfg.depth)]
    head_dir = save_head(head, out / "head", extra={"acceptance": acc, "train_steps": state["step"],
                                                        "draft_vocab_coverage": round(eval_coverage, 4)})
    manifest = {
        "command": command, "config": asdict(cfg), "head_dir": str(head_dir),
        "head_bytes": sum(f.stat().st_size for f in head_dir.iterdir()),
        "data": {"sequences": len(source), "train_sequences": len(train_idx), "eval_sequences": len(eval_idx),
                 "source": [str(p) for p in source.paths] if isinstance(source, HiddenCache) else "online",
                 "eval_source": "split of source" if eval_source is source else [str(p) for p in eval_source.paths],
                 "draft_vocab_coverage_eval": round(eval_coverage, 4)},
        "steps": state["step"], "ended_early": ended_early, "tokens_seen": state["tokens"],
        "train_seconds": round(state["seconds"], 1), "skipped_steps": state["skipped"],
        "empty_batches": state["empty"],
        "lambda_scale": state["lam_scale"], "final_eval": last_eval,
        "draft_vocab_size": len(draft_vocab) if draft_vocab else None, "processes": world,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    plot_metrics(metrics, out / "metrics.png")
    return {**manifest, "head": head, "discriminator": disc}


def plot_metrics(metrics: Path, png: Path) -> None:
    """Loss and acc@k curves (train and held-out), plus D/G losses when adversarial; the last row per step wins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: dict[tuple, dict] = {}
    for line in metrics.read_text().splitlines():
        r = json.loads(line)
        if "split" in r:
            rows[(r["split"], r["step"])] = r
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        rs = sorted((r for (s, _), r in rows.items() if s == split), key=lambda r: r["step"])
        if not rs:
            continue
        steps = [r["step"] for r in rs]
        axes[0].plot(steps, [r["loss"] for r in rs], style, label=f"{split} loss")
        for k in sorted({k for r in rs for k in r if k.startswith("acc@")}):
            axes[1].plot(steps, [r.get(k, 0) for r in rs], style, label=f"{split} {k}")
        for k in ("d_loss", "g_loss"):
            if any(k in r for r in rs):
                axes[2].plot([r["step"] for r in rs if k in r], [r[k] for r in rs if k in r], label=k)
    for ax, title in zip(axes, ("supervised loss", "top-1 agreement with the target", "adversarial (D / head)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "off", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------- CLI

def source_from_paths(target, data: list[str], max_length: int):
    """Cache directories (read as one), or one distilled JSONL (then the target runs in the loop: online mode)."""
    from koala.hidden_cache import TokenStats, tokenize_file

    paths = [Path(d) for d in data]
    if all(p.is_dir() for p in paths):
        cache = HiddenCache(paths)
        if cache.target.get("lm_head_sha256") != target.identity["lm_head_sha256"]:
            raise ValueError(f"The cache {paths[0]} was built from another target "
                             f"({cache.manifest.get('target_name')}); pass the same --target or rebuild the cache.")
        return cache
    if len(paths) > 1:
        raise ValueError("Several --data paths must all be cache directories (`koala distill` / `koala cache`).")
    return OnlineSource(target, tokenize_file(target, paths[0], max_length, TokenStats()))


def config_from_args(args) -> TrainConfig:
    adv = AdvConfig(weight=args.adv_weight, start=args.adv_start, warmup=args.adv_warmup, loss=args.adv_loss,
                    level=args.adv_level, d_steps=args.d_steps, d_lr=args.d_lr, r1=args.r1,
                    spectral_norm=args.spectral_norm, contexts=args.adv_contexts, use_features=args.adv_features)
    return TrainConfig(head=args.head, layers=args.layers, num_heads=args.num_heads, unroll=args.unroll,
                       draft_vocab=args.draft_vocab or None, adversarial=args.adversarial, adv=adv,
                       max_steps=args.max_steps, batch_size=args.batch_size, max_seq_len=args.max_seq_len,
                       lr=args.lr, warmup=args.warmup, grad_clip=args.grad_clip, seed=args.seed,
                       eval_sequences=args.eval_sequences, eval_every=args.eval_every, log_every=args.log_every,
                       save_every=args.save_every, max_minutes=args.max_minutes, bf16=args.bf16, noise=args.noise,
                       init=args.init)


def _run(args) -> int:
    from accelerate import Accelerator


    accelerator = Accelerator(cpu=args.device == "cpu")
    device = str(accelerator.device) if accelerator.num_processes > 1 else args.device
    target = target_from_args(args)
    source = source_from_paths(target, args.data, args.max_seq_len)
    held_out = source_from_paths(target, args.eval_data, args.max_seq_len) if args.eval_data else None
    manifest = train(target, source, args.out, config_from_args(args), resume=args.resume, device=device,
                     command=" ".join(sys.argv), accelerator=accelerator, eval_source=held_out)
    if "head_dir" in manifest:
        print(json.dumps({k: manifest[k] for k in ("head_dir", "head_bytes", "steps", "train_seconds",
                                                   "final_eval", "skipped_steps")}, indent=1))
    return 0


def add_command(sub) -> None:

    p = sub.add_parser("train", help="train a Medusa/EAGLE draft head (optionally KOALA adversarial)")
    p.add_argument("--head", choices=["medusa", "eagle"], required=True)
    p.add_argument("--layers", type=positive_int, default=1,
                   help="K: residual blocks per Medusa head / EAGLE decoder layers")
    p.add_argument("--data", required=True, nargs="+",
                   help="cache directories (`koala distill` / `koala cache`), or one distilled JSONL (online mode)")
    p.add_argument("--eval-data", nargs="+", default=None,
                   help="held-out cache(s) for acc@k, e.g. the target's answers to benchmark-style prompts "
                        "(default: a fixed split of --data)")
    p.add_argument("--out", required=True, help="run directory (checkpoint/, metrics, head/, manifest.json)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--init", default=None,
                   help="start from this saved head (same --head and --layers; its draft vocabulary is kept)")
    p.add_argument("--num-heads", type=positive_int, default=4, help="Medusa heads")
    p.add_argument("--unroll", type=non_negative_int, default=2,
                   help="EAGLE: training steps on its own predicted features")
    p.add_argument("--draft-vocab", type=non_negative_int, default=0, help="reduced draft vocabulary size (0 = full)")
    p.add_argument("--max-steps", type=positive_int, default=1000)
    p.add_argument("--max-minutes", type=positive_float, default=None, help="stop early (saved) after this wall time")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU (always on with CUDA)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-seq-len", type=positive_int, default=512)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--warmup", type=non_negative_int, default=50)
    p.add_argument("--grad-clip", type=positive_float, default=1.0)
    p.add_argument("--noise", type=non_negative_float, default=0.1, help="EAGLE: uniform feature noise amplitude")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-sequences", type=non_negative_int, default=32)
    p.add_argument("--eval-every", type=positive_int, default=100)
    p.add_argument("--log-every", type=positive_int, default=10)
    p.add_argument("--save-every", type=positive_int, default=100)
    g = p.add_argument_group("KOALA adversarial learning (docs/adversarial.md)")
    g.add_argument("--adversarial", action="store_true", help="add the discriminator term")
    g.add_argument("--adv-weight", type=non_negative_float, default=0.1, help="lambda")
    g.add_argument("--adv-start", type=non_negative_int, default=100,
                   help="supervised-only steps before lambda ramps up")
    g.add_argument("--adv-warmup", type=non_negative_int, default=100)
    g.add_argument("--adv-loss", choices=["nonsaturating", "hinge", "lsgan"], default="nonsaturating")
    g.add_argument("--adv-level", choices=["sequence", "position"], default="sequence")
    g.add_argument("--adv-contexts", type=non_negative_int, default=128,
                   help="contexts per batch in the adversarial term")
    g.add_argument("--adv-features", action="store_true", help="EAGLE: D also sees predicted features")
    g.add_argument("--d-steps", type=positive_int, default=1, help="discriminator updates per head update")
    g.add_argument("--d-lr", type=positive_float, default=5e-4)
    g.add_argument("--r1", type=non_negative_float, default=0.0, help="R1 penalty weight (0 = off)")
    g.add_argument("--spectral-norm", action="store_true")
    add_target_args(p)
    p.set_defaults(func=_run)
