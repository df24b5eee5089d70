"""What a training run is: one dataclass whose fields are also the `koala train` flags (defaults and help live
here only), checkpointed with the run so a resume follows the same settings."""
from __future__ import annotations

from dataclasses import dataclass, field

from koala.adversarial import AdvConfig
from koala.args import non_negative_float, non_negative_int, option, positive_float, positive_int
from koala.kinds import kind


@dataclass
class TrainConfig:
    head: str = "medusa"  # a registered head kind (koala.kinds); the CLI flag is --head
    layers: int = option(1, "K: residual blocks per Medusa head / EAGLE decoder layers", positive_int)
    num_heads: int = option(4, "Medusa heads", positive_int)
    unroll: int = option(2, "EAGLE: training steps on its own predicted features (draft depth trained = unroll + 1)",
                         non_negative_int)
    draft_vocab: int | None = option(None, "reduced draft vocabulary size (default or 0: the full vocabulary)",
                                     non_negative_int)
    init: str | None = option(None, "start from this saved head (same --head and --layers; its draft vocabulary is "
                                    "kept)")
    init_from_target: bool = option(False, "EAGLE: start the K decoder layers as copies of the target's last K "
                                           "layers instead of random weights")
    adversarial: bool = option(False, "add KOALA's discriminator term (flags --adv-*, --d-*)")
    adv: AdvConfig = field(default_factory=AdvConfig)
    max_steps: int = option(1000, "optimizer steps", positive_int)
    max_minutes: float | None = option(None, "stop after this wall time, saved; the step count is then planned "
                                             "from measured throughput so the schedule anneals", positive_float)
    batch_size: int = option(8, "sequences (windows) per step, over all processes", positive_int)
    max_seq_len: int = option(512, "window length; longer sequences become overlapping windows", positive_int)
    lr: float = option(1e-3, "peak learning rate", positive_float)
    min_lr_ratio: float = option(0.1, "the cosine ends at lr * this", non_negative_float)
    warmup: int = option(50, "linear warm-up steps", non_negative_int)
    weight_decay: float = option(0.0, "AdamW weight decay", non_negative_float)
    grad_clip: float = option(1.0, "gradient norm clip", positive_float)
    decay: float = option(0.8, "loss weight of head / unroll step i is decay**i", positive_float)
    ce_weight: float = option(0.1, "EAGLE: weight of the distribution loss next to the feature regression",
                              non_negative_float)
    noise: float = option(0.1, "EAGLE: uniform feature noise amplitude", non_negative_float)
    seed: int = option(0, "initial weights, data order, noise", int)
    eval_sequences: int = option(32, "held-out sequences for acc@k", non_negative_int)
    eval_every: int = option(100, "steps between held-out evaluations", positive_int)
    log_every: int = option(10, "steps between metric rows", positive_int)
    save_every: int = option(100, "steps between checkpoints", positive_int)
    bf16: bool = option(False, "bf16 autocast on CPU too (always on with CUDA): ~2x faster with AMX or "
                                "AVX-512 BF16; ignored, with a warning, on CPUs without them")

    def __post_init__(self) -> None:
        kind(self.head)
        if self.layers < 1 or self.max_steps < 1 or self.batch_size < 1:
            raise ValueError("--layers, --max-steps and --batch-size must be >= 1.")
        if isinstance(self.adv, dict):
            self.adv = AdvConfig(**self.adv)
        self.draft_vocab = self.draft_vocab or None

    @property
    def depth(self) -> int:
        """Tokens drafted per context that the losses cover (acc@1..acc@depth)."""
        return kind(self.head).depth(self)
