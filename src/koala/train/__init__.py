"""Training draft heads (Medusa or EAGLE, K layers) by self-distillation, optionally with KOALA's adversarial term.

Inputs come from a hidden-state cache (or the target in the loop): labels are the target's own next-token
distributions, recomputed from cached final hidden states through the frozen LM head and restricted/renormalised to
the draft vocabulary. Losses:
- Medusa: head i at position t predicts token t+i+2; KL(target || head) weighted by decay**i.
- EAGLE: the head maps (feature t, token t+1) to feature t+1; SmoothL1 regression + ce_weight * KL on the logits,
  uniform noise on the input features, and `unroll` extra steps where the head reads its own predicted features
  (a training-time rehearsal of drafting, with a mask that lets each step see the real context and its own chain).
acc@k = top-1 agreement with the target's own argmax (stored in the cache).

Checkpoints hold everything a run needs to continue bit-exactly (weights, optimisers, step, RNG, lambda scale);
the data order is a pure function of (seed, step), so no iterator state is stored. See docs/training.md.

Modules: config (TrainConfig, whose fields are the flags), data (windows, split, batches, draft-vocabulary counts),
loop (the run), checkpoint (exact resume), report (metrics and curves), cli (`koala train`). The supervised step of
each head kind lives with the kind (koala.kinds), its shared pieces in koala.losses.
"""
from koala.train.config import TrainConfig
from koala.train.loop import train

__all__ = ["TrainConfig", "train"]
