"""Module naming: kohya / SGM / LyCORIS / PEFT / diffusers keys <-> live module paths.

Full-size SD1.5 and SDXL UNets and text encoders are built on the meta device (no memory,
no download) so that the counts and real keys of docs/formats.md 1.3-1.5 can be checked; the
SGM names are cross-checked against diffusers' and LyCORIS' own converters.
"""
import json
import re
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.utils import convert_unet_state_dict_to_peft
from lycoris.utils import convert_diffusers_name_to_compvis
from peft import LoHaConfig as PeftLoHaConfig
from peft import LoKrConfig as PeftLoKrConfig
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, get_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from loha_diffusion import AdapterLayer, LoHaConfig, LoHaModel, inject_adapter
from loha_diffusion.family import detect_family
from loha_diffusion.key_table import KeyTable
from loha_diffusion.naming import diffusers_lora, kohya, peft, sgm
from loha_diffusion.naming.keys import Target, split_key
from loha_diffusion.naming.kohya import detect_unet_naming
from tiny_models import tiny_sd15_pipeline, tiny_sdxl_pipeline

SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8)
SDXL_UNET = dict(
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048, addition_embed_type="text_time", projection_class_embeddings_input_dim=2816,
    addition_time_embed_dim=256, use_linear_projection=True, attention_head_dim=(5, 10, 20),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_SD2 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280)
TE_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def on_meta(cls, **config):
    with torch.device("meta"):
        return cls(CLIPTextConfig(**config)) if cls is not UNet2DConditionModel else cls(**config)


@pytest.fixture(scope="module")
def sd15_unet():
    return on_meta(UNet2DConditionModel, **SD15_UNET)


@pytest.fixture(scope="module")
def sdxl_unet():
    return on_meta(UNet2DConditionModel, **SDXL_UNET)


@pytest.fixture(scope="module")
def sd15_table(sd15_unet):
    return KeyTable(unet=sd15_unet, text_encoder=on_meta(CLIPTextModel, **CLIP_L))


@pytest.fixture(scope="module")
def sdxl_table(sdxl_unet):
    return KeyTable(unet=sdxl_unet, text_encoder=on_meta(CLIPTextModel, **CLIP_L),
                    text_encoder_2=on_meta(CLIPTextModelWithProjection, **CLIP_G))


def kohya_targets(unet, conv_dim: bool) -> list[str]:
    """sd-scripts' rule (docs/formats.md 1.7): Linear and 1x1 Conv2d inside Transformer2DModel; with
    conv_dim also every Linear/Conv2d inside ResnetBlock2D, Downsample2D, Upsample2D."""
    paths = []
    for block_path, block in unet.named_modules():
        if isinstance(block, Transformer2DModel):
            paths += [f"{block_path}.{p}" for p, m in block.named_modules()
                      if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1))]
        elif conv_dim and isinstance(block, (ResnetBlock2D, Downsample2D, Upsample2D)):
            paths += [f"{block_path}.{p}" for p, m in block.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return paths


def flat(path):
    return path.replace(".", "_")


# --------------------------------------------------------------------------- UNet, full size

def test_sd15_kohya_targets_resolve(sd15_unet, sd15_table):
    assert len(kohya_targets(sd15_unet, conv_dim=False)) == 192
    locon = kohya_targets(sd15_unet, conv_dim=True)
    assert len(locon) == 278
    for path in locon + ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]:
        assert sd15_table.resolve("lora_unet_" + flat(path)) == ("unet", path)
        assert sd15_table.resolve("lycoris_" + flat(path)) == ("unet", path)
        assert sd15_table.kohya_name("unet", path) == "lora_unet_" + flat(path)


