"""The EAGLE head kind: K decoder layers over (feature, next-token embedding), drafting autoregressively on its own
features; exported as an EAGLE-1 style llama draft model for vLLM and SGLang (see docs/export.md).

Export layout: the engines concatenate (embedding, feature) where KOALA concatenates (feature, embedding), so fc's
column halves are swapped; both engines drop layer 0's input RMSNorm, which KOALA keeps, so an all-zero decoder
layer (a no-op residual) is prepended and our first layer becomes the engine's layer 1, which has its input norm.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from koala.adversarial import Draft
from koala.drafters.eagle import EagleDrafter
from koala.heads.config import CONFIG, WEIGHTS, HeadConfig
from koala.heads.eagle import EagleHead
from koala.kinds.base import HeadKind, dtype_name, llama_config, take
from koala.losses import DraftVocab, Labels, StepOut, hits, sample_rows, shifted, unroll_mask

if TYPE_CHECKING:
    from koala.hidden_cache import Batch
    from koala.train.config import TrainConfig

FORMATS = ("vllm-eagle", "sglang-eagle")
ARCHITECTURES = {"vllm-eagle": "LlamaForCausalLM",  # vLLM prefixes "Eagle" itself (EagleLlamaForCausalLM)
                 "sglang-eagle": "LlamaForCausalLMEagle"}
TOKEN_MAP = "token_map.pt"  # SGLang's --speculative-token-map file (it reads it with torch.load, weights_only)
# The decoder-layer weights of a llama-style layer, the only layer both engines' EAGLE-1 models build.
LLAMA_LAYER = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
               "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
               "input_layernorm.weight", "post_attention_layernorm.weight")


def build(cfg: HeadConfig, target) -> EagleHead:
    model = target.model
    return EagleHead(cfg, model.get_input_embeddings().weight, model.get_output_embeddings().weight)


def train_step(head, batch: Batch, vocab: DraftVocab, cfg: TrainConfig, want_drafts: bool, train: bool = True,
               measure: bool = True) -> StepOut:
    """Position t maps (feature t, token t+1) to feature t+1, whose logits predict token t+2: the target's next
    token after t+1; the predicted feature is also regressed onto the target's."""
    return unrolled_step(head, batch, batch.hidden, vocab, cfg, want_drafts, train, measure, regress=True)


def unrolled_step(head, batch: Batch, first: torch.Tensor, vocab: DraftVocab, cfg: TrainConfig, want_drafts: bool,
                  train: bool, measure: bool, regress: bool) -> StepOut:
    """The supervised step of the EAGLE kinds: step 0 reads `first` (the target features at t) with token t+1;
    unroll step s reads the head's own outputs from step s-1 (training-time test). Losses: KL to the target's
    next-token distribution over the draft vocabulary, plus, with `regress`, smooth-L1 of the output onto the
    target's final hidden state at t+1 (EAGLE-1: outputs are features; EAGLE-3 outputs are the head's own)."""
    from transformers import DynamicCache

    h, ids = batch.hidden, batch.ids
    B, T, d = h.shape
    labels = Labels(vocab, h, shifted(batch.loss_mask, 1))
    nxt_ids = torch.zeros_like(ids)
    nxt_ids[:, :-1] = ids[:, 1:]
    pos = torch.arange(T, device=h.device).expand(B, T)
    w = shifted(batch.loss_mask, 2)
    x = first + (torch.rand_like(first) * 2 - 1) * cfg.noise if train and cfg.noise > 0 else first
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
        logits = head.logits(g[rows].to(head.fc.weight.dtype))
        dist, parts[f"kl{s + 1}"] = labels.loss(rows[0], rows[1] + 1, logits)
        if regress:
            reg = F.smooth_l1_loss(g[rows], h[rows[0], rows[1] + 1])
            loss = loss + cfg.decay ** s * (reg + cfg.ce_weight * dist)
            parts[f"reg{s + 1}"] = float(reg.detach())
        else:
            loss = loss + cfg.decay ** s * dist
        acc.append((hits(logits, vocab, batch.greedy[rows[0], rows[1] + 1]) if measure else 0, rows[0].numel()))
    out = StepOut(loss, parts, acc)
    if want_drafts:
        S = cfg.unroll + 1
        ok = torch.stack([shifted(weights[s], s) for s in range(S)]).all(0)  # every step of the chain counted
        b, t = sample_rows(ok, cfg.adv.contexts)
        if b.numel():
            fake_f = torch.stack([preds[s][b, t + s] for s in range(S)], dim=1)
            fake_lp = F.log_softmax(head.logits(fake_f.to(head.fc.weight.dtype)).float(), dim=-1)
            real_lp = torch.stack([labels.logprobs(b, t + s + 1) for s in range(S)], dim=1)
            real_f = torch.stack([h[b, t + s + 1] for s in range(S)], dim=1)
            use = cfg.adv.use_features and regress  # EAGLE-3 outputs are no target features to compare
            out.real = Draft(h[b, t], real_lp, real_f if use else None)
            out.fake = Draft(h[b, t], fake_lp, fake_f if use else None)
    return out


