import copy

import pytest
import torch
import torch.nn.functional as F

from koala import cpu_kernels, invariant_linear
from koala.invariant_linear import invariant_block, use_invariant_linears


def _linear(out_features, in_features, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features, bias=False).bfloat16().requires_grad_(False)


@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576)])  # SmolLM2's MLP: F.linear's rows drift from 18 / 28 rows
def test_each_row_is_the_same_alone_and_inside_any_call(shape):
    layer = _linear(*shape)
    blocks = use_invariant_linears(torch.nn.Sequential(layer))
    assert blocks[shape] >= 16
    x = torch.randn(200, shape[1]).bfloat16()
    alone = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
    for n in [*range(2, 70), 127, 128, 129, 200]:  # verify widths, a prefill over several blocks
        assert torch.equal(layer(x[:n]), alone[:n]), n
    assert torch.equal(layer(x[None, :40]), alone[None, :40])  # (batch, rows, features) too
    torch.testing.assert_close(alone.float(), F.linear(x, layer.weight).float(), atol=2e-2, rtol=2e-2)


def test_onednn_is_used_only_where_amx_multiplies(monkeypatch):
    """On a Zen 5 (AVX-512 BF16, no AMX) oneDNN's packed bf16 rows drifted inside the 4-row calls its load-time check
    allowed, and bf16 speculation left plain decoding's answers; only AMX CPUs were measured invariant."""
    weight = torch.randn(8, 16).bfloat16()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert invariant_linear._onednn_bf16(weight, None) is None
    invariant_linear.bf16_backend.cache_clear()
    try:
        assert invariant_linear.bf16_backend() == ("koala" if cpu_kernels.library() is not None else "torch")
    finally:
        invariant_linear.bf16_backend.cache_clear()


def test_the_block_shrinks_until_the_rows_agree():
    weight = torch.randn(8, 16).bfloat16()

    def drifts_above_20_rows(x):  # a kernel that changes its rows once a call holds more than 20
        out = F.linear(x, weight)
        return out * (1 + 2 ** -6) if len(x) > 20 else out

    assert invariant_block(drifts_above_20_rows, 16, torch.bfloat16) == 16
    assert invariant_block(lambda x: F.linear(x, weight), 16, torch.bfloat16) == 128


def test_patched_models_still_deep_copy():
    model = torch.nn.Sequential(_linear(32, 16), torch.nn.Linear(16, 4))
    assert sorted(use_invariant_linears(model)) == [(4, 16), (32, 16)]
    twin = copy.deepcopy(model)
    x = torch.randn(3, 16).bfloat16()
    assert torch.equal(twin[0](x), model[0](x))


kernels = pytest.mark.skipif(cpu_kernels.library() is None, reason=f"no C kernels here: {cpu_kernels.why()}")


@kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(577, 576), (64, 1539), (7, 3)])  # odd column counts and a k tail
def test_c_kernel_rows_are_invariant_and_match_f_linear(dtype, shape):
    torch.manual_seed(0)
    weight, bias = torch.randn(*shape).to(dtype), torch.randn(shape[0])
    kernel = cpu_kernels.linear_kernel(weight, bias)
    x = torch.randn(41, shape[1])
    for rows in (x, x.to(dtype)):  # fp32 rows, and rows of the weight's dtype (bf16 x bf16: the dot-product path)
        full = kernel(rows)
        for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 33):  # every tile height of both builds, several tiles
            for start in (0, 1, 6):
                assert torch.equal(kernel(rows[start:start + n]), full[start:start + n]), (n, start)
    torch.testing.assert_close(kernel(x), F.linear(x, weight.float(), bias), atol=1e-4, rtol=1e-4)
    half = x.to(dtype)  # half-precision rows in and out: the result rounded as .to() rounds
    if dtype == torch.bfloat16 and cpu_kernels.isa() == "avx512" and shape[1] % 2 == 0:
        # vdpbf16ps: products summed in pairs, a different chain from the widened one, within bf16 rounding
        torch.testing.assert_close(kernel(half), kernel(half.float()).to(dtype), atol=0.05, rtol=1 / 128)
    else:  # widened exactly to fp32 first: the same bits as fp32 rows
        assert torch.equal(kernel(half), kernel(half.float()).to(dtype))


@kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_c_kernel_writes_unrounded_fp32_from_half_rows(dtype):
    torch.manual_seed(0)
    weight, x = torch.randn(200, 576).to(dtype), torch.randn(9, 576).to(dtype)
    kernel = cpu_kernels.linear_kernel(weight, None)
    exact = F.linear(x.double(), weight.double())  # the products of half values are exact in fp32 and fp64
    out = kernel(x, torch.float32)
    assert out.dtype == torch.float32
    assert (out.double() - exact).abs().max() < 1e-3 < (kernel(x).double() - exact).abs().max()  # not rounded
    assert torch.equal(kernel(x[3:4], torch.float32), out[3:4])  # still row-invariant


@kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_c_rmsnorm_matches_llama_and_keeps_rows_invariant(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(577, eps=1e-5).to(dtype).requires_grad_(False)
    norm.weight.uniform_(0.5, 2)
    x = (3 * torch.randn(2, 13, 577)).to(dtype)
    expected = norm(x)
    assert cpu_kernels.use_kernel_norms(torch.nn.Sequential(norm)) == 1
    got = norm(x)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)
    assert torch.equal(norm(x[:, 4:5]), got[:, 4:5])


@kernels
def test_norms_that_are_not_llama_style_keep_their_own_forward():
    class GemmaStyleRMSNorm(torch.nn.Module):  # scales by (1 + weight): the probe check must refuse it
        def __init__(self):
            super().__init__()
            self.weight, self.eps = torch.nn.Parameter(torch.full((16,), 0.5)), 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)

    norm = GemmaStyleRMSNorm().requires_grad_(False)
    assert cpu_kernels.use_kernel_norms(torch.nn.Sequential(norm)) == 0
    assert "forward" not in vars(norm)


@kernels
def test_targets_take_the_c_kernel_where_onednn_cannot_pack(monkeypatch):
    monkeypatch.setattr(invariant_linear, "_onednn_bf16", lambda weight, bias: None)
    layer = torch.nn.Linear(24, 10).requires_grad_(False)
    assert use_invariant_linears(torch.nn.Sequential(layer)) == {(10, 24): 128}
    x = torch.randn(5, 24)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    assert torch.equal(layer(x[:1]), layer(x)[:1])


def test_without_the_c_kernels_linears_fall_back_to_torch(monkeypatch):
    monkeypatch.setattr(invariant_linear, "linear_kernel", lambda weight, bias: None)
    monkeypatch.setattr(invariant_linear, "_onednn_bf16", lambda weight, bias: None)
    layer = torch.nn.Linear(24, 10).requires_grad_(False)
    use_invariant_linears(torch.nn.Sequential(layer))
    x = torch.randn(5, 24)
    assert torch.equal(layer(x[:1]), F.linear(x[:1], layer.weight, layer.bias))


def test_kernels_can_be_switched_off_and_say_why(monkeypatch):
    monkeypatch.setenv("KOALA_KERNELS", "0")
    monkeypatch.setattr(cpu_kernels, "_why", [])
    cpu_kernels.library.cache_clear()
    try:
        assert cpu_kernels.library() is None and cpu_kernels.linear_kernel(torch.ones(2, 2), None) is None
        assert "KOALA_KERNELS=0" in cpu_kernels.why()
    finally:
        monkeypatch.delenv("KOALA_KERNELS")
        cpu_kernels.library.cache_clear()


def test_a_failing_compiler_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("KOALA_HOME", str(tmp_path))  # nothing compiled there yet
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: {"avx2", "fma", "f16c"})
    monkeypatch.setattr(cpu_kernels, "_why", [])
    cpu_kernels.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="using torch's kernels"):
            assert cpu_kernels.library() is None
        assert "could not build them: false failed" in cpu_kernels.why()
        assert not list((tmp_path / "kernels").glob("*"))  # no half-written library left behind
    finally:
        monkeypatch.undo()
        cpu_kernels.library.cache_clear()


def test_draft_lm_heads_opt_in_to_the_same_kernels():
    from koala.heads.vocab import DraftLMHead

    head = DraftLMHead(torch.randn(50, 24), draft_vocab=[3, 7, 11, 19, 40])
    assert use_invariant_linears(torch.nn.Sequential(head)) == {(5, 24): 128}  # F.linear before the opt-in: {}
    assert "forward" in vars(head)
    x = torch.randn(9, 24)
    torch.testing.assert_close(head(x), F.linear(x, head.weight), atol=1e-5, rtol=1e-5)
    assert torch.equal(head(x[3:4]), head(x)[3:4])
