"""The adapter layer: forward, gradients, zero init, merge/unmerge, caching - against formulas."""
import copy

import pytest
import torch
from torch import nn

from formulas import apply_layer, loha_delta, lora_delta
from loha_diffusion import AdapterLayer, AdapterWeights
from loha_diffusion.algorithms import loha, lora
from loha_diffusion.layers import paths

FORMULAS = {"loha": loha_delta, "lora": lora_delta}
ALGOS = {"loha": loha, "lora": lora}


def make_layer(kind):
    torch.manual_seed(0)
    return {"linear": lambda: nn.Linear(24, 20),
            "conv1d": lambda: nn.Conv1d(6, 10, 3, padding=1),
            "conv2d": lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1)}[kind]()


def make_input(kind, tokens=5):
    torch.manual_seed(1)
    return {"linear": torch.randn(2, tokens, 24), "conv1d": torch.randn(2, 6, 9),
            "conv2d": torch.randn(2, 6, 9, 9)}[kind]


def wrap(layer, algo="loha", tucker=False, alpha=6.0, r=4, scheme="random", **kw):
    wrapped = AdapterLayer(layer)
    tensors = ALGOS[algo].init_params(layer.weight.shape, r, use_tucker=tucker, scheme=scheme)
    wrapped.add_adapter("a", AdapterWeights(algo, tensors, alpha, **kw))
    return wrapped


def reference_output(wrapped, x, names=("a",)):
    """The wrapped layer's op in float64 with the formula's merged weight."""
    return apply_layer(copy.deepcopy(wrapped.base_layer).double(), x.double(), reference_weight(wrapped, names))


def close(actual, expected):
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-5)


def reference_weight(wrapped, names=("a",)):
    weight = wrapped.base_layer.weight.double()
    for name in names:
        adapter = wrapped.adapters[name]
        tensors = {k: v.detach() for k, v in adapter.params.items()}
        delta = FORMULAS[adapter.algorithm.NAME](tensors, weight.shape, float(adapter.alpha))
        weight = weight + wrapped.strengths[name] * delta
    return weight


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
@pytest.mark.parametrize("algo,tucker", [("loha", False), ("loha", True), ("lora", False), ("lora", True)])
@pytest.mark.parametrize("path", ["thin", "merged"])
@pytest.mark.parametrize("route", ["fused", "general"])
def test_forward_and_gradients_equal_reference(kind, algo, tucker, path, route, monkeypatch):
    wrapped = wrap(make_layer(kind), algo, tucker)
    wrapped.base_layer.requires_grad_(False)
    monkeypatch.setattr(paths, "prefers_thin_path", lambda *a: path == "thin")
    used = []
    if route == "general":  # what several adapters, DoRA or mixed precision take
        monkeypatch.setattr(paths, "fused_route_applies", lambda *a: False)
    else:
        original = paths.fused_forward
        monkeypatch.setattr(paths, "fused_forward", lambda *a: used.append(1) or original(*a))
    x = make_input(kind)
    out = wrapped(x)
    reference_params = {k: v.detach().clone().double().requires_grad_()
                        for k, v in wrapped.adapters["a"].params.items()}
    base = wrapped.base_layer
    delta = FORMULAS[algo](reference_params, base.weight.shape, 6.0)
    expected = apply_layer(base.double(), x.double(), base.weight + delta)
    base.float()
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)

    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    (expected * grad_out.double()).sum().backward()
    for name, param in wrapped.adapters["a"].params.items():
        torch.testing.assert_close(param.grad.double(), reference_params[name].grad, rtol=1e-4, atol=1e-4)
    assert base.weight.grad is None and base.bias.grad is None
    assert bool(used) == (route == "fused")


def test_cost_model_picks_thin_for_few_tokens_and_merged_for_many():
    wrapped = wrap(nn.Linear(256, 256), r=8)
    adapters = [wrapped.adapters["a"]]
    assert paths.prefers_thin_path(wrapped.base_layer, torch.randn(2, 256), adapters, needs_grad=True)  # time_emb_proj
    assert not paths.prefers_thin_path(wrapped.base_layer, torch.randn(4096, 256), adapters, needs_grad=True)


