"""A decode step's whole decoder stack in one C call: the fused layers' work without Python between the layers.

After koala.fused_layer a one-token SmolLM2 step (bf16, 2 threads, Zen 4) still spent ~4 of its ~12 ms in Python
and torch ops around the C calls: module calls, the KV cache's bookkeeping, the attention's conversions and views,
~40 calls a layer. For a step on top of a koala KV cache (ReservedCache in fp32; a fresh prompt keeps its SDPA
forward) with every layer fused and 16-bit activations, `FusedBody` computes the embedding and the rotary tables
as the model does, runs the layers in C (koala_layers: the fused layer's steps with the same roundings, the
activation read from a table of the model's own activation at all 65,536 16-bit inputs), then the final norm.
`fused_body` checks it against the model's own forward on probes (outputs, the inputs to asked-for layers and
every cache entry, bit for bit) and gives None where it differs or does not fit; `KOALA_FUSED_BODY=0` turns it off.
"""
from __future__ import annotations

import ctypes
import os

import torch

from koala import cpu_kernels
from koala.exact_attention import fresh_prompts
from koala.kvcache import ReservedCache, ReservedLayer

_DTYPES = {cpu_kernels.KINDS[torch.bfloat16]: torch.bfloat16, cpu_kernels.KINDS[torch.float16]: torch.float16}
_POINTERS = ("w1", "wq", "wk", "wv", "wo", "w2", "wg", "wu", "wd", "bq", "bk", "bv", "bo", "bg", "bu", "bd", "act",
             "keys", "values")


class _Layer(ctypes.Structure):
    """koala_layer in cpu_kernels.c."""
    _fields_ = [(name, ctypes.c_void_p) for name in _POINTERS] + [
        ("cap", ctypes.c_int64), ("eps1", ctypes.c_float), ("eps2", ctypes.c_float)]


