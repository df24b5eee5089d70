"""koala's own C kernels for x86 CPUs (AVX2 + FMA), compiled on first use with the system's C compiler.

Kernels whose result for a row does not depend on the other rows of the call, by construction
(kernels/cpu_kernels.c says how): `linear_kernel` (y = x W^T + b for fp32, bf16 and fp16 weights, packed once into
k-major panels), `attention` (fp32, any additive mask, GQA) and `use_kernel_norms` (Llama-style RMSNorm in one
call). BLAS libraries and SDPA pick blocking by shape, so a row verified beside n draft tokens comes out a rounding
step different from the same row alone (measured on an AMD EPYC: every fp32 row of SmolLM2 differs), which breaks
lossless verification. These kernels are also faster than F.linear and than the float64 attention they replace
(docs/benchmark.md).

On CPUs with AVX-512 BF16 (AMD Zen 4/5, Intel Sapphire Rapids and later) the library is built for AVX-512: the
linear runs 16 lanes wide, and bf16 x bf16 products run in vdpbf16ps (twice the products per instruction; a
different fixed chain, still row-invariant). KOALA_AVX512=0 builds the AVX2 library instead (`isa()` says which).

The shared library is cached under KOALA_HOME/kernels, keyed by the source and flags. Where it cannot be built
(no compiler, a CPU without AVX2/FMA/F16C, not Linux) or KOALA_KERNELS=0, `library()` returns None, `why()` says
why, and callers fall back to torch's kernels.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import torch

from koala.home import cache_dir

SOURCE = Path(__file__).with_name("kernels") / "cpu_kernels.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off", "-Wall", "-Werror", "-shared", "-fPIC")
AVX512_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512bf16")
AVX512_CPU = {"avx512f", "avx512bw", "avx512_bf16"}
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
Q4, Q8 = 3, 4  # packed coded weights (codes_kernel): a GGUF's Q4_1 and Q8_0 blocks
BLOCK_BYTES = {Q4: 20, Q8: 34}  # bytes of one GGUF block of 32 weights
_why: list[str] = []


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def _flag_sets() -> list[tuple[str, ...]]:
    """The builds to try on this CPU, best first: AVX-512 (with BF16) where it has them, then AVX2."""
    wide = AVX512_CPU <= _cpu_flags() and os.environ.get("KOALA_AVX512", "1") != "0"
    return [FLAGS + AVX512_FLAGS, FLAGS] if wide else [FLAGS]


def _key(flags: tuple[str, ...] = FLAGS) -> str:
    return hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]


def _compile(flags: tuple[str, ...]) -> Path:
    """Compile the kernels with these flags (once per source and flags) and return the shared library's path."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    out = cache_dir() / "kernels" / f"cpu_kernels-{_key(flags)}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, out)  # atomic: a process loading it never sees half a file
    return out


