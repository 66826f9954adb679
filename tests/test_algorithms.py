"""Delta weights against PEFT's LoHa layer and against the formulas of docs/formats.md."""
import pytest
import torch
from peft import LoHaConfig as PeftLoHaConfig
from peft import inject_adapter_in_model
from torch import nn

from adapter_files import random_module, reference_delta
from formulas import loha_delta, lora_delta
from loha_diffusion.algorithms import alpha_scale, as_float_scalar, get_algorithm, loha, lora
from loha_diffusion.algorithms.common import khatri_rao_pair

LAYERS = {
    "linear": lambda: nn.Linear(24, 20),
    "conv1d": lambda: nn.Conv1d(6, 10, 3),
    "conv2d_3x3": lambda: nn.Conv2d(6, 10, 3, padding=1),
    "conv2d_1x1": lambda: nn.Conv2d(6, 10, 1),
}


def peft_loha(layer, effective):
    torch.manual_seed(1)
    holder = nn.Sequential()
    holder.add_module("target", layer)
    cfg = PeftLoHaConfig(r=4, alpha=6, target_modules=["target"], init_weights=False,
                         use_effective_conv2d=effective)
    inject_adapter_in_model(cfg, holder)
    return holder.target


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("effective", [False, True])
def test_loha_delta_matches_peft_and_formula(kind, effective):
    peft_layer = peft_loha(LAYERS[kind](), effective)
    shape = peft_layer.get_base_layer().weight.shape
    tensors = {n: getattr(peft_layer, n)["default"].detach() for n in
               ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
               if "default" in getattr(peft_layer, n)}
    expected_tucker = effective and kind in ("conv1d", "conv2d_3x3")
    assert loha.is_tucker(tensors) == expected_tucker
    ours = loha.delta_weight(tensors, torch.empty(shape)) * alpha_scale(6, loha.rank(tensors))
    with torch.no_grad():
        theirs = peft_layer.get_delta_weight("default")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.double(), loha_delta(tensors, shape, alpha=6), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tucker", [False, True])
def test_khatri_rao_factors_are_exact(tucker):
    torch.manual_seed(0)
    shape = (10, 6, 3, 3)
    tensors = loha.init_params(shape, 4, use_tucker=tucker, scheme="random")
    up, down = loha.low_rank_factors(tensors)
    assert up.shape == (10, 16) and down.shape == (16, 54)
    torch.testing.assert_close((up @ down).reshape(shape).double(), loha_delta(tensors, shape), rtol=1e-5, atol=1e-6)


def test_khatri_rao_pair_identity():
    torch.manual_seed(0)
    u1, d1, u2, d2 = torch.randn(7, 3), torch.randn(3, 5), torch.randn(7, 2), torch.randn(2, 5)
    up, down = khatri_rao_pair(u1, d1, u2, d2)
    torch.testing.assert_close(up @ down, (u1 @ d1) * (u2 @ d2))


def test_hadamard_backward_matches_plain_autograd():
    torch.manual_seed(0)
    factors = [torch.randn(8, 3, dtype=torch.double, requires_grad=True),
               torch.randn(3, 5, dtype=torch.double, requires_grad=True),
               torch.randn(8, 3, dtype=torch.double, requires_grad=True),
               torch.randn(3, 5, dtype=torch.double, requires_grad=True)]
    assert torch.autograd.gradcheck(loha.HadamardOfProducts.apply, factors)