def blocks(keys: list[str]) -> dict[str, int]:
    """The config field that `layers.i.*` tensor names pin down: decoder layers."""
    return {"layers": len({int(k.split(".")[1]) for k in keys if k.startswith("layers.")})}


def _config(cfg: HeadConfig, fmt: str, dtype: torch.dtype) -> dict:
    tcfg = cfg.target_config
    data = llama_config(tcfg)
    data.update(architectures=[ARCHITECTURES[fmt]], model_type="llama", vocab_size=cfg.vocab_size,
                num_hidden_layers=cfg.layers + 1,  # + the no-op layer 0, see the module docstring
                tie_word_embeddings=False,  # SGLang aliases lm_head to embed_tokens when tied, then overwrites it
                attention_bias=False, mlp_bias=False, torch_dtype=dtype_name(dtype), dtype=dtype_name(dtype))
    return data


def _tensors(head, target, fmt: str) -> dict[str, torch.Tensor]:
    """Engine-named tensors: swapped fc, zero layer 0, our layers shifted by one, the target embedding."""
    d = head.cfg.hidden_size
    fc = head.fc.weight.detach()
    tensors = {"fc.weight": torch.cat([fc[:, d:], fc[:, :d]], dim=1),
               "embed_tokens.weight": target.model.get_input_embeddings().weight.detach()}
    if fmt == "sglang-eagle":  # SGLang's fc has a bias (left uninitialised if absent); ours is bias-free
        tensors["fc.bias"] = torch.zeros(d, dtype=fc.dtype)
    for i, layer in enumerate(head.layers):
        state = layer.state_dict()
        if set(state) != set(LLAMA_LAYER):
            extra = sorted(set(state) ^ set(LLAMA_LAYER))
            raise ValueError(f"EAGLE export supports llama-style decoder layers only (llama, mistral targets); "
                             f"this head's {head.cfg.target.get('architecture')} layers differ in {extra[:4]}.")
        tensors.update({f"layers.{i + 1}.{k}": v.detach() for k, v in state.items()})
    for k in LLAMA_LAYER:  # the no-op layer: zero projections give zero attention and MLP outputs exactly
        if k != "input_layernorm.weight":
            like = tensors[f"layers.1.{k}"]
            tensors[f"layers.0.{k}"] = torch.ones_like(like) if "layernorm" in k else torch.zeros_like(like)
    return tensors


def export(head, target, fmt: str, dtype: torch.dtype, out: Path) -> tuple[dict, dict, list[str], dict]:
    cfg = head.cfg
    if cfg.own_lm_head:
        raise ValueError("This EAGLE head trained its own LM head copy, but vLLM's and SGLang's EAGLE-1 models "
                         "always use the target's LM head, so it cannot be exported exactly; train the head with "
                         "the frozen target LM head (own_lm_head off) to export it.")
    notes, files = [], {}
    if cfg.draft_vocab is not None and fmt == "vllm-eagle":
        notes.append(f"vLLM's EAGLE-1 model has no reduced draft vocabulary: it will score all {cfg.vocab_size} "
                     f"tokens with the target LM head instead of this head's {cfg.draft_vocab_size}, so its "
                     f"drafts can differ from KOALA's (outputs stay exact; acceptance may change).")
    if cfg.draft_vocab is not None and fmt == "sglang-eagle":
        ids = torch.tensor(cfg.draft_vocab, dtype=torch.long)
        files[TOKEN_MAP] = lambda p: torch.save(ids, p)
        notes.append(f"Reduced draft vocabulary ({cfg.draft_vocab_size} tokens): start SGLang with "
                     f"--speculative-token-map {out / TOKEN_MAP}.")
    return _tensors(head, target, fmt), _config(cfg, fmt, dtype), notes, files


def import_state(cfg: HeadConfig, config: dict, tensors: dict, path: Path) -> dict[str, torch.Tensor]:
    if config.get("num_hidden_layers") != cfg.layers + 1:
        raise ValueError(f"{path / CONFIG}: num_hidden_layers {config.get('num_hidden_layers')} does not match the "
                         f"koala block's {cfg.layers} layers + the no-op layer 0.")
    d = cfg.hidden_size
    fc = take(tensors, "fc.weight", path)
    state = {"fc.weight": torch.cat([fc[:, d:], fc[:, :d]], dim=1)}
    pad = [take(tensors, f"layers.0.{k}", path) for k in LLAMA_LAYER if "layernorm" not in k]
    if any(t.any() for t in pad) or tensors.pop("fc.bias", torch.zeros(1)).any():
        raise ValueError(f"{path / WEIGHTS}: layer 0 (or fc.bias) is not all zeros, so this is not the exact "
                         f"layout `koala export` writes; it cannot be turned back into a KOALA head.")
    tensors.pop("layers.0.post_attention_layernorm.weight", None)
    tensors.pop("embed_tokens.weight", None)  # KOALA re-attaches the target's embedding
    for i in range(cfg.layers):
        state.update({f"layers.{i}.{k}": take(tensors, f"layers.{i + 1}.{k}", path) for k in LLAMA_LAYER})
    return state


KIND = HeadKind("eagle", build, EagleDrafter, train_step, lambda cfg: cfg.unroll + 1, blocks, FORMATS, export,
                import_state)
