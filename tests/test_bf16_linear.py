import copy

import pytest
import torch
import torch.nn.functional as F

from koala.bf16_linear import invariant_block, use_invariant_linears


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


def test_the_block_shrinks_until_the_rows_agree():
    weight = torch.randn(8, 16).bfloat16()

    def drifts_above_20_rows(x):  # a kernel that changes its rows once a call holds more than 20
        out = F.linear(x, weight)
        return out * (1 + 2 ** -6) if len(x) > 20 else out

    assert invariant_block(drifts_above_20_rows, 16, torch.bfloat16) == 16
    assert invariant_block(lambda x: F.linear(x, weight), 16, torch.bfloat16) == 128


def test_patched_models_still_deep_copy_and_leave_fp32_alone():
    model = torch.nn.Sequential(_linear(32, 16), torch.nn.Linear(16, 4))
    assert list(use_invariant_linears(model)) == [(32, 16)]
    twin = copy.deepcopy(model)
    x = torch.randn(3, 16).bfloat16()
    assert torch.equal(twin[0](x), model[0](x))
    assert "forward" not in vars(model[1])
