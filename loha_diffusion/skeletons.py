"""Weightless SD1 / SD2 / SDXL / Flux / SD3 models (on the meta device) for converting files
without a model.

Converting between formats only needs module paths and weight shapes, so the published
architectures are rebuilt from their configs on the meta device: no download, no memory.
A diffusers folder can stand in for them (``components_from_folder``).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .io import read_json_object

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


# Published transformer configs (the models' transformer/config.json on the hub): FLUX.1-dev is
# FluxTransformer2DModel's defaults (schnell only lacks the guidance embedder, whose modules a
# schnell file never names); SD3 Medium, SD3.5 Large and SD3.5 Medium.
_SD3_MEDIUM = {"num_layers": 24, "num_attention_heads": 24, "attention_head_dim": 64, "caption_projection_dim": 1536,
               "joint_attention_dim": 4096, "pooled_projection_dim": 2048, "in_channels": 16, "out_channels": 16,
               "patch_size": 2, "pos_embed_max_size": 192, "sample_size": 128}
TRANSFORMER_CONFIGS = {
    "flux": {},
    "sd3": _SD3_MEDIUM,
    "sd3.5-large": {**_SD3_MEDIUM, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
                    "qk_norm": "rms_norm"},
    "sd3.5-medium": {**_SD3_MEDIUM, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
                     "dual_attention_layers": tuple(range(13))},
}
_CLIP_L_PROJECTED = {**_CLIP_L, "projection_dim": 768}
_CLIP_G = TEXT_ENCODER_CONFIGS["sdxl"]["text_encoder_2"]
_T5_XXL = {"d_model": 4096, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "d_kv": 64,
           "feed_forward_proj": "gated-gelu", "vocab_size": 32128}
DIT_TEXT_ENCODERS = {"flux": {"text_encoder": ("clip", _CLIP_L), "text_encoder_2": ("t5", _T5_XXL)},
                     "sd3": {"text_encoder": ("clip_projected", _CLIP_L_PROJECTED),
                             "text_encoder_2": ("clip_projected", _CLIP_G), "text_encoder_3": ("t5", _T5_XXL)}}


def _text_encoder(kind: str, config: dict) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    if kind == "t5":
        return T5EncoderModel(T5Config(**config))
    return (CLIPTextModelWithProjection if kind == "clip_projected" else CLIPTextModel)(CLIPTextConfig(**config))


def dit_skeleton_components(variant: str) -> dict[str, nn.Module]:
    """transformer and text encoders of a published Flux / SD3 variant (``TRANSFORMER_CONFIGS``), weightless."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if variant not in TRANSFORMER_CONFIGS:
        raise ValueError(f"unknown DiT model {variant!r}: expected one of {', '.join(TRANSFORMER_CONFIGS)}")
    family = "flux" if variant == "flux" else "sd3"
    with torch.device("meta"):
        cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
        components = {"transformer": cls(**TRANSFORMER_CONFIGS[variant])}
        for name, (kind, config) in DIT_TEXT_ENCODERS[family].items():
            components[name] = _text_encoder(kind, config)
    return components


def skeleton_components(family: str) -> dict[str, nn.Module]:
    """unet and text encoder(s) of a published family, weightless; Flux / SD3 variants too."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if family in TRANSFORMER_CONFIGS:
        return dit_skeleton_components(family)
    if family not in UNET_CONFIGS:
        raise ValueError(f"unknown model family {family!r}: expected one of "
                         f"{', '.join([*UNET_CONFIGS, *TRANSFORMER_CONFIGS])}")
    with torch.device("meta"):
        components = {"unet": UNet2DConditionModel(**UNET_CONFIGS[family])}
        for name, config in TEXT_ENCODER_CONFIGS[family].items():
            cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            components[name] = cls(CLIPTextConfig(**config))
    return components


def components_from_folder(folder: str | Path) -> dict[str, nn.Module]:
    """unet or transformer and the text encoders of a diffusers folder, weightless, each built from
    its config.json (the class it names: diffusers' ``_class_name``, transformers' ``architectures``)."""
    import diffusers
    import transformers

    folder = Path(folder)
    denoiser = next((name for name in ("unet", "transformer") if (folder / name / "config.json").is_file()), None)
    if denoiser is None:
        raise FileNotFoundError(f"{folder} is not a diffusers model folder (no unet/config.json nor "
                                "transformer/config.json)")
    components = {}
    with torch.device("meta"):
        for name in (denoiser, "text_encoder", "text_encoder_2", "text_encoder_3"):
            config_file = folder / name / "config.json"
            if not config_file.is_file():
                continue
            config = read_json_object(config_file)
            if name == denoiser:
                cls = getattr(diffusers, config.get("_class_name", "UNet2DConditionModel"))
                components[name] = cls.from_config(cls.load_config(folder / name))
            else:
                cls = getattr(transformers, (config.get("architectures") or ["CLIPTextModel"])[0])
                components[name] = cls(transformers.AutoConfig.from_pretrained(folder / name))
    return components
