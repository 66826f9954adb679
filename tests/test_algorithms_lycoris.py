"""LoKr, Full, Norm, IA3 and DoRA against LyCORIS' module forward and the formulas of docs/formats.md.

LyCORIS' forward is the oracle (its merge_to / get_diff_weight apply alpha/r twice for LoKr and
LoHa, docs/formats.md 2.11, so they are never used here). Every module is built on a small layer,
filled with random tensors, and its forward output minus the base output is compared with the
base op run on W + m*dW from our functions.
"""
import pytest
import torch
import torch.nn.functional as F
from lycoris.functional.general import factorization as lycoris_factorization
from lycoris.functional.lokr import diff_weight as lycoris_kron_diff
from lycoris.modules.full import FullModule
from lycoris.modules.ia3 import IA3Module
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from lycoris.modules.norms import NormModule
from torch import nn

from formulas import apply_layer, dora_merged, ia3_delta, lokr_delta
from loha_diffusion.algorithms import ALGORITHMS, as_float_scalar, detect_algorithm, full, ia3, loha, lokr, lora, norm
from loha_diffusion.algorithms.dora import apply_dora, dora_axis
from loha_diffusion.algorithms.unsupported import unsupported_algorithm

LAYERS = {
    "linear": lambda: nn.Linear(128, 96),
    "conv3x3": lambda: nn.Conv2d(32, 24, 3, padding=1),
}


def sample_input(layer):
    return torch.randn(3, 128) if isinstance(layer, nn.Linear) else torch.randn(2, 32, 5, 5)


