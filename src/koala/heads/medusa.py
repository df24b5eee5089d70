"""Medusa heads made K blocks deep: head i reads the target's hidden state at t and predicts the token at t+i+2.

Each block is x + SiLU(W x + b) with W, b zero-initialised, so a fresh head is the identity and its logits equal
the base LM head's; training then only has to learn the shift. The LM head itself is the target's, frozen.
"""
from __future__ import annotations

import torch
from torch import nn

from koala.heads.config import HeadConfig
from koala.heads.vocab import DraftLMHead


class ResidualBlock(nn.Module):
    """x + SiLU(W x + b); zero-initialised so it starts as the identity."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(self.linear(x))


class MedusaHead(nn.Module):
    def __init__(self, cfg: HeadConfig, lm_head_weight: torch.Tensor) -> None:
        super().__init__()
        if cfg.kind != "medusa":
            raise ValueError(f"MedusaHead needs a config of kind 'medusa', got {cfg.kind!r}.")
        if tuple(lm_head_weight.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise ValueError(f"The LM head is {tuple(lm_head_weight.shape)} but the head config expects "
                             f"({cfg.vocab_size}, {cfg.hidden_size}).")
        self.cfg = cfg
        # K distinct blocks per head (never one block repeated: the depth is the point of KOALA)
        self.heads = nn.ModuleList(
            nn.Sequential(*(ResidualBlock(cfg.hidden_size) for _ in range(cfg.layers))) for _ in range(cfg.num_heads))
        self.to(device=lm_head_weight.device, dtype=lm_head_weight.dtype)
        self.lm_head = DraftLMHead(lm_head_weight, cfg.draft_vocab, trainable=cfg.own_lm_head)

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, d) target hidden states -> (B, T, H, d) per-head features."""
        return torch.stack([head(hidden) for head in self.heads], dim=-2)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, T, H, Vd) logits; head i predicts the token at t+i+2 (draft-vocab ids)."""
        return self.lm_head(self.features(hidden))
