"""The supervised pieces every head kind's training step uses: the target's distributions as labels (fp32, only
where a loss reads them), the soft cross-entropy against them, the draft vocabulary's label side, agreement counts
for acc@k, and the unroll mask."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from koala import cpu_kernels
from koala.adversarial import Draft


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
    constant entropy of p) at a fraction of the memory traffic; KL itself is reported as CE - H(p). Each (N, V)
    fp32 pass costs about as much as the head's matmuls here (memory-bound), so the labels take as few as they
    can: koala's C kernel turns the logits into probabilities in place and sums the entropy in the same pass."""

    def __init__(self, vocab: DraftVocab, hidden: torch.Tensor, need: torch.Tensor) -> None:
        rows = need.nonzero(as_tuple=True)
        self.index = torch.full(need.shape, -1, dtype=torch.long, device=hidden.device)
        self.index[rows] = torch.arange(rows[0].numel(), device=hidden.device)
        with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
            z = hidden[rows].float() @ vocab.weight.T
            self.entropy = cpu_kernels.softmax_entropy_(z)  # z becomes the probabilities, in one pass
            if self.entropy is None:
                lp = z - torch.logsumexp(z, dim=-1, keepdim=True)
                self.p = lp.exp()
                self.entropy = -torch.einsum("nv,nv->n", self.p, lp)
            else:
                self.p = z

    def logprobs(self, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Log-probs at (b, t) (for the few contexts the discriminator sees)."""
        return self.p[self.index[b, t]].clamp_min(1e-30).log()

    def loss(self, b: torch.Tensor, t: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(soft cross-entropy of the head's `logits` to train on, KL(target || head) to report), averaged over
        rows (b, t)."""
        rows = self.index[b, t]
        every = rows.numel() == len(self.p) and bool((rows == torch.arange(len(rows), device=rows.device)).all())
        ce = SoftCrossEntropy.apply(logits, self.p if every else self.p[rows])  # no (N, V) gather when in order
        return ce, float(ce.detach() - self.entropy[rows].mean())


class SoftCrossEntropy(torch.autograd.Function):
    """Mean over rows of -sum_v p_v log softmax(z)_v for logits z of any float dtype and fp32 probabilities p,
    as logsumexp(z) - <p, z> (p sums to one): no (N, V) log-prob tensor is made or kept, and the backward writes
    softmax(z) - p (one pass each on koala's C kernels). Computed in fp32 outside autocast."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        with torch.autocast(z.device.type, enabled=False):
            rows = cpu_kernels.soft_ce_rows(z, p)  # one read of z and p (torch: ~5 passes, ~4x the time)
            ctx.kernel = rows is not None
            if rows is None:
                zf = z.float()
                rows = torch.logsumexp(zf, dim=-1), torch.einsum("nv,nv->n", p, zf)
            lse, pz = rows
            ctx.save_for_backward(z, p, lse)
            return (lse - pz).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        z, p, lse = ctx.saved_tensors
        if ctx.kernel:
            return cpu_kernels.soft_ce_grad(z, p, lse, float(grad) / len(z)), None
        with torch.autocast(z.device.type, enabled=False):
            g = torch.sub(z, lse[:, None]).exp_()  # promotes to fp32: softmax(z)
            g.sub_(p).mul_(grad / len(z))
        return g.to(z.dtype), None


def sample_rows(ok: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = ok.nonzero(as_tuple=True)
    if rows[0].numel() > n:
        keep = torch.randperm(rows[0].numel(), device=ok.device)[:n].sort().values
        rows = (rows[0][keep], rows[1][keep])
    return rows


def hits(logits: torch.Tensor, vocab: DraftVocab, greedy: torch.Tensor) -> int:
    """Rows whose top-1 draft token is the target's own argmax (a target argmax outside the draft vocabulary is a
    miss: the head can never propose it)."""
    return int((logits.argmax(-1) == vocab.draft_ids(greedy)).sum())


def unroll_mask(step: int, length: int, device) -> torch.Tensor:
    """(1, 1, T, (step+1)T) boolean mask for unroll step `step` >= 1: the query at t (a chain that left the real
    features at t-step) sees real positions <= t-step and, in block j, only its own chain element t-step+j."""
    t = torch.arange(length, device=device)
    blocks = [t[None, :] <= (t[:, None] - step)]
    blocks += [t[None, :] == (t[:, None] - step + j) for j in range(1, step + 1)]
    return torch.cat(blocks, dim=1)[None, None]
