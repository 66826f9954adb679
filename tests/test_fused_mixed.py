"""The fused single-node ops in mixed precision: a frozen bf16/fp16 layer, fp32 adapter tensors,
``torch.autocast`` - where real training runs.

The oracle is float64 autograd on the formula (W + s * dW); the ops must match it to the
precision of the compute dtype, deliver gradients in the inputs' own dtypes, and agree with the
general autograd path that an adapter layer takes when the fused route does not apply.
"""
import math

import pytest
import torch
from torch import nn

from formulas import apply_layer, loha_delta, lora_delta
from loha_diffusion import AdapterLayer, AdapterWeights
from loha_diffusion.algorithms import loha, lora
from loha_diffusion.fused import MergedAdapterOp, ThinAdapterOp
from loha_diffusion.layers import paths

LAYERS = {
    "linear": (lambda: nn.Linear(48, 40), (2, 7, 48)),
    "conv2d": (lambda: nn.Conv2d(16, 24, 3, stride=2, padding=1), (2, 16, 9, 8)),
    "conv1d": (lambda: nn.Conv1d(16, 24, 3, padding=1), (2, 16, 11)),
}
COMPUTE = [torch.bfloat16, torch.float16]


def factor_shapes(kind, out_dim, flat_in):
    return {"hadamard": [(out_dim, 4), (4, flat_in), (out_dim, 3), (3, flat_in)],
            "product": [(out_dim, 6), (6, flat_in)]}[kind]


def formula(kind, factors):
    if kind == "hadamard":
        u1, d1, u2, d2 = factors
        return (u1 @ d1) * (u2 @ d2)
    up, down = factors
    return up @ down


def relative_error(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("kind", ["hadamard", "product"])
@pytest.mark.parametrize("op", [ThinAdapterOp, MergedAdapterOp])
@pytest.mark.parametrize("dtype", COMPUTE)
def test_ops_under_autocast_match_float64_formula(layer, kind, op, dtype):
    torch.manual_seed(0)
    make, x_shape = LAYERS[layer]
    base = make().to(dtype).requires_grad_(False)              # the frozen model in half precision
    flat_in = math.prod(base.weight.shape[1:])
    factors = [(torch.randn(*s) * 0.3).requires_grad_() for s in factor_shapes(kind, base.weight.shape[0], flat_in)]
    x = torch.randn(*x_shape, requires_grad=True)              # fp32 activations, as autocast sees them
    row_scale = 0.75

    with torch.autocast("cpu", dtype=dtype):
        y = op.apply(base, kind, row_scale, x, base.weight, base.bias, *factors)
    assert y.dtype == dtype
    grad_out = torch.randn_like(y, dtype=torch.float32)
    (y.float() * grad_out).sum().backward()
    assert x.grad.dtype == torch.float32 and all(f.grad.dtype == torch.float32 for f in factors)

    # float64 oracle: the same rounded inputs, exact arithmetic afterwards
    x64 = x.detach().to(dtype).double().requires_grad_()
    f64 = [f.detach().double().requires_grad_() for f in factors]
    merged = base.weight.double() + (row_scale * formula(kind, f64)).view(base.weight.shape)
    expected = apply_layer(base.double(), x64, merged)
    (expected * grad_out.double()).sum().backward()

    tolerance = 0.02 if dtype == torch.bfloat16 else 0.004     # a few units of the format's last place
    assert relative_error(y, expected) < tolerance
    assert relative_error(x.grad, x64.grad) < tolerance
    for f, reference in zip(factors, f64):
        assert relative_error(f.grad, reference.grad) < tolerance


def adapter_layer(layer_kind, algorithm, dtype):
    torch.manual_seed(0)
    make, x_shape = LAYERS[layer_kind]
    layer = AdapterLayer(make().to(dtype).requires_grad_(False))
    module = {"loha": loha, "lora": lora}[algorithm]
    tensors = module.init_params(layer.base_layer.weight.shape, 4, scheme="random")
    layer.add_adapter("a", AdapterWeights(algorithm, tensors, 2.0))
    return layer, torch.randn(*x_shape)


@pytest.mark.parametrize("layer_kind", ["linear", "conv2d"])
@pytest.mark.parametrize("algorithm", ["loha", "lora"])
@pytest.mark.parametrize("path", ["thin", "merged"])
def test_adapter_layer_takes_the_fused_route_under_autocast_and_agrees_with_the_general_path(
        layer_kind, algorithm, path, monkeypatch):
    monkeypatch.setattr(paths, "prefers_thin_path", lambda *a: path == "thin")
    results = {}
    for route in ("fused", "general"):
        layer, x = adapter_layer(layer_kind, algorithm, torch.bfloat16)
        used = []
        with monkeypatch.context() as patch:
            if route == "general":
                patch.setattr(paths, "fused_route_applies", lambda *a: False)
            else:
                original = paths.fused_forward
                patch.setattr(paths, "fused_forward",
                              lambda *a, spy=used, run=original: spy.append(1) or run(*a))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(x)
            y.float().square().sum().backward()
        assert bool(used) == (route == "fused")
        adapter = layer.adapters["a"]
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in adapter.params.values())
        results[route] = (y, {n: p.grad for n, p in adapter.params.items()})

    # reference for the adapter's change: the general path's formula in float64
    layer, x = adapter_layer(layer_kind, algorithm, torch.bfloat16)
    params = {k: v.detach().double() for k, v in layer.adapters["a"].params.items()}
    delta = {"loha": loha_delta, "lora": lora_delta}[algorithm](params, layer.base_layer.weight.shape, 2.0)
    expected = apply_layer(layer.base_layer.double(), x.bfloat16().double(), layer.base_layer.weight.double() + delta)
    (y_fused, g_fused), (y_general, g_general) = results["fused"], results["general"]
    assert relative_error(y_fused, expected) < 0.02
    assert relative_error(y_fused, y_general.double()) < 0.02
    for name, grad in g_fused.items():
        assert relative_error(grad, g_general[name].double()) < 0.05


def test_no_autocast_and_mismatched_dtypes_leave_the_route():
    layer, x = adapter_layer("linear", "loha", torch.bfloat16)
    adapters = list(layer.adapters.values())
    assert paths.fused_route_applies(layer.base_layer, x.bfloat16(), adapters)        # bf16 model, bf16 input
    assert not paths.fused_route_applies(layer.base_layer, x, adapters)               # fp32 input, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert paths.fused_route_applies(layer.base_layer, x, adapters)
        assert not paths.fused_route_applies(layer.base_layer, x.double(), adapters)  # autocast leaves fp64 alone