SD15_REAL_KEYS = {  # docs/formats.md 1.3
    "lora_unet_down_blocks_0_attentions_0_proj_in": "down_blocks.0.attentions.0.proj_in",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0":
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k":
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj":
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2":
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    "lora_unet_down_blocks_0_attentions_0_proj_out": "down_blocks.0.attentions.0.proj_out",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_v":
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_v",
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q":
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q",
    "lora_unet_down_blocks_0_resnets_0_conv1": "down_blocks.0.resnets.0.conv1",
    "lora_unet_down_blocks_0_resnets_0_time_emb_proj": "down_blocks.0.resnets.0.time_emb_proj",
    "lora_unet_down_blocks_1_resnets_0_conv_shortcut": "down_blocks.1.resnets.0.conv_shortcut",
    "lora_unet_down_blocks_0_downsamplers_0_conv": "down_blocks.0.downsamplers.0.conv",
    "lora_unet_up_blocks_0_upsamplers_0_conv": "up_blocks.0.upsamplers.0.conv",
    "lora_unet_mid_block_resnets_1_conv2": "mid_block.resnets.1.conv2",
    "lora_unet_conv_in": "conv_in",
    "lora_unet_conv_out": "conv_out",
    "lora_unet_time_embedding_linear_1": "time_embedding.linear_1",
    "lora_unet_time_embedding_linear_2": "time_embedding.linear_2",
}


def test_sd15_real_keys(sd15_table):
    for name, path in SD15_REAL_KEYS.items():
        assert sd15_table.resolve(name) == ("unet", path), name
        assert split_key(name + ".lora_down.weight") == (name, "lora_down.weight")


SDXL_SGM_KEYS = {  # docs/formats.md 1.4, plus the modules outside the blocks (1.6)
    "lora_unet_input_blocks_4_1_proj_in": "down_blocks.1.attentions.0.proj_in",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k":
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_ff_net_0_proj":
        "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "lora_unet_input_blocks_7_1_transformer_blocks_9_attn1_to_out_0":
        "down_blocks.2.attentions.0.transformer_blocks.9.attn1.to_out.0",
    "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2": "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_v":
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
    "lora_unet_output_blocks_5_1_proj_out": "up_blocks.1.attentions.2.proj_out",
    "lora_unet_input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "lora_unet_input_blocks_1_0_emb_layers_1": "down_blocks.0.resnets.0.time_emb_proj",
    "lora_unet_input_blocks_1_0_out_layers_3": "down_blocks.0.resnets.0.conv2",
    "lora_unet_input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
    "lora_unet_input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "lora_unet_output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "lora_unet_middle_block_2_in_layers_2": "mid_block.resnets.1.conv1",
    "lora_unet_input_blocks_0_0": "conv_in",
    "lora_unet_out_0": "conv_norm_out",
    "lora_unet_out_2": "conv_out",
    "lora_unet_time_embed_0": "time_embedding.linear_1",
    "lora_unet_time_embed_2": "time_embedding.linear_2",
    "lora_unet_label_emb_0_0": "add_embedding.linear_1",
    "lora_unet_label_emb_0_2": "add_embedding.linear_2",
    "lora_unet_input_blocks_1_0_in_layers_0": "down_blocks.0.resnets.0.norm1",
    "lora_unet_output_blocks_8_0_out_layers_0": "up_blocks.2.resnets.2.norm2",
}


def test_sdxl_sgm_keys(sdxl_unet, sdxl_table):
    for name, path in SDXL_SGM_KEYS.items():
        assert sdxl_table.resolve(name) == ("unet", path), name
        assert sdxl_table.kohya_name("unet", path) == name
    assert len(kohya_targets(sdxl_unet, conv_dim=False)) == 722
    locon = kohya_targets(sdxl_unet, conv_dim=True)
    assert len(locon) == 788
    names = [sdxl_table.kohya_name("unet", path) for path in locon]
    assert all(n.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks"))
               for n in names)
    assert [sdxl_table.resolve(n) for n in names] == [("unet", p) for p in locon]
    # SDXL files with diffusers block names (LyCORIS on diffusers, SimpleTuner) resolve as well
    for path in locon:
        assert sdxl_table.resolve("lora_unet_" + flat(path)) == ("unet", path)
        assert sdxl_table.resolve("lycoris_" + flat(path)) == ("unet", path)


