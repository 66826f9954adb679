"""The pipeline methods on a tiny Flux pipeline: strengths per component, two adapters, fuse /
unfuse / unload bit-exact, disable / enable, img2img sharing the components, save and reload.

Expected weights are W + strength * (formula delta) in float64 (tests/dit_files.py); expected
images come from a copy of the pipeline whose weights were set to those expected weights.
"""
import copy

import numpy as np
import pytest
import torch
from diffusers import FluxImg2ImgPipeline
from safetensors.torch import load_file

import loha_diffusion  # noqa: F401  (attaches the pipeline methods)
from dit_files import (  # noqa: F401  (one_thread: an autouse fixture)
    T5,
    assert_components,
    clip,
    clip_name,
    diffusers_path_file,
    flux_modules,
    loaded,
    make_original_file,
    one_thread,
    text_encoder_file,
)
from loha_diffusion.io import AdapterFileError
from loha_diffusion.layers import AdapterLayer
from tiny_dit import run_tiny_dit_pipeline

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2")
STACKED = ("double_blocks_0_img_attn_qkv", "double_blocks_1_txt_attn_qkv", "single_blocks_0_linear1",
           "final_layer_adaLN_modulation_1")
PLAIN = ("double_blocks_0_img_mlp_0", "single_blocks_1_linear2", "img_in", "guidance_in_in_layer")


def flux_adapter(flux, algo="lora", names=STACKED + PLAIN, seed=0, lokr_rows=None, text_encoders=True):
    """A BFL-named Flux file with CLIP-L (lora_te1_) and T5 (lora_te3_) modules; {component: {path:
    (weight, bias) at strength 1}}."""
    modules = [m for m in flux_modules() if m[0] in names]
    state, expected = make_original_file(flux, algo, modules, seed=seed, lokr_rows=lokr_rows)
    if not text_encoders:
        return state, {"transformer": expected}
    q = clip(flux.text_encoder, "encoder.layers.0.self_attn.q_proj")
    te_state, te_expected = text_encoder_file(flux, [("text_encoder", clip_name("lora_te1_", q), q),
                                                     ("text_encoder_2", "lora_te3_" + T5.replace(".", "_"), T5)],
                                              algo if algo != "dora" else "lora", seed=seed + 100)
    return {**state, **te_state}, {"transformer": expected, **te_expected}


def at_strengths(base, expected, strengths):
    """The expected weights at per-component strengths: W + s * (E - W), bias likewise."""
    out = {}
    for component, layers in expected.items():
        s, model = strengths.get(component, 1.0), getattr(base, component)
        out[component] = {}
        for path, (weight, bias) in layers.items():
            layer = model.get_submodule(path)
            w = layer.weight.detach().double()
            b = None if bias is None else layer.bias.detach().double() + s * (bias - layer.bias.detach().double())
            out[component][path] = (w + s * (weight - w), b)
    return out


def merged_pipeline(base, expected):
    """A copy of ``base`` with the expected weights written in (the reference for images)."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for component, layers in expected.items():
            for path, (weight, bias) in layers.items():
                layer = getattr(ref, component).get_submodule(path)
                layer.weight.copy_(weight)
                if bias is not None:
                    layer.bias.copy_(bias)
    return ref


def state_of(pipe):
    return {f"{c}.{k}": v.clone() for c in COMPONENTS for k, v in getattr(pipe, c).state_dict().items()}


def logical_state(pipe):
    """The pipeline's own parameters and buffers by their paths before wrapping (adapters left out)."""
    return {k.replace(".base_layer.", "."): v for k, v in state_of(pipe).items() if ".adapters." not in k}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def close_images(a, b):
    # images in [0, 1]: the merged reference and the adapter layers differ by fp32 rounding (~1e-6)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


@pytest.fixture
def pipe(flux):
    return copy.deepcopy(flux)


