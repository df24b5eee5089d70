"""CPU linears whose result for a row does not depend on how many rows share the call: lossless verification.

Speculative decoding is lossless only if a verify forward of n tokens gives each token the bits a one-token step
gives it. torch's CPU linears do not: BLAS and oneDNN pick kernels and blocking by shape, so a row computed beside
others comes out a rounding step away from the same row alone (bf16 F.linear on a Xeon from 18-34 rows on; fp32
F.linear on an AMD EPYC from 2 rows on), and near-tied argmaxes flip.

So every linear of a CPU target gets a kernel chosen once at load, in this order: oneDNN's linear on a bf16 weight
packed once, on CPUs with AMX only (fast, and invariant up to 149 rows as measured on a Xeon; on an AMD Zen 5 with
AVX-512 BF16 but no AMX its rows drifted even inside the 4-row calls the load-time check allowed, and bf16 greedy
answers left plain decoding's), koala's own C kernel (koala.cpu_kernels: invariant at any row count by
construction, fp32/bf16/fp16), else F.linear. Whatever the kernel, it runs in blocks of at most `block` rows, a
size checked at load for each weight shape: probe rows computed alone must come out the same inside calls of up to
`block` rows (the block halves until they do; one row at a time is invariant by construction).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from koala.cpu_kernels import codes_kernel, linear_kernel

MAX_BLOCK = 128  # rows per call; prefills run in blocks of this many rows
PROBE_ROWS = (2, 3, 5, 8, 13, 17, 24, 33, 48, 65, 96, 128)  # row counts the load-time check compares

Kernel = Callable[[torch.Tensor], torch.Tensor]


def amx_bf16() -> bool:
    """Whether this CPU multiplies bf16 in AMX tiles: there a bf16 verify of 1-32 tokens costs about one plain step."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check is not None and check())


def bf16_units() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX-512 BF16). Without them torch emulates bf16
    matmuls: bf16 autocast made head training ~45x slower on an AVX2-only AMD EPYC (44 vs 1,965 tok/s)."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return amx_bf16() or bool(check is not None and check())


def _onednn_bf16(weight: torch.Tensor, bias: torch.Tensor | None) -> Kernel | None:
    """oneDNN's linear on a bf16 weight packed once (no per-call reordering), on AMX CPUs: the only kind where its
    rows were measured independent of the row count (see the module docstring)."""
    if weight.dtype != torch.bfloat16 or not amx_bf16():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        kernel = lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")  # noqa: E731
        kernel(weight.new_zeros(1, weight.shape[1]))
        return kernel
    except (AttributeError, RuntimeError):  # torch without oneDNN, or a CPU without bf16 instructions
        return None


@functools.cache
def bf16_backend() -> str:
    """Which kernel a CPU bf16 linear gets here: 'onednn' (packed; AMX CPUs), 'koala' (the C kernel), or
    'torch' (F.linear)."""
    weight = torch.zeros(8, 8, dtype=torch.bfloat16)
    if _onednn_bf16(weight, None) is not None:
        return "onednn"
    return "koala" if linear_kernel(weight, None) is not None else "torch"


def _kernel(linear: torch.nn.Module, codes: tuple[int, torch.Tensor] | None = None) -> Kernel:
    """The first available of: koala's C kernel on the weight's codes ((kind, GGUF blocks) that rebuild it
    exactly; koala.gguf_codes), packed oneDNN bf16, koala's C kernel, F.linear."""
    bias = getattr(linear, "bias", None)
    weight, bias = linear.weight.detach(), None if bias is None else bias.detach()
    return ((codes is not None and codes_kernel(codes[1], codes[0], weight, bias)) or _onednn_bf16(weight, bias)
            or linear_kernel(weight, bias) or (lambda x: F.linear(x, weight, bias)))


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
    forward.kernel = kernel  # koala.fused_layer calls koala's C kernels directly
    return forward  # a closure, not a bound method: deep-copying the module copies no packed (opaque) weight


def c_kernel(module: torch.nn.Module) -> Callable | None:
    """The koala C kernel behind a linear `use_invariant_linears` patched (its `packed`, `kind` and `bias` are what
    callers read), or None (not patched, or oneDNN / F.linear behind it)."""
    kernel = getattr(getattr(module, "forward", None), "kernel", None)
    return kernel if getattr(kernel, "packed", None) is not None else None


@torch.inference_mode()
def use_invariant_linears(model: torch.nn.Module, codes: dict[str, tuple[int, torch.Tensor]] | None = None
                          ) -> dict[tuple[int, int], int]:
    """Give every nn.Linear of a frozen CPU model (and every module that computes F.linear(x, self.weight) and says
    so with `frozen_linear = True`, like a draft LM head) a row-invariant kernel run in checked blocks; returns the
    block per weight shape. `codes`: {module name: (kind, GGUF blocks of its weight)} (see _kernel; a kernel on them
    gives the bf16 kernel's bits, so shares its block). The weights must not change afterwards (the kernels read
    them, or packed copies)."""
    blocks: dict[tuple[int, int], int] = {}
    codes = codes or {}
    for name, module in model.named_modules():
        linear = type(module) is torch.nn.Linear or getattr(module, "frozen_linear", False)
        if not linear or module.weight.device.type != "cpu":
            continue
        kernel = _kernel(module, codes.get(name))
        shape = tuple(module.weight.shape)
        if shape not in blocks:
            blocks[shape] = invariant_block(kernel, shape[1], module.weight.dtype)
        module.forward = _forward(kernel, blocks[shape])
    return blocks