def test_each_unet_module_has_three_distinct_names(sd15_table, sdxl_table):
    # diffusers, SGM and lycoris_ spellings never collide: no name is ambiguous or shared
    for table in (sd15_table, sdxl_table):
        assert not table.ambiguous
        unet_modules = [t for t in table.modules if t.component == "unet"]
        unet_names = [n for n in table.names() if table.resolve(n).component == "unet"]
        assert len(unet_names) == 3 * len(unet_modules)


def test_sgm_names_match_lycoris_converter(sd15_unet, sdxl_unet):
    """LyCORIS' convert_diffusers_name_to_compvis uses the SDXL upsampler rule for every model."""
    for unet in (sdxl_unet, sd15_unet):
        table_sgm = sgm.SgmPaths(unet.config)
        for path, module in unet.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            theirs = convert_diffusers_name_to_compvis("lora_unet_" + flat(path))
            ours = "lora_unet_" + flat(table_sgm.to_sgm(path))
            if path.startswith("add_embedding."):
                assert theirs == "lora_unet_" + flat(path)  # LyCORIS has no rule for it
            elif unet is sd15_unet and path == "up_blocks.0.upsamplers.0.conv":
                assert (ours, theirs) == ("lora_unet_output_blocks_2_1_conv", "lora_unet_output_blocks_2_2_conv")
            else:
                assert ours == theirs, path


