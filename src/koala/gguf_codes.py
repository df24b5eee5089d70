"""The codes behind a GGUF target's weights, for koala's coded-weight kernel (koala.cpu_kernels.codes_kernel).

SmolLM2 ships as a GGUF: its layers' linears as Q4_1 (each block of 32 weights of a row is 4-bit codes with an
fp16 scale and offset) and its LM head as Q8_0 (int8 codes, fp16 scale), and the bf16 target holds exactly those
values rounded to bf16. A one-token bf16 step streams every weight from memory (about 270 MB), so the linears read
the codes instead, 6 or 9 bits a weight, and compute with the very same bf16 values: the output is bit for bit the
bf16 kernel's, and nothing about losslessness changes. Each tensor is matched to its module by llama.cpp's tensor
names (Llama-family layers and the LM head), and its rows to the module's rows by their values (transformers
permutes q and k rows when it loads a GGUF); a tensor whose codes do not rebuild the module's weight exactly keeps
the bf16 kernel.
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import torch

from koala.cpu_kernels import BLOCK_BYTES, Q4, Q8, code_values, codes_run_here

# transformers' module name -> llama.cpp's tensor name, per decoder layer
LLAMA_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
_LAYER = re.compile(r"layers\.(\d+)\.(" + "|".join(re.escape(k) for k in LLAMA_NAMES) + r")$")
HEAD_NAMES = ("output.weight", "token_embd.weight")  # the LM head's own tensor, else the tied embedding


def _tensor_names(name: str) -> tuple[str, ...]:
    """The GGUF tensors that may hold module `name`'s weight, in the order to try."""
    if name.split(".")[-1] == "lm_head":
        return HEAD_NAMES
    match = _LAYER.search(name)
    return (f"blk.{match[1]}.{LLAMA_NAMES[match[2]]}.weight",) if match else ()


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # GGUF kv types
_STRING, _ARRAY = 8, 9
GGML_TYPES = {3: Q4, 8: Q8}  # GGML tensor types Q4_1 and Q8_0 -> kernel kinds


def coded_tensors(path: Path) -> dict[str, tuple[int, np.ndarray]]:
    """{tensor name: (kind, blocks (rows, bytes per row) uint8, memory-mapped)} for a GGUF file's Q4_1 and Q8_0
    tensors. Reads only the header's sizes (gguf-py's reader decodes the whole vocabulary, ~5 s for SmolLM2)."""
    with open(path, "rb") as f:
        head = f.read(24)
        if head[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        _, tensors, kvs = struct.unpack("<IQQ", head[4:])

        def read(fmt: str):
            return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(read("Q")).decode("utf-8", "replace")

        def skip(kind: int):
            if kind == _STRING:
                f.seek(read("Q"), 1)
            elif kind == _ARRAY:
                item, count = read("I"), read("Q")
                if item in _SCALARS:
                    f.seek(count * struct.calcsize(_SCALARS[item]), 1)
                else:
                    for _ in range(count):
                        skip(item)
            else:
                f.seek(struct.calcsize(_SCALARS[kind]), 1)

        alignment = 32
        for _ in range(kvs):
            key, kind = string(), read("I")
            if key == "general.alignment" and kind == 4:
                alignment = read("I")
            else:
                skip(kind)
        infos = []
        for _ in range(tensors):
            name, dims = string(), read("I")
            shape = [read("Q") for _ in range(dims)]
            infos.append((name, shape, read("I"), read("Q")))
        start = -(-f.tell() // alignment) * alignment
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, shape, ggml_type, offset in infos:
        if ggml_type in GGML_TYPES and shape[0] % 32 == 0:
            kind, rows = GGML_TYPES[ggml_type], int(np.prod(shape[1:]))
            width = shape[0] // 32 * BLOCK_BYTES[kind]
            out[name] = kind, data[start + offset:start + offset + rows * width].reshape(rows, width)
    return out


def gguf_codes(model: torch.nn.Module, gguf: Path) -> dict[str, tuple[int, torch.Tensor]]:
    """{module name: (kind, its weight's GGUF blocks (N, K / 32 * block bytes) uint8, rows in the module's order)}
    for the linears of a bf16 `model` loaded from `gguf` whose codes rebuild their weight exactly (empty where the
    coded kernel does not run here)."""
    if not codes_run_here():
        return {}
    tensors = coded_tensors(gguf)
    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or weight.dtype != torch.bfloat16:
            continue
        found = next((tensors[t] for t in _tensor_names(name) if t in tensors), None)
        if found is None:
            continue
        kind, blocks = found[0], torch.from_numpy(np.array(found[1]))
        rows = _row_order(blocks, kind, weight.detach())
        if rows is not None:
            out[name] = kind, blocks[rows]
    return out


def _row_order(blocks: torch.Tensor, kind: int, weight: torch.Tensor) -> torch.Tensor | None:
    """Which block row holds each weight row, or None if some weight row is not there."""
    if blocks.shape[0] != weight.shape[0]:
        return None
    values = code_values(blocks, kind, weight.shape[1])
    if values is None:
        return None
    if torch.equal(values, weight):
        return torch.arange(len(weight))
    where = {row.tobytes(): i for i, row in enumerate(values.view(torch.int16).numpy())}
    rows = [where.get(row.tobytes()) for row in weight.view(torch.int16).numpy()]
    return None if None in rows else torch.tensor(rows)
