"""The 4-bit codes behind a GGUF target's weights, for koala's Q4 kernel (koala.cpu_kernels.q4_kernel).

SmolLM2 ships as a Q4_1 GGUF: each block of 32 weights of a row is 4-bit codes with an fp16 scale and offset, and
the bf16 target holds exactly those values rounded to bf16. A one-token bf16 step streams every weight from memory
(about 270 MB, which bounds it on two cores), so the linears read the codes instead, 6 bits a weight, and compute
with the very same bf16 values: the output is bit for bit the bf16 kernel's, and nothing about losslessness
changes. Each tensor is matched to its module by the llama.cpp tensor names (Llama-family layers), and its rows to
the module's rows by their values (transformers permutes q and k rows when it loads a GGUF); a tensor whose codes
do not rebuild the module's weight exactly keeps the bf16 kernel.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from koala.cpu_kernels import q4_values

# transformers' module name -> llama.cpp's tensor name, per decoder layer
LLAMA_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
_LAYER = re.compile(r"layers\.(\d+)\.(" + "|".join(re.escape(k) for k in LLAMA_NAMES) + r")$")


def q4_blocks(model: torch.nn.Module, gguf: Path) -> dict[str, torch.Tensor]:
    """{module name: its weight's Q4_1 blocks (N, K / 32 * 20) uint8, rows in the module's order} for the linears
    of a bf16 `model` loaded from `gguf` whose codes rebuild their weight exactly (empty where the Q4 kernel does
    not run here)."""
    from gguf import GGMLQuantizationType, GGUFReader

    if q4_values(torch.zeros(1, 20, dtype=torch.uint8), 32) is None:
        return {}
    tensors = {t.name: t for t in GGUFReader(gguf).tensors if t.tensor_type == GGMLQuantizationType.Q4_1}
    out = {}
    for name, module in model.named_modules():
        match = _LAYER.search(name)
        weight = getattr(module, "weight", None)
        tensor = match and tensors.get(f"blk.{match[1]}.{LLAMA_NAMES[match[2]]}.weight")
        if tensor is None or weight is None or weight.dtype != torch.bfloat16 or weight.dim() != 2:
            continue
        blocks = torch.from_numpy(np.array(tensor.data, dtype=np.uint8).reshape(tensor.data.shape[0], -1))
        rows = _row_order(blocks, weight.detach())
        if rows is not None:
            out[name] = blocks[rows]
    return out


def _row_order(blocks: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """Which block row holds each weight row, or None if some weight row is not there."""
    if blocks.shape[0] != weight.shape[0]:
        return None
    values = q4_values(blocks, weight.shape[1])
    if values is None:
        return None
    if torch.equal(values, weight):
        return torch.arange(len(weight))
    where = {row.tobytes(): i for i, row in enumerate(values.view(torch.int16).numpy())}
    rows = [where.get(row.tobytes()) for row in weight.view(torch.int16).numpy()]
    return None if None in rows else torch.tensor(rows)
