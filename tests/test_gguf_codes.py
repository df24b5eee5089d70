"""Linears on a GGUF target's codes: the bf16 kernel's bits from a fraction of the bytes, or not used at all."""
import copy

import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from koala import cpu_kernels
from koala.decode import generate
from koala.drafters.plan import _target_key
from koala.drafters import PromptLookupDrafter
from koala.drafters.factory import draft_lm_head_codes
from koala.fused_layer import use_cpu_kernels
from koala.gguf_codes import LLAMA_NAMES, gguf_codes
from koala.heads.checkpoint import build_head
from koala.heads.config import HeadConfig
from koala.invariant_linear import c_kernel
from koala.target import Target

from conftest import tiny_target

T = GGMLQuantizationType
KINDS = {T.Q4_1: cpu_kernels.Q4, T.Q8_0: cpu_kernels.Q8}
pytestmark = pytest.mark.skipif(cpu_kernels.isa() != "avx512", reason="coded weights need the AVX-512 build")


def _blocks(weight: torch.Tensor, qtype: T) -> tuple[torch.Tensor, torch.Tensor]:
    """(GGUF blocks of a weight, the bf16 weight they stand for), as a GGUF file and its bf16 target hold them."""
    blocks = quantize(weight.float().numpy(), qtype)
    values = torch.from_numpy(dequantize(blocks, qtype).reshape(weight.shape).copy()).to(torch.bfloat16)
    return torch.from_numpy(blocks.reshape(weight.shape[0], -1).copy()), values


@pytest.mark.parametrize("qtype", list(KINDS))
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17, 40])
def test_the_coded_kernel_gives_the_bf16_kernels_bits(rows, qtype):
    torch.manual_seed(rows)
    blocks, weight = _blocks(torch.randn(80, 96) * 0.1, qtype)
    bias = torch.randn(80).to(torch.bfloat16)
    x = torch.randn(rows, 96).to(torch.bfloat16)
    assert torch.equal(cpu_kernels.code_values(blocks, KINDS[qtype], 96), weight)
    codes, plain = cpu_kernels.codes_kernel(blocks, KINDS[qtype], weight, bias), cpu_kernels.linear_kernel(weight, bias)
    assert codes.kind == KINDS[qtype]
    assert torch.equal(codes(x), plain(x)) and torch.equal(codes(x, torch.float32), plain(x, torch.float32))
    assert torch.equal(codes(x)[:1], codes(x[:1]))  # a row alone has its bits inside any call


@pytest.mark.parametrize("qtype", list(KINDS))
def test_codes_that_do_not_rebuild_the_weight_are_refused(qtype):
    kind = KINDS[qtype]
    blocks, weight = _blocks(torch.randn(32, 64), qtype)
    nudged = weight.clone()
    nudged.view(torch.int16)[5, 7] += 1  # one bf16 rounding step
    assert cpu_kernels.codes_kernel(blocks, kind, nudged, None) is None
    assert cpu_kernels.codes_kernel(blocks, kind, weight, None) is not None
    assert cpu_kernels.codes_kernel(blocks[:, :20], kind, weight, None) is None  # blocks of another shape
    assert cpu_kernels.codes_kernel(blocks, kind, weight.float(), None) is None  # fp32 targets keep their kernel
    assert cpu_kernels.codes_kernel(blocks, 7, weight, None) is None  # a kind the kernel does not know


