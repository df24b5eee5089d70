"""Draft heads that read the target's features: Medusa (K-layer residual MLP heads) and EAGLE (K decoder layers).

Both reuse the target's frozen LM head (and, for EAGLE, its embedding); only the head's own weights are trained and
saved. Building, saving and loading them is koala.heads.checkpoint (it dispatches on the head kinds of
koala.kinds, which import this package, so it is not re-exported here). See docs/heads.md.
"""
from koala.heads.config import HeadConfig
from koala.heads.eagle import EagleHead
from koala.heads.medusa import MedusaHead
from koala.heads.vocab import draft_vocab_from_counts

__all__ = ["EagleHead", "HeadConfig", "MedusaHead", "draft_vocab_from_counts"]