@torch.inference_mode()
def activation_table(act: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """act's output for every 16-bit input of `dtype`, as int16 bits indexed by the input's bits (unsigned)."""
    bits = torch.arange(65536, dtype=torch.int32)
    return act((bits - 65536 * (bits >= 32768)).to(torch.int16).view(dtype)).contiguous().view(torch.int16)


class FusedBody:
    """Runs a body's decoder layers in one C call per stretch between asked-for layer inputs (see the module)."""

    def __init__(self, body: torch.nn.Module, forwards: list) -> None:
        parts = [f.parts for f in forwards]
        first = parts[0]
        self.forwards = forwards  # they hold what the pointers below point into (packed weights, norms)
        self.body, self.kind, self.wkind = body, first.kind, first.wkind
        self.dtype, self.sizes, self.scale = _DTYPES[first.kind], first.sizes, first.scale
        self.tables: dict[type, torch.Tensor] = {}  # one per activation class, held for the C side's pointers
        self.layers = (_Layer * len(parts))()
        for y, p in zip(self.layers, parts):
            table = self.tables.setdefault(type(p.act), activation_table(p.act, self.dtype))
            for name, value in zip(_POINTERS, (*p.weights, *p.biases, table.data_ptr())):
                setattr(y, name, value)
            y.eps1, y.eps2 = p.eps

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache, attention_mask: torch.Tensor | None,
                 layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Target.features' (last hidden state, inputs to `layers` concatenated) for this step, or None where the
        fused stack does not apply (the caller then runs the model's own forward; nothing has changed)."""
        count = len(self.layers)
        entries = getattr(cache, "layers", None)
        if (not isinstance(cache, ReservedCache) or entries is None or len(entries) != count
                or any(not 0 <= i < count for i in layers)
                or (attention_mask is not None and attention_mask.dim() != 4)):
            return None
        b, n = input_ids.shape
        shape = entries[0].keys.shape if isinstance(entries[0], ReservedLayer) and entries[0].is_initialized else None
        if shape is None or shape[0] != b or shape[-2] == 0 or any(
                not isinstance(e, ReservedLayer) or not e.is_initialized or e.storage != torch.float32
                or e.keys.shape != shape or e.values.shape != shape for e in entries):
            return None
        past, end = shape[-2], shape[-2] + n
        x = self.body.embed_tokens(input_ids)
        if x.dtype != self.dtype:
            return None
        cos, sin = (t.contiguous() for t in self.body.rotary_emb(x, position_ids))
        if fresh_prompts(attention_mask, b, n, end):  # a 4D mask is what the layers get too; None: causal
            return None
        mask = cpu_kernels.attention_mask(attention_mask, b, n, end)  # as the per-layer attention gives it
        for y, e in zip(self.layers, entries):
            e.reserve(end, e.keys, e.values)
            y.keys, y.values, y.cap = e.key_buffer.data_ptr(), e.value_buffer.data_ptr(), e.key_buffer.shape[-2]
        x = x.contiguous()
        inputs, start = {}, 0
        for stop in [*sorted(set(layers)), count]:
            if stop > start:
                self._run(start, stop, x, cos, sin, mask, b, n, past)
            if stop < count:
                inputs[stop] = x.clone()
            start = stop
        for e in entries:
            e.extend(end)
        aux = torch.cat([inputs[i] for i in layers], dim=-1) if layers else None
        return self.body.norm(x), aux

    def _run(self, start: int, stop: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             mask: torch.Tensor | None, b: int, n: int, past: int) -> None:
        heads, kv_heads, d, inter, hidden = self.sizes
        first = ctypes.addressof(self.layers) + start * ctypes.sizeof(_Layer)
        status = cpu_kernels.library().koala_layers(
            first, stop - start, x.data_ptr(), self.kind, self.wkind, cos.data_ptr(), sin.data_ptr(),
            int(cos.shape[0] > 1), None if mask is None else mask.data_ptr(), b, n, past, hidden, heads, kv_heads, d,
            inter, self.scale)
        if status:
            raise MemoryError("koala's fused decoder stack could not allocate its scratch memory")


def _forwards(body: torch.nn.Module) -> list | None:
    """Every decoder layer's fused forward (koala.fused_layer), if all layers have one with the same kind, weight
    kind, sizes and scale, a 16-bit kind, and no sliding window; else None."""
    layers = getattr(body, "layers", None)
    if layers is None or not all(hasattr(body, a) for a in ("embed_tokens", "rotary_emb", "norm", "config")):
        return None
    config = body.config  # a sliding window masks what short probes cannot show: those keep their own masks
    windowed = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    if windowed or any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return None
    forwards = [vars(layer).get("forward") for layer in layers]
    if not forwards or any(getattr(f, "parts", None) is None for f in forwards):
        return None
    same = {(f.parts.kind, f.parts.wkind, f.parts.sizes, f.parts.scale) for f in forwards}
    return forwards if len(same) == 1 and forwards[0].parts.kind in _DTYPES else None


@torch.inference_mode()
def _same_bits(body: torch.nn.Module, fused: FusedBody) -> bool:
    """Whether the fused stack gives the body's own outputs, layer inputs and cache entries bit for bit on probes:
    two rows of a 5-token prompt, then 3 tokens (causal, no mask), then 2 tokens under a tree mask (the second
    does not see the first), asking for the input of a middle layer."""
    gen = torch.Generator().manual_seed(0)
    vocab, count = int(body.config.vocab_size), len(body.layers)
    caches = ReservedCache(torch.float32), ReservedCache(torch.float32)
    prompt = torch.randint(vocab, (2, 5), generator=gen)
    for cache in caches:
        body(input_ids=prompt, position_ids=torch.arange(5).expand(2, 5), cache=cache, use_cache=True)
    allowed = torch.ones(2, 1, 2, 10, dtype=torch.bool)
    allowed[:, :, 0, 9] = allowed[:, :, 1, 8] = False
    layers = (count // 2,)
    for n, past, mask in ((3, 5, None), (2, 8, allowed)):
        ids, pos = torch.randint(vocab, (2, n), generator=gen), torch.arange(past, past + n).expand(2, n)
        own = body(input_ids=ids, position_ids=pos, cache=caches[0], attention_mask=mask, use_cache=True,
                   output_hidden_states=True)
        got = fused(ids, pos, caches[1], mask, layers)
        if got is None or not (torch.equal(got[0], own.last_hidden_state)
                               and torch.equal(got[1], torch.cat([own.hidden_states[i] for i in layers], -1))):
            return False
    return all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
               for a, b in zip(caches[0].layers, caches[1].layers))


def fused_body(body: torch.nn.Module) -> FusedBody | None:
    """The fused stack for a frozen CPU body whose layers all run koala's fused forward, checked on probes; None
    where it does not apply, its bits differ, or KOALA_FUSED_BODY=0."""
    if os.environ.get("KOALA_FUSED_BODY", "1") == "0" or cpu_kernels.library() is None:
        return None
    forwards = _forwards(body)
    if forwards is None:
        return None
    fused = FusedBody(body, forwards)
    try:
        return fused if _same_bits(body, fused) else None
    except (RuntimeError, TypeError, ValueError):  # a body this does not fit
        return None
