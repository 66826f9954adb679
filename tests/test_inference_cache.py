"""The unfused-inference weight cache: O(1) validity that still notices every change, and the
memory budget (some layers cached, the others applying their adapters per call, same images).

Outputs are checked against the LoHa formula (tests/formulas.py) in float64.
"""
import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import loha_diffusion  # noqa: F401  (attaches the pipeline methods)
from adapter_files import make_file_tensors
from formulas import apply_layer, loha_delta
from loha_diffusion.layers import AdapterLayer, AdapterWeights
from loha_diffusion.layers import cache as weight_cache
from tiny_models import run_tiny_pipeline


def loha_layer(requires_grad=False):
    torch.manual_seed(0)
    layer = AdapterLayer(nn.Linear(24, 20))
    tensors = {"hada_w1_a": torch.randn(20, 4), "hada_w1_b": torch.randn(4, 24),
               "hada_w2_a": torch.randn(20, 4), "hada_w2_b": torch.randn(4, 24)}
    layer.add_adapter("a", AdapterWeights("loha", {k: v * 0.3 for k, v in tensors.items()}, 2.0))
    layer.adapters["a"].requires_grad_(requires_grad)
    return layer


def expected(layer, x):
    adapter = layer.adapters["a"]
    tensors = {k: v.detach() for k, v in adapter.params.items()}
    weight = layer.base_layer.weight.double()
    weight = weight + layer.strengths["a"] * loha_delta(tensors, weight.shape, float(adapter.alpha))
    return apply_layer(copy.deepcopy(layer.base_layer).double(), x.double(), weight)


def check(layer, x):
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out.double(), expected(layer, x), rtol=1e-5, atol=1e-5)
    assert layer.weight_cache.params is not None                  # served from the cache


def test_fused_optimizer_steps_between_evaluations_invalidate_the_cache():
    layer = loha_layer(requires_grad=True)
    x = torch.randn(3, 24)
    optimizer = torch.optim.AdamW(layer.adapters.parameters(), lr=0.05, fused=True)
    for _ in range(3):                                            # train, evaluate, train, evaluate...
        layer.train()
        versions = [p._version for p in layer.adapters.parameters()]
        layer(x).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        # a fused step leaves the version counters as they were: only the optimizer hook tells
        assert [p._version for p in layer.adapters.parameters()] == versions
        layer.eval()
        check(layer, x)


def test_every_other_change_is_noticed():
    layer = loha_layer().eval()
    x = torch.randn(3, 24)
    adapter = layer.adapters["a"]
    check(layer, x)
    with torch.no_grad():
        adapter.get_parameter("hada_w2_b").mul_(-2)              # in-place edit
    check(layer, x)
    replaced = {k: v * 1.5 for k, v in adapter.state_dict().items()}
    adapter.load_state_dict(replaced, assign=True)               # new parameter objects
    check(layer, x)
    layer.set_strength("a", -0.5)
    check(layer, x)
    with torch.no_grad():
        layer.base_layer.weight.add_(0.25)                       # base weight in place
    check(layer, x)
    layer.base_layer.weight.data = layer.base_layer.weight.data * 2   # new base storage
    check(layer, x)
    layer.double()                                               # dtype change
    check(layer, x.double())
    layer.float()
    layer.adapters_enabled = False
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))
    layer.adapters_enabled = True
    layer.set_active([])
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))


def test_budget_admits_within_the_cap_or_the_free_fraction(monkeypatch):
    capped = weight_cache.CacheBudget(max_bytes=1000)
    capped.used = 400
    assert capped.admits(600, torch.device("cpu")) and not capped.admits(601, torch.device("cpu"))
    # without a cap: what the device has free, keeping leave_free of its total
    monkeypatch.setattr(weight_cache, "_free_and_total", lambda device: (1000, 2000))
    free_rule = weight_cache.CacheBudget(leave_free=0.2)
    assert free_rule.admits(600, torch.device("cuda")) and not free_rule.admits(601, torch.device("cuda"))
    monkeypatch.undo()
    free, total = weight_cache._free_and_total(torch.device("cpu"))   # the kernel's figures, read for real
    assert 0 < free <= total
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_bytes"):
            weight_cache.CacheBudget(max_bytes=bad)
    with pytest.raises(ValueError, match="leave_free"):
        weight_cache.CacheBudget(leave_free=1.0)


def test_an_out_of_memory_build_falls_back_to_the_per_call_path(monkeypatch):
    layer = loha_layer().eval()
    layer.set_weight_cache(True, weight_cache.CacheBudget())
    x = torch.randn(3, 24)

    def out_of_memory(terms):
        raise torch.OutOfMemoryError("no room")

    monkeypatch.setattr(layer, "_build", out_of_memory)
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out.double(), expected(layer, x), rtol=1e-5, atol=1e-5)
    assert layer.weight_cache.params is None and layer.weight_cache.budget.used == 0


def adapter_layers(pipe):
    return [m for c in ("unet", "text_encoder") for m in getattr(pipe, c).modules() if isinstance(m, AdapterLayer)]


def test_a_small_budget_caches_some_layers_and_gives_the_same_image(sd15, tmp_path):
    pipe = copy.deepcopy(sd15)
    state, _ = make_file_tensors(pipe, "loha")
    pipe.load_loha_weights(state, adapter_name="a")
    pipe.disable_loha_weight_cache()
    reference = run_tiny_pipeline(pipe, steps=1)
    assert all(m.weight_cache.params is None for m in adapter_layers(pipe))

    cap = 40_000
    pipe.enable_loha_weight_cache(max_bytes=cap)
    image = run_tiny_pipeline(pipe, steps=1)
    layers = adapter_layers(pipe)
    held = [m.weight_cache.params[0].nbytes for m in layers if m.weight_cache.params is not None]
    budget = layers[0].weight_cache.budget
    assert all(m.weight_cache.budget is budget for m in layers)     # one budget for the pipeline
    assert 0 < len(held) < len(layers) and sum(held) == budget.used <= cap
    np.testing.assert_allclose(image, reference, atol=1e-5, rtol=0)

    second, _ = make_file_tensors(sd15, "lora", seed=5)
    save_file(second, str(tmp_path / "b.safetensors"))
    pipe.load_loha_weights(tmp_path / "b.safetensors")              # new layers join the same budget
    assert all(m.weight_cache.budget is budget for m in adapter_layers(pipe))
    pipe.unload_loha_weights()
    assert budget.used == 0                                         # every byte handed back
