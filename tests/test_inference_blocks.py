"""Per-block strengths: set_loha_adapters(names, weights=[dict]) against diffusers' set_adapters.

The oracle is diffusers itself: a Kohya LoRA file with alpha = rank (which diffusers scales
right) loaded by ``load_lora_weights`` + ``set_adapters(dict)`` must give the same image as the
same file through ``load_loha_weights`` + ``set_loha_adapters(dict)``. For a LoHa file the
strength diffusers gives each layer (read off its PEFT layers' ``scaling``) is applied to the
LoHa formula (tests/formulas.py) on a copy of the pipeline.
"""
import copy

import numpy as np
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

import loha_diffusion  # noqa: F401  (attaches the pipeline methods)
from adapter_files import UNET_TARGETS, make_file_tensors, reference_delta
from loha_diffusion.layers import AdapterLayer
from tiny_models import run_tiny_pipeline

PROMPT = "a photo of sks dog"
# resnets, down/upsamplers and transformers: every kind of layer a block entry reaches
TARGETS = (*UNET_TARGETS, "conv")
SD15_WEIGHTS = {"unet": {"down": {"block_1": [0.0, 1.5]}, "mid": 0.2,
                         "up": {"block_1": [1.0, 0.0, 1.0], "block_3": 0.3}}, "text_encoder": 0.8}
SDXL_WEIGHTS = {"unet": {"down": 0.3, "mid": [0.0], "up": {"block_0": [1.0, 0.2, -1.0], "block_1": 0.5}},
                "text_encoder": 0.8, "text_encoder_2": 0.4}


def image(pipe):
    return run_tiny_pipeline(pipe, PROMPT, steps=1)


def lora_file(pipe, tmp_path, sdxl=False):
    state, _ = make_file_tensors(pipe, "lora", sdxl=sdxl, unet_targets=TARGETS, seed=3)
    path = tmp_path / "lora.safetensors"
    save_file(state, str(path))
    return path


def diffusers_strengths(pipe) -> dict[tuple[str, str], float]:
    """{(component, path): strength} as diffusers set them (PEFT scaling / (alpha / r) = strength)."""
    found = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        for path, module in [] if model is None else model.named_modules():
            if isinstance(module, BaseTunerLayer):
                found[(component, path)] = module.scaling["x"]   # alpha == r: scaling is the strength
    return found


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_per_block_dict_gives_diffusers_image(family, sd15, sdxl, tmp_path):
    base, weights = (sd15, SD15_WEIGHTS) if family == "sd15" else (sdxl, SDXL_WEIGHTS)
    path = lora_file(base, tmp_path, sdxl=family == "sdxl")
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    theirs.load_lora_weights(str(path), adapter_name="x")
    ours.load_loha_weights(path, adapter_name="x")
    full = image(theirs)
    theirs.set_adapters(["x"], [copy.deepcopy(weights)])
    ours.set_loha_adapters(["x"], [weights])
    expected = image(theirs)
    assert np.abs(expected - full).max() > 1e-3                   # the dict visibly changes the image
    np.testing.assert_allclose(image(ours), expected, atol=1e-4, rtol=0)
    # and layer by layer: every adapted layer got diffusers' strength
    ours_by_layer = {(c, p): layer.strengths["x"] for c, p, layer in loha_diffusion.pipeline._layers(ours)}
    assert ours_by_layer == pytest.approx(diffusers_strengths(theirs))
    assert len(set(ours_by_layer.values())) > 4

    ours.fuse_loha()                                               # fuses at the strengths that are set
    np.testing.assert_allclose(image(ours), expected, atol=1e-4, rtol=0)
    ours.unfuse_loha()
    reported = ours.get_loha_adapters(weights=True)
    ours.set_loha_adapters(["x"], weights=0.0)
    ours.set_loha_adapters(list(reported), list(reported.values()))   # the report sets them again
    assert {(c, p): layer.strengths["x"] for c, p, layer in loha_diffusion.pipeline._layers(ours)} == ours_by_layer


def test_same_dict_on_a_loha_file_follows_the_formula(sd15, tmp_path):
    theirs = copy.deepcopy(sd15)
    theirs.load_lora_weights(str(lora_file(sd15, tmp_path)), adapter_name="x")
    theirs.set_adapters(["x"], [copy.deepcopy(SD15_WEIGHTS)])
    strengths = diffusers_strengths(theirs)

    state, by_module = make_file_tensors(sd15, "loha", unet_targets=TARGETS, seed=4)
    ours = copy.deepcopy(sd15)
    ours.load_loha_weights(state, adapter_name="x")
    ours.set_loha_adapters("x", SD15_WEIGHTS)
    reference = copy.deepcopy(sd15)
    with torch.no_grad():
        for (component, path), tensors in by_module.items():
            module = getattr(reference, component).get_submodule(path)
            delta = reference_delta(tensors, module.weight)
            module.weight.copy_((module.weight.double() + strengths[(component, path)] * delta).float())
    np.testing.assert_allclose(image(ours), image(reference), atol=2e-3, rtol=0)


def test_bad_dicts_are_refused_with_the_valid_names_and_change_nothing(sd15, tmp_path):
    pipe = copy.deepcopy(sd15)
    pipe.load_loha_weights(lora_file(sd15, tmp_path), adapter_name="x")
    pipe.set_loha_adapters("x", 0.5)
    cases = [
        ({"unet": {"up": {"block_0": 1.0}}}, r"block_1 \(3 transformers\)"),   # SD1.5 up.block_0: no transformer
        ({"unet": {"down": {"block_7": 1.0}}}, "valid names: down: block_0"),
        ({"unet": {"middle": 1.0}}, "'down', 'mid' and 'up'"),
        ({"unet": {"up": {"block_1": [1.0, 2.0]}}}, "has 3 transformers, got 2"),
        ({"text_encoder_2": 1.0}, r"valid components: \['unet', 'text_encoder'\]"),
        ({"text_encoder": {"down": 1.0}}, "text_encoder takes one strength"),
        ({"unet": {"mid": "high"}}, "expected a number"),
    ]
    for weights, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe.set_loha_adapters(["x"], [weights])
    layers = [layer for _, _, layer in loha_diffusion.pipeline._layers(pipe)]
    assert all(layer.strengths["x"] == 0.5 for layer in layers)

    pipe.fuse_loha()
    with pytest.raises(RuntimeError, match="unfuse_loha"):
        pipe.set_loha_adapters("x", {"unet": {"down": 0.0}})
    assert all(layer.strengths["x"] == 0.5 for layer in layers)
    assert all(isinstance(layer, AdapterLayer) and layer.merged_adapters == ["x"] for layer in layers)