def _build() -> tuple[Path, tuple[str, ...]]:
    """The library for this CPU and the flags it was built with: the first flag set that compiles (an older
    compiler may not know the AVX-512 BF16 intrinsics)."""
    sets = _flag_sets()
    for flags in sets[:-1]:
        try:
            return _compile(flags), flags
        except (RuntimeError, subprocess.SubprocessError):
            continue
    return _compile(sets[-1]), sets[-1]


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they are unavailable (see `why`)."""
    if os.environ.get("KOALA_KERNELS", "1") == "0":
        _why.append("KOALA_KERNELS=0")
        return None
    missing = {"avx2", "fma", "f16c"} - _cpu_flags()
    if missing:
        _why.append(f"this CPU lacks {', '.join(sorted(missing))} (or is not Linux)")
        return None
    try:
        path, flags = _build()
        lib = ctypes.CDLL(str(path))  # after torch: the kernels share torch's OpenMP runtime and threads
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _why.append(f"could not build them: {e}")
        warnings.warn(f"koala's C kernels are unavailable ({_why[-1]}); using torch's kernels, which are slower on "
                      f"some CPUs and need a row-by-row check to stay lossless", stacklevel=2)
        return None
    lib.koala_linear.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    lib.koala_linear.restype = ctypes.c_int
    lib.koala_isa.restype = ctypes.c_int
    lib.key = _key(flags)
    lib.koala_pack.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    lib.koala_pack.restype = None
    lib.koala_pack_codes.argtypes = lib.koala_unpack_codes.argtypes = ([ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
                                                                        + [ctypes.c_int64] * 2)
    lib.koala_pack_codes.restype = lib.koala_unpack_codes.restype = ctypes.c_int
    lib.koala_packed_bytes.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    lib.koala_packed_bytes.restype = ctypes.c_int64
    lib.koala_rmsnorm.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int, ctypes.c_float, ctypes.c_void_p,
                                                          ctypes.c_int64, ctypes.c_int64]
    lib.koala_rmsnorm.restype = None
    pointers, sizes = [ctypes.c_void_p], [ctypes.c_int64]
    kinds = [ctypes.c_int] * 2  # rows' kind, weights' kind
    lib.koala_attn_in.argtypes = (pointers + kinds + pointers + [ctypes.c_float] + pointers * 8
                                  + [ctypes.c_int] + pointers * 3 + sizes * 6)
    lib.koala_attn_out.argtypes = (pointers + kinds + pointers * 5 + [ctypes.c_float] + pointers * 6
                                   + sizes * 4)
    lib.koala_mlp_out.argtypes = pointers + kinds + pointers * 3 + sizes * 3
    lib.koala_attn_in.restype = lib.koala_attn_out.restype = lib.koala_mlp_out.restype = ctypes.c_int
    lib.koala_attention.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 10 + [ctypes.c_float]
    lib.koala_attention.restype = None
    lib.koala_layers.argtypes = (pointers + sizes + pointers + kinds + pointers * 2 + [ctypes.c_int] + pointers
                                 + sizes * 8 + [ctypes.c_float])
    lib.koala_layers.restype = ctypes.c_int
    lib.koala_soft_ce.argtypes = pointers + [ctypes.c_int] + pointers * 3 + sizes * 2
    lib.koala_soft_ce_grad.argtypes = pointers + [ctypes.c_int] + pointers * 2 + [ctypes.c_float] + pointers + sizes * 2
    lib.koala_softmax_entropy.argtypes = pointers * 2 + sizes * 2
    lib.koala_soft_ce.restype = lib.koala_soft_ce_grad.restype = lib.koala_softmax_entropy.restype = None
    return lib


def version() -> str:
    """Which kernels run here (a hash of their source and flags, or 'torch'): timings measured with other kernels
    do not apply."""
    lib = library()
    return lib.key if lib is not None else "torch"


def isa() -> str:
    """The instruction set koala's linear runs here: 'avx512' (with BF16 dot products), 'avx2', or 'torch'."""
    lib = library()
    return "torch" if lib is None else {512: "avx512", 256: "avx2"}[lib.koala_isa()]


def why() -> str:
    """Why `library()` is None ('' when it is not)."""
    library()
    return "; ".join(_why)


