"""The Medusa head kind: K residual blocks per head, head i predicting the token i+2 steps ahead; exported in
vLLM's Medusa layout (blocks.H.layers.J, one shared LM head, token_map for a reduced vocabulary)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from koala.adversarial import Draft
from koala.drafters.medusa import MedusaDrafter
from koala.heads.config import CONFIG, WEIGHTS, HeadConfig
from koala.heads.medusa import MedusaHead
from koala.kinds.base import HeadKind, dtype_name, take
from koala.losses import DraftVocab, Labels, StepOut, hits, sample_rows, shifted

if TYPE_CHECKING:
    from koala.hidden_cache import Batch
    from koala.train.config import TrainConfig

FORMAT = "vllm-medusa"


def build(cfg: HeadConfig, target) -> MedusaHead:
    return MedusaHead(cfg, target.model.get_output_embeddings().weight)


def train_step(head, batch: Batch, vocab: DraftVocab, cfg: TrainConfig, want_drafts: bool, train: bool = True,
               measure: bool = True) -> StepOut:
    """Head i at position t predicts token t+i+2, i.e. the target's next token after position t+i+1 (`train` is
    unused: Medusa trains on the real features, without noise)."""
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
        logits = head.lm_head(feats[keep, i])
        part, parts[f"kl{i + 1}"] = labels.loss(b, t + i + 1, logits)
        loss = loss + cfg.decay ** i * part
        acc.append((hits(logits, vocab, batch.greedy[b, t + i + 1]) if measure else 0, b.numel()))
    out = StepOut(loss, parts, acc)
    if want_drafts:
        b, t = sample_rows(torch.stack(w).all(0), cfg.adv.contexts)
        if b.numel():
            fake_lp = F.log_softmax(head.lm_head(head.features(h[b, t][None])[0]).float(), dim=-1)
            real_lp = torch.stack([labels.logprobs(b, t + i + 1) for i in range(H)], dim=1)
            out.real, out.fake = Draft(h[b, t], real_lp), Draft(h[b, t], fake_lp)
    return out


def blocks(keys: list[str]) -> dict[str, int]:
    """The config fields that `heads.h.i.*` tensor names pin down: blocks per head and heads."""
    pairs = {tuple(int(x) for x in k.split(".")[1:3]) for k in keys if k.startswith("heads.")}
    return {"layers": len({i for _, i in pairs}), "num_heads": len({h for h, _ in pairs})}


def _config(cfg: HeadConfig, dtype: torch.dtype) -> dict:
    return {"architectures": ["MedusaModel"], "model_type": "medusa",
            "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "num_heads": cfg.num_heads,
            "num_hidden_layers": cfg.layers, "truncated_vocab_size": cfg.draft_vocab_size,
            "medusa_fc_bias": True,  # our residual blocks have biases (vLLM's default is no bias)
            "original_lm_head": True,  # one LM head shared by all heads, as in KOALA
            "max_paths": 64, "topk": 10, "torch_dtype": dtype_name(dtype)}


def _tensors(head) -> dict[str, torch.Tensor]:
    tensors = {}
    for h, blocks in enumerate(head.heads):
        for j, block in enumerate(blocks):
            tensors[f"blocks.{h}.layers.{j}.weight"] = block.linear.weight.detach()
            tensors[f"blocks.{h}.layers.{j}.bias"] = block.linear.bias.detach()
    tensors["lm_heads.0.weight"] = head.lm_head.weight.detach()  # already restricted to the draft vocab
    if head.cfg.draft_vocab is not None:
        tensors["token_map"] = torch.tensor(head.cfg.draft_vocab, dtype=torch.long)
    return tensors


def export(head, target, fmt: str, dtype: torch.dtype, out: Path) -> tuple[dict, dict, list[str], dict]:
    return _tensors(head), _config(head.cfg, dtype), [], {}


def import_state(cfg: HeadConfig, config: dict, tensors: dict, path: Path) -> dict[str, torch.Tensor]:
    if (config.get("num_heads"), config.get("num_hidden_layers")) != (cfg.num_heads, cfg.layers):
        raise ValueError(f"{path / CONFIG}: num_heads/num_hidden_layers do not match the koala block.")
    state = {f"heads.{h}.{j}.linear.{p}": take(tensors, f"blocks.{h}.layers.{j}.{p}", path)
             for h in range(cfg.num_heads) for j in range(cfg.layers) for p in ("weight", "bias")}
    lm_head = take(tensors, "lm_heads.0.weight", path)
    token_map = tensors.pop("token_map", None)
    if (token_map.tolist() if token_map is not None else None) != cfg.draft_vocab:
        raise ValueError(f"{path / WEIGHTS}: token_map does not match the koala block's draft vocabulary.")
    if cfg.own_lm_head:
        state["lm_head.weight"] = lm_head
    return state


KIND = HeadKind("medusa", build, MedusaDrafter, train_step, lambda cfg: cfg.num_heads, blocks, (FORMAT,), export,
                import_state)
