"""KOALA's adversarial term: a small discriminator that tells the target's continuation from the head's draft.

The draft head is the generator. For a context (the target's hidden state where drafting starts) the discriminator
D sees a *draft*: the distributions over the next few tokens, either the target's own (real) or the head's (fake).
Distributions enter D as soft embeddings p @ E (E = the target's frozen input embedding restricted to the draft
vocabulary), so the head gets gradients through D without sampling tokens. By default D judges the whole draft at
once (sequence level: all Medusa heads together, or the EAGLE head's unrolled steps), because speculative decoding
accepts a draft as a prefix and errors compound along it; a per-position D is an option. See docs/adversarial.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from koala.args import non_negative_float, non_negative_int, option, positive_float, positive_int

LOSSES = ("nonsaturating", "hinge", "lsgan")
LEVELS = ("sequence", "position")


@dataclass
class AdvConfig:
    """Switches of the adversarial term; each is a `koala train` flag (--adv-NAME unless it names its own)."""

    weight: float = option(0.1, "lambda: loss = supervised + lambda * adversarial", non_negative_float)
    start: int = option(100, "supervised-only steps before lambda ramps up", non_negative_int)
    warmup: int = option(100, "steps of the linear lambda ramp", non_negative_int)
    loss: str = option("nonsaturating", "adversarial loss", choices=LOSSES)
    level: str = option("sequence", "what the discriminator judges", choices=LEVELS)
    d_steps: int = option(1, "discriminator updates per head update", positive_int, "--d-steps")
    d_lr: float = option(5e-4, "discriminator learning rate", positive_float, "--d-lr")
    d_hidden: int = option(256, "discriminator width", positive_int, "--d-hidden")
    r1: float = option(0.0, "R1 gradient penalty weight on real inputs (0 = off)", non_negative_float, "--r1")
    spectral_norm: bool = option(False, "spectral normalisation in the discriminator", flag="--spectral-norm")
    contexts: int = option(128, "contexts per batch in the adversarial term (bounds its cost)", non_negative_int)
    use_features: bool = option(False, "EAGLE: the discriminator also sees predicted / target features",
                                flag="--adv-features")
    max_blowups: int = option(3, "non-finite steps in a row before lambda is halved", positive_int)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"Unknown adversarial loss {self.loss!r}; choose one of {LOSSES}.")
        if self.level not in LEVELS:
            raise ValueError(f"Unknown discriminator level {self.level!r}; choose one of {LEVELS}.")
        if self.d_steps < 1 or self.weight < 0 or self.r1 < 0:
            raise ValueError("Need d_steps >= 1, weight >= 0 and r1 >= 0.")

    def lam(self, step: int, scale: float = 1.0) -> float:
        """lambda at `step`: 0 during the supervised start, then a linear ramp to weight * scale."""
        if step < self.start:
            return 0.0
        ramp = min(1.0, (step - self.start + 1) / max(1, self.warmup))
        return self.weight * scale * ramp


@dataclass
class Draft:
    """A batch of N drafts of length S: context (N, d), draft-vocab log-probs (N, S, Vd), optional features."""

    context: torch.Tensor
    logprobs: torch.Tensor
    features: torch.Tensor | None = None


def _unit_rms(x: torch.Tensor) -> torch.Tensor:
    """Rescale each vector to RMS 1 (hidden states of different targets/layers have very different scales)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class Discriminator(nn.Module):
    """Scores drafts: high = looks like the target's continuation. Sequence level: one score per draft from all
    its steps; position level: one score per step (same MLP, step embedding), the loss averages them."""

    def __init__(self, hidden_size: int, steps: int, embed: torch.Tensor, cfg: AdvConfig) -> None:
        super().__init__()
        d, h = hidden_size, cfg.d_hidden
        self.level, self.steps = cfg.level, steps
        embed = embed.detach().float()
        # (Vd, d) frozen soft-embedding table, scaled to unit RMS: token embeddings are tiny next to hidden states,
        # and D should not have to learn that scale before it can tell drafts apart
        self.register_buffer("embed", embed / embed.pow(2).mean().sqrt().clamp_min(1e-8), persistent=False)
        self.ctx = nn.Linear(d, h)
        self.tok = nn.Linear(d, h)
        self.feat = nn.Linear(d, h) if cfg.use_features else None
        self.step_emb = nn.Parameter(torch.zeros(steps, h))
        width = h * (steps + 1) if cfg.level == "sequence" else 2 * h
        self.mlp = nn.Sequential(nn.Linear(width, h), nn.LeakyReLU(0.2), nn.Linear(h, h), nn.LeakyReLU(0.2),
                                 nn.Linear(h, 1))
        if cfg.spectral_norm:
            for m in [self.ctx, self.tok, self.feat, *self.mlp]:
                if isinstance(m, nn.Linear):
                    nn.utils.parametrizations.spectral_norm(m)

    def soft_embed(self, draft: Draft) -> torch.Tensor:
        """(N, S, d) expected embedding of each step's distribution."""
        return draft.logprobs.float().exp() @ self.embed

    def score(self, context: torch.Tensor, tokens: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """context (N, d), tokens (N, S, d) soft embeddings -> (N,) or (N, S) scores."""
        x = self.tok(tokens) + self.step_emb[: tokens.shape[1]]
        if self.feat is not None and features is not None:
            x = x + self.feat(_unit_rms(features.float()))
        c = self.ctx(_unit_rms(context.float()))
        if self.level == "sequence":
            return self.mlp(torch.cat([c, x.flatten(1)], dim=-1)).squeeze(-1)
        return self.mlp(torch.cat([c[:, None].expand_as(x), x], dim=-1)).squeeze(-1)

    def forward(self, draft: Draft) -> torch.Tensor:
        return self.score(draft.context, self.soft_embed(draft), draft.features)


def d_loss(disc: Discriminator, real: Draft, fake: Draft, cfg: AdvConfig) -> torch.Tensor:
    """Discriminator loss on detached drafts (+ optional R1 penalty on the real inputs)."""
    real_tok = disc.soft_embed(real).detach().requires_grad_(cfg.r1 > 0)
    s_real = disc.score(real.context, real_tok, real.features)
    s_fake = disc(Draft(fake.context, fake.logprobs.detach(),
                        None if fake.features is None else fake.features.detach()))
    if cfg.loss == "nonsaturating":
        loss = F.softplus(-s_real).mean() + F.softplus(s_fake).mean()
    elif cfg.loss == "hinge":
        loss = F.relu(1 - s_real).mean() + F.relu(1 + s_fake).mean()
    else:
        loss = ((s_real - 1) ** 2).mean() + (s_fake ** 2).mean()
    if cfg.r1 > 0:
        (grad,) = torch.autograd.grad(s_real.sum(), real_tok, create_graph=True)
        loss = loss + 0.5 * cfg.r1 * grad.pow(2).flatten(1).sum(1).mean()
    return loss


def g_loss(disc: Discriminator, fake: Draft, cfg: AdvConfig) -> torch.Tensor:
    """The head's adversarial loss: make D score its drafts as real (gradients flow through the soft embeddings)."""
    s = disc(fake)
    if cfg.loss == "nonsaturating":
        return F.softplus(-s).mean()
    if cfg.loss == "hinge":
        return -s.mean()
    return ((s - 1) ** 2).mean()