def test_strengths_per_component(flux, pipe):
    state, expected = flux_adapter(flux)
    assert pipe.load_loha_weights(state, adapter_name="a") == "a"
    assert pipe.get_loha_adapters() == {c: ["a"] for c in COMPONENTS}
    cases = [  # (set_loha_adapters keywords, strength per component)
        (dict(weights=0.5), {"transformer": 0.5, "text_encoder": 0.5, "text_encoder_2": 0.5}),
        (dict(weights={"transformer": 0.5, "text_encoder": 0.0}),
         {"transformer": 0.5, "text_encoder": 0.0, "text_encoder_2": 1.0}),
        (dict(weights=1.0, text_encoder_weights=0.25),
         {"transformer": 1.0, "text_encoder": 0.25, "text_encoder_2": 0.25}),
    ]
    for kwargs, strengths in cases:
        pipe.set_loha_adapters(["a"], **kwargs)
        described = pipe.get_loha_adapters(weights=True)
        assert described == {"a": strengths}
        pipe.set_loha_adapters(list(described), list(described.values()))     # the documented round trip
        assert pipe.get_loha_adapters(weights=True) == described
        pipe.fuse_loha()
        assert_components(flux, pipe, {c: w for c, w in at_strengths(flux, expected, strengths).items()
                                       if strengths[c] != 0})
        for path in expected["text_encoder"] if strengths["text_encoder"] == 0 else ():
            live, original = pipe.text_encoder.get_submodule(path), flux.text_encoder.get_submodule(path)
            assert torch.equal(live.weight, original.weight)
        pipe.unfuse_loha()
    # unfused, at the second strengths: the image of the merged reference
    pipe.set_loha_adapters(["a"], weights={"transformer": 0.5, "text_encoder": 0.0})
    reference = merged_pipeline(flux, at_strengths(flux, expected, cases[1][1]))
    image = run_tiny_dit_pipeline(pipe)
    assert np.abs(image - run_tiny_dit_pipeline(flux)).max() > 1e-2
    close_images(image, run_tiny_dit_pipeline(reference))


def test_per_block_strengths_on_a_transformer(flux, pipe):
    """Per double / single block and for the layers outside them (what sd-webui-lora-block-weight's
    D00-D18 / S00-S37 / IN-OUT weights do): each layer at its block's strength, W + s * (E - W)."""
    state, expected = flux_adapter(flux, text_encoders=False)
    pipe.load_loha_weights(state, adapter_name="a")
    spec = {"transformer_blocks": [1.0, 0.0], "single_transformer_blocks": {"block_1": 0.5}, "rest": 0.25}
    pipe.set_loha_adapters(["a"], weights={"transformer": spec})

    per_block = {"transformer_blocks": [1.0, 0.0], "single_transformer_blocks": [1.0, 0.5]}

    def strength(path):
        block, _, inner = path.partition(".")
        return per_block[block][int(inner.partition(".")[0])] if block in per_block else 0.25

    paths = expected["transformer"]
    assert {strength(p) for p in paths} == {1.0, 0.5, 0.25, 0.0}  # the file reaches every kind of slot
    wanted = {p: at_strengths(flux, {"transformer": {p: paths[p]}}, {"transformer": strength(p)})["transformer"][p]
              for p in paths if strength(p) != 0}
    described = pipe.get_loha_adapters(weights=True)
    assert described == {"a": {"transformer": {"transformer_blocks": [1.0, 0.0],
                                               "single_transformer_blocks": [1.0, 0.5], "rest": 0.25}}}
    pipe.set_loha_adapters(list(described), list(described.values()))  # the documented round trip
    assert pipe.get_loha_adapters(weights=True) == described
    pipe.fuse_loha()
    assert_components(flux, pipe, {"transformer": wanted})
    for path in (p for p in paths if strength(p) == 0):
        assert torch.equal(pipe.transformer.get_submodule(path).weight, flux.transformer.get_submodule(path).weight)
    pipe.unfuse_loha()

    for bad, message in (({"down": 0.5}, "valid: transformer_blocks \\(2 blocks\\), single_transformer_blocks"),
                         ({"transformer_blocks": [1.0]}, "has 2 blocks, got 1"),
                         ({"single_transformer_blocks": {"block_2": 1.0}}, "block_0 to block_1")):
        with pytest.raises(ValueError, match=message):
            pipe.set_loha_adapters(["a"], weights={"transformer": bad})
    assert pipe.get_loha_adapters(weights=True) == described


