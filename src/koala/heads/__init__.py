"""Draft heads that read the target's features: Medusa (K-layer residual MLP heads) and EAGLE (K decoder layers).

Both reuse the target's frozen LM head (and, for EAGLE, its embedding); only the head's own weights are trained and
saved. See docs/heads.md.
"""
from koala.heads.checkpoint import build_head, load_head, save_head
from koala.heads.config import HeadConfig
from koala.heads.eagle import EagleHead
from koala.heads.medusa import MedusaHead
from koala.heads.vocab import draft_vocab_from_counts

__all__ = ["EagleHead", "HeadConfig", "MedusaHead", "build_head", "draft_vocab_from_counts", "load_head", "save_head"]