def randomize(module, std=0.3):
    """Every trainable tensor of a LyCORIS module drawn at random (its own init zeroes one)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * std)


def community_tensors(module):
    """The tensors LyCORIS writes to a file for this module: {name: tensor}, alpha apart."""
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return state, state.pop("alpha", None)


def assert_forward_matches(module, layer, new_weight, x=None):
    """LyCORIS forward delta == layer op on ``new_weight`` minus layer op on W."""
    x = sample_input(layer) if x is None else x
    with torch.no_grad():
        theirs = module(x) - layer(x)
        ours = apply_layer(layer, x, new_weight) - apply_layer(layer, x, layer.weight)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


# -- LoKr --------------------------------------------------------------------------------------

# (layer, LokrModule kwargs, which tensors LyCORIS makes)
LOKR_CASES = {
    "w2_factorised": ("linear", dict(lora_dim=4, alpha=2.0), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "both_factorised": ("linear", dict(lora_dim=2, alpha=3.0, decompose_both=True),
                        {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
    "both_full": ("linear", dict(lora_dim=4, alpha=7.0, full_matrix=True), {"lokr_w1", "lokr_w2"}),
    "huge_dim": ("linear", dict(lora_dim=100000, alpha=4.0), {"lokr_w1", "lokr_w2"}),
    "unbalanced": ("linear", dict(lora_dim=2, alpha=1.0, unbalanced_factorization=True),
                   {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "factor_4": ("linear", dict(lora_dim=2, alpha=1.5, factor=4), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "conv_flat_w2b": ("conv3x3", dict(lora_dim=2, alpha=1.0), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}),
    "conv_tucker": ("conv3x3", dict(lora_dim=2, alpha=3.0, use_tucker=True),
                    {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    "conv_tucker_decompose_both": ("conv3x3", dict(lora_dim=1, alpha=0.5, use_tucker=True, decompose_both=True),
                                   {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}),
    "conv_full": ("conv3x3", dict(lora_dim=4, alpha=2.0, full_matrix=True), {"lokr_w1", "lokr_w2"}),
}


def lycoris_lokr(case, multiplier=1.0):
    torch.manual_seed(0)
    kind, kwargs, names = LOKR_CASES[case]
    layer = LAYERS[kind]()
    module = LokrModule("m", layer, multiplier=multiplier, **kwargs)
    randomize(module)
    tensors, alpha = community_tensors(module)
    assert set(tensors) == names
    return layer, module, tensors, alpha


@pytest.mark.parametrize("case", LOKR_CASES)
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_lokr_matches_lycoris_forward_and_formula(case, multiplier):
    layer, module, tensors, alpha = lycoris_lokr(case, multiplier)
    assert lokr.detect(tensors) and detect_algorithm(tensors) is lokr
    assert lokr.check_shapes(tensors, layer.weight.shape) is None
    scale = lokr.scale(tensors, as_float_scalar(alpha))
    delta = lokr.delta_weight(tensors, layer.weight) * scale
    assert delta.dtype == torch.float32 and delta.shape == layer.weight.shape
    # the formula applies "both full => scale 1" by itself, so it gets the raw alpha
    torch.testing.assert_close(delta.double(), lokr_delta(tensors, layer.weight.shape, float(alpha)),
                               rtol=1e-5, atol=1e-6)
    assert_forward_matches(module, layer, layer.weight + multiplier * delta)


def test_lokr_scale_and_rank_rules():
    _, _, tensors, alpha = lycoris_lokr("both_full")
    assert lokr.rank(tensors) is None and float(alpha) == 4.0      # LyCORIS stores alpha = dim ...
    assert lokr.scale(tensors, 7.0) == 1.0                           # ... and any alpha means scale 1
    _, _, tensors, _ = lycoris_lokr("huge_dim")
    assert lokr.scale(tensors, 100000.0) == 1.0
    _, _, tensors, _ = lycoris_lokr("both_factorised")
    assert lokr.rank(tensors) == 2 and lokr.scale(tensors, 3.0) == 1.5
    # w2's rank wins when the halves disagree (ComfyUI, A1111, diffusers)
    mixed = {"lokr_w1_a": torch.ones(4, 3), "lokr_w1_b": torch.ones(3, 4), "lokr_w2_a": torch.ones(6, 2),
             "lokr_w2_b": torch.ones(2, 8)}
    assert lokr.rank(mixed) == 2
    _, _, tensors, _ = lycoris_lokr("conv_tucker")
    assert lokr.rank(tensors) == 2       # from lokr_w2_b, not the transposed Tucker lokr_w2_a (r, b)


@pytest.mark.parametrize("alpha", [torch.tensor(2.0), torch.tensor([2.0]), torch.tensor(2.0, dtype=torch.float16),
                                   torch.tensor(2.0, dtype=torch.bfloat16), torch.tensor(2, dtype=torch.int64),
                                   torch.tensor([2.0], dtype=torch.float16), None, torch.tensor(0.0)],
                         ids=["0d", "1elem", "fp16", "bf16", "int64", "1elem_fp16", "missing", "zero"])
def test_lokr_scale_from_stored_alpha(alpha):
    _, _, tensors, _ = lycoris_lokr("w2_factorised")    # r = 4
    expected = 1.0 if alpha is None or float(alpha) == 0 else 0.5
    assert lokr.scale(tensors, as_float_scalar(alpha)) == expected


def test_lokr_4d_w2b_of_the_functional_api():
    layer, module, tensors, alpha = lycoris_lokr("conv_flat_w2b")
    r, flat = tensors["lokr_w2_b"].shape
    four_d = dict(tensors, lokr_w2_b=tensors["lokr_w2_b"].reshape(r, flat // 9, 3, 3))
    assert lokr.check_shapes(four_d, layer.weight.shape) is None
    ours = lokr.delta_weight(four_d, layer.weight) * lokr.scale(four_d, float(alpha))
    torch.testing.assert_close(ours, lokr.delta_weight(tensors, layer.weight) * lokr.scale(tensors, float(alpha)))
    with torch.no_grad():
        theirs = lycoris_kron_diff(tensors["lokr_w1"], None, None, None, four_d["lokr_w2_a"], four_d["lokr_w2_b"],
                                   None, gamma=float(alpha))
    torch.testing.assert_close(ours, theirs.reshape(layer.weight.shape), rtol=1e-5, atol=1e-6)
    assert_forward_matches(module, layer, layer.weight + ours)


def test_lokr_on_a_meta_weight_and_a_1x1_conv_file_on_linear():
    _, _, tensors, _ = lycoris_lokr("w2_factorised")
    assert lokr.delta_weight(tensors, torch.empty(96, 128, device="meta")).shape == (96, 128)
    # sd-scripts style 4-D tensors on a Linear target (docs/formats.md 5, item 9): reshape by numel
    as_conv = dict(tensors, lokr_w2_b=tensors["lokr_w2_b"][..., None, None])
    assert lokr.check_shapes(as_conv, (96, 128)) is None
    torch.testing.assert_close(lokr.delta_weight(as_conv, torch.empty(96, 128)),
                               lokr.delta_weight(tensors, torch.empty(96, 128)))


@pytest.mark.parametrize("case", ["w2_factorised", "both_factorised", "conv_tucker", "conv_full"])
def test_lokr_check_shapes_names_misfits(case):
    layer, _, tensors, _ = lycoris_lokr(case)
    out_dim, in_dim, *kernel = layer.weight.shape
    error = lokr.check_shapes(tensors, (out_dim, in_dim + 4, *kernel))
    assert error is not None and "LoKr" in error and str((out_dim, in_dim + 4, *kernel)) in error
    assert lokr.check_shapes(tensors, (out_dim * 2, in_dim, *kernel)) is not None


def test_lokr_check_shapes_wants_c_to_divide_in():
    # w1 (2, 3), w2 (4, 30): 3 * 30 == 10 * 9 elements per row, but 3 does not split 10 input channels
    tensors = {"lokr_w1": torch.ones(2, 3), "lokr_w2": torch.ones(4, 30)}
    assert lokr.check_shapes(tensors, (8, 10, 3, 3)) is not None
    fitting = {"lokr_w1": torch.ones(2, 3), "lokr_w2": torch.ones(4, 27)}
    assert lokr.check_shapes(fitting, (8, 9, 3, 3)) is None
    assert lokr.delta_weight(fitting, torch.empty(8, 9, 3, 3)).shape == (8, 9, 3, 3)


def test_lokr_check_shapes_names_missing_halves():
    _, _, tensors, _ = lycoris_lokr("w2_factorised")
    error = lokr.check_shapes({k: v for k, v in tensors.items() if k != "lokr_w2_b"}, (96, 128))
    assert "lokr_w2 or lokr_w2_a + lokr_w2_b" in error
    error = lokr.check_shapes({k: v for k, v in tensors.items() if k != "lokr_w1"}, (96, 128))
    assert "lokr_w1 or lokr_w1_a + lokr_w1_b" in error


def test_factorization_matches_lycoris():
    for dim in list(range(1, 300)) + [320, 360, 640, 768, 1024, 1280, 2048]:
        for factor in (-1, 0, 1, 2, 3, 4, 5, 8, 16, 64):
            assert lokr.factorization(dim, factor) == lycoris_factorization(dim, factor), (dim, factor)
    assert lokr.factorization(1280) == (32, 40) and lokr.factorization(360, 16) == (15, 24)


INIT_CASES = [
    ((96, 128), dict(r=4)),
    ((96, 128), dict(r=2, decompose_both=True)),
    ((96, 128), dict(r=2, factor=4)),
    ((96, 128), dict(r=64)),
    ((24, 32, 3, 3), dict(r=2)),
    ((24, 32, 3, 3), dict(r=2, use_tucker=True)),
    ((24, 32, 3, 3), dict(r=1, use_tucker=True, decompose_both=True)),
    ((24, 32, 1, 1), dict(r=2, use_tucker=True)),
]


@pytest.mark.parametrize("shape,kwargs", INIT_CASES)
def test_lokr_init_params_match_lycoris_layout_with_zero_delta(shape, kwargs):
    layer = nn.Linear(shape[1], shape[0]) if len(shape) == 2 else nn.Conv2d(shape[1], shape[0], shape[2:])
    kwargs = dict(kwargs)
    r = kwargs.pop("r")
    module = LokrModule("m", layer, lora_dim=r, **kwargs)
    theirs, _ = community_tensors(module)
    for scheme in ("lycoris", "peft"):
        ours = lokr.init_params(shape, r, scheme=scheme, **kwargs)
        assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
        assert lokr.check_shapes(ours, shape) is None
        assert torch.count_nonzero(lokr.delta_weight(ours, torch.empty(shape))) == 0
    # LyCORIS zeroes the same tensor we do
    ours = lokr.init_params(shape, r, **kwargs)
    assert {k for k, v in ours.items() if not v.any()} == {k for k, v in theirs.items() if not v.any()}
    random = lokr.init_params(shape, r, scheme="random", **kwargs)
    assert torch.count_nonzero(lokr.delta_weight(random, torch.empty(shape))) > 0
    with pytest.raises(ValueError, match="init scheme"):
        lokr.init_params(shape, r, scheme="kaiming", **kwargs)


# -- Full --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_full_matches_lycoris_forward(kind, multiplier):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    tensors = {"diff": torch.randn_like(layer.weight) * 0.1, "diff_b": torch.randn_like(layer.bias) * 0.1}
    with torch.no_grad():    # as LyCORIS' own loader calls it
        module = FullModule.make_module_from_state_dict("m", layer, tensors["diff"], tensors["diff_b"])
    module.multiplier = multiplier
    assert detect_algorithm(tensors) is full and full.rank(tensors) is None and full.scale(tensors, 5.0) == 1.0
    assert full.check_shapes(tensors, layer.weight.shape) is None
    delta_w, delta_b = full.delta_weight(tensors, layer.weight), full.delta_bias(tensors, layer.bias)
    torch.testing.assert_close(delta_w, tensors["diff"])
    assert delta_w.data_ptr() != tensors["diff"].data_ptr()     # a caller may scale it in place
    x = sample_input(layer)
    with torch.no_grad():
        theirs = module(x) - layer(x)
        new = apply_layer(layer, x, layer.weight + multiplier * delta_w) + multiplier * delta_b.reshape(
            1, -1, *(1,) * (x.dim() - 2))
        ours = new - layer(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_full_without_bias_and_shape_checks():
    tensors = {"diff": torch.randn(6, 4, dtype=torch.float16)}
    assert full.delta_bias(tensors, torch.zeros(6)) is None
    assert full.delta_weight(tensors, torch.empty(6, 4)).dtype == torch.float32
    assert full.delta_bias({"diff_b": torch.ones(6)}, None).shape == (6,)
    assert "(6, 4)" in full.check_shapes(tensors, (6, 5)) and "(6, 5)" in full.check_shapes(tensors, (6, 5))
    assert "diff_b" in full.check_shapes(dict(tensors, diff_b=torch.ones(5)), (6, 4))


# -- Norm --------------------------------------------------------------------------------------

NORMS = {
    "layernorm": (lambda: nn.LayerNorm(16), lambda: torch.randn(3, 5, 16)),
    "groupnorm": (lambda: nn.GroupNorm(4, 16), lambda: torch.randn(2, 16, 3, 3)),
}


def norm_forward(layer, x, weight, bias):
    if isinstance(layer, nn.LayerNorm):
        return F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)
    return F.group_norm(x, layer.num_groups, weight, bias, layer.eps)


@pytest.mark.parametrize("kind", NORMS)
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_norm_matches_lycoris_forward(kind, multiplier):
    torch.manual_seed(0)
    make_layer, make_input = NORMS[kind]
    layer = make_layer()
    with torch.no_grad():
        layer.weight.copy_(torch.rand(16) + 0.5)
        layer.bias.copy_(torch.randn(16))
    tensors = {"w_norm": torch.randn(16) * 0.2, "b_norm": torch.randn(16) * 0.2}
    with torch.no_grad():    # as LyCORIS' own loader calls it
        module = NormModule.make_module_from_state_dict("m", layer, tensors["w_norm"], tensors["b_norm"])
    module.multiplier = multiplier
    assert detect_algorithm(tensors) is norm and norm.scale(tensors, None) == 1.0 and norm.rank(tensors) is None
    assert norm.check_shapes(tensors, layer.weight.shape) is None
    dw, db = norm.delta_weight(tensors, layer.weight), norm.delta_bias(tensors, layer.bias)
    x = make_input()
    with torch.no_grad():
        theirs = module(x) - layer(x)
        ours = norm_forward(layer, x, layer.weight + multiplier * dw, layer.bias + multiplier * db) - layer(x)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_norm_weight_only_and_shape_checks():
    tensors = {"w_norm": torch.ones(16)}
    assert norm.delta_bias(tensors, torch.zeros(16)) is None
    assert norm.check_shapes(tensors, (16,)) is None
    error = norm.check_shapes(dict(tensors, b_norm=torch.ones(8)), (16,))
    assert "b_norm" in error and "(8,)" in error and "(16,)" in error
    assert "(16,)" in norm.check_shapes(tensors, (32,))


# -- IA3 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("on_input", [False, True])
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_ia3_matches_lycoris_forward_and_formula(kind, on_input, multiplier):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    module = IA3Module("m", layer, multiplier=multiplier, train_on_input=on_input)
    randomize(module)
    tensors, alpha = community_tensors(module)
    assert alpha is None and set(tensors) == {"weight", "on_input"}
    channels = layer.weight.shape[1 if on_input else 0]
    assert tensors["weight"].numel() == channels
    assert detect_algorithm(tensors) is ia3 and ia3.scale(tensors, None) == 1.0
    assert ia3.check_shapes(tensors, layer.weight.shape) is None
    delta = ia3.delta_weight(tensors, layer.weight)
    torch.testing.assert_close(delta.double(), ia3_delta(layer.weight.detach(), tensors["weight"], on_input))
    assert_forward_matches(module, layer, layer.weight + multiplier * delta)


def test_ia3_on_input_as_saved_in_half_precision_and_shape_checks():
    weight = torch.randn(6, 4)
    tensors = {"weight": torch.randn(4), "on_input": torch.tensor(1, dtype=torch.float16)}
    torch.testing.assert_close(ia3.delta_weight(tensors, weight).double(), ia3_delta(weight, tensors["weight"], True))
    assert ia3.check_shapes(tensors, (6, 4)) is None
    error = ia3.check_shapes(tensors, (4, 6))
    assert "(4,)" in error and "6 input channels" in error
    # without on_input: output rows, LyCORIS' default
    assert ia3.check_shapes({"weight": torch.randn(6)}, (6, 4)) is None
    assert ia3.check_shapes({"weight": torch.randn(1, 6, 1, 1)}, (6, 4, 3, 3)) is None
    assert "output channels" in ia3.check_shapes({"weight": torch.randn(6, 4)}, (6, 4))


def test_detection_never_confuses_algorithms():
    names = {
        "lora": {"lora_down.weight", "lora_up.weight"},
        "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
        "lokr": {"lokr_w1", "lokr_w2_a", "lokr_w2_b"},
        "full": {"diff", "diff_b"},
        "norm": {"w_norm", "b_norm"},
        "ia3": {"weight", "on_input"},
    }
    assert set(ALGORITHMS) == set(names)
    for expected, tensor_names in names.items():
        assert [a.NAME for a in ALGORITHMS.values() if a.detect(tensor_names)] == [expected]
    assert detect_algorithm({"weight"}) is ia3
    assert detect_algorithm({"weight", "bias"}) is None
    assert detect_algorithm({"a1.weight", "a2.weight", "b1.weight", "b2.weight"}) is None


# -- unsupported algorithms ----------------------------------------------------------------------

def test_unsupported_algorithms_are_named():
    assert unsupported_algorithm({"a1.weight", "a2.weight", "b1.weight", "b2.weight"}) == "GLoRA"
    assert unsupported_algorithm({"oft_blocks", "rescale"}) == "OFT/BOFT"
    assert unsupported_algorithm({"oft_blocks": torch.zeros(4, 8, 8)}) == "OFT"
    assert unsupported_algorithm({"oft_blocks": torch.zeros(2, 4, 8, 8), "rescale": torch.ones(32, 1)}) == "BOFT"
    assert unsupported_algorithm({"oft_diag"}).startswith("OFT")
    assert unsupported_algorithm({"q_layer.weight", "p_layer.weight", "lambda_layer"}) == "T-LoRA"
    assert "bias" in unsupported_algorithm({"bias_indices", "bias_values", "bias_size"})
    for supported in ({"lora_down.weight", "lora_up.weight"}, {"weight", "on_input"}, {"diff"}, {"w_norm"}):
        assert unsupported_algorithm(supported) is None


# -- DoRA --------------------------------------------------------------------------------------

DORA_HOSTS = {
    "locon": (LoConModule, lora),
    "loha": (LohaModule, loha),
    "lokr": (LokrModule, lokr),
}


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("host", DORA_HOSTS)
@pytest.mark.parametrize("wd_on_out", [True, False], ids=["output_axis", "input_axis"])
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_dora_matches_lycoris_forward(kind, host, wd_on_out, multiplier):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    module_class, algorithm = DORA_HOSTS[host]
    module = module_class("m", layer, multiplier=multiplier, lora_dim=4, alpha=2.0, weight_decompose=True,
                          wd_on_out=wd_on_out)
    norms = module.dora_scale.detach().clone()
    randomize(module)
    with torch.no_grad():
        module.dora_scale.copy_(norms * (1 + 0.5 * torch.rand_like(norms)))
    tensors, alpha = community_tensors(module)
    dora_scale = tensors.pop("dora_scale")
    out_dim, in_dim = layer.weight.shape[:2]
    assert dora_scale.shape[:2] == ((out_dim, 1) if wd_on_out else (1, in_dim))
    assert dora_axis(dora_scale, layer.weight.shape) == ("output" if wd_on_out else "input")
    scaled = algorithm.delta_weight(tensors, layer.weight) * algorithm.scale(tensors, as_float_scalar(alpha))
    change = apply_dora(layer.weight, scaled, dora_scale, multiplier)
    assert change.dtype == torch.float32
    assert_forward_matches(module, layer, layer.weight + change)
    expected = dora_merged(layer.weight.detach(), scaled, dora_scale, multiplier, wd_on_out, "lycoris")
    torch.testing.assert_close((layer.weight + change).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("output_axis", [True, False])
def test_dora_semantics_agree_at_full_strength_only(output_axis):
    torch.manual_seed(0)
    weight, scaled = torch.randn(10, 6, 3, 3), torch.randn(10, 6, 3, 3) * 0.3
    dora_scale = torch.rand(10, 1, 1, 1) + 1 if output_axis else torch.rand(1, 6, 1, 1) + 1
    for m in (1.0, 0.5):
        for semantics in ("lycoris", "comfyui"):
            ours = weight + apply_dora(weight, scaled, dora_scale, m, semantics)
            expected = dora_merged(weight, scaled, dora_scale, m, output_axis, semantics)
            torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_dora(weight, scaled, dora_scale, 1.0, "lycoris"),
                               apply_dora(weight, scaled, dora_scale, 1.0, "comfyui"), rtol=1e-5, atol=1e-5)
    lycoris_half = apply_dora(weight, scaled, dora_scale, 0.5, "lycoris")
    assert (lycoris_half - apply_dora(weight, scaled, dora_scale, 0.5, "comfyui")).abs().max() > 0.1
    torch.testing.assert_close(apply_dora(weight, scaled, dora_scale, 0.5, "a1111"),
                               apply_dora(weight, scaled, dora_scale, 0.5, "comfyui"))


def test_dora_axis_from_shapes():
    assert dora_axis(torch.ones(10), (10, 6)) == "output"              # PEFT-style 1-D magnitude
    assert dora_axis(torch.ones(10, 1, 1, 1), (10, 6)) == "output"     # 4-D file on a Linear target
    assert dora_axis((1, 6), (10, 6)) == "input"
    assert dora_axis(torch.ones(1, 6, 1, 1), (10, 6, 3, 3)) == "input"
    with pytest.raises(ValueError, match=r"\(6,\).*\(10, 6\)"):
        dora_axis(torch.ones(6), (10, 6))
    with pytest.raises(ValueError, match=r"\(10, 6\).*\(10, 6, 3, 3\)"):
        apply_dora(torch.ones(10, 6, 3, 3), torch.zeros(10, 6, 3, 3), torch.ones(10, 6), 1.0)
    with pytest.raises(ValueError, match="semantics"):
        apply_dora(torch.ones(4, 3), torch.zeros(4, 3), torch.ones(4, 1), 1.0, "peft")


def test_dora_1d_scale_equals_column_vector():
    torch.manual_seed(0)
    weight, scaled, magnitude = torch.randn(8, 5), torch.randn(8, 5) * 0.2, torch.rand(8) + 0.5
    torch.testing.assert_close(apply_dora(weight, scaled, magnitude, 0.7),
                               apply_dora(weight, scaled, magnitude[:, None], 0.7))
    torch.testing.assert_close((weight + apply_dora(weight, scaled, magnitude, 0.7)).double(),
                               dora_merged(weight, scaled, magnitude, 0.7, True, "lycoris"), rtol=1e-5, atol=1e-6)


def test_dora_zero_row_gives_zero_not_nan():
    weight = torch.zeros(3, 4)
    change = apply_dora(weight, torch.zeros(3, 4), torch.ones(3, 1), 1.0)
    assert torch.isfinite(change).all() and not change.any()
