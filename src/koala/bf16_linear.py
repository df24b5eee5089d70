"""bf16 linears whose result for a row does not depend on how many rows share the call: lossless bf16 on CPU.

Speculative decoding is lossless only if a verify forward of n tokens gives each token the bits a one-token step
gives it. On this machine (torch 2.13, oneDNN, AMX) F.linear's bf16 rows change with the row count: from 18 to 34
rows on, depending on the SmolLM2 weight shape, a row comes out a rounding step different from the same row alone,
so verifying a tree of more than ~16 nodes could change the decoded text. oneDNN's linear on weights packed once
at load agreed with the one-row result for every row count up to 149 on every SmolLM2 shape, and it is faster
than F.linear at any row count (no per-call weight reordering; 576x1536, 16 rows: 87 vs 110 us on 2 threads).

So each bf16 linear on CPU packs its weight once and runs in blocks of at most `block` rows, a size checked at load
for each weight shape: probe rows computed alone must come out the same inside calls of up to `block` rows (the
block halves until they do; one row at a time is invariant by construction). Where packing is unavailable
(torch built without oneDNN) the same check runs on F.linear.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

MAX_BLOCK = 128  # rows per call; prefills run in blocks of this many rows
PROBE_ROWS = (2, 3, 5, 8, 13, 17, 24, 33, 48, 65, 96, 128)  # row counts the load-time check compares

Kernel = Callable[[torch.Tensor], torch.Tensor]


def _kernel(linear: torch.nn.Linear) -> Kernel:
    """oneDNN's linear on a weight packed once, or F.linear where that is unavailable."""
    weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        kernel = lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")  # noqa: E731
        kernel(weight.new_zeros(1, weight.shape[1]))
        return kernel
    except (AttributeError, RuntimeError):
        return lambda x: F.linear(x, weight, bias)


def invariant_block(kernel: Kernel, in_features: int, dtype: torch.dtype, limit: int = MAX_BLOCK) -> int:
    """The largest block (a power of two <= limit) within which the probe rows come out as they do alone."""
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(limit, in_features, generator=gen).to(dtype)
    alone = torch.cat([kernel(probe[i:i + 1]) for i in range(limit)])
    block = limit
    while block > 1 and not all(torch.equal(kernel(probe[:n]), alone[:n]) for n in PROBE_ROWS if n <= block):
        block //= 2
    return block


def _forward(kernel: Kernel, block: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        if len(rows) <= block:
            out = kernel(rows)
        else:
            out = torch.cat([kernel(rows[i:i + block]) for i in range(0, len(rows), block)])
        return out.view(*x.shape[:-1], out.shape[-1])
    return forward  # a closure, not a bound method: deep-copying the module copies no packed (opaque) weight


@torch.inference_mode()
def use_invariant_linears(model: torch.nn.Module) -> dict[tuple[int, int], int]:
    """Give every bf16 nn.Linear of a CPU model a packed kernel run in checked blocks; returns the block per
    weight shape. The frozen target's weights must not change afterwards (the packed copies would not follow)."""
    blocks: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if type(module) is not torch.nn.Linear or module.weight.dtype != torch.bfloat16 \
                or module.weight.device.type != "cpu":
            continue
        kernel = _kernel(module)
        shape = tuple(module.weight.shape)
        if shape not in blocks:
            blocks[shape] = invariant_block(kernel, module.in_features, module.weight.dtype)
        module.forward = _forward(kernel, blocks[shape])
    return blocks
