"""pipe.load_loha_weights and friends on tiny SD1.5 / SDXL / inpaint pipelines.

References are pipelines whose weights were merged with the formulas (tests/formulas.py),
and files are built with independently derived key names (tests/adapter_files.py).
"""
import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import loha_diffusion  # noqa: F401  (attaches the pipeline methods)
from adapter_files import make_file_tensors, merged_reference, reference_delta
from loha_diffusion.io import AdapterFileError
from loha_diffusion.layers import AdapterLayer
from tiny_models import run_tiny_pipeline, tiny_sd15_pipeline, tiny_sdxl_pipeline

PROMPT = "a photo of sks dog"


@pytest.fixture
def pipe(sd15):
    return copy.deepcopy(sd15)


def state_of(pipe):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder", "text_encoder_2")
            if getattr(pipe, c, None) is not None for k, v in getattr(pipe, c).state_dict().items()}


def assert_same_state(pipe, before):
    after = state_of(pipe)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, AdapterLayer) for c in ("unet", "text_encoder") for m in getattr(pipe, c).modules())


def write(tmp_path, state, name="adapter.safetensors", metadata=None):
    path = tmp_path / name
    save_file(state, str(path), metadata=metadata)
    return path


def close_images(a, b, atol=2e-3):
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("algo", ["loha", "lora", ["lokr", "loha", "full", "lora"]])
def test_loaded_adapter_matches_formula_merged_pipeline(pipe, tmp_path, algo):
    state, by_module = make_file_tensors(pipe, algo)
    reference = run_tiny_pipeline(merged_reference(pipe, by_module), PROMPT)
    base_image = run_tiny_pipeline(pipe, PROMPT)
    name = pipe.load_loha_weights(write(tmp_path, state))
    assert name == "adapter"
    image = run_tiny_pipeline(pipe, PROMPT)
    assert np.abs(reference - base_image).max() > 1e-2      # the adapter visibly changes the image
    close_images(image, reference)
    pipe.disable_loha_weight_cache()          # applied per call instead, thin or merged
    close_images(run_tiny_pipeline(pipe, PROMPT), reference)
    assert all(m.weight_cache.params is None for m in pipe.unet.modules() if isinstance(m, AdapterLayer))
    pipe.enable_loha_weight_cache()
    run_tiny_pipeline(pipe, PROMPT)
    layers = [m for m in pipe.unet.modules() if isinstance(m, AdapterLayer)]
    cached = [m.weight_cache.params[0].data_ptr() for m in layers]
    pipe.fuse_loha()                          # takes the cached effective weights as they are
    assert [m.base_layer.weight.data_ptr() for m in layers] == cached
    close_images(run_tiny_pipeline(pipe, PROMPT), reference)


def test_strengths_two_adapters_and_component_weights(pipe, tmp_path):
    state_a, mods_a = make_file_tensors(pipe, "loha", seed=1)
    state_b, mods_b = make_file_tensors(pipe, "lora", seed=2)
    pipe.load_loha_weights(write(tmp_path, state_a, "a.safetensors"))
    pipe.load_loha_weights(write(tmp_path, state_b, "b.safetensors"))
    assert pipe.get_loha_adapters() == {"unet": ["a", "b"], "text_encoder": ["a", "b"]}

    pipe.set_loha_adapters(["a", "b"], weights=[0.5, 1.0])
    ref = merged_reference(merged_reference(pipe, mods_a, 0.5, 0.5), mods_b)
    # merged_reference copies ``pipe`` with its (unmerged) adapter layers; disable them there
    ref.disable_loha()
    close_images(run_tiny_pipeline(pipe, PROMPT), run_tiny_pipeline(ref, PROMPT))

    pipe.set_loha_adapters(["a"], weights=0.8, text_encoder_weights=0.0)       # UNet only
    ref = merged_reference(pipe, mods_a, 0.8, 0.0)
    ref.disable_loha()
    close_images(run_tiny_pipeline(pipe, PROMPT), run_tiny_pipeline(ref, PROMPT))

    pipe.set_loha_adapters(["b"], weights=0.0, text_encoder_weights=1.0)       # text encoder only
    ref = merged_reference(pipe, mods_b, 0.0, 1.0)
    ref.disable_loha()
    close_images(run_tiny_pipeline(pipe, PROMPT), run_tiny_pipeline(ref, PROMPT))


