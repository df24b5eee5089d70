"""Attention whose result for a query row does not depend on what else is in the call: lossless verification.

Speculative decoding is lossless only if verifying a tree of n tokens gives each token the same logits a plain
one-token step would. On CPU that fails with SDPA: its kernels group queries, split keys into blocks and pick GEMM
kernels by shape, so a row's attention output moves by a rounding error; in bf16 (8 bits of mantissa) near-tied
argmaxes then flip (15-23% of Spec-Bench answers stayed identical to plain bf16 decoding on a Xeon), and in fp32
the rows differ too (every row of SmolLM2 on an AMD EPYC, by ~1e-5). The linears keep a row's bits at any row count
through koala.invariant_linear, and with attention fixed the decoded tokens agree (tests/test_exact_attention.py,
the slow SmolLM2 tests).

Rows go to koala's C kernel (koala.cpu_kernels: fp32, invariant by construction, reading an fp32 KV cache) where it
builds; elsewhere scores, softmax and the weighted sum run in float64 on a float64 cache and only the result is
rounded to the model's dtype (differences ~1e-16 relative, far below the rounding step). A prompt with nothing
cached before it is the exception: it is processed once, in a call of the same shape on every path (alone or beside
other rows), so it keeps SDPA (several times faster on long prompts) and every path starts from the same cache.
Long query blocks on the float64 path are processed in chunks (bounded memory; each chunk skips the keys none of
its rows may see).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from koala import cpu_kernels

NAME = "koala_exact"
CHUNK = 128  # query rows per float64 block (scores take CHUNK x keys x 8 bytes per head)
NEG = torch.finfo(torch.float64).min  # not -inf: a fully masked padding row gets a uniform softmax, never NaN
_memo: tuple[torch.Tensor | None, dict[int, int]] = (None, {})  # the last mask seen and its fresh prompt rows


def exact_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (B, H, q, D), key/value (B, KVH, L, D), an additive or boolean
    (B, 1, q, L) mask or None (causal, the queries being the last q positions) -> ((B, q, H, D), None)."""
    b, q, length = query.shape[0], query.shape[2], key.shape[2]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    fresh = fresh_prompts(attention_mask, b, q, length)
    if not fresh:
        return _rows(query, key, value, attention_mask, scale), None
    out = query.new_zeros(b, q, query.shape[1], query.shape[3])  # a prompt's padding rows stay 0: nothing sees them
    rest = [r for r in range(b) if r not in fresh]
    if rest:
        out[rest] = _rows(query[rest], key[rest], value[rest],
                          None if attention_mask is None else attention_mask[rest], scale)
    past = length - q
    for r, m in fresh.items():
        out[r, :m] = _prompt(query[r:r + 1, :, :m], key[r:r + 1, :, past:past + m],
                             value[r:r + 1, :, past:past + m], scale)
    return out, None


def _prompt(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """A prompt's causal self-attention with nothing cached before it, by SDPA in the model's dtype: (1, m, H, D).

    A prompt is processed exactly once, always in a call of this shape (whatever else shares the forward), so
    plain and speculative decoding, alone or in a batch, start from the same bits; the tokens that later steps
    compare are decided by _rows. SDPA reads a long prompt several times faster than the float64 path."""
    group = query.shape[1] // key.shape[1]
    key = key.to(query.dtype).repeat_interleave(group, 1)  # the fp32/float64 cache holds the model's values: exact
    value = value.to(query.dtype).repeat_interleave(group, 1)
    out = F.scaled_dot_product_attention(query.contiguous(), key, value, is_causal=True, scale=scale)
    return out[0].transpose(0, 1)


def fresh_prompts(mask: torch.Tensor | None, b: int, q: int, length: int) -> dict[int, int]:
    """{row: m} for the rows whose first m queries are a whole prompt: nothing cached before them, plain causal
    among themselves, and the row's other queries padding (see koala.tree.batch_verify_inputs)."""
    past = length - q
    if mask is None:
        return {r: q for r in range(b)} if past == 0 else {}
    global _memo
    last = _memo  # one read: another thread may replace it meanwhile
    if last[0] is mask:  # every layer of a forward gets the same mask object
        return last[1]
    allowed = _allowed(mask[:, 0])
    fresh = {}
    for r in range(b):
        a = allowed[r]
        m = int(a[:, past].sum())
        if m == 0 or (past and a[:, :past].any()):
            continue
        tril = torch.ones(m, m, dtype=torch.bool, device=a.device).tril()
        if torch.equal(a[:m, past:past + m], tril) and not a[:m, past + m:].any() and not a[m:, past:past + m].any():
            fresh[r] = m
    _memo = (mask, fresh)  # holding the mask keeps its identity from being reused by a new tensor
    return fresh


_WIDENS = (torch.float32, torch.bfloat16, torch.float16)  # caches the C kernel reads (half precision widened)


def cache_dtype() -> torch.dtype:
    """What a CPU target's KV cache stores for this attention: fp32 for the C kernel (exact for bf16 and fp16
    values), else float64, converted once when written instead of on every forward."""
    return torch.float32 if cpu_kernels.library() is not None else torch.float64


def _rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
          scale: float) -> torch.Tensor:
    """(B, q, H, D) in the query's dtype: by koala's C kernel on an fp32 cache, else in float64. A half-precision
    cache (one koala did not make, e.g. HF generate's) is widened, exactly, so it gets the same bits as koala's."""
    if key.device.type != "cpu" or cpu_kernels.library() is None or key.dtype not in _WIDENS:
        return _float64(query, key, value, attention_mask, scale)
    key, value = key.float(), value.float()  # no copy for an fp32 cache
    return cpu_kernels.attention(query, key, value, attention_mask, scale).to(query.dtype)


