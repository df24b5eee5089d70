"""koala's C kernels alone, at a decode step's shapes: is a forward's cost the hardware's or the kernels'?

    .venv/bin/python scripts/bench_kernels.py --threads 2

attention: one call per layer over --layers layers' own KV caches (so each call reads its cache from memory, as a
forward does), 9 query heads on 3 KV heads of 64 (SmolLM2-135M), `rows` query rows (1: a plain step; 5: a 4-node
tree with its pending token) over `context` cached keys. linear: weights of a decoder layer's shapes and the LM
head, packed as the target packs them (bf16, and on the AVX-512 build GGUF Q4_1 and Q8_0 codes: koala.gguf_codes),
as many copies as fill ~120 MB of bf16, so the weights stream from memory; GB/s is packed bytes over time, to set beside the machine's memory bandwidth (a copy of 200 MB, read + write, is timed
too). Each cell is the fastest of --repeats back-to-back runs after one warm-up (shapes are not interleaved, so a
burst of load from another process moves single cells: time it alone).
"""
from __future__ import annotations

import argparse
import time

import torch

from koala import cpu_kernels


def fastest(job, repeats: int) -> float:
    job()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        job()
        best = min(best, time.perf_counter() - start)
    return best


def attention(contexts: list[int], rows: list[int], layers: int, repeats: int) -> None:
    print("| attention, ms per forward | " + " | ".join(f"{r} row{'s' * (r > 1)}" for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for context in contexts:
        k = torch.randn(layers, 1, 3, context, 64)
        v = torch.randn(layers, 1, 3, context, 64)
        cells = []
        for r in rows:
            q = torch.randn(1, 9, r, 64)
            mask = torch.zeros(1, 1, r, context) if r > 1 else None

            def job():
                for layer in range(layers):
                    cpu_kernels.attention(q, k[layer], v[layer], mask, 0.125)
            cells.append(f"{1000 * fastest(job, repeats):.2f}")
        print(f"| {context} cached keys | " + " | ".join(cells) + " |")


def _kernels(n: int, k: int, weights: str, copies: int) -> list:
    """`copies` kernels of an (n, k) random weight: on bf16 weights, or on GGUF codes of one (koala.gguf_codes)."""
    if weights == "bf16":
        return [cpu_kernels.linear_kernel(torch.randn(n, k).bfloat16(), None) for _ in range(copies)]
    from gguf import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize

    qtype, kind = {"Q4_1": (T.Q4_1, cpu_kernels.Q4), "Q8_0": (T.Q8_0, cpu_kernels.Q8)}[weights]
    blocks = quantize(torch.randn(n, k).numpy(), qtype)
    weight = torch.from_numpy(dequantize(blocks, qtype).reshape(n, k).copy()).bfloat16()
    blocks = torch.from_numpy(blocks.reshape(n, -1).copy())
    return [cpu_kernels.codes_kernel(blocks, kind, weight, None) for _ in range(copies)]


def linear(rows: list[int], repeats: int) -> None:
    shapes = {"q/o 576x576": (576, 576), "gate/up 1536x576": (1536, 576), "down 576x1536": (576, 1536),
              "LM head 49152x576": (49152, 576)}
    coded = cpu_kernels.isa() == "avx512"
    print("\n| linear, us per call (GB/s of the bytes read) | " + " | ".join(f"{r} row{'s' * (r > 1)}" for r in rows)
          + " |")
    print("|---|" + "---|" * len(rows))
    for (name, (n, k)), weights in ((s, w) for s in shapes.items() for w in ("bf16", "Q4_1", "Q8_0")
                                    if w == "bf16" or coded):
        copies = max(2, int(120e6 // (n * k * 2)))
        kernels = _kernels(n, k, weights, copies)
        size = kernels[0].packed.numel()  # bytes; coded weights keep bf16 panels after the codes for wide calls
        if weights != "bf16":
            size -= cpu_kernels.library().koala_packed_bytes(cpu_kernels.KINDS[torch.bfloat16], n, k)
        cells = []
        for r in rows:
            x = torch.randn(r, k).bfloat16()
            seconds = fastest(lambda: [w(x) for w in kernels], repeats) / copies
            cells.append(f"{1e6 * seconds:.0f} ({size / seconds / 1e9:.1f})")
        print(f"| {name}, {weights} | " + " | ".join(cells) + " |")
    a = torch.ones(100_000_000, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    print(f"\nmemory: a 200 MB copy moves {4e8 / fastest(lambda: b.copy_(a), repeats) / 1e9:.1f} GB/s (read + write)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")], default=[128, 700])
    ap.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[1, 5, 7, 9])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if cpu_kernels.library() is None:
        raise SystemExit(f"koala's C kernels are unavailable here: {cpu_kernels.why()}")
    torch.manual_seed(0)
    attention(args.contexts, args.rows, args.layers, args.repeats)
    linear(args.rows, args.repeats)


if __name__ == "__main__":
    main()
