"""What a draft head is and which target it belongs to, as a small JSON-serialisable dataclass.

The target identity (architecture, sizes and a hash of the LM head) is stored so a head is never silently used with
a different target: its features and vocabulary would not mean the same thing there.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

import torch

from koala.target import Target, model_identity

CONFIG, WEIGHTS = "config.json", "model.safetensors"  # the files of a head directory
def _hf_model(target) -> torch.nn.Module:
    """The Hugging Face CausalLM behind a koala Target (or the model itself when given one)."""
    return target.model if isinstance(target, Target) else target


@dataclass
class HeadConfig:
    """kind "medusa" | "eagle" | "eagle3"; `layers` = K (residual blocks per Medusa head, decoder layers for the
    EAGLE kinds)."""

    kind: str
    layers: int
    hidden_size: int
    vocab_size: int
    num_heads: int = 4  # Medusa only: head i predicts the token i+2 steps after the feature's position
    draft_vocab: list[int] | None = None  # target ids the head can propose, most frequent first; None = all
    target: dict = field(default_factory=dict)  # identity: architecture, hidden_size, vocab_size, lm_head_sha256
    target_config: dict | None = None  # the target's HF config dict (EAGLE builds its decoder layers from it)
    own_lm_head: bool = False  # True: a trainable copy of the (restricted) LM head instead of the frozen one
    aux_layers: list[int] | None = None  # EAGLE-3 only: the target layers whose inputs the head reads

    def __post_init__(self) -> None:
        if self.layers < 1 or self.num_heads < 1:
            raise ValueError(f"A head needs layers >= 1 and num_heads >= 1 (got {self.layers}, {self.num_heads}).")
        if self.aux_layers is not None:
            self.aux_layers = [int(i) for i in self.aux_layers]
        if self.draft_vocab is not None:
            self.draft_vocab = [int(i) for i in self.draft_vocab]
            bad = [i for i in self.draft_vocab if not 0 <= i < self.vocab_size]
            if bad or len(set(self.draft_vocab)) != len(self.draft_vocab) or not self.draft_vocab:
                raise ValueError(f"draft_vocab must be distinct target ids in [0, {self.vocab_size}) "
                                 f"(first bad id: {bad[0] if bad else 'a duplicate'}).")

    @property
    def draft_vocab_size(self) -> int:
        return len(self.draft_vocab) if self.draft_vocab is not None else self.vocab_size

    @classmethod
    def for_target(cls, target, kind: str, layers: int, num_heads: int = 4, draft_vocab: list[int] | None = None,
                   own_lm_head: bool = False, aux_layers: list[int] | None = None) -> "HeadConfig":
        """A config for a new head on `target` (a koala Target or an HF CausalLM)."""
        model = _hf_model(target)
        ident = model_identity(model)
        # through JSON once, so a config read back from disk compares equal (e.g. int keys become strings)
        tcfg = json.loads(json.dumps(model.config.to_dict()))
        return cls(kind=kind, layers=layers, hidden_size=ident["hidden_size"], vocab_size=ident["vocab_size"],
                   num_heads=num_heads, draft_vocab=draft_vocab, target=ident, target_config=tcfg,
                   own_lm_head=own_lm_head, aux_layers=aux_layers)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HeadConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown head config fields {unknown}; was the head saved by a newer koala?")
        return cls(**data)