def linear_kernel(weight: torch.Tensor, bias: torch.Tensor | None):
    """x (M, K) -> x W^T + b (M, N) in x's dtype (fp32, bf16 or fp16; others in fp32), row-invariant; None if
    unavailable here. The kernel reads a copy of the weight packed now (as much memory again as the weight)."""
    lib = library()
    if lib is None or weight.device.type != "cpu" or weight.dtype not in KINDS or weight.dim() != 2:
        return None
    weight = weight.detach().contiguous()
    kind, (n, k) = KINDS[weight.dtype], weight.shape
    packed = torch.empty(lib.koala_packed_bytes(kind, n, k), dtype=torch.uint8)
    lib.koala_pack(weight.data_ptr(), kind, packed.data_ptr(), n, k)
    bias = None if bias is None else bias.detach().float().contiguous()
    bias_ptr = None if bias is None else bias.data_ptr()

    def run(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """out_dtype (fp32, bf16, fp16; default x's dtype): e.g. fp32 logits from bf16 rows, unrounded."""
        rows = (x if x.dtype in KINDS else x.float()).contiguous()
        out = torch.empty(rows.shape[0], n, dtype=out_dtype or rows.dtype)
        if lib.koala_linear(rows.data_ptr(), KINDS[rows.dtype], packed.data_ptr(), kind, bias_ptr, out.data_ptr(),
                            KINDS[out.dtype], rows.shape[0], n, k):
            raise MemoryError(f"koala_linear could not allocate {rows.shape[0]} x {k} floats")
        return out

    run.packed, run.bias, run.kind = packed, bias, kind  # keep the buffers alive; koala.fused_layer reads them
    return run


def codes_kernel(blocks: torch.Tensor, kind: int, weight: torch.Tensor, bias: torch.Tensor | None):
    """The bf16 linear of `weight` read from codes: `blocks` (N, K / 32 * BLOCK_BYTES[kind]) uint8 are the weight's
    GGUF blocks (Q4: Q4_1, Q8: Q8_0; rows in the weight's order), from which a bf16 weight came by dequantising and
    rounding. The kernel gives bf16 rows exactly `linear_kernel(weight)`'s bits (the same chain on the same values)
    reading 6 or 9 bits a weight instead of 16 (kernels/cpu_kernels.c, "Coded weights"). None unless the AVX-512
    build runs here and the codes rebuild `weight` bit for bit. Rows of another dtype take F.linear (a bf16 target
    never sends any)."""
    if weight.dtype != torch.bfloat16 or weight.dim() != 2 or blocks.shape[0] != weight.shape[0]:
        return None
    packed, values = _pack_codes(blocks, kind, weight.shape[1])
    if packed is None or not torch.equal(values, weight):
        return None
    lib, (n, k) = library(), weight.shape
    weight = weight.detach().contiguous()
    bf16 = KINDS[torch.bfloat16]  # wide calls read the bf16 panels of the same values, kept after the codes
    lib.koala_pack(weight.data_ptr(), bf16, packed.data_ptr() + packed.numel() - lib.koala_packed_bytes(bf16, n, k),
                   n, k)
    bias = None if bias is None else bias.detach().float().contiguous()
    bias_ptr = None if bias is None else bias.data_ptr()

    def run(x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        rows = x.contiguous()
        out = torch.empty(rows.shape[0], n, dtype=out_dtype or rows.dtype)
        if lib.koala_linear(rows.data_ptr(), KINDS[rows.dtype], packed.data_ptr(), kind, bias_ptr, out.data_ptr(),
                            KINDS[out.dtype], rows.shape[0], n, k):
            raise MemoryError(f"koala_linear could not allocate {rows.shape[0]} x {k} floats")
        return out

    run.packed, run.bias, run.kind = packed, bias, kind
    return run


def codes_run_here() -> bool:
    """Whether codes_kernel can run here (it needs koala's AVX-512 build)."""
    lib = library()
    return lib is not None and lib.koala_isa() == 512


def _pack_codes(blocks: torch.Tensor, kind: int, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """GGUF blocks (N, k / 32 * BLOCK_BYTES[kind]) -> (packed weight with the coded panels written, the bf16 (N, k)
    weight the kernel reads from them), or (None, None) where the kernel does not run here or the shapes do not
    fit."""
    lib = library()
    n = blocks.shape[0]
    if (not codes_run_here() or kind not in BLOCK_BYTES or blocks.dtype != torch.uint8 or k % 32
            or tuple(blocks.shape) != (n, k // 32 * BLOCK_BYTES[kind])):
        return None, None
    blocks = blocks.contiguous()
    packed = torch.empty(lib.koala_packed_bytes(kind, n, k), dtype=torch.uint8)
    values = torch.empty(n, k, dtype=torch.bfloat16)
    if lib.koala_pack_codes(blocks.data_ptr(), kind, packed.data_ptr(), n, k) or lib.koala_unpack_codes(
            packed.data_ptr(), kind, values.data_ptr(), n, k):
        return None, None
    return packed, values


def code_values(blocks: torch.Tensor, kind: int, k: int) -> torch.Tensor | None:
    """The bf16 (N, k) weight GGUF blocks of `kind` stand for, as codes_kernel reads it (None where that kernel
    does not run here)."""
    return _pack_codes(blocks, kind, k)[1]


def _rmsnorm_kernel(norm: torch.nn.Module):
    """A forward for a Llama-style RMSNorm module (weight * (x / rms(x)), eps in `variance_epsilon` or `eps`) in
    the weight's dtype, or None where the module is not one (checked against its own forward on a probe)."""
    lib = library()
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if (lib is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.dtype not in KINDS
            or weight.device.type != "cpu" or not isinstance(eps, float)):
        return None
    weight = weight.detach().contiguous()
    kind, k = KINDS[weight.dtype], weight.shape[0]

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != weight.dtype:
            return own(x)
        rows = x.reshape(-1, k).contiguous()
        out = torch.empty_like(rows)
        lib.koala_rmsnorm(rows.data_ptr(), weight.data_ptr(), kind, eps, out.data_ptr(), rows.shape[0], k)
        return out.view(x.shape)

    forward.weight, forward.eps = weight, eps  # for koala.fused_layer
    own = type(norm).forward.__get__(norm)  # the class's own, even if this module was patched before
    probe = torch.randn(4, k, generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    tol = 1e-5 if weight.dtype == torch.float32 else 2e-2
    return forward if torch.allclose(forward(probe).float(), own(probe).float(), rtol=tol, atol=tol) else None


@torch.inference_mode()
def use_kernel_norms(model: torch.nn.Module) -> int:
    """Give every Llama-style RMSNorm of a frozen CPU model the C kernel (one call instead of ~8 tensor ops, ~4 ms
    of a SmolLM2 step on an AMD EPYC); returns how many were replaced. Rows stay invariant (see the kernel)."""
    count = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and (forward := _rmsnorm_kernel(module)) is not None:
            module.forward = forward
            count += 1
    return count


def attention_mask(mask: torch.Tensor | None, b: int, q: int, length: int) -> torch.Tensor | None:
    """A (B or 1, 1, q, L) boolean ("may attend") or additive mask as koala_attention reads it: additive fp32
    (B, 1, q, L), contiguous (None stays None: causal). The per-layer attention and koala.fused_body both use it."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    return mask.float().expand(b, 1, q, length).contiguous()


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """query (B, H, q, D) any float dtype; key/value (B, KVH, L, D) fp32 with contiguous rows (a cache's views);
    mask (B, 1, q, L) boolean or additive, or None (causal, the queries being the last q positions) -> (B, q, H, D)
    fp32. Needs `library()`."""
    b, heads, q, d = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    if key.stride(-1) != 1 or key.stride(-2) != d or value.stride(-1) != 1 or value.stride(-2) != d:
        key, value = key.contiguous(), value.contiguous()
    query = query.float().contiguous()
    mask = attention_mask(mask, b, q, length)
    out = torch.empty(b, q, heads, d)
    library().koala_attention(query.data_ptr(), key.data_ptr(), value.data_ptr(),
                              None if mask is None else mask.data_ptr(), out.data_ptr(), b, heads, kv_heads, q,
                              length, d, key.stride(0), key.stride(1), value.stride(0), value.stride(1), scale)
    return out


def soft_ce_rows(z: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(logsumexp(z), <p, z>) per row of CPU logits z (N, V; fp32/bf16/fp16) and fp32 probabilities p, in one
    read of each; None where the kernels are unavailable or the tensors do not fit them."""
    lib = library()
    if (lib is None or z.device.type != "cpu" or z.dtype not in KINDS or p.dtype != torch.float32 or z.dim() != 2
            or p.shape != z.shape):
        return None
    z, p = z.contiguous(), p.contiguous()
    lse, pz = torch.empty(len(z)), torch.empty(len(z))
    lib.koala_soft_ce(z.data_ptr(), KINDS[z.dtype], p.data_ptr(), lse.data_ptr(), pz.data_ptr(), *z.shape)
    return lse, pz


def soft_ce_grad(z: torch.Tensor, p: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * (softmax(z) - p) in z's dtype, for the tensors `soft_ce_rows` accepted."""
    z, p = z.contiguous(), p.contiguous()
    g = torch.empty_like(z)
    library().koala_soft_ce_grad(z.data_ptr(), KINDS[z.dtype], p.data_ptr(), lse.contiguous().data_ptr(), scale,
                                 g.data_ptr(), *z.shape)
    return g


def softmax_entropy_(z: torch.Tensor) -> torch.Tensor | None:
    """Contiguous fp32 CPU logits (N, V) -> softmax in place; returns each row's entropy (None, z untouched, where
    the kernels are unavailable)."""
    lib = library()
    if lib is None or z.device.type != "cpu" or z.dtype != torch.float32 or z.dim() != 2 or not z.is_contiguous():
        return None
    entropy = torch.empty(len(z))
    lib.koala_softmax_entropy(z.data_ptr(), entropy.data_ptr(), *z.shape)
    return entropy
