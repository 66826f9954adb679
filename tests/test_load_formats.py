"""load_loha_weights on every layout the ecosystem writes: diffusers' own LoRA files, PEFT adapter
folders (one component or a whole pipeline), and everything loha_diffusion itself writes.

Oracles: the PEFT-injected pipeline that wrote a file (its own forward is what the file means),
diffusers' ``load_lora_weights`` and ``peft.PeftModel.from_pretrained`` on the same file/folder.
"""
import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import loha_diffusion  # noqa: F401  (attaches the pipeline methods)
from adapter_files import make_file_tensors, merged_reference
from loha_diffusion.convert import convert
from loha_diffusion.io import AdapterFileError
from loha_diffusion.layers import AdapterLayer
from tiny_models import run_tiny_pipeline, tiny_sdxl_pipeline

PROMPT = "a photo of sks dog"


@pytest.fixture
def pipe(sd15):
    return copy.deepcopy(sd15)


def close(a, b, atol=2e-3):
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def state_of(pipe):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder", "text_encoder_2")
            if getattr(pipe, c, None) is not None for k, v in getattr(pipe, c).state_dict().items()}


def assert_untouched(pipe, before):
    after = state_of(pipe)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, AdapterLayer) for c in ("unet", "text_encoder") for m in getattr(pipe, c).modules())


def peft_lora(model, config):
    """Inject a randomly initialised PEFT LoRA (non-zero delta) into ``model`` in place."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, model)
    return model


# -- diffusers' own LoRA files ------------------------------------------------------------------------
def diffusers_lora_file(pipe, folder, *, unet_config, te_config=None, with_metadata=True):
    """What diffusers' training scripts write: save_lora_weights of PEFT-injected components.
    Returns (folder, image of the writing pipeline)."""
    from peft.utils import get_peft_model_state_dict

    writer = copy.deepcopy(pipe)
    torch.manual_seed(0)
    peft_lora(writer.unet, unet_config)
    layers = {"unet_lora_layers": get_peft_model_state_dict(writer.unet)}
    metadata = {"unet_lora_adapter_metadata": unet_config.to_dict()} if with_metadata else {}
    if te_config is not None:
        peft_lora(writer.text_encoder, te_config)
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(writer.text_encoder)
        if with_metadata:
            metadata["text_encoder_lora_adapter_metadata"] = te_config.to_dict()
    type(pipe).save_lora_weights(folder, **layers, **metadata)
    return folder, run_tiny_pipeline(writer, PROMPT)


def test_diffusers_lora_file_with_patterns_matches_writer_and_diffusers(pipe, tmp_path):
    from peft import LoraConfig

    unet_config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                             target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"],
                             rank_pattern={"conv1": 2}, alpha_pattern={"to_k": 3})
    te_config = LoraConfig(r=4, lora_alpha=2, init_lora_weights=False, target_modules=["q_proj", "v_proj", "fc1"])
    folder, expected = diffusers_lora_file(pipe, tmp_path / "lora", unet_config=unet_config, te_config=te_config)
    through_diffusers = copy.deepcopy(pipe)
    through_diffusers.load_lora_weights(folder)
    close(run_tiny_pipeline(through_diffusers, PROMPT), expected)   # the oracle agrees with the writer

    base_image = run_tiny_pipeline(pipe, PROMPT)
    assert np.abs(expected - base_image).max() > 1e-2
    name = pipe.load_loha_weights(folder)                          # the folder, as diffusers takes it
    close(run_tiny_pipeline(pipe, PROMPT), expected)
    assert name == "pytorch_lora_weights"
    assert set(pipe.get_loha_adapters()) == {"unet", "text_encoder"}


def test_diffusers_lora_file_without_metadata_has_scale_one(pipe, tmp_path):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_v"])
    folder, expected = diffusers_lora_file(pipe, tmp_path / "plain", unet_config=config, with_metadata=False)
    pipe.load_loha_weights(folder / "pytorch_lora_weights.safetensors")
    close(run_tiny_pipeline(pipe, PROMPT), expected)


def test_diffusers_rslora_file_scales_by_sqrt_rank(pipe, tmp_path):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=3, use_rslora=True, init_lora_weights=False,
                        target_modules=["to_q", "to_v", "conv1"], rank_pattern={"conv1": 2})
    folder, expected = diffusers_lora_file(pipe, tmp_path / "rs", unet_config=config)
    pipe.load_loha_weights(folder)
    close(run_tiny_pipeline(pipe, PROMPT), expected)


def test_folder_of_no_known_layout_is_refused(pipe, tmp_path):
    (tmp_path / "notes.txt").write_text("not an adapter")
    with pytest.raises(AdapterFileError, match="PEFT adapter folder"):
        pipe.load_loha_weights(tmp_path)


def test_diffusers_dora_unet_file(pipe, tmp_path):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True, target_modules=["to_q", "to_v"])
    folder, expected = diffusers_lora_file(pipe, tmp_path / "dora", unet_config=config)
    keys = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    assert any(k.endswith("lora_magnitude_vector") for k in keys)
    pipe.load_loha_weights(folder)
    close(run_tiny_pipeline(pipe, PROMPT), expected)


@pytest.mark.parametrize("with_text_model", [True, False])
def test_diffusers_text_encoder_paths_with_or_without_text_model(pipe, tmp_path, with_text_model):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q"])
    te_config = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["k_proj", "out_proj"])
    folder, expected = diffusers_lora_file(pipe, tmp_path / "te", unet_config=config, te_config=te_config)
    path = folder / "pytorch_lora_weights.safetensors"
    state = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    renamed = {}
    for key, value in state.items():
        if key.startswith("text_encoder.") and with_text_model and not key.startswith("text_encoder.text_model."):
            key = "text_encoder.text_model." + key.removeprefix("text_encoder.")
        renamed[key] = value
    assert any(k.startswith("text_encoder.text_model.") for k in renamed) == with_text_model
    save_file(renamed, str(path), metadata=metadata)
    pipe.load_loha_weights(path)
    close(run_tiny_pipeline(pipe, PROMPT), expected)


def old_diffusers_key(key, te_style):
    """A current diffusers key in one of diffusers' pre-PEFT layouts (attention processors for
    the UNet's attention, ``.lora.`` elsewhere, ``te_style`` for the text encoder)."""
    component, _, rest = key.partition(".")
    path, _, side = rest.removesuffix(".weight").rpartition(".")
    side = {"lora_A": "down", "lora_B": "up"}[side]
    parent, _, leaf = path.removesuffix(".0").rpartition(".")
    if component == "unet" and leaf in ("to_q", "to_k", "to_v", "to_out"):
        return f"{component}.{parent}.processor.{leaf}_lora.{side}.weight"
    if component == "text_encoder" and te_style == "processor":
        leaf = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}[leaf]
        return f"{component}.{parent}.{leaf}_lora.{side}.weight"
    layer = "lora_linear_layer" if component == "text_encoder" else "lora"
    return f"{component}.{path}.{layer}.{side}.weight"


