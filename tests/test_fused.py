"""The single-node ops of loha_diffusion.fused against autograd on the formula (float64).

``gradcheck`` compares every hand-written gradient (input, base weight and bias, each factor)
with finite differences; the outputs are compared with the op applied to W + row_scale * dW.
"""
import math

import pytest
import torch
from torch import nn

from loha_diffusion.fused import MergedAdapterOp, ThinAdapterOp, supports_fused_ops

LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (2, 3, 6)),
    "conv2d": (lambda: nn.Conv2d(4, 5, 3, stride=2, padding=1), (2, 4, 7, 6)),
    "conv1d": (lambda: nn.Conv1d(4, 5, 3, padding=2, dilation=2), (2, 4, 9)),
}


def random_factors(kind, out_dim, flat_in):
    # different ranks in the two LoHa halves catch a swapped r1/r2
    shapes = {"hadamard": [(out_dim, 3), (3, flat_in), (out_dim, 2), (2, flat_in)],
              "product": [(out_dim, 3), (3, flat_in)]}[kind]
    return [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in shapes]


def formula_delta(kind, factors):
    if kind == "hadamard":
        u1, d1, u2, d2 = factors
        return (u1 @ d1) * (u2 @ d2)      # docs/formats.md 2.2
    up, down = factors
    return up @ down                       # docs/formats.md 2.1


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("kind", ["hadamard", "product"])
@pytest.mark.parametrize("op", [ThinAdapterOp, MergedAdapterOp])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_op_matches_formula_and_finite_differences(layer, kind, op, masked):
    torch.manual_seed(0)
    make, x_shape = LAYERS[layer]
    base = make().double()
    weight = base.weight.detach().clone().requires_grad_()
    bias = base.bias.detach().clone().requires_grad_()
    factors = random_factors(kind, weight.shape[0], math.prod(weight.shape[1:]))
    row_scale = torch.rand(weight.shape[0], dtype=torch.float64) if masked else 0.7
    x = torch.randn(*x_shape, dtype=torch.float64, requires_grad=True)

    def fused(x, weight, bias, *factors):
        return op.apply(base, kind, row_scale, x, weight, bias, *factors)

    rows = row_scale.unsqueeze(1) if masked else row_scale
    merged = weight + (rows * formula_delta(kind, factors)).view(weight.shape)
    expected = (torch.nn.functional.linear(x, merged, bias) if layer == "linear"
                else base._conv_forward(x, merged, bias))
    torch.testing.assert_close(fused(x, weight, bias, *factors), expected)
    assert torch.autograd.gradcheck(fused, (x, weight, bias, *factors))


def test_layers_the_fused_ops_cannot_run_are_left_to_the_general_path():
    assert not supports_fused_ops(nn.Conv2d(4, 4, 3, groups=2))
    assert not supports_fused_ops(nn.Conv2d(4, 4, 3, padding="same"))
    assert not supports_fused_ops(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    assert not supports_fused_ops(nn.LayerNorm(3))
    assert supports_fused_ops(nn.Linear(3, 3)) and supports_fused_ops(nn.Conv1d(4, 4, 3, padding=1))
