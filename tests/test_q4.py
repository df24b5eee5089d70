"""Linears on a GGUF target's 4-bit codes: the bf16 kernel's bits from a third of the bytes, or not used at all."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from koala import cpu_kernels
from koala.decode import generate
from koala.drafters import PromptLookupDrafter
from koala.gguf_codes import LLAMA_NAMES, q4_blocks
from koala.invariant_linear import c_kernel
from koala.target import Target

from conftest import tiny_target

Q4_1 = GGMLQuantizationType.Q4_1
pytestmark = pytest.mark.skipif(cpu_kernels.isa() != "avx512", reason="the Q4 kernel needs the AVX-512 build")


def _q4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q4_1 blocks of a weight, the bf16 weight they stand for), as a GGUF file and its bf16 target hold them."""
    blocks = quantize(weight.float().numpy(), Q4_1)
    values = torch.from_numpy(dequantize(blocks, Q4_1).reshape(weight.shape).copy()).to(torch.bfloat16)
    return torch.from_numpy(blocks.reshape(weight.shape[0], -1).copy()), values


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17, 40])
def test_the_q4_kernel_gives_the_bf16_kernels_bits(rows):
    torch.manual_seed(rows)
    blocks, weight = _q4(torch.randn(80, 96) * 0.1)
    bias = torch.randn(80).to(torch.bfloat16)
    x = torch.randn(rows, 96).to(torch.bfloat16)
    assert torch.equal(cpu_kernels.q4_values(blocks, 96), weight)
    codes, plain = cpu_kernels.q4_kernel(blocks, weight, bias), cpu_kernels.linear_kernel(weight, bias)
    assert codes.kind == cpu_kernels.Q4 and codes.packed.numel() < plain.packed.numel() / 2
    assert torch.equal(codes(x), plain(x)) and torch.equal(codes(x, torch.float32), plain(x, torch.float32))
    assert torch.equal(codes(x)[:1], codes(x[:1]))  # a row alone has its bits inside any call


def test_codes_that_do_not_rebuild_the_weight_are_refused():
    blocks, weight = _q4(torch.randn(32, 64))
    nudged = weight.clone()
    nudged.view(torch.int16)[5, 7] += 1  # one bf16 rounding step
    assert cpu_kernels.q4_kernel(blocks, nudged, None) is None and cpu_kernels.q4_kernel(blocks, weight, None)
    assert cpu_kernels.q4_kernel(blocks[:, :20], weight, None) is None  # blocks of another shape: no
    assert cpu_kernels.q4_kernel(blocks, weight.float(), None) is None  # fp32 targets keep their kernel


def _gguf_target(tmp_path, permute: bool = True):
    """A tiny bf16 llama whose linears hold Q4_1 values, and a GGUF file of their blocks (q rows permuted, as
    llama.cpp's converter stores them), with one tensor left out."""
    target = tiny_target("llama")
    writer = GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    for name, module in target.model.named_modules():
        part = next((p for p in LLAMA_NAMES if name.endswith(p)), None)
        if part is None:
            continue
        blocks, values = _q4(module.weight.detach())
        module.weight.data = values.float()
        layer = name.split(".")[2]
        if part == "mlp.up_proj" and layer == "1":
            continue  # not in the file: keeps the bf16 kernel
        order = torch.randperm(len(blocks)) if permute and part == "self_attn.q_proj" else torch.arange(len(blocks))
        writer.add_tensor(f"blk.{layer}.{LLAMA_NAMES[part]}.weight", blocks[order].numpy(), raw_dtype=Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target.model.to(torch.bfloat16), target.tokenizer, tmp_path / "tiny.gguf"


def test_a_gguf_targets_linears_read_its_codes_and_decode_the_same_tokens(tmp_path, monkeypatch):
    model, tokenizer, path = _gguf_target(tmp_path)
    assert len(q4_blocks(model, path)) == 13  # 2 layers x 7 linears, less the one left out
    import copy
    plain = Target(copy.deepcopy(model), tokenizer, "plain")
    codes = Target(model, tokenizer, "codes", gguf=path)
    kinds = [c_kernel(m).kind for m in codes.model.modules() if c_kernel(m) is not None]
    assert kinds.count(cpu_kernels.Q4) == 13
    prompt = [5, 6, 7, 5, 6, 7, 5, 6, 9, 12]
    want = generate(plain, prompt, max_new_tokens=24).tokens
    assert generate(codes, prompt, max_new_tokens=24).tokens == want
    assert generate(codes, prompt, PromptLookupDrafter(), max_new_tokens=24).tokens == want
    monkeypatch.setenv("KOALA_Q4", "0")
    off = Target(copy.deepcopy(plain.model), tokenizer, "off", gguf=path)
    assert not any(c_kernel(m).kind == cpu_kernels.Q4 for m in off.model.modules() if c_kernel(m) is not None)


def test_rows_that_are_not_in_the_file_keep_the_bf16_kernel(tmp_path):
    model, _, path = _gguf_target(tmp_path)
    q = model.model.layers[0].self_attn.q_proj.weight
    q.data[3] = q.data[3].flip(0)  # a row the file does not hold
    assert "model.layers.0.self_attn.q_proj" not in q4_blocks(model, path)
    assert len(q4_blocks(model, path)) == 12