@pytest.mark.parametrize("algo", ["loha", "lora"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_zero_init_is_bit_identical(algo, kind):
    layer = make_layer(kind)
    plain = copy.deepcopy(layer)
    wrapped = wrap(layer, algo, scheme="lycoris")
    x = make_input(kind, tokens=300)
    for training in (True, False):
        wrapped.train(training)
        assert torch.equal(wrapped(x), plain(x))
        with torch.no_grad():
            assert torch.equal(wrapped(x), plain(x))


def test_eval_cache_follows_parameter_and_strength_changes():
    wrapped = wrap(make_layer("linear")).eval()
    x = make_input("linear")
    with torch.no_grad():
        close(wrapped(x), reference_output(wrapped, x))
        wrapped.adapters["a"].get_parameter("hada_w1_a").mul_(2)        # in-place edit: cache must notice
        close(wrapped(x), reference_output(wrapped, x))
        wrapped.set_strength("a", 0.5)
        close(wrapped(x), reference_output(wrapped, x))
        wrapped.base_layer.weight.add_(1.0)                             # base weight edited in place
        close(wrapped(x), reference_output(wrapped, x))


def test_two_adapters_combine_linearly():
    wrapped = wrap(make_layer("conv2d"))
    tensors = lora.init_params(wrapped.weight.shape, 3, scheme="random")
    wrapped.add_adapter("b", AdapterWeights("lora", tensors, 1.5), strength=-0.7)
    x = make_input("conv2d")
    ref = reference_output(wrapped, x, ("a", "b"))
    for training in (True, False):
        wrapped.train(training)
        close(wrapped(x), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_then_unmerge_restores_weights_bit_exactly(dtype):
    wrapped = wrap(make_layer("conv2d")).to(dtype)
    original = wrapped.base_layer.weight.detach().clone()
    wrapped.merge()
    merged = wrapped.base_layer.weight.detach().clone()
    expected = (original.double() + loha_delta({k: v.detach() for k, v in wrapped.adapters["a"].params.items()},
                                               original.shape, 6.0)).to(dtype)
    assert torch.equal(merged, expected) or torch.allclose(merged.double(), expected.double(), atol=1e-6)
    assert not torch.equal(merged, original)
    x = make_input("conv2d").to(dtype)
    with torch.no_grad():
        assert torch.equal(wrapped(x), wrapped.base_layer(x))  # merged adapters are not applied twice
    wrapped.unmerge()
    assert torch.equal(wrapped.base_layer.weight, original)


def test_strength_of_fused_adapter_cannot_change_silently():
    wrapped = wrap(make_layer("linear"))
    wrapped.merge()
    with pytest.raises(RuntimeError, match="unfuse"):
        wrapped.set_strength("a", 0.3)


def test_module_dropout_skips_adapter_in_training_only(monkeypatch):
    wrapped = wrap(make_layer("linear"), module_dropout=0.999999)
    plain = copy.deepcopy(wrapped.base_layer)
    x = make_input("linear")
    wrapped.train()
    assert torch.equal(wrapped(x), plain(x))
    wrapped.eval()
    assert not torch.equal(wrapped(x), plain(x))


def test_rank_dropout_masks_rows_and_keeps_expectation():
    torch.manual_seed(0)
    wrapped = wrap(nn.Linear(16, 400), rank_dropout=0.5).train()
    x = torch.randn(3, 16)
    with torch.no_grad():
        base = wrapped.base_layer(x)
        wrapped.eval()
        full = wrapped(x) - base
        wrapped.train()
        dropped = wrapped(x) - base
    kept = (dropped.abs().sum(0) > 0)
    assert 0.3 < kept.float().mean() < 0.7            # about half of the output rows dropped
    ratio = dropped[:, kept] / full[:, kept]
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1 / kept.float().mean().item()), rtol=1e-3, atol=1e-3)


def test_unsupported_layer_is_refused():
    with pytest.raises(TypeError, match="nn.Linear, nn.Conv1d and nn.Conv2d"):
        AdapterLayer(nn.MultiheadAttention(8, 2))
    with pytest.raises(TypeError, match="affine weights"):
        AdapterLayer(nn.LayerNorm(8, elementwise_affine=False))


# -- algorithms that depend on the base weight or change the bias ------------------------------
def test_full_diff_changes_weight_and_bias():
    layer = make_layer("linear")
    torch.manual_seed(3)
    diff, diff_b = torch.randn_like(layer.weight), torch.randn_like(layer.bias)
    wrapped = AdapterLayer(layer)
    wrapped.add_adapter("a", AdapterWeights("full", {"diff": diff, "diff_b": diff_b}, None), strength=0.5)
    x = make_input("linear")
    expected = torch.nn.functional.linear(x.double(), (layer.weight + 0.5 * diff).double(),
                                          (layer.bias + 0.5 * diff_b).double())
    for training in (True, False):
        wrapped.train(training)
        close(wrapped(x), expected)
    before = (layer.weight.clone(), layer.bias.clone())
    wrapped.merge()
    close(layer.bias, (before[1] + 0.5 * diff_b).double())
    wrapped.unmerge()
    assert torch.equal(layer.weight, before[0]) and torch.equal(layer.bias, before[1])


def test_norm_adapter_on_group_norm():
    norm = nn.GroupNorm(4, 8)
    torch.manual_seed(4)
    w_norm, b_norm = torch.randn(8), torch.randn(8)
    wrapped = AdapterLayer(norm)
    wrapped.add_adapter("a", AdapterWeights("norm", {"w_norm": w_norm, "b_norm": b_norm}, None))
    x = torch.randn(2, 8, 5, 5)
    expected = torch.nn.functional.group_norm(x.double(), 4, (norm.weight + w_norm).double(),
                                              (norm.bias + b_norm).double(), norm.eps)
    close(wrapped(x), expected)


@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_scales_rows_or_columns(on_input):
    from formulas import ia3_delta
    layer = make_layer("linear")
    torch.manual_seed(5)
    w = torch.randn(24 if on_input else 20)
    wrapped = AdapterLayer(layer)
    wrapped.add_adapter("a", AdapterWeights("ia3", {"weight": w, "on_input": torch.tensor(int(on_input))}, None),
                        strength=0.7)
    x = make_input("linear")
    weight = layer.weight.double() + 0.7 * ia3_delta(layer.weight.double(), w.double(), on_input)
    close(wrapped(x), torch.nn.functional.linear(x.double(), weight, layer.bias.double()))


@pytest.mark.parametrize("semantics", ["lycoris", "comfyui"])
@pytest.mark.parametrize("output_axis", [True, False])
def test_dora_loha_in_the_layer(semantics, output_axis):
    from formulas import dora_merged
    layer = make_layer("conv2d")
    torch.manual_seed(6)
    tensors = loha.init_params(layer.weight.shape, 4, scheme="random")
    shape = (10, 1, 1, 1) if output_axis else (1, 6, 1, 1)
    dora_scale = torch.rand(shape) + 0.5
    wrapped = AdapterLayer(layer)
    wrapped.add_adapter("a", AdapterWeights("loha", tensors, 2.0, dora_scale=dora_scale, dora_semantics=semantics),
                        strength=0.5)
    x = make_input("conv2d")
    scaled = loha_delta(tensors, layer.weight.shape, alpha=2.0)
    weight = dora_merged(layer.weight.double(), scaled, dora_scale.double(), 0.5, output_axis, semantics)
    for training in (True, False):
        wrapped.train(training)
        close(wrapped(x), apply_layer(copy.deepcopy(layer).double(), x.double(), weight))


def test_lokr_runs_merged_and_matches_formula():
    from formulas import lokr_delta
    from loha_diffusion.algorithms import lokr
    layer = make_layer("conv2d")
    tensors = lokr.init_params(layer.weight.shape, 4, scheme="random", decompose_both=True)
    wrapped = AdapterLayer(layer)
    wrapped.add_adapter("a", AdapterWeights("lokr", tensors, 3.0))
    x = make_input("conv2d")
    weight = layer.weight.double() + lokr_delta(tensors, layer.weight.shape, alpha=3.0)
    close(wrapped(x), apply_layer(copy.deepcopy(layer).double(), x.double(), weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("algo", ["loha", "lora"])
def test_in_place_merge_writes_the_formula_into_the_weight_and_subtracts_it_again(algo, dtype):
    wrapped = wrap(make_layer("conv2d"), algo=algo).to(dtype)
    weight = wrapped.base_layer.weight
    original = weight.detach().clone()
    storage = weight.data_ptr()
    wrapped.merge(scale=0.5, exact_unmerge=False)
    tensors = {k: v.detach() for k, v in wrapped.adapters["a"].params.items()}
    expected = original.double() + 0.5 * FORMULAS[algo](tensors, original.shape, 6.0)
    assert weight.data_ptr() == storage and wrapped.merge_state.weight_backup is None  # no second copy
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(weight.detach().double(), expected, rtol=eps, atol=1e-6)
    wrapped.unmerge()
    assert weight.data_ptr() == storage and not wrapped.merged_adapters
    # Subtracting again restores W to within one rounding of W + dW and one of the result: two
    # ulps of the larger of W and W + dW (the change itself is far larger than that).
    _, exponent = torch.frexp(torch.maximum(original.double().abs(), expected.abs()))
    ulp = eps * torch.pow(2.0, exponent.double() - 1)
    assert ((weight.detach().double() - original.double()).abs() <= 2 * ulp).all()
    assert ((expected - original.double()).abs() > 2 * ulp).any()


def test_in_place_merge_keeps_the_original_where_the_change_reads_it():
    wrapped = AdapterLayer(make_layer("conv2d"))
    torch.manual_seed(6)
    tensors = loha.init_params(wrapped.weight.shape, 4, scheme="random")
    wrapped.add_adapter("a", AdapterWeights("loha", tensors, 2.0, dora_scale=torch.rand(10, 1, 1, 1) + 0.5))
    original = wrapped.base_layer.weight.detach().clone()
    wrapped.merge(exact_unmerge=False)   # DoRA normalises W + dW: subtracting cannot undo it
    assert not torch.equal(wrapped.base_layer.weight, original)
    wrapped.unmerge()
    assert torch.equal(wrapped.base_layer.weight, original)


def test_second_fuse_at_another_scale_is_refused_and_changes_nothing():
    wrapped = wrap(make_layer("linear"))
    tensors = lora.init_params(wrapped.weight.shape, 2, scheme="random")
    wrapped.add_adapter("b", AdapterWeights("lora", tensors, 1.0), activate=False)
    wrapped.merge(["a"], scale=0.5)
    fused = wrapped.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="fused at scale 0.5"):
        wrapped.merge(["b"], scale=1.0)
    assert wrapped.merged_adapters == ["a"] and torch.equal(wrapped.base_layer.weight, fused)


def test_eval_cache_holds_the_formula_weight_and_a_fuse_adopts_it():
    wrapped = wrap(make_layer("linear")).eval()
    x = make_input("linear")
    with torch.no_grad():
        wrapped(x)
    cached_weight, cached_bias = wrapped.weight_cache.params
    close(cached_weight, reference_weight(wrapped))
    assert cached_bias is wrapped.base_layer.bias
    wrapped.merge()                                    # the same scale-1 weight: taken as it is
    assert wrapped.base_layer.weight.data_ptr() == cached_weight.data_ptr()
    assert wrapped.weight_cache.params is None         # fused: nothing left to cache
    wrapped.unmerge()
    wrapped.set_weight_cache(False)
    with torch.no_grad():
        close(wrapped(x), reference_output(wrapped, x))
    assert wrapped.weight_cache.params is None


@pytest.mark.parametrize("exact", [True, False])
def test_restore_merge_goes_back_to_the_snapshot(exact):
    wrapped = wrap(make_layer("linear"))
    wrapped.add_adapter("b", AdapterWeights("lora", lora.init_params(wrapped.weight.shape, 2, scheme="random"), 1.0),
                        activate=False)
    original = wrapped.base_layer.weight.detach().clone()
    wrapped.merge(["a"], scale=0.5, exact_unmerge=exact)
    fused_a = wrapped.base_layer.weight.detach().clone()
    snapshot = wrapped.merge_state.snapshot()
    wrapped.merge(["b"], scale=0.5)
    assert wrapped.merged_adapters == ["a", "b"]
    wrapped.restore_merge(snapshot)
    assert wrapped.merged_adapters == ["a"] and wrapped.merge_state.in_place == (not exact)
    torch.testing.assert_close(wrapped.base_layer.weight.detach(), fused_a, rtol=0, atol=0 if exact else 1e-6)
    wrapped.unmerge()
    torch.testing.assert_close(wrapped.base_layer.weight.detach(), original, rtol=0, atol=0 if exact else 1e-6)
