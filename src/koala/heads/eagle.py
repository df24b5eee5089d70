"""EAGLE head with K decoder layers of the target's own family (KOALA's deeper EAGLE).

Input at position t: concat(feature_t, embed(token_{t+1})) -> Linear(2d -> d) -> K decoder layers -> the predicted
feature at t+1, which the frozen target LM head turns into logits for token t+2. Features are the target's final
(normed) hidden states, exactly what the decode loop hands to drafters.

Choices (see docs/heads.md):
- The decoder layers and rotary embedding are the target family's own classes, found by instantiating the target
  architecture on the meta device; no modeling code is copied.
- Unlike EAGLE we keep the first layer's input RMSNorm: our fc output mixes normed features with raw embeddings of
  a different scale, and the norm gives attention a fixed input scale for d extra parameters.
- fc starts as [I | 0] (pass the feature through); layer 1 gets the usual N(0, initializer_range) init; layers 2..K
  have zeroed o_proj/down_proj so they start as identity residuals and deepening a head never hurts at step 0.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from koala.heads.config import HeadConfig
from koala.heads.vocab import DraftLMHead

_OUTPUT_PROJECTIONS = ("o_proj", "down_proj")


def family_config(target_config: dict, layers: int):
    """The target's HF config with `layers` decoder layers, all full attention, attention via SDPA."""
    from transformers import AutoConfig

    data = {k: v for k, v in target_config.items() if k != "model_type"}
    data["num_hidden_layers"] = layers
    if data.get("layer_types") is not None:
        data["layer_types"] = ["full_attention"] * layers
    for drop in ("quantization_config", "auto_map"):
        data.pop(drop, None)
    cfg = AutoConfig.for_model(target_config["model_type"], **data)
    cfg._attn_implementation = "sdpa"
    return cfg


@functools.lru_cache(maxsize=8)
def _family_classes_cached(model_type: str, config_json: str) -> tuple[type, type]:
    import json

    from transformers import AutoModelForCausalLM

    cfg = family_config(json.loads(config_json), 1)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    body = model.get_decoder()
    rotary = getattr(body, "rotary_emb", None)
    if not hasattr(body, "layers") or rotary is None:
        raise ValueError(f"EAGLE heads need a decoder with `layers` and a shared `rotary_emb` (llama-like); "
                         f"the {model_type!r} architecture has no such structure.")
    return type(body.layers[0]), type(rotary)


def family_classes(target_config: dict) -> tuple[type, type]:
    """(decoder layer class, rotary embedding class) of the target's architecture."""
    import json

    return _family_classes_cached(target_config["model_type"], json.dumps(target_config, sort_keys=True))


def causal_mask(past: int, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(1, 1, length, past+length) additive mask: every query sees the cache and the earlier new positions."""
    allowed = torch.ones(length, past + length, dtype=torch.bool, device=device).tril(past)
    return additive(allowed, dtype)[None, None]


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean "may attend" -> additive mask (0 or the dtype's most negative value)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


@torch.no_grad()
def init_layers(layers: nn.ModuleList, std: float) -> None:
    """Linear weights ~ N(0, std), biases zero; layers after the first start as identity residuals (zeroed output
    projections), so deepening a head never hurts at step 0."""
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
                if i > 0 and name.rsplit(".", 1)[-1] in _OUTPUT_PROJECTIONS:
                    nn.init.zeros_(module.weight)


def check_config(cfg: HeadConfig, kind: str, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor) -> None:
    """What an EAGLE-style head needs before it is built: its kind, the target's config, and target embedding and
    LM head of the configured shapes."""
    if cfg.kind != kind:
        raise ValueError(f"This head needs a config of kind {kind!r}, got {cfg.kind!r}.")
    if not cfg.target_config:
        raise ValueError(f"A {kind} head needs the target's config (target_config) to build its decoder layers.")
    for name, w in (("embedding", embed_weight), ("LM head", lm_head_weight)):
        if tuple(w.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise ValueError(f"The target {name} is {tuple(w.shape)} but the head config expects "
                             f"({cfg.vocab_size}, {cfg.hidden_size}).")


def layer_mask(x: torch.Tensor, cache, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The additive mask the head's layers take: causal over the cache and this call when none is given, a
    boolean mask made additive."""
    if attention_mask is None:
        past = cache.get_seq_length() if cache is not None else 0
        return causal_mask(past, x.shape[1], x.dtype, x.device)
    return additive(attention_mask, x.dtype) if attention_mask.dtype == torch.bool else attention_mask


class EagleHead(nn.Module):
    def __init__(self, cfg: HeadConfig, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor) -> None:
        super().__init__()
        check_config(cfg, "eagle", embed_weight, lm_head_weight)
        d = cfg.hidden_size
        self.cfg = cfg
        self.family = family_config(cfg.target_config, cfg.layers)
        layer_cls, rotary_cls = family_classes(cfg.target_config)
        self.fc = nn.Linear(2 * d, d, bias=False)
        self.layers = nn.ModuleList(layer_cls(self.family, i) for i in range(cfg.layers))
        self.rotary = rotary_cls(config=self.family)
        self._init_weights()
        self.to(device=lm_head_weight.device, dtype=lm_head_weight.dtype)
        self.register_buffer("embed", embed_weight.detach(), persistent=False)
        self.lm_head = DraftLMHead(lm_head_weight, cfg.draft_vocab, trainable=cfg.own_lm_head)

    @torch.no_grad()
    def _init_weights(self) -> None:
        d = self.cfg.hidden_size
        self.fc.weight.zero_()
        self.fc.weight[:, :d] = torch.eye(d)
        init_layers(self.layers, float(getattr(self.family, "initializer_range", 0.02)))

    @torch.no_grad()
    def copy_target_layers(self, body: nn.Module) -> None:
        """Start the K layers as the target's last K decoder layers (same family, same shapes): a deeper head then
        begins from what the top of the target's own stack computes rather than from noise."""
        if len(self.layers) > len(body.layers):
            raise ValueError(f"The head has {len(self.layers)} layers; the target only {len(body.layers)}.")
        for mine, theirs in zip(self.layers, body.layers[-len(self.layers):]):
            mine.load_state_dict(theirs.state_dict())

    def forward(self, features: torch.Tensor, next_ids: torch.Tensor, position_ids: torch.Tensor, cache=None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted next features (B, T, d).

        features (B, T, d) and next_ids (B, T) are the pairs (feature_t, token_{t+1}); position_ids (B, T) = t.
        `cache` (a transformers DynamicCache) holds earlier positions and is extended. attention_mask is an
        additive or boolean (B, 1, T, past+T) mask; None means causal over the cache and this call.
        """
        x = self.fc(torch.cat([features, nn.functional.embedding(next_ids, self.embed)], dim=-1))
        attention_mask = layer_mask(x, cache, attention_mask)
        rope = self.rotary(x, position_ids)
        for layer in self.layers:
            out = layer(x, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                        use_cache=cache is not None, position_embeddings=rope)
            x = out[0] if isinstance(out, tuple) else out
        return x

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, T, d) predicted features -> (B, T, Vd) draft-vocab logits via the frozen target LM head."""
        return self.lm_head(features)
