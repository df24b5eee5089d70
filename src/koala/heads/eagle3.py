"""EAGLE-3 style head with K decoder layers: reads three target layers, drafts on its own pre-norm states.

Input at position t: the inputs to three target layers (low, middle, high; `cfg.aux_layers`) at t, fused by
fc (3d -> d), and token t+1. Layer 1 attends over [norm(embedding) | norm(fused)] (2d wide q/k/v) and keeps the
fused state as its residual; layers 2..K are ordinary decoder layers of the target's family (KOALA's depth). The
output is the head's *pre-norm* state for t+1: a final RMSNorm and the target's LM head (restricted to the draft
vocabulary) give logits for token t+2, and the state itself is the next draft step's input in place of fc's
output (so `forward` takes either 3d target features or d-wide own states).

This is the layout EAGLE-3 engines load with one layer (llama.cpp, vLLM, SGLang; see koala.kinds.eagle3).
Choices (docs/heads.md):
- fc starts as [0 | 0 | I]: the high layer's input passes through, so at step 0 the head reads roughly the
  residual stream near the top of the target.
- The final norm starts as the target's own final norm, whose scale the target's LM head expects.
- Layers 2..K start as identity residuals (zeroed o_proj / down_proj), as in the EAGLE head.
"""
from __future__ import annotations

import torch
from torch import nn

from koala.heads.config import HeadConfig
from koala.heads.eagle import check_config, family_classes, family_config, init_layers, layer_mask
from koala.heads.vocab import DraftLMHead


def widen_attention(layer: nn.Module, d: int) -> None:
    """Give a decoder layer's q/k/v projections 2d inputs: [normed embedding | normed feature]."""
    attn = layer.self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        old = getattr(attn, name)
        setattr(attn, name, nn.Linear(2 * d, old.out_features, bias=old.bias is not None))


class Eagle3Head(nn.Module):
    def __init__(self, cfg: HeadConfig, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor,
                 final_norm: nn.Module) -> None:
        super().__init__()
        check_config(cfg, "eagle3", embed_weight, lm_head_weight)
        if not cfg.aux_layers:
            raise ValueError("An EAGLE-3 head needs the target layers it reads (aux_layers).")
        d = cfg.hidden_size
        self.cfg = cfg
        self.family = family_config(cfg.target_config, cfg.layers)
        layer_cls, rotary_cls = family_classes(cfg.target_config)
        self.fc = nn.Linear(len(cfg.aux_layers) * d, d, bias=False)
        self.layers = nn.ModuleList(layer_cls(self.family, i) for i in range(cfg.layers))
        widen_attention(self.layers[0], d)
        norm_cls = type(self.layers[0].input_layernorm)
        self.layers[0].hidden_norm = norm_cls(d, eps=self.family.rms_norm_eps)
        self.norm = norm_cls(d, eps=self.family.rms_norm_eps)
        self.rotary = rotary_cls(config=self.family)
        self._init_weights(final_norm)
        self.to(device=lm_head_weight.device, dtype=lm_head_weight.dtype)
        self.register_buffer("embed", embed_weight.detach(), persistent=False)
        self.lm_head = DraftLMHead(lm_head_weight, cfg.draft_vocab, trainable=cfg.own_lm_head)

    @torch.no_grad()
    def _init_weights(self, final_norm: nn.Module) -> None:
        d = self.cfg.hidden_size
        self.fc.weight.zero_()
        self.fc.weight[:, -d:] = torch.eye(d)
        init_layers(self.layers, float(getattr(self.family, "initializer_range", 0.02)))
        self.norm.weight.copy_(final_norm.weight.detach())

    def forward(self, features: torch.Tensor, next_ids: torch.Tensor, position_ids: torch.Tensor, cache=None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The head's pre-norm states (B, T, d) for (feature_t, token_{t+1}) pairs.

        features: (B, T, n*d) target aux-layer inputs (fused by fc) or (B, T, d) the head's own earlier outputs;
        cache / attention_mask / position_ids as in EagleHead.forward.
        """
        h = self.fc(features) if features.shape[-1] != self.cfg.hidden_size else features
        emb = nn.functional.embedding(next_ids, self.embed)
        attention_mask = layer_mask(h, cache, attention_mask)
        rope = self.rotary(h, position_ids)
        first, kw = self.layers[0], dict(attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                                         use_cache=cache is not None, position_embeddings=rope)
        x = torch.cat([first.input_layernorm(emb), first.hidden_norm(h)], dim=-1)
        h = h + first.self_attn(hidden_states=x, **kw)[0]
        h = h + first.mlp(first.post_attention_layernorm(h))
        for layer in self.layers[1:]:
            out = layer(h, **kw)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """(B, T, d) pre-norm states -> (B, T, Vd) draft-vocab logits (final norm, frozen target LM head)."""
        return self.lm_head(self.norm(states))