def test_sgm_names_match_diffusers_converter(sdxl_unet, sdxl_table):
    """diffusers maps SGM kohya names to its own paths (SDXL pipelines only)."""
    paths = [p for p, m in sdxl_unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    state_dict = {}
    for path in paths:
        name = sdxl_table.kohya_name("unet", path)
        state_dict[f"{name}.lora_down.weight"] = torch.zeros(1)
        state_dict[f"{name}.lora_up.weight"] = torch.zeros(1)
    converted = _maybe_map_sgm_blocks_to_diffusers(state_dict, SimpleNamespace(layers_per_block=2))
    converted, _ = _convert_non_diffusers_lora_to_diffusers(converted)
    keys = convert_unet_state_dict_to_peft(converted)
    assert sorted(k.removesuffix(".lora_A.weight") for k in keys if k.endswith("lora_A.weight")) == sorted(
        f"unet.{p}" for p in paths)


def test_sd1_sgm_layout():
    table = sgm.sgm_to_diffusers_unet_map(SD15_UNET)
    assert table["output_blocks.2.1.conv"] == "up_blocks.0.upsamplers.0.conv"
    assert table["output_blocks.5.2.conv"] == "up_blocks.1.upsamplers.0.conv"
    assert table["output_blocks.8.2.conv"] == "up_blocks.2.upsamplers.0.conv"
    assert table["input_blocks.9.0.op"] == "down_blocks.2.downsamplers.0.conv"
    assert table["input_blocks.1.1"] == "down_blocks.0.attentions.0"
    assert table["output_blocks.11.1"] == "up_blocks.3.attentions.2"
    assert "input_blocks.12.0.op" not in table and "label_emb.0.0" not in table
    paths = sgm.SgmPaths(SD15_UNET)
    assert paths.to_diffusers("input_blocks.11.0.emb_layers.1") == "down_blocks.3.resnets.1.time_emb_proj"
    assert paths.to_diffusers("input_blocks.1.0.in_layers.1") is None  # SiLU: no diffusers module
    assert paths.to_sgm("up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k") == \
        "output_blocks.11.1.transformer_blocks.0.attn2.to_k"


def test_sgm_layout_follows_layers_per_block():
    config = dict(SDXL_UNET, layers_per_block=(1, 2, 3))
    table = sgm.SgmPaths(config)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    for path, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and not path.startswith("add_embedding"):
            assert table.to_diffusers(table.to_sgm(path)) == path
    # down: 1 resnet + op, 2 + op, 3 resnets -> input_blocks 1 | 2(op) 3 4 | 5(op) 6 7 8
    assert table.to_diffusers("input_blocks.2.0.op") == "down_blocks.0.downsamplers.0.conv"
    assert table.to_diffusers("input_blocks.8.1.proj_in") == "down_blocks.2.attentions.2.proj_in"
    # up: 4, 3, 2 resnets -> output_blocks 0-3 | 4-6 | 7-8
    assert table.to_diffusers("output_blocks.3.2.conv") == "up_blocks.0.upsamplers.0.conv"
    assert table.to_diffusers("output_blocks.6.2.conv") == "up_blocks.1.upsamplers.0.conv"
    assert table.to_diffusers("output_blocks.8.0.skip_connection") == "up_blocks.2.resnets.1.conv_shortcut"


# --------------------------------------------------------------------------- text encoders

REAL_TE_KEYS = [  # docs/formats.md 1.5 (module names)
    ("sd1", "lora_te_text_model_encoder_layers_0_self_attn_q_proj", "text_encoder", 0, "self_attn.q_proj"),
    ("sd1", "lora_te_text_model_encoder_layers_5_self_attn_out_proj", "text_encoder", 5, "self_attn.out_proj"),
    ("sd1", "lora_te_text_model_encoder_layers_11_mlp_fc1", "text_encoder", 11, "mlp.fc1"),
    ("sd2", "lora_te_text_model_encoder_layers_22_mlp_fc2", "text_encoder", 22, "mlp.fc2"),
    ("sd2", "lora_te_text_model_encoder_layers_22_self_attn_v_proj", "text_encoder", 22, "self_attn.v_proj"),
    ("sdxl", "lora_te1_text_model_encoder_layers_0_self_attn_k_proj", "text_encoder", 0, "self_attn.k_proj"),
    ("sdxl", "lora_te1_text_model_encoder_layers_11_mlp_fc2", "text_encoder", 11, "mlp.fc2"),
    ("sdxl", "lora_te2_text_model_encoder_layers_0_self_attn_k_proj", "text_encoder_2", 0, "self_attn.k_proj"),
    ("sdxl", "lora_te2_text_model_encoder_layers_31_mlp_fc1", "text_encoder_2", 31, "mlp.fc1"),
    ("sdxl", "lora_te2_text_model_encoder_layers_31_self_attn_out_proj", "text_encoder_2", 31, "self_attn.out_proj"),
]


def test_real_text_encoder_keys(sd15_table, sdxl_table):
    sd2_table = KeyTable(text_encoder=on_meta(CLIPTextModel, **CLIP_SD2))
    tables = {"sd1": sd15_table, "sd2": sd2_table, "sdxl": sdxl_table}
    for family, name, component, layer, child in REAL_TE_KEYS:
        table = tables[family]
        model = table.components[component]
        prefix = "text_model." if hasattr(model, "text_model") else ""  # the installed tree
        path = f"{prefix}encoder.layers.{layer}.{child}"
        assert table.resolve(name) == (component, path), name
        assert table.kohya_name(component, path, family) == name
        # written by tools under transformers 5 (no text_model level)
        assert table.resolve(name.replace("_text_model_", "_", 1)) == (component, path)
    # kohya's 72 (te1) and 192 (te2) text encoder modules
    for component, layers in (("text_encoder", 12), ("text_encoder_2", 32)):
        model = sdxl_table.components[component]
        paths = [p for p, _ in model.named_modules() if p.endswith(TE_LAYERS)]
        assert len(paths) == 6 * layers
        assert all(sdxl_table.resolve(sdxl_table.kohya_name(component, p)) == (component, p) for p in paths)


class Transformers4Tree(nn.Module):
    """The transformers-4 CLIPTextModel tree: everything under ``text_model``."""

    def __init__(self, inner):
        super().__init__()
        self.text_model = inner


@pytest.mark.parametrize("tree", ["transformers5", "transformers4", "with_projection"])
def test_text_encoder_names_with_and_without_text_model(tree):
    config = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=8, projection_dim=8)
    model = {"transformers5": lambda: CLIPTextModel(config),
             "transformers4": lambda: Transformers4Tree(CLIPTextModel(config)),
             "with_projection": lambda: CLIPTextModelWithProjection(config)}[tree]()
    single = KeyTable(text_encoder=model)
    sdxl = KeyTable(text_encoder_2=model, text_encoder=CLIPTextModel(config))
    live = "text_model.encoder.layers.1.mlp.fc2" if tree != "transformers5" else "encoder.layers.1.mlp.fc2"
    for table, component, prefixes in ((single, "text_encoder", ("lora_te_", "lora_te1_")),
                                       (sdxl, "text_encoder_2", ("lora_te2_",))):
        for prefix in prefixes:
            for body in ("text_model_encoder_layers_1_mlp_fc2", "encoder_layers_1_mlp_fc2"):
                assert table.resolve(prefix + body) == (component, live)
        assert table.resolve_path(component, "text_model.encoder.layers.1.mlp.fc2") == (component, live)
        assert table.resolve_path(component, "encoder.layers.1.mlp.fc2") == (component, live)
    written = {single.kohya_name("text_encoder", live, "sd1"), single.kohya_name("text_encoder", live, "sd2")}
    assert written == {"lora_te_text_model_encoder_layers_1_mlp_fc2"}
    assert sdxl.kohya_name("text_encoder_2", live) == "lora_te2_text_model_encoder_layers_1_mlp_fc2"
    # norms and embeddings are targetable too (LyCORIS full / norm modules)
    assert single.resolve("lora_te_text_model_final_layer_norm") is not None
    assert single.resolve("lora_te_text_model_embeddings_token_embedding") is not None
    if tree == "with_projection":
        assert single.resolve("lora_te_text_projection") == ("text_encoder", "text_projection")
        assert single.kohya_name("text_encoder", "text_projection", "sd1") == "lora_te_text_projection"
        assert sdxl.resolve("lora_te2_text_projection") == ("text_encoder_2", "text_projection")