def test_fuse_unfuse_and_unload_are_bit_exact(pipe, tmp_path):
    before = state_of(pipe)
    originals = {p: m for p, m in pipe.unet.named_modules()}
    state, _ = make_file_tensors(pipe, ["loha", "lokr", "full"])
    pipe.load_loha_weights(write(tmp_path, state))
    pipe.fuse_loha(scale=0.7)
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert not torch.equal(pipe.unet.get_submodule(q).base_layer.weight, before[f"unet.{q}.weight"])  # fused
    pipe.unfuse_loha()
    pipe.fuse_loha()
    pipe.unfuse_loha()
    pipe.unload_loha_weights()
    assert_same_state(pipe, before)
    assert all(pipe.unet.get_submodule(p) is m for p, m in originals.items() if p)


def test_fp16_pipeline_fuse_unfuse_exact(pipe, tmp_path):
    pipe.to(torch.float16)
    before = state_of(pipe)
    state, by_module = make_file_tensors(pipe, "loha")
    pipe.load_loha_weights(write(tmp_path, state))
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    x = torch.randn(1, 5, layer.weight.shape[1], dtype=torch.float16)
    expected = torch.nn.functional.linear(x.double(), merged_reference(pipe, {
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"):
            by_module[("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")]}).unet.get_submodule(
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").base_layer.weight.double())
    with torch.no_grad():
        np.testing.assert_allclose(layer(x).double().numpy(), expected.numpy(), atol=2e-2)
    pipe.fuse_loha()
    pipe.unfuse_loha()
    pipe.unload_loha_weights()
    assert_same_state(pipe, before)


def test_sdxl_pipeline_loads_sgm_named_file(tmp_path):
    pipe = tiny_sdxl_pipeline(tmp_path)
    state, by_module = make_file_tensors(pipe, "loha", sdxl=True)
    assert any(k.startswith("lora_unet_input_blocks_") for k in state)
    assert any(k.startswith("lora_te2_text_model_") for k in state)
    reference = run_tiny_pipeline(merged_reference(pipe, by_module), PROMPT)
    pipe.load_loha_weights(write(tmp_path, state))
    close_images(run_tiny_pipeline(pipe, PROMPT), reference)


def test_inpaint_pipeline_pads_a_4_channel_conv_in_delta(tmp_path):
    pipe = tiny_sd15_pipeline(tmp_path, in_channels=9)
    conv_in = pipe.unet.conv_in
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 4, 3, 3, generator=g), torch.randn(conv_in.out_channels, 4, 1, 1, generator=g)
    state = {"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up,
             "lora_unet_conv_in.alpha": torch.tensor(2.0)}
    original = conv_in.weight.detach().clone()
    pipe.load_loha_weights(write(tmp_path, state))
    pipe.fuse_loha()
    delta = (up.flatten(1) @ down.flatten(1)).reshape(-1, 4, 3, 3) * 0.5
    expected = original.clone()
    expected[:, :4] += delta
    torch.testing.assert_close(pipe.unet.conv_in.base_layer.weight, expected)
    assert run_tiny_pipeline(pipe, PROMPT).shape == (1, 16, 16, 3)


# -- bad input leaves the pipeline untouched ---------------------------------------------------
def test_sdxl_file_into_sd15_pipeline(pipe, tmp_path):
    sdxl = tiny_sdxl_pipeline(tmp_path / "xl")
    state, _ = make_file_tensors(sdxl, "lora", sdxl=True)
    before = state_of(pipe)
    with pytest.raises(AdapterFileError, match=r"match no layer.*(sdxl|te2)"):
        pipe.load_loha_weights(write(tmp_path, state))
    assert_same_state(pipe, before)


def test_wrong_shapes_are_named(pipe, tmp_path):
    state, _ = make_file_tensors(pipe, "loha")
    key = next(k for k in state if k.endswith("attn1_to_q.hada_w1_b"))
    state[key] = torch.randn(4, state[key].shape[1] + 1)
    before = state_of(pipe)
    with pytest.raises(AdapterFileError, match=r"attn1_to_q.*needs"):
        pipe.load_loha_weights(write(tmp_path, state))
    assert_same_state(pipe, before)


def test_truncated_garbage_pickle_nan_unknown(pipe, tmp_path):
    state, _ = make_file_tensors(pipe, "lora")
    good = write(tmp_path, state)
    before = state_of(pipe)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    pickled = tmp_path / "adapter.ckpt"
    torch.save(state, pickled)
    nan_state = dict(state)
    nan_state[next(iter(nan_state))] = torch.full_like(next(iter(state.values())), float("nan"))
    unknown = dict(state, **{"lora_unet_conv_in.something_else": torch.ones(2)})
    cases = [(truncated, "truncated"), (garbage, "not valid JSON"), (pickled, "allow_pickle"),
             (write(tmp_path, nan_state, "nan.safetensors"), "NaN"),
             (write(tmp_path, unknown, "unknown.safetensors"), "allow_unknown_keys")]
    for path, message in cases:
        with pytest.raises(AdapterFileError, match=message):
            pipe.load_loha_weights(path)
        assert_same_state(pipe, before)
    # the opt-ins work
    pipe.load_loha_weights(pickled, allow_pickle=True)
    pipe.load_loha_weights(write(tmp_path, unknown, "unknown2.safetensors"), allow_unknown_keys=True)
    assert pipe.get_loha_adapters(flat=True) == ["adapter", "unknown2"]


def test_unsupported_algorithm_is_refused(pipe, tmp_path):
    state = {"lora_unet_conv_in.oft_blocks": torch.zeros(4, 4, 4), "lora_unet_conv_in.alpha": torch.tensor(1.0)}
    with pytest.raises(AdapterFileError, match="not support"):
        pipe.load_loha_weights(write(tmp_path, state))


def test_sd2_linear_projection_takes_4d_kohya_tensors(tmp_path):
    """sd-scripts writes SD2 proj_in/proj_out LoRAs as 1x1 conv tensors; diffusers' SD2 has Linear there."""
    pipe = tiny_sd15_pipeline(tmp_path, use_linear_projection=True, prediction_type="v_prediction")
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.proj_in")
    assert isinstance(layer, torch.nn.Linear)
    g = torch.Generator().manual_seed(0)
    down = torch.randn(2, layer.in_features, 1, 1, generator=g)
    up = torch.randn(layer.out_features, 2, 1, 1, generator=g)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    original = layer.weight.detach().clone()
    pipe.load_loha_weights({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                            f"{name}.alpha": torch.tensor(1.0)})
    pipe.fuse_loha()
    expected = original + 0.5 * (up.flatten(1) @ down.flatten(1))
    fused = pipe.unet.get_submodule("down_blocks.0.attentions.0.proj_in").base_layer.weight
    torch.testing.assert_close(fused, expected)
    assert np.isfinite(run_tiny_pipeline(pipe, PROMPT)).all()


def test_bf16_pipeline_runs_and_unfuses_exactly(pipe, tmp_path):
    pipe.to(torch.bfloat16)
    before = state_of(pipe)
    state, _ = make_file_tensors(pipe, ["loha", "lora"])
    pipe.load_loha_weights(state)
    assert np.isfinite(run_tiny_pipeline(pipe, PROMPT)).all()
    pipe.fuse_loha()
    pipe.unfuse_loha()
    pipe.unload_loha_weights()
    assert_same_state(pipe, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("algo", ["loha", "lora"])
def test_fused_weights_equal_the_formula(pipe, tmp_path, monkeypatch, dtype, algo):
    import loha_diffusion.fused
    monkeypatch.setattr(loha_diffusion.fused, "_BLOCK_ELEMENTS", 64)  # many row blocks per layer
    pipe.to(dtype)
    before = state_of(pipe)
    state, by_module = make_file_tensors(pipe, algo)
    name = pipe.load_loha_weights(write(tmp_path, state))
    pipe.set_loha_adapters([name], weights=0.6)
    pipe.fuse_loha(scale=0.5)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-3, "atol": 1e-4}
    for (component, path), tensors in by_module.items():
        fused = getattr(pipe, component).get_submodule(path).base_layer.weight
        original = before[f"{component}.{path}.weight"].double()
        expected = original + 0.3 * reference_delta(tensors, original)
        assert fused.dtype == dtype
        torch.testing.assert_close(fused.double(), expected, **tolerance)
    pipe.unfuse_loha()
    pipe.unload_loha_weights()
    assert_same_state(pipe, before)


def test_failed_fuse_changes_nothing(pipe, tmp_path):
    before = state_of(pipe)
    state, _ = make_file_tensors(pipe, "loha")
    name = pipe.load_loha_weights(write(tmp_path, state))
    layers = [m for m in pipe.unet.modules() if isinstance(m, AdapterLayer)]
    with torch.no_grad():  # a factor that overflows fp32 in the last layer fused
        layers[-1].adapters[name].hada_w1_a.fill_(3e38)
    with pytest.raises(ValueError, match="NaN/inf"):
        pipe.fuse_loha()
    assert all(not layer.merged_adapters for layer in layers)
    pipe.unload_loha_weights()
    assert_same_state(pipe, before)


def test_in_place_fuse_equals_the_formula_without_new_weight_memory(pipe, tmp_path):
    before = state_of(pipe)
    state, by_module = make_file_tensors(pipe, ["loha", "lokr", "full", "lora"])  # fused ops and the general path
    name = pipe.load_loha_weights(write(tmp_path, state))
    pipe.set_loha_adapters([name], weights=0.6)
    layers = {key: getattr(pipe, key[0]).get_submodule(key[1]) for key in by_module}
    storage = {key: layer.base_layer.weight.data_ptr() for key, layer in layers.items()}
    pipe.fuse_loha(scale=0.5, exact_unfuse=False)
    for key, tensors in by_module.items():
        weight = layers[key].base_layer.weight
        original = before[f"{key[0]}.{key[1]}.weight"].double()
        assert weight.data_ptr() == storage[key]     # written where W was: no second copy
        torch.testing.assert_close(weight.double(), original + 0.3 * reference_delta(tensors, original),
                                   rtol=1e-5, atol=1e-6)
    pipe.unfuse_loha()
    pipe.unload_loha_weights()
    after = state_of(pipe)
    drift = max((after[k].double() - before[k].double()).abs().max().item() for k in before)
    assert 0 < drift < 1e-6   # subtracted again: back to fp32 rounding, not bit-exact


def test_unload_keeps_fused_adapters_only_when_asked(pipe, tmp_path):
    before = state_of(pipe)
    originals = {p: m for p, m in pipe.unet.named_modules()}
    state, by_module = make_file_tensors(pipe, "loha")
    reference = run_tiny_pipeline(merged_reference(pipe, by_module), PROMPT)
    pipe.load_loha_weights(write(tmp_path, state))
    pipe.fuse_loha()
    with pytest.warns(UserWarning, match="keep_fused=True"):
        pipe.unload_loha_weights()
    assert_same_state(pipe, before)

    pipe.load_loha_weights(write(tmp_path, state))
    pipe.fuse_loha()
    pipe.unload_loha_weights(keep_fused=True)     # diffusers' fuse_lora + unload_lora_weights
    assert not any(isinstance(m, AdapterLayer) for c in ("unet", "text_encoder") for m in getattr(pipe, c).modules())
    assert all(pipe.unet.get_submodule(p) is m for p, m in originals.items() if p)
    assert pipe.get_loha_adapters(flat=True) == []
    close_images(run_tiny_pipeline(pipe, PROMPT), reference)


def test_saved_peft_folder_loads_in_peft(pipe, tmp_path):
    from peft import PeftModel

    state, by_module = make_file_tensors(pipe, "loha")
    reference = run_tiny_pipeline(merged_reference(pipe, by_module), PROMPT)
    through_peft = copy.deepcopy(pipe)
    pipe.load_loha_weights(state, adapter_name="a")
    folder = pipe.save_loha_weights(tmp_path / "peft", format="peft")
    through_peft.unet = PeftModel.from_pretrained(through_peft.unet, str(folder / "unet"))
    through_peft.text_encoder = PeftModel.from_pretrained(through_peft.text_encoder, str(folder / "text_encoder"))
    close_images(run_tiny_pipeline(through_peft, PROMPT), reference)
    with pytest.raises(ValueError, match="format must be 'kohya' or 'peft'"):
        pipe.save_loha_weights(tmp_path / "adapter.onnx", format="onnx")
