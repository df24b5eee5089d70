"""The target's own layers over a preallocated KV cache with one slot (row) per sequence.

transformers' DynamicCache grows by concatenation (every layer, every token) and a batch shares one length. For
bulk generation (self-distillation) we want the opposite: memory allocated once, keys written in place at each
row's own positions, finished rows leaving and new ones joining between steps. `SlotModel` runs the target's
modules (embedding, rotary, q/k/v/o, norms, MLP: the same weights and the same code transformers uses for them)
and owns only the attention bookkeeping, so its hidden states equal the target's body up to float rounding.

Live rows always occupy slots 0..n-1, so attention reads a view of the cache, never a gathered copy; a finished
row is replaced by the last live row (one row copied per layer).
"""
from __future__ import annotations

import sys

import torch
from torch.nn import functional as F

SUPPORTED = ("llama", "mistral", "qwen2")


def supports(model, capacity: int) -> bool:
    """Whether SlotModel runs this model exactly: llama-style blocks, no q/k norms, and no sliding window that a
    sequence of `capacity` tokens could exceed."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED or hasattr(model.get_decoder().layers[0].self_attn, "q_norm"):
        return False
    window = getattr(cfg, "sliding_window", None)
    if cfg.model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False):
        window = None
    return window is None or window >= capacity


class SlotModel:
    """A target body with a (slots, capacity) KV cache written in place; see the module docstring."""

    def __init__(self, model, slots: int, capacity: int, aux_layers: tuple[int, ...] = ()) -> None:
        if not supports(model, capacity):
            raise NotImplementedError(
                f"Fast slot generation supports {', '.join(SUPPORTED)} models (no sliding window, no q/k norms); "
                f"{model.config.model_type!r} is not one of them.")
        self.body = model.get_decoder()
        self.layers = list(self.body.layers)
        cfg = model.config
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        p = self.body.embed_tokens.weight
        shape = (slots, self.kv_heads, capacity, self.head_dim)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in self.layers]
        self.slots, self.capacity = slots, capacity
        self.aux_layers = tuple(aux_layers)  # layers whose inputs forward also returns (EAGLE-3 heads read them)

    @torch.inference_mode()
    def forward(self, start: int, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states (n, t, d) for tokens `ids` (n, t) at positions `pos` (n, t) of the rows in
        slots start..start+n-1, followed on the last axis by the inputs to `aux_layers` (n, t, d each; an id equal
        to the layer count means the final normed state, as in transformers' `hidden_states`). Keys/values are stored at their positions; a query at
        position p sees the row's keys at positions <= p (so right-padding of a prefill is overwritten before it
        is ever seen)."""
        n, t = ids.shape
        stop = start + n
        if int(pos.max()) >= self.capacity or stop > self.slots:
            raise ValueError(f"slot cache too small: positions up to {int(pos.max())}, capacity {self.capacity}")
        span = int(pos.max()) + 1
        seen = torch.arange(span, device=ids.device)[None, None, None, :] <= pos[:, None, :, None]
        mask = torch.zeros(seen.shape, dtype=self.k[0].dtype, device=ids.device).masked_fill_(~seen, float("-inf"))
        group = self.heads // self.kv_heads
        mask = mask.repeat(1, 1, group, 1)
        rows = torch.arange(start, stop, device=ids.device)[:, None]
        x = self.body.embed_tokens(ids)
        cos, sin = self.body.rotary_emb(x, pos)
        aux = {}
        for i, (layer, kc, vc) in enumerate(zip(self.layers, self.k, self.v)):
            if i in self.aux_layers:
                aux[i] = x
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(n, t, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(n, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(n, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            kc[rows, :, pos] = k.transpose(1, 2)
            vc[rows, :, pos] = v.transpose(1, 2)
            # the query heads sharing a KV head are stacked along the query axis: each key is read once per KV
            # head, not once per query head (25% faster than enable_gqa on CPU at decode shapes)
            o = F.scaled_dot_product_attention(q.reshape(n, self.kv_heads, group * t, self.head_dim),
                                               kc[start:stop, :, :span], vc[start:stop, :, :span], attn_mask=mask)
            x = x + attn.o_proj(o.view(n, self.heads, t, self.head_dim).transpose(1, 2).reshape(n, t, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        aux[len(self.layers)] = x = self.body.norm(x)
        return torch.cat([x] + [aux[i] for i in self.aux_layers], dim=-1)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cache positions of slot src into slot dst (a finished row's slot is refilled by
        the last live row, so live rows stay contiguous)."""
        for kc, vc in zip(self.k, self.v):
            kc[dst, :, :length] = kc[src, :, :length]
            vc[dst, :, :length] = vc[src, :, :length]