@pytest.mark.parametrize("te_style", ["processor", "lora_linear_layer"])
def test_pre_peft_diffusers_layouts_load_like_diffusers(pipe, tmp_path, te_style):
    from peft import LoraConfig

    unet_config = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                             target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"])
    te_config = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                           target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    folder, expected = diffusers_lora_file(pipe, tmp_path / "new", unet_config=unet_config, te_config=te_config,
                                           with_metadata=False)
    state = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    old = {old_diffusers_key(k, te_style): v for k, v in state.items()}
    assert any(".processor.to_out_lora.up.weight" in k for k in old) and any(".lora.down.weight" in k for k in old)
    path = tmp_path / "old.safetensors"
    save_file(old, str(path))
    through_diffusers = copy.deepcopy(pipe)
    through_diffusers.load_lora_weights(str(path))
    close(run_tiny_pipeline(through_diffusers, PROMPT), expected)  # diffusers reads the old layout so
    pipe.load_loha_weights(path)
    close(run_tiny_pipeline(pipe, PROMPT), expected)


# -- PEFT adapter folders --------------------------------------------------------------------------------
def peft_folder(model, config, folder, seed=0):
    """``PeftModel.save_pretrained`` of a random-initialised adapter; returns (folder, peft model)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():  # LoHa/LoKr start at a zero delta: make every factor non-zero
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.2)
    peft_model.save_pretrained(str(folder))
    return folder, peft_model


def peft_configs():
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    return {
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "conv1"], rank_pattern={"to_k": 2}),
        "loha": LoHaConfig(r=4, alpha=2, target_modules=["to_q", "to_v", "conv1", "conv2"], use_effective_conv2d=True,
                           rank_pattern={"conv2": 2}, alpha_pattern={"to_v": 6}),
        "lokr": LoKrConfig(r=2, alpha=4, target_modules=["to_q", "to_k", "ff.net.2", "conv1"]),
    }


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_peft_unet_folder_matches_peft(pipe, tmp_path, kind):
    folder, peft_unet = peft_folder(pipe.unet, peft_configs()[kind], tmp_path / kind)
    reference = copy.deepcopy(pipe)
    reference.unet = peft_unet
    expected = run_tiny_pipeline(reference, PROMPT)
    assert np.abs(expected - run_tiny_pipeline(pipe, PROMPT)).max() > 1e-2
    pipe.load_loha_weights(folder)                                  # component found from its module paths
    close(run_tiny_pipeline(pipe, PROMPT), expected)
    assert pipe.get_loha_adapters() == {"unet": [kind]}


def test_peft_text_encoder_folder_named_component(pipe, tmp_path):
    from peft import LoHaConfig

    config = LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "fc2"])
    folder, peft_te = peft_folder(pipe.text_encoder, config, tmp_path / "te")
    reference = copy.deepcopy(pipe)
    reference.text_encoder = peft_te
    pipe.load_loha_weights(folder, component="text_encoder")
    close(run_tiny_pipeline(pipe, PROMPT), run_tiny_pipeline(reference, PROMPT))


def test_peft_folder_for_the_wrong_component_is_refused(pipe, tmp_path):
    from peft import LoHaConfig

    folder, _ = peft_folder(pipe.text_encoder, LoHaConfig(r=2, target_modules=["q_proj"]), tmp_path / "te")
    before = state_of(pipe)
    with pytest.raises(AdapterFileError, match="unet"):
        pipe.load_loha_weights(folder, component="unet")
    assert_untouched(pipe, before)


def test_component_argument_outside_a_one_component_folder_is_refused(pipe, tmp_path):
    state, _ = make_file_tensors(pipe, "lora")
    path = tmp_path / "kohya.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="component='unet' only applies to a PEFT adapter folder of one component"):
        pipe.load_loha_weights(path, component="unet")
    assert pipe.get_loha_adapters(flat=True) == []


# -- everything we write loads back ----------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["kohya", "peft"])
@pytest.mark.parametrize("algo", ["loha", "lora", "lokr"])
def test_save_loha_weights_formats_load_back(pipe, tmp_path, fmt, algo):
    state, mods = make_file_tensors(pipe, algo)
    source = tmp_path / "source.safetensors"
    save_file(state, str(source))
    expected = run_tiny_pipeline(merged_reference(pipe, mods), PROMPT)
    writer = copy.deepcopy(pipe)
    writer.load_loha_weights(source, adapter_name="a")
    out = writer.save_loha_weights(tmp_path / ("out.safetensors" if fmt == "kohya" else "out"), format=fmt)
    pipe.load_loha_weights(out)
    close(run_tiny_pipeline(pipe, PROMPT), expected)


@pytest.mark.parametrize("to", ["kohya", "peft", "diffusers"])
def test_every_convert_target_loads_back(pipe, tmp_path, to):
    state, mods = make_file_tensors(pipe, "loha")
    source = tmp_path / "source.safetensors"
    save_file(state, str(source), metadata={"ss_base_model_version": "sd_v1"})
    expected = run_tiny_pipeline(merged_reference(pipe, mods), PROMPT)
    folder = tmp_path / "model"
    pipe.save_pretrained(folder)
    out = convert(source, tmp_path / ("out" if to == "peft" else "out.safetensors"), to, base_model=folder)
    pipe.load_loha_weights(out)
    close(run_tiny_pipeline(pipe, PROMPT), expected)


def test_diffusers_file_converts_to_kohya(pipe, tmp_path):
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_v", "conv1"],
                        alpha_pattern={"conv1": 2})
    folder, expected = diffusers_lora_file(pipe, tmp_path / "d", unet_config=config)
    model = tmp_path / "model"
    pipe.save_pretrained(model)
    out = convert(folder / "pytorch_lora_weights.safetensors", tmp_path / "k.safetensors", "kohya", base_model=model)
    assert all(k.startswith("lora_unet_") for k in load_file(str(out)))
    pipe.load_loha_weights(out)
    close(run_tiny_pipeline(pipe, PROMPT), expected)


def test_sdxl_peft_pipeline_folder_loads(tmp_path):
    pipe = tiny_sdxl_pipeline(tmp_path / "xl")
    state, mods = make_file_tensors(pipe, "lora", sdxl=True)
    source = tmp_path / "xl.safetensors"
    save_file(state, str(source))
    expected = run_tiny_pipeline(merged_reference(pipe, mods), PROMPT)
    writer = copy.deepcopy(pipe)
    writer.load_loha_weights(source)
    folder = writer.save_loha_weights(tmp_path / "peft", format="peft")
    assert {p.name for p in folder.iterdir()} == {"unet", "text_encoder", "text_encoder_2"}
    pipe.load_loha_weights(folder)
    close(run_tiny_pipeline(pipe, PROMPT), expected)