def _float64(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
             scale: float) -> torch.Tensor:
    """Scores, softmax and weighted sum in float64, only the result rounded: (B, q, H, D)."""
    b, heads, q, d = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = heads // kv_heads
    k, v = key.double().transpose(-1, -2), value.double()
    out = torch.empty(b, kv_heads, group, q, d, dtype=torch.float64, device=query.device)
    grouped = query.reshape(b, kv_heads, group, q, d)  # the query heads sharing a KV head read it once
    for start in range(0, q, CHUNK):
        stop = min(q, start + CHUNK)
        # a long prompt's early chunks skip the keys none of their rows may see (a causal prefill halves its cost);
        # dropping exact zeros from the float64 sums moves them by far less than bf16's rounding step
        seen = length if q <= CHUNK else _keys_seen(attention_mask, start, stop, length, q)
        s = torch.matmul(grouped[:, :, :, start:stop].double().flatten(2, 3), k[..., :seen]).mul_(scale)
        s = s.view(b, kv_heads, group, stop - start, seen)
        s = _masked(s, attention_mask, start, stop, seen, length - q)
        out[:, :, :, start:stop] = torch.matmul(torch.softmax(s, dim=-1).flatten(2, 3), v[:, :, :seen]).view(
            b, kv_heads, group, stop - start, d)
    return out.view(b, heads, q, d).transpose(1, 2).to(query.dtype)


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _keys_seen(mask: torch.Tensor | None, start: int, stop: int, length: int, q: int) -> int:
    """How many leading keys the query rows start..stop may see at all (the rest are masked for every one)."""
    if mask is None:
        return length - q + stop
    cols = _allowed(mask[:, :, start:stop, :length]).flatten(0, 2).any(0).nonzero()
    return int(cols[-1]) + 1 if len(cols) else length


def _masked(s: torch.Tensor, mask: torch.Tensor | None, start: int, stop: int, seen: int, past: int) -> torch.Tensor:
    """Scores with the mask applied; `seen` leading keys; `past` cached positions before the queries (for None)."""
    if mask is None:  # causal: query i (of the last q positions) sees keys up to past + i
        rows = torch.arange(start, stop, device=s.device)[:, None] + past
        allowed = torch.arange(seen, device=s.device)[None, :] <= rows
        return s.masked_fill_(~allowed, NEG)
    mask = mask[:, :, None, start:stop, :seen]  # (B, 1, 1, rows, keys): broadcast over KV heads and groups
    if mask.dtype == torch.bool:
        return s.masked_fill_(~mask, NEG)
    return s.add_(mask.double())


AttentionInterface.register(NAME, exact_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # masks transformers builds itself: boolean, or None = causal


def use_exact_attention(model: torch.nn.Module, on: bool = True) -> None:
    """Switch a transformers model to exact_attention (keeping its own mask building as for eager/SDPA), or, with
    on=False, from it back to SDPA."""
    if on:
        model.set_attn_implementation(NAME)
    elif model.config._attn_implementation == NAME:
        model.set_attn_implementation("sdpa")