def _gguf_target(tmp_path):
    """A tiny bf16 llama whose linears hold Q4_1 values and whose LM head holds Q8_0 ones, and a GGUF file of their
    blocks (q rows permuted, as llama.cpp's converter stores them), with one tensor left out."""
    target = tiny_target("llama")
    writer = GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    for name, module in target.model.named_modules():
        part = next((p for p in LLAMA_NAMES if name.endswith(p)), None)
        if part is None and name != "lm_head":
            continue
        blocks, values = _blocks(module.weight.detach(), T.Q8_0 if part is None else T.Q4_1)
        module.weight.data = values.float()
        if part is None:
            writer.add_tensor("output.weight", blocks.numpy(), raw_dtype=T.Q8_0)
            continue
        layer = name.split(".")[2]
        if part == "mlp.up_proj" and layer == "1":
            continue  # not in the file: keeps the bf16 kernel
        order = torch.randperm(len(blocks)) if part == "self_attn.q_proj" else torch.arange(len(blocks))
        writer.add_tensor(f"blk.{layer}.{LLAMA_NAMES[part]}.weight", blocks[order].numpy(), raw_dtype=T.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target.model.to(torch.bfloat16), target.tokenizer, tmp_path / "tiny.gguf"


def _kinds(target: Target) -> list[int]:
    return [c_kernel(m).kind for m in target.model.modules() if c_kernel(m) is not None]


def test_a_gguf_targets_linears_read_its_codes_and_decode_the_same_tokens(tmp_path, monkeypatch):
    model, tokenizer, path = _gguf_target(tmp_path)
    found = gguf_codes(model, path)
    assert len(found) == 14 and found["lm_head"][0] == cpu_kernels.Q8  # 2 layers x 7 linears, less one, + head
    plain = Target(copy.deepcopy(model), tokenizer, "tiny")
    codes = Target(model, tokenizer, "tiny", gguf=path)
    kinds = _kinds(codes)
    assert kinds.count(cpu_kernels.Q4) == 13 and kinds.count(cpu_kernels.Q8) == 1
    assert codes.coded_linears == 14 and _target_key(codes) != _target_key(plain)  # timed apart
    prompt = [5, 6, 7, 5, 6, 7, 5, 6, 9, 12]
    want = generate(plain, prompt, max_new_tokens=24).tokens
    assert generate(codes, prompt, max_new_tokens=24).tokens == want
    assert generate(codes, prompt, PromptLookupDrafter(), max_new_tokens=24).tokens == want
    monkeypatch.setenv("KOALA_CODES", "0")
    off = Target(copy.deepcopy(plain.model), tokenizer, "off", gguf=path)
    assert not set(_kinds(off)) & set(KINDS.values())


def test_rows_that_are_not_in_the_file_keep_the_bf16_kernel(tmp_path):
    model, _, path = _gguf_target(tmp_path)
    q = model.model.layers[0].self_attn.q_proj.weight
    q.data[3] = q.data[3].flip(0)  # a row the file does not hold
    found = gguf_codes(model, path)
    assert "model.layers.0.self_attn.q_proj" not in found and len(found) == 13


def test_the_header_reader_finds_what_gguf_py_finds(tmp_path):
    import numpy as np
    from gguf import GGUFReader

    from koala.gguf_codes import coded_tensors

    path = _gguf_target(tmp_path)[2]
    ours = coded_tensors(path)
    theirs = {t.name: np.asarray(t.data).reshape(t.data.shape[0], -1) for t in GGUFReader(path).tensors}
    assert sorted(ours) == sorted(theirs) and len(ours) == 14
    assert all(np.array_equal(ours[name][1], theirs[name]) for name in ours)
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="not a GGUF"):
        coded_tensors(tmp_path / "notes.txt")


def test_a_draft_heads_lm_head_reads_its_rows_of_the_targets_codes(tmp_path):
    model, tokenizer, path = _gguf_target(tmp_path)
    target = Target(model, tokenizer, "tiny", gguf=path)
    assert target.lm_head_codes is not None and target.lm_head_codes[0] == cpu_kernels.Q8
    vocab = [9, 3, 40, 7] + list(range(50, 78))  # a reduced draft vocabulary, not in id order
    heads = [build_head(HeadConfig.for_target(target, "eagle", 1, draft_vocab=vocab), target).to(torch.bfloat16)
             for _ in range(2)]
    use_cpu_kernels(heads[0], draft_lm_head_codes(heads[0], target))
    use_cpu_kernels(heads[1])
    assert c_kernel(heads[0].lm_head).kind == cpu_kernels.Q8
    assert c_kernel(heads[1].lm_head).kind == cpu_kernels.KINDS[torch.bfloat16]
    x = torch.randn(3, 64).bfloat16()
    assert torch.equal(heads[0].lm_head(x), heads[1].lm_head(x))