def test_two_adapters_at_once(flux, pipe):
    state_a, expected_a = flux_adapter(flux, "lora", seed=1)
    # b: LoHa in diffusers' tree (SimpleTuner names), on some of a's layers and others
    paths = ["transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.proj_mlp", "transformer_blocks.1.ff.net.2"]
    state_b, expected_b = diffusers_path_file(flux, "loha", "lycoris_", paths, seed=2)
    pipe.load_loha_weights(state_a, adapter_name="a")
    pipe.load_loha_weights(state_b, adapter_name="b")
    assert pipe.get_loha_adapters() == {"transformer": ["a", "b"], "text_encoder": ["a"], "text_encoder_2": ["a"]}
    pipe.set_loha_adapters(["a", "b"], weights=[1.0, 0.5])
    pipe.fuse_loha()
    want = at_strengths(flux, expected_a, {})
    half_b = at_strengths(flux, {"transformer": expected_b}, {"transformer": 0.5})["transformer"]
    for path, (weight, _) in half_b.items():
        w = flux.transformer.get_submodule(path).weight.detach().double()
        old, bias = want["transformer"].get(path, (w, None))
        want["transformer"][path] = (old + weight - w, bias)
    assert_components(flux, pipe, want)


def test_fuse_unfuse_unload_are_bit_exact(flux, pipe):
    before = state_of(pipe)
    originals = {c: dict(getattr(pipe, c).named_modules()) for c in COMPONENTS}
    state, expected = flux_adapter(flux, "lokr", lokr_rows=lambda name, out: {96: (8, 12)}.get(out, (out // 16, 16)))
    loha_state, _ = flux_adapter(flux, "loha", names=("double_blocks_1_img_attn_qkv",), seed=3, text_encoders=False)
    pipe.load_loha_weights(state, adapter_name="lokr")
    pipe.load_loha_weights(loha_state, adapter_name="loha")
    pipe.fuse_loha()
    q = "transformer_blocks.0.attn.to_q"
    assert not torch.equal(pipe.transformer.get_submodule(q).weight, before[f"transformer.{q}.weight"])
    pipe.unfuse_loha()
    assert_same_state(logical_state(pipe), before)
    pipe.fuse_loha(scale=0.7)
    pipe.unfuse_loha()
    pipe.fuse_loha()
    with pytest.warns(UserWarning, match="took the fused adapters"):
        pipe.unload_loha_weights()
    assert_same_state(state_of(pipe), before)
    for component in COMPONENTS:
        live = dict(getattr(pipe, component).named_modules())
        assert live.keys() == originals[component].keys()
        assert all(live[p] is m for p, m in originals[component].items())
    assert pipe.get_loha_adapters(flat=True) == []


def test_disable_and_enable(flux, pipe):
    base_image = run_tiny_dit_pipeline(flux)
    pipe.load_loha_weights(flux_adapter(flux, "loha")[0])
    adapted = run_tiny_dit_pipeline(pipe)
    assert np.abs(adapted - base_image).max() > 1e-2
    pipe.disable_loha()
    np.testing.assert_array_equal(run_tiny_dit_pipeline(pipe), base_image)
    pipe.enable_loha()
    np.testing.assert_array_equal(run_tiny_dit_pipeline(pipe), adapted)


def test_img2img_pipeline_sees_the_adapter(flux, pipe):
    state, expected = flux_adapter(flux, "lora")
    pipe.load_loha_weights(state, adapter_name="a")
    i2i = FluxImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    assert i2i.get_loha_adapters() == {c: ["a"] for c in COMPONENTS}
    reference = FluxImg2ImgPipeline(**merged_pipeline(flux, expected).components)
    reference.set_progress_bar_config(disable=True)
    plain = FluxImg2ImgPipeline(**flux.components)
    plain.set_progress_bar_config(disable=True)
    image = run_tiny_dit_pipeline(i2i, strength=0.75, steps=2)
    assert np.abs(image - run_tiny_dit_pipeline(plain, strength=0.75, steps=2)).max() > 1e-2
    close_images(image, run_tiny_dit_pipeline(reference, strength=0.75, steps=2))


def mixed_adapter(flux):
    """LoRA on qkv and final_layer, LoHa on linear1, an unaligned LoKr qkv (rows cut its 12-row
    blocks: kept whole with rows taken), full diff + diff_b on a plain module, LoRA + DoRA on a
    qkv (per-output magnitudes, cut by rows); CLIP-L and T5."""
    parts = [("lora", ("double_blocks_0_img_attn_qkv", "final_layer_adaLN_modulation_1")),
             ("loha", ("single_blocks_0_linear1",)), ("lokr", ("double_blocks_1_txt_attn_qkv",)),
             ("full", ("double_blocks_0_img_mlp_0",)), ("dora", ("double_blocks_1_img_attn_qkv",))]
    state, expected = {}, {}
    for seed, (algo, names) in enumerate(parts):
        s, e = flux_adapter(flux, algo, names=names, seed=10 * seed, lokr_rows=lambda name, out: (8, 12),
                            text_encoders=algo == "lora")
        state.update(s)
        for component, layers in e.items():
            expected.setdefault(component, {}).update(layers)
    return state, expected


def fused_state(pipe):
    pipe.fuse_loha()
    return {f"{c}.{p}": m.weight.detach().clone() for c in COMPONENTS
            for p, m in getattr(pipe, c).named_modules() if isinstance(m, AdapterLayer)}


def test_save_and_reload_gives_the_same_weights(flux, pipe, tmp_path):
    state, expected = mixed_adapter(flux)
    pipe.load_loha_weights(state, adapter_name="mixed")
    path = tmp_path / "saved.safetensors"
    pipe.save_loha_weights(path)
    saved = load_file(str(path))
    # the unaligned LoKr rows are written as each layer's exact change, the rest as they came
    assert "lycoris_transformer_blocks_1_attn_add_k_proj.diff" in saved
    assert "lycoris_transformer_blocks_0_attn_to_q.lora_up.weight" in saved
    assert "lycoris_single_transformer_blocks_0_proj_mlp.hada_w1_a" in saved
    assert saved["lycoris_transformer_blocks_1_attn_to_v.dora_scale"].shape == (32, 1)
    again = loaded(flux, path)
    ours = fused_state(pipe)
    assert_components(flux, pipe, expected)
    theirs = fused_state(again)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(theirs[key], ours[key]), key


@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_save_as_peft_and_reload(flux, pipe, tmp_path, algo):
    state, expected = flux_adapter(flux, algo)
    pipe.load_loha_weights(state, adapter_name="a")
    pipe.save_loha_weights(tmp_path / "peft", format="peft")
    again = loaded(flux, tmp_path / "peft")
    again.fuse_loha()
    assert_components(flux, again, expected)


def test_save_as_peft_refuses_what_peft_cannot_hold(flux, pipe, tmp_path):
    """Rows of an unaligned LoKr, full diffs and mixed algorithms have no PEFT form."""
    pipe.load_loha_weights(mixed_adapter(flux)[0], adapter_name="mixed")
    with pytest.raises(AdapterFileError):
        pipe.save_loha_weights(tmp_path / "peft", format="peft")
