"""Weightless SD1 / SD2 / SDXL models (on the meta device) for converting files without a model.

Converting between formats only needs module paths and weight shapes, so the published
architectures are rebuilt from their configs on the meta device: no download, no memory.
A diffusers folder can stand in for them (``components_from_folder``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

_SD_BLOCKS = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
              "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
              "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2}
UNET_CONFIGS = {
    "sd1": {**_SD_BLOCKS, "cross_attention_dim": 768, "attention_head_dim": 8},
    "sd2": {**_SD_BLOCKS, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True},
    "sdxl": {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
             "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
             "attention_head_dim": [5, 10, 20], "use_linear_projection": True,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816},
}
_CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
           "hidden_act": "quick_gelu"}
TEXT_ENCODER_CONFIGS = {
    "sd1": {"text_encoder": _CLIP_L},
    "sd2": {"text_encoder": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
                             "num_attention_heads": 16, "hidden_act": "gelu"}},
    "sdxl": {"text_encoder": _CLIP_L,
             "text_encoder_2": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                                "num_attention_heads": 20, "hidden_act": "gelu", "projection_dim": 1280}},
}


def skeleton_components(family: str) -> dict[str, nn.Module]:
    """unet and text encoder(s) of a published family, weightless."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if family not in UNET_CONFIGS:
        raise ValueError(f"unknown model family {family!r}: expected one of {', '.join(UNET_CONFIGS)}")
    with torch.device("meta"):
        components = {"unet": UNet2DConditionModel(**UNET_CONFIGS[family])}
        for name, config in TEXT_ENCODER_CONFIGS[family].items():
            cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            components[name] = cls(CLIPTextConfig(**config))
    return components


def components_from_folder(folder: str | Path) -> dict[str, nn.Module]:
    """unet and text encoder(s) of a diffusers folder, built from its configs, weightless."""
    from diffusers import UNet2DConditionModel
    from transformers import AutoConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    if not (folder / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers model folder (no unet/config.json)")
    with torch.device("meta"):
        components = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))}
        for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if (folder / name / "config.json").is_file():
                components[name] = cls(AutoConfig.from_pretrained(folder / name))
    return components
