"""Flux / SD3 files through convert, save and inspect: BFL/SAI names <-> diffusers-tree names,
diffusers' LoRA format, the published skeletons. Numbers are checked against the formulas
(tests/formulas.py) and against plain diffusers' own loader."""
import copy

import pytest
import torch
from safetensors.torch import load_file

import loha_diffusion  # noqa: F401  (adds the pipeline methods)
from adapter_files import random_module, reference_delta
from loha_diffusion.cli import inspect_file
from loha_diffusion.convert import convert
from loha_diffusion.io import AdapterFileError, save_state_dict

D, MLP = 32, 128  # tiny Flux: inner width, MLP width (tests/tiny_dit.py)
QKV = ("lora_unet_double_blocks_0_img_attn_qkv", 3 * D)
TXT_QKV = ("lora_unet_double_blocks_1_txt_attn_qkv", 3 * D)
LINEAR1 = ("lora_unet_single_blocks_0_linear1", 3 * D + MLP)
FINAL = ("lora_unet_final_layer_adaLN_modulation_1", 2 * D)
PLAIN = ("lora_unet_double_blocks_0_img_attn_proj", D)


@pytest.fixture(scope="module")
def flux_folder(flux, tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux_model")
    flux.save_pretrained(folder)
    return folder


def _module(algo, rows, cols, g):
    if algo == "lokr_aligned":  # w2's 32 rows divide every part of qkv: the split stays a LoKr
        return {"lokr_w1": torch.randn(rows // D, 2, generator=g),
                "lokr_w2": torch.randn(D, cols // 2, generator=g) * 0.1, "alpha": torch.tensor(2.0)}
    return random_module("lokr" if algo == "lokr_unaligned" else algo, torch.empty(rows, cols), generator=g)


def _bfl_file(path, algo, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, rows in (QKV, TXT_QKV, LINEAR1, FINAL, PLAIN):
        state.update({f"{name}.{k}": v for k, v in _module(algo, rows, D, g).items()})
    for name, rows, cols in (("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 32, 32),
                             ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", 32, 128)):
        state.update({f"{name}.{k}": v for k, v in _module("lora", rows, cols, g).items()})
    save_state_dict(state, path, {"ss_base_model_version": "flux1"})
    return state


def _modules(state):
    grouped = {}
    for key, tensor in state.items():
        name, _, tensor_name = key.partition(".")
        grouped.setdefault(name, {})[tensor_name] = tensor
    return grouped


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr_aligned", "lokr_unaligned", "full"])
def test_bfl_names_round_trip_through_diffusers_tree_names(algo, flux_folder, tmp_path):
    source = _bfl_file(tmp_path / "bfl.safetensors", algo)
    lyco = convert(tmp_path / "bfl.safetensors", tmp_path / "lyco.safetensors", "kohya", base_model=flux_folder)
    names = set(_modules(load_file(lyco)))
    assert {n.split("_")[0] + "_" for n in names} <= {"lycoris_", "lora_"}
    assert "lycoris_transformer_blocks_0_attn_to_k" in names and "lycoris_single_transformer_blocks_0_proj_mlp" in names
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q" in names
    back = load_file(convert(lyco, tmp_path / "back.safetensors", "kohya", base_model=flux_folder, naming="original"))
    before, after = _modules(source), _modules(back)
    assert set(before) == set(after)
    for name, rows in (QKV, TXT_QKV, LINEAR1, FINAL, PLAIN):
        weight = torch.empty(rows, D)
        torch.testing.assert_close(reference_delta(after[name], weight), reference_delta(before[name], weight),
                                   rtol=1e-6, atol=1e-7)
        if algo != "lokr_unaligned":  # the split layers hold rows of the same tensors: the module comes back as it was
            assert set(after[name]) == set(before[name]) and all(torch.equal(after[name][k], v)
                                                                   for k, v in before[name].items())
    assert all(torch.equal(back[k], v) for k, v in source.items() if "lora_te" in k)


def _layer_file(path, algo, seed=1):
    """Separately trained adapters on to_q and to_k (not to_v) and the final modulation, in
    diffusers' tree under LyCORIS' prefix (as LyCORIS' wrapper / SimpleTuner write)."""
    g = torch.Generator().manual_seed(seed)
    modules = {"lycoris_transformer_blocks_0_attn_to_q": random_module(algo, torch.empty(D, D), rank=2, generator=g),
               "lycoris_transformer_blocks_0_attn_to_k": random_module(algo, torch.empty(D, D), rank=4, generator=g),
               "lycoris_norm_out_linear": random_module(algo, torch.empty(2 * D, D), generator=g)}
    save_state_dict({f"{n}.{k}": v for n, m in modules.items() for k, v in m.items()}, path)
    return modules


@pytest.mark.parametrize("algo", ["lora", "loha", "full"])
def test_separate_layer_adapters_stack_into_original_modules_exactly(algo, flux_folder, tmp_path):
    layers = _layer_file(tmp_path / "layers.safetensors", algo)
    out = _modules(load_file(convert(tmp_path / "layers.safetensors", tmp_path / "bfl.safetensors", "kohya",
                                     base_model=flux_folder, naming="original")))
    assert set(out) == {QKV[0], FINAL[0]}
    square = torch.empty(D, D)
    qkv = reference_delta(out[QKV[0]], torch.empty(3 * D, D))
    torch.testing.assert_close(qkv[:D], reference_delta(layers["lycoris_transformer_blocks_0_attn_to_q"], square))
    torch.testing.assert_close(qkv[D:2 * D], reference_delta(layers["lycoris_transformer_blocks_0_attn_to_k"], square))
    assert torch.all(qkv[2 * D:] == 0)  # to_v had no adapter
    final = reference_delta(out[FINAL[0]], torch.empty(2 * D, D))
    norm_out = reference_delta(layers["lycoris_norm_out_linear"], torch.empty(2 * D, D))
    torch.testing.assert_close(final, torch.cat([norm_out[D:], norm_out[:D]]))  # BFL: (shift, scale)


def test_separate_lokr_adapters_do_not_stack(flux_folder, tmp_path):
    _layer_file(tmp_path / "layers.safetensors", "lokr")
    with pytest.raises(ValueError, match="lycoris_"):
        convert(tmp_path / "layers.safetensors", tmp_path / "bfl.safetensors", "kohya", base_model=flux_folder,
                naming="original")


def _diffusers_fused(pipe, path):
    """Plain diffusers' loader, fused: the transformer's weights as its own code merges them."""
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(components=["transformer", "text_encoder"])
    pipe.unload_lora_weights()  # keeps what is fused, drops the PEFT layers
    return pipe.transformer.state_dict()


def test_diffusers_reads_our_original_names_file(flux, flux_folder, tmp_path):
    """LoRA adapters on separate layers, stacked into BFL modules by us, then read by
    diffusers' own kohya-Flux converter: the weights it merges are W + the layers' deltas."""
    layers = _layer_file(tmp_path / "layers.safetensors", "lora")
    del layers["lycoris_norm_out_linear"]  # diffusers drops final_layer alphas (it pops them unused)
    save_state_dict({f"{n}.{k}": v for n, m in layers.items() for k, v in m.items()}, tmp_path / "layers.safetensors")
    bfl = convert(tmp_path / "layers.safetensors", tmp_path / "bfl.safetensors", "kohya", base_model=flux_folder,
                  naming="original")
    base = flux.transformer.state_dict()
    fused = _diffusers_fused(copy.deepcopy(flux), bfl)
    for part in ("q", "k"):
        delta = reference_delta(layers[f"lycoris_transformer_blocks_0_attn_to_{part}"], torch.empty(D, D))
        key = f"transformer_blocks.0.attn.to_{part}.weight"
        torch.testing.assert_close(fused[key].double(), base[key].double() + delta, rtol=0, atol=1e-6)
    assert torch.equal(fused["transformer_blocks.0.attn.to_v.weight"], base["transformer_blocks.0.attn.to_v.weight"])


def test_loha_to_diffusers_format_is_exact_for_plain_diffusers(flux, flux_folder, tmp_path):
    layers = _layer_file(tmp_path / "layers.safetensors", "loha")
    clip = random_module("loha", torch.empty(32, 32), generator=torch.Generator().manual_seed(5))
    layers["lora_te1_text_model_encoder_layers_1_mlp_fc2"] = random_module(
        "loha", torch.empty(32, 64), generator=torch.Generator().manual_seed(6))
    layers["lora_te1_text_model_encoder_layers_0_self_attn_v_proj"] = clip
    save_state_dict({f"{n}.{k}": v for n, m in layers.items() for k, v in m.items()}, tmp_path / "layers.safetensors")
    out = convert(tmp_path / "layers.safetensors", tmp_path / "diffusers.safetensors", "diffusers",
                  base_model=flux_folder)
    assert all(k.startswith(("transformer.", "text_encoder.")) for k in load_file(out))
    pipe = copy.deepcopy(flux)
    base_t, base_te = flux.transformer.state_dict(), flux.text_encoder.state_dict()
    fused = _diffusers_fused(pipe, out)
    for path, name, shape in (("transformer_blocks.0.attn.to_q", "lycoris_transformer_blocks_0_attn_to_q", (D, D)),
                              ("norm_out.linear", "lycoris_norm_out_linear", (2 * D, D))):
        expected = base_t[f"{path}.weight"].double() + reference_delta(layers[name], torch.empty(shape))
        torch.testing.assert_close(fused[f"{path}.weight"].double(), expected, rtol=0, atol=1e-6)
    te = pipe.text_encoder.state_dict()
    key = "encoder.layers.0.self_attn.v_proj.weight"
    expected = base_te[key].double() + reference_delta(clip, torch.empty(32, 32))
    torch.testing.assert_close(te[key].double(), expected, rtol=0, atol=1e-6)


def test_t5_modules_are_refused_in_diffusers_format(flux_folder, tmp_path):
    _bfl_file(tmp_path / "bfl.safetensors", "lora")
    with pytest.raises(ValueError, match="no T5 text encoder"):
        convert(tmp_path / "bfl.safetensors", tmp_path / "out.safetensors", "diffusers", base_model=flux_folder)


def test_save_with_original_names_gives_the_loaded_file_back(flux, tmp_path):
    source = _bfl_file(tmp_path / "bfl.safetensors", "loha")
    pipe = copy.deepcopy(flux)
    pipe.load_loha_weights(tmp_path / "bfl.safetensors")
    saved = load_file(pipe.save_loha_weights(tmp_path / "saved.safetensors", naming="original"))
    assert set(saved) == set(source) and all(torch.equal(saved[k], v) for k, v in source.items())


def test_inspect_names_family_and_naming(flux_folder, tmp_path):
    _bfl_file(tmp_path / "bfl.safetensors", "lora")
    report = inspect_file(tmp_path / "bfl.safetensors")
    assert (report["family"], report["denoiser_naming"]) == ("flux", "original")
    lyco = convert(tmp_path / "bfl.safetensors", tmp_path / "lyco.safetensors", "kohya", base_model=flux_folder)
    report = inspect_file(lyco)
    assert (report["family"], report["denoiser_naming"]) == ("flux", "diffusers")
    comfy = {k.replace("lora_unet_double_blocks_0_img_attn_qkv", "diffusion_model.double_blocks.0.img_attn.qkv"): v
             for k, v in load_file(tmp_path / "bfl.safetensors").items() if k.startswith(QKV[0])}
    save_state_dict(comfy, tmp_path / "comfy.safetensors")
    report = inspect_file(tmp_path / "comfy.safetensors")
    assert (report["layout"], report["family"], report["denoiser_naming"]) == (
        "ComfyUI/BFL dotted paths", "flux", "original")
    sd3 = {"lora_unet_joint_blocks_0_context_block_attn_qkv.lora_down.weight": torch.zeros(2, 8),
           "lora_unet_joint_blocks_0_context_block_attn_qkv.lora_up.weight": torch.zeros(24, 2)}
    save_state_dict(sd3, tmp_path / "sd3.safetensors")
    assert inspect_file(tmp_path / "sd3.safetensors")["family"] == "sd3"


@pytest.mark.parametrize(("name", "width", "variant"), [
    ("lora_unet_joint_blocks_30_x_block_attn_qkv", 2432, "stable-diffusion-3.5-large"),
    ("lora_unet_joint_blocks_0_x_block_attn2_qkv", 1536, "stable-diffusion-3.5-medium"),
    ("lora_unet_joint_blocks_0_x_block_attn_qkv", 1536, "stable-diffusion-3-medium"),
])
def test_sd3_files_convert_on_the_published_variant_they_fit(name, width, variant, tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {f"{name}.lora_down.weight": torch.randn(2, width, generator=g),
             f"{name}.lora_up.weight": torch.randn(3 * width, 2, generator=g), f"{name}.alpha": torch.tensor(1.0)}
    save_state_dict(state, tmp_path / "sd3.safetensors")
    out = convert(tmp_path / "sd3.safetensors", tmp_path / "out.safetensors", "kohya")
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        assert f.metadata()["modelspec.architecture"].startswith(variant)
        names = {k.partition(".")[0] for k in f.keys()}
    block = name.split("_")[4]
    attention = "attn2" if "attn2" in name else "attn"
    assert names == {f"lycoris_transformer_blocks_{block}_{attention}_to_{x}" for x in "qkv"}


def test_flux_file_converts_on_the_published_skeleton(tmp_path):
    g = torch.Generator().manual_seed(0)
    t5 = "lora_te3_encoder_block_23_layer_1_DenseReluDense_wi_0"
    state = {"lora_unet_single_blocks_37_linear1.lora_down.weight": torch.randn(2, 3072, generator=g),
             "lora_unet_single_blocks_37_linear1.lora_up.weight": torch.randn(21504, 2, generator=g),
             f"{t5}.lora_down.weight": torch.randn(2, 4096, generator=g),
             f"{t5}.lora_up.weight": torch.randn(10240, 2, generator=g)}
    save_state_dict(state, tmp_path / "flux.safetensors")
    out = load_file(convert(tmp_path / "flux.safetensors", tmp_path / "out.safetensors", "kohya"))
    up = out["lycoris_single_transformer_blocks_37_proj_mlp.lora_up.weight"]
    assert torch.equal(up, state["lora_unet_single_blocks_37_linear1.lora_up.weight"][3 * 3072:])
    assert f"{t5}.lora_up.weight" in out


@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_peft_folder_of_a_flux_adapter_is_what_peft_applies(algo, flux, tmp_path):
    """A BFL-named file loaded, then saved as PEFT folders: PEFT's own LoHa / LoRA layers on a
    fresh transformer, merged, give W + the formula's delta of the file's stacked modules."""
    from peft import PeftModel

    source = _modules(_bfl_file(tmp_path / "bfl.safetensors", algo))
    pipe = copy.deepcopy(flux)
    pipe.load_loha_weights(tmp_path / "bfl.safetensors")
    folder = pipe.save_loha_weights(tmp_path / "peft", format="peft")
    assert sorted(p.name for p in folder.iterdir()) == ["text_encoder", "text_encoder_2", "transformer"]
    merged = PeftModel.from_pretrained(copy.deepcopy(flux.transformer), folder / "transformer").merge_and_unload()
    base, ours = flux.transformer.state_dict(), merged.state_dict()
    qkv = reference_delta(source[QKV[0]], torch.empty(3 * D, D))
    for i, part in enumerate("qkv"):
        key = f"transformer_blocks.0.attn.to_{part}.weight"
        torch.testing.assert_close(ours[key].double(), base[key].double() + qkv[i * D:(i + 1) * D], rtol=0, atol=1e-6)
    linear1 = reference_delta(source[LINEAR1[0]], torch.empty(3 * D + MLP, D))
    key = "single_transformer_blocks.0.proj_mlp.weight"
    torch.testing.assert_close(ours[key].double(), base[key].double() + linear1[3 * D:], rtol=0, atol=1e-6)


def test_rows_of_a_shared_lokr_are_not_written_as_peft(flux, tmp_path):
    _bfl_file(tmp_path / "bfl.safetensors", "lokr_unaligned")
    pipe = copy.deepcopy(flux)
    pipe.load_loha_weights(tmp_path / "bfl.safetensors")
    with pytest.raises(AdapterFileError, match="Kronecker blocks do not line up"):
        pipe.save_loha_weights(tmp_path / "peft", format="peft")


def test_rows_of_a_shared_lokr_with_dora_save_as_diff_and_magnitude(flux, tmp_path):
    """An unaligned LoKr with an output-axis DoRA magnitude on qkv: each layer is written as its
    exact diff plus its rows of the magnitude, and the reloaded file fuses to W' of the formula."""
    from formulas import dora_merged

    g = torch.Generator().manual_seed(3)
    lokr = {"lokr_w1": torch.randn(8, 2, generator=g), "lokr_w2": torch.randn(12, 16, generator=g) * 0.1}
    magnitude = torch.rand(3 * D, 1, generator=g) + 0.5
    state = {f"{QKV[0]}.{k}": v for k, v in lokr.items()} | {f"{QKV[0]}.dora_scale": magnitude}
    pipe = copy.deepcopy(flux)
    pipe.load_loha_weights(state)
    saved = load_file(pipe.save_loha_weights(tmp_path / "lyco.safetensors"))
    layers = {f"lycoris_transformer_blocks_0_attn_to_{x}" for x in "qkv"}
    assert set(saved) == {f"{layer}.{t}" for layer in layers for t in ("diff", "dora_scale")}
    fresh = copy.deepcopy(flux)
    fresh.load_loha_weights(tmp_path / "lyco.safetensors")
    fresh.fuse_loha()
    stacked = torch.cat([flux.transformer.get_submodule(f"transformer_blocks.0.attn.to_{x}").weight for x in "qkv"])
    expected = dora_merged(stacked.double(), reference_delta(lokr, stacked), magnitude.double(), 1.0,
                           output_axis=True, semantics="lycoris")
    for i, x in enumerate("qkv"):
        fused = fresh.transformer.get_submodule(f"transformer_blocks.0.attn.to_{x}").base_layer.weight
        torch.testing.assert_close(fused.double(), expected[i * D:(i + 1) * D], rtol=0, atol=1e-5)


def test_an_sd3_file_no_published_variant_fits_is_refused_with_the_variants_named(tmp_path):
    name = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    state = {f"{name}.lora_down.weight": torch.zeros(2, 1000), f"{name}.lora_up.weight": torch.zeros(3000, 2)}
    save_state_dict(state, tmp_path / "odd.safetensors")
    with pytest.raises(AdapterFileError, match=r"(?s)tried sd3, sd3.5-medium, sd3.5-large.*--base-model"):
        convert(tmp_path / "odd.safetensors", tmp_path / "out.safetensors", "kohya")
