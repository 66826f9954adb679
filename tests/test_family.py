"""The one model-family detector: each source alone, then their precedence.

Expected families are the published facts (docs/formats.md 1.6, 3.1): sd-scripts' metadata
values, the text encoder widths 768 / 1024 / 2048 and the SD1/SDXL UNet layouts.
"""
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from loha_diffusion import LoHaConfig, LoHaModel
from loha_diffusion.family import detect_family, family_of_components
from loha_diffusion.formats.peft import PeftFolder
from loha_diffusion.skeletons import skeleton_components

TO_K = "down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
SD1_NAME = "lora_unet_down_blocks_0_attentions_0_proj_in"          # attentions in down level 0: SD1/SD2
SDXL_NAME = "lora_unet_input_blocks_7_1_transformer_blocks_9_attn1_to_q"  # depth-10 transformer: SDXL


@pytest.mark.parametrize("metadata, family", [
    ({"ss_base_model_version": "sd_v1"}, "sd1"),
    ({"ss_base_model_version": "sd_v2_v"}, "sd2"),
    ({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
    ({"ss_v2": "True"}, "sd2"),
    ({"ss_v2": "False"}, None),
    ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "sd2"),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lycoris"}, "sdxl"),
    ({"modelspec.architecture": "stable-diffusion-v1/lora"}, "sd1"),
    ({"ss_output_name": "x"}, None),
])
def test_metadata(metadata, family):
    assert detect_family(metadata=metadata) == family


@pytest.mark.parametrize("width, family", [(768, "sd1"), (1024, "sd2"), (2048, "sdxl"), (32, None)])
@pytest.mark.parametrize("key", [
    f"lora_unet_{TO_K}.lora_down.weight",                       # Kohya LoRA
    f"lora_unet_{TO_K}.hada_w1_b",                              # Kohya LoHa
    "unet.base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight",  # PEFT
    "unet.base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.hada_w1_b",
])
def test_cross_attention_width(key, width, family):
    assert detect_family(tensors={key: torch.zeros(4, width)}) == family


def test_shapes_need_a_cross_attention_key_input_factor():
    assert detect_family(tensors={f"lora_unet_{TO_K}.lora_up.weight": torch.zeros(768, 4)}) is None
    assert detect_family(tensors={"lora_unet_x_attn1_to_k.lora_down.weight": torch.zeros(4, 768)}) is None


def test_precedence_metadata_then_shapes_then_names():
    sd2_shapes = {f"lora_unet_{TO_K}.lora_down.weight": torch.zeros(4, 1024)}
    assert detect_family({"ss_base_model_version": "sd_v1"}, sd2_shapes, [SDXL_NAME]) == "sd1"
    assert detect_family({"ss_output_name": "x"}, sd2_shapes, [SDXL_NAME]) == "sd2"
    assert detect_family({}, {f"lora_unet_{TO_K}.lora_down.weight": torch.zeros(4, 32)}, [SDXL_NAME]) == "sdxl"
    assert detect_family(names=[SD1_NAME]) == "sd1/sd2"
    assert detect_family() is None


def test_peft_folder_family_from_paths_and_shapes():
    te2 = {"base_model.model.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(2, 8)}
    te1 = {"base_model.model.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(2, 8)}
    unet = {"base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight":
            torch.zeros(2, 768)}
    assert PeftFolder({"text_encoder": te1, "text_encoder_2": te2}, {}).family() == "sdxl"
    assert PeftFolder({"text_encoder": te1}, {}).family() == "sd1/sd2"
    assert PeftFolder({"unet": unet, "text_encoder": te1}, {}).family() == "sd1"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_family_of_published_components(family):
    components = skeleton_components(family)
    assert family_of_components(components) == family
    if family == "sdxl":   # the refiner: one (OpenCLIP) text encoder, the text_time UNet
        assert family_of_components({"unet": components["unet"],
                                     "text_encoder_2": components["text_encoder_2"]}) == "sdxl"


def test_family_of_components_without_unet_or_wrapped():
    config = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=8)
    text_encoder = CLIPTextModel(config)
    assert family_of_components({"text_encoder": text_encoder}) == "sd1/sd2"
    assert family_of_components({"text_encoder": text_encoder, "text_encoder_2": None}) == "sd1/sd2"
    unet = skeleton_components("sd2")["unet"]
    wrapped = LoHaModel(unet, LoHaConfig(r=2, target_modules=["to_k"]))
    assert family_of_components({"unet": wrapped, "text_encoder": text_encoder}) == "sd2"