def test_te_prefix_aliases():
    config = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=8, projection_dim=8)
    te1, te2 = CLIPTextModel(config), CLIPTextModelWithProjection(config)
    sdxl = KeyTable(text_encoder=te1, text_encoder_2=te2)
    assert sdxl.resolve("lora_te_text_model_encoder_layers_0_mlp_fc1") == ("text_encoder", "encoder.layers.0.mlp.fc1")
    refiner = KeyTable(text_encoder_2=te2)  # one (OpenCLIP-G) encoder
    assert refiner.resolve("lora_te_text_model_encoder_layers_0_mlp_fc1") == \
        ("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1")
    assert refiner.family == "sdxl"
    assert "does not have" in refiner.why_unmatched("lora_te1_text_model_encoder_layers_0_mlp_fc1")
    single = KeyTable(text_encoder=te1)
    assert single.resolve("lora_te2_text_model_encoder_layers_0_mlp_fc1") is None
    assert "text_encoder_2" in single.why_unmatched("lora_te2_text_model_encoder_layers_0_mlp_fc1")
    assert "unknown prefix" in single.why_unmatched("lora_prior_unet_x")
    with pytest.raises(ValueError, match="text_encoder_2"):
        single.kohya_name("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1", "sd1")


# --------------------------------------------------------------------------- tiny pipelines