@pytest.mark.parametrize("shape", [(12, 8), (12, 8, 3, 3), (12, 8, 1, 1), (12, 8, 3)])
@pytest.mark.parametrize("tucker", [False, True])
def test_lora_delta_matches_formula(shape, tucker):
    torch.manual_seed(0)
    tensors = lora.init_params(shape, 4, use_tucker=tucker, scheme="random")
    assert ("lora_mid.weight" in tensors) == (tucker and len(shape) > 2 and shape[2] > 1)
    ours = lora.delta_weight(tensors, torch.empty(shape)) * alpha_scale(2.0, 4)
    torch.testing.assert_close(ours.double(), lora_delta(tensors, shape, alpha=2.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algorithm", [loha, lora])
@pytest.mark.parametrize("scheme", ["lycoris", "peft"])
def test_fresh_adapters_have_zero_delta(algorithm, scheme):
    tensors = algorithm.init_params((12, 8, 3, 3), 4, scheme=scheme)
    assert torch.count_nonzero(algorithm.delta_weight(tensors, torch.empty(12, 8, 3, 3))) == 0
    zeroed = ("hada_w2_a", "hada_w2_b", "lora_up.weight")
    assert all(torch.count_nonzero(t) > 0 for n, t in tensors.items() if n not in zeroed)


def test_alpha_rules():
    assert alpha_scale(None, 8) == 1.0          # missing alpha: scale 1
    assert alpha_scale(0.0, 8) == 1.0           # alpha 0 is read as "alpha = rank" (kohya, LyCORIS)
    assert alpha_scale(4.0, 8) == 0.5
    assert as_float_scalar(torch.tensor([16.0], dtype=torch.float16)) == 16.0
    assert as_float_scalar(torch.tensor(3, dtype=torch.int64)) == 3.0
    with pytest.raises(ValueError, match="one number"):
        as_float_scalar(torch.ones(2))


@pytest.mark.parametrize("algorithm", [loha, lora])
@pytest.mark.parametrize("tucker", [False, True])
def test_check_shapes_accepts_fitting_and_names_misfits(algorithm, tucker):
    tensors = algorithm.init_params((10, 6, 3, 3), 4, use_tucker=tucker)
    assert algorithm.check_shapes(tensors, (10, 6, 3, 3)) is None
    error = algorithm.check_shapes(tensors, (10, 5, 3, 3))
    assert "(10, 54)" in error and "(10, 45)" in error


def test_sd2_style_4d_lora_fits_a_linear_layer():
    # sd-scripts writes SD2 proj_in/proj_out as 1x1 conv tensors even where diffusers has Linear
    tensors = lora.init_params((10, 6, 1, 1), 4, scheme="random")
    assert lora.check_shapes(tensors, (10, 6)) is None
    torch.testing.assert_close(lora.delta_weight(tensors, torch.empty(10, 6)).double(),
                               lora_delta(tensors, (10, 6)))


@pytest.mark.parametrize("layout", ["loha", "lora", "lokr", "lokr_both", "lokr_w2", "lokr_tucker", "full"])
@pytest.mark.parametrize("shape", [(12, 8), (12, 8, 3, 3)])
def test_delta_bound_bounds_the_formula(layout, shape):
    """A load trusts ``delta_bound`` to rule out overflow, so it must never be below the real max |dW|."""
    weight = torch.zeros(shape)
    for seed in range(5):
        tensors = random_module(layout, weight, rank=3, generator=torch.Generator().manual_seed(seed))
        body = {k: v for k, v in tensors.items() if k != "alpha"}
        algorithm = get_algorithm(next(a for a in ("loha", "lora", "lokr", "full") if layout.startswith(a)))
        true_max = float(reference_delta(body, weight).abs().max())
        assert true_max <= algorithm.delta_bound(body) * (1 + 1e-6)
        assert algorithm.delta_bound(body) < 50 * true_max  # loose is fine, useless is not


@pytest.mark.parametrize("layout", ["lokr", "lokr_both", "lokr_tucker"])
@pytest.mark.parametrize("layer", ["linear", "conv2d_3x3"])
def test_lokr_delta_rows_are_rows_of_the_kronecker_product(layout, layer):
    """Any rows, in any order (a stacked module's layer taking rows through the Kronecker blocks),
    built from the factors' rows: equal to those rows of torch.kron."""
    from formulas import lokr_delta

    weight = LAYERS[layer]().weight
    tensors = random_module(layout, weight, generator=torch.Generator().manual_seed(2))
    alpha = float(tensors.pop("alpha"))
    rows = torch.randperm(weight.shape[0], generator=torch.Generator().manual_seed(3))[:7]
    algorithm = get_algorithm("lokr")
    ours = algorithm.delta_rows(tensors, tuple(weight.shape), rows, scale=algorithm.scale(tensors, alpha))
    expected = lokr_delta(tensors, weight.shape, alpha)[rows]
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)