@pytest.fixture(scope="module")
def tiny_pipes(tmp_path_factory):
    return {"sd1": tiny_sd15_pipeline(tmp_path_factory.mktemp("sd15")),
            "sdxl": tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_write_then_resolve_round_trips(tiny_pipes, family):
    pipe = tiny_pipes[family]
    table = KeyTable.from_pipeline(pipe)
    assert table.family == ("sdxl" if family == "sdxl" else "sd1/sd2")
    assert not table.ambiguous
    components = {t.component for t in table.modules}
    assert components == ({"unet", "text_encoder", "text_encoder_2"} if family == "sdxl" else
                          {"unet", "text_encoder"})
    for target, module in table.modules.items():
        assert module is pipe.components[target.component].get_submodule(target.path)
        # SDXL text encoders only have SDXL prefixes; an SDXL UNet also takes diffusers names
        write_families = ({"sd1", "sd2"} if family == "sd1" else
                          {"sdxl", "sd1"} if target.component == "unet" else {"sdxl"})
        for write_family in write_families:
            name = table.kohya_name(target.component, target.path, write_family)
            assert table.resolve(name) == target, name
            if target.component != "unet":
                assert "_text_model_" in name or name.endswith("text_projection")
    written = [table.kohya_name(*t) for t in table.modules]
    assert detect_unet_naming(written) == ("sgm" if family == "sdxl" else "diffusers")
    assert detect_family(names=written) == ("sdxl" if family == "sdxl" else "sd1/sd2")
    assert table.unmatched(written) == []


def test_adapter_wrapped_layers_keep_their_paths(tmp_path):
    pipe = tiny_sd15_pipeline(tmp_path)
    before = KeyTable.from_pipeline(pipe)
    inject_adapter(pipe.unet, LoHaConfig(r=2, target_modules=["to_q", "conv1", "proj_in"]))
    pipe.text_encoder = LoHaModel(pipe.text_encoder, LoHaConfig(r=2, target_modules=["q_proj", "fc1"]))
    after = KeyTable.from_pipeline(pipe)
    assert set(after.modules) == set(before.modules)
    assert dict(zip(after.names(), map(after.resolve, after.names()))) == \
        dict(zip(before.names(), map(before.resolve, before.names())))
    assert not any("base_layer" in t.path or "adapters" in t.path for t in after.modules)
    wrapped = after.modules[Target("unet", "down_blocks.0.resnets.0.conv1")]
    assert isinstance(wrapped, AdapterLayer)
    assert isinstance(after.modules[Target("text_encoder", "encoder.layers.0.self_attn.q_proj")], AdapterLayer)
    assert after.resolve("lora_te_text_model_encoder_layers_0_self_attn_q_proj") == \
        ("text_encoder", "encoder.layers.0.self_attn.q_proj")


# --------------------------------------------------------------------------- names only

def test_split_key():
    assert split_key("lora_unet_x.lora_down.weight") == ("lora_unet_x", "lora_down.weight")
    assert split_key("lora_te_y.alpha") == ("lora_te_y", "alpha")
    assert split_key("lora_te_y.hada_w1_a") == ("lora_te_y", "hada_w1_a")


def test_resolve_all_reports_unmatched_and_conflicts(sdxl_table):
    names = ["lora_unet_input_blocks_4_1_proj_in", "lora_unet_down_blocks_1_attentions_0_proj_in",
             "lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te1_encoder_layers_0_mlp_fc1",
             "lora_unet_input_blocks_4_1_proj_in", "lora_unet_nothing_here", "bundle_emb"]
    result = sdxl_table.resolve_all(names)
    assert result.unmatched == ["bundle_emb", "lora_unet_nothing_here"]
    assert sdxl_table.unmatched(names) == result.unmatched
    assert result.conflicts == {
        ("unet", "down_blocks.1.attentions.0.proj_in"): ["lora_unet_down_blocks_1_attentions_0_proj_in",
                                                           "lora_unet_input_blocks_4_1_proj_in"],
        ("text_encoder", "encoder.layers.0.mlp.fc1"): ["lora_te1_encoder_layers_0_mlp_fc1",
                                                        "lora_te1_text_model_encoder_layers_0_mlp_fc1"]}
    assert "nothing_here" in sdxl_table.why_unmatched("lora_unet_nothing_here")


def test_detect_unet_naming_and_family():
    sd1 = [f"lora_unet_{flat(p)}" for p in SD15_REAL_KEYS.values()]
    sgm_xl = list(SDXL_SGM_KEYS)
    diffusers_xl = ["lora_unet_" + flat(p) for p in SDXL_SGM_KEYS.values()]
    assert detect_unet_naming(sd1) == "diffusers"
    assert detect_unet_naming(sgm_xl) == "sgm"
    assert detect_unet_naming(sgm_xl + sd1) == "mixed"
    assert detect_unet_naming(["lycoris_down_blocks_0_resnets_0_conv1"]) == "diffusers"
    assert detect_unet_naming(["lora_unet_time_embedding_linear_1"]) == "diffusers"
    assert detect_unet_naming(["lora_unet_time_embed_0"]) == "sgm"
    assert detect_unet_naming(["lora_te_text_model_encoder_layers_0_mlp_fc1"]) is None
    assert detect_family(names=sd1) == "sd1/sd2"
    assert detect_family(names=sgm_xl) == "sdxl"
    assert detect_family(names=diffusers_xl) == "sdxl"
    assert detect_family(names=["lora_unet_output_blocks_2_1_conv"]) == "sd1/sd2"
    assert detect_family(names=["lora_unet_output_blocks_2_2_conv"]) == "sdxl"
    assert detect_family(names=["lora_te2_text_model_encoder_layers_0_mlp_fc1"]) == "sdxl"
    assert detect_family(names=["lora_te1_text_model_encoder_layers_0_mlp_fc1"]) == "sdxl"
    assert detect_family(names=["lora_te_text_model_encoder_layers_0_mlp_fc1"]) == "sd1/sd2"
    # lora_te1_ on an SD1 file: the UNet layout decides
    assert detect_family(names=["lora_te1_text_model_encoder_layers_0_mlp_fc1"] + sd1) == "sd1/sd2"
    # names that fit both layouts say nothing
    assert detect_family(names=["lora_unet_input_blocks_4_1_proj_in"]) is None
    assert detect_family(names=sd1 + sgm_xl) is None


def test_kohya_name_needs_config_for_sdxl_unet():
    path = "down_blocks.1.attentions.0.proj_in"
    assert kohya.kohya_name("unet", path, "sd2") == "lora_unet_down_blocks_1_attentions_0_proj_in"
    assert kohya.kohya_name("unet", path, "sdxl", SDXL_UNET) == "lora_unet_input_blocks_4_1_proj_in"
    with pytest.raises(ValueError, match="UNet config"):
        kohya.kohya_name("unet", path, "sdxl")
    with pytest.raises(ValueError, match="family"):
        kohya.kohya_name("unet", path, "sd4")


# --------------------------------------------------------------------------- PEFT / diffusers

@pytest.mark.parametrize("config_cls", [PeftLoraConfig, PeftLoHaConfig, PeftLoKrConfig])
def test_peft_keys_match_peft(config_cls):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Conv2d(8, 8, 3)])

    kwargs = {"use_effective_conv2d": True} if config_cls is PeftLoHaConfig else {}
    model = get_peft_model(Net(), config_cls(r=2, target_modules=["blocks.0", "blocks.1"], **kwargs))
    saved = get_peft_model_state_dict(model)
    live = [k for k in model.state_dict() if "base_layer" not in k]
    for keys, adapter in ((saved, None), (live, "default")):
        assert keys
        for key in keys:
            parsed = peft.parse_peft_key(key)
            assert parsed is not None and parsed.adapter_name == adapter, key
            assert parsed.module_path in ("blocks.0", "blocks.1")
            assert peft.peft_key(parsed.module_path, parsed.tensor_name, adapter) == key
    community = {peft.parse_peft_key(k).tensor_name for k in saved}
    if config_cls is PeftLoraConfig:
        assert community == {"lora_down.weight", "lora_up.weight"}
    elif config_cls is PeftLoHaConfig:
        assert community == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"}
    else:
        assert community <= {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
    assert peft.parse_peft_key("base_model.model.blocks.0.weight") is None
    assert peft.parse_peft_key("base_model.model.blocks.0.lora_A.default.extra.weight") is None


def test_exact_module_pattern_with_peft_matcher():
    paths = ["down_blocks.0.attentions.0.proj_in", "up_blocks.0.down_blocks.0.attentions.0.proj_in",
             "down_blocks.0.attentions.0.proj_in_x", "down_blocks.10.attentions.0.proj_in"]
    pattern = peft.exact_module_pattern(paths[0])
    assert [get_pattern_key([pattern], p) == pattern for p in paths] == [True, False, False, False]


def test_diffusers_lora_layout_loads_in_diffusers(tmp_path):
    """Keys and alpha metadata written with our names are read by diffusers' own loader."""
    pipe = tiny_sd15_pipeline(tmp_path)
    targets = {("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"): 8.0,
               ("unet", "up_blocks.1.resnets.0.conv1"): 2.0,
               ("text_encoder", "encoder.layers.1.self_attn.q_proj"): 4.0}
    state_dict, before, deltas = {}, {}, {}
    torch.manual_seed(0)
    for (component, path), alpha in targets.items():
        weight = pipe.components[component].get_submodule(path).weight
        before[component, path] = weight.detach().clone()
        down = torch.randn(2, *weight.shape[1:])
        up = torch.randn(weight.shape[0], 2, *([1] * (weight.dim() - 2)))
        state_dict[diffusers_lora.diffusers_lora_key(component, path, "lora_down.weight")] = down
        state_dict[diffusers_lora.diffusers_lora_key(component, path, "lora_up.weight")] = up
        deltas[component, path] = alpha / 2 * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    assert "text_encoder.text_model.encoder.layers.1.self_attn.q_proj.lora_A.weight" in state_dict
    for key in state_dict:
        parsed = diffusers_lora.parse_diffusers_lora_key(key)
        assert KeyTable.from_pipeline(pipe).resolve_path(parsed.component, parsed.module_path) in targets
    metadata = {}
    for component in ("unet", "text_encoder"):
        paths = [p for c, p in targets if c == component]
        metadata[diffusers_lora.metadata_field(component, "r")] = 2
        metadata[diffusers_lora.metadata_field(component, "lora_alpha")] = targets[component, paths[0]]
        metadata[diffusers_lora.metadata_field(component, "target_modules")] = paths
        metadata[diffusers_lora.metadata_field(component, "alpha_pattern")] = {
            peft.exact_module_pattern(p): targets[component, p] for p in paths}
    save_file(state_dict, tmp_path / "lora.safetensors",
              metadata={"format": "pt", diffusers_lora.LORA_ADAPTER_METADATA_KEY: json.dumps(metadata)})
    assert diffusers_lora.split_metadata_field("unet.lora_alpha") == ("unet", "lora_alpha")
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    pipe.fuse_lora()
    for (component, path), delta in deltas.items():
        layer = pipe.components[component].get_submodule(path)
        torch.testing.assert_close(layer.base_layer.weight - before[component, path], delta, rtol=1e-4, atol=1e-4)


def test_diffusers_lora_save_layout(tmp_path):
    """``save_lora_weights`` prefixes the PEFT state dict with the component name."""
    unet_layers = {"down_blocks.0.resnets.0.conv1.lora_A.weight": torch.zeros(1)}
    te_layers = {"encoder.layers.0.mlp.fc1.lora_B.weight": torch.zeros(1)}
    packed = {**StableDiffusionPipeline.pack_weights(unet_layers, "unet"),
              **StableDiffusionPipeline.pack_weights(te_layers, "text_encoder")}
    assert set(packed) == {
        diffusers_lora.diffusers_lora_key("unet", "down_blocks.0.resnets.0.conv1", "lora_down.weight"),
        "text_encoder.encoder.layers.0.mlp.fc1.lora_B.weight"}
    assert diffusers_lora.parse_diffusers_lora_key("text_encoder.encoder.layers.0.mlp.fc1.lora_B.weight") == \
        ("text_encoder", "encoder.layers.0.mlp.fc1", "lora_up.weight")
    assert diffusers_lora.parse_diffusers_lora_key("vae.encoder.conv_in.lora_A.weight") is None
    assert re.fullmatch(r"unet\..*", diffusers_lora.diffusers_lora_key("unet", "conv_in", "hada_w1_a"))
