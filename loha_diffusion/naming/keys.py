"""The pure string pieces every file layout shares: component names, Kohya prefixes, key splits.

Nothing here looks at a model or a tensor (docs/formats.md 1.1, 1.2, 1.5).
"""
from __future__ import annotations

from typing import NamedTuple

UNET = "unet"
TRANSFORMER = "transformer"  # the denoiser of DiT pipelines (Flux, SD3), in place of the UNet
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
TEXT_ENCODER_3 = "text_encoder_3"  # SD3's T5
COMPONENTS = (UNET, TRANSFORMER, TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3)
DENOISERS = (UNET, TRANSFORMER)

UNET_PREFIX = "lora_unet_"
LYCORIS_PREFIX = "lycoris_"
TE_PREFIX = "lora_te_"
TE1_PREFIX = "lora_te1_"
TE2_PREFIX = "lora_te2_"
TE3_PREFIX = "lora_te3_"  # kohya's T5 prefix on Flux and SD3, whichever pipeline attribute holds T5
TRANSFORMER_PREFIX = "lora_transformer_"  # OneTrainer: diffusers transformer paths

# every Kohya / LyCORIS prefix and what it names (on Flux / SD3 ``lora_unet_`` and
# ``lycoris_`` name the transformer)
PREFIX_OWNERS = {UNET_PREFIX: "UNet or transformer", LYCORIS_PREFIX: "UNet or transformer",
                 TRANSFORMER_PREFIX: TRANSFORMER, TE_PREFIX: TEXT_ENCODER, TE1_PREFIX: TEXT_ENCODER,
                 TE2_PREFIX: TEXT_ENCODER_2, TE3_PREFIX: "T5 text encoder"}

# The model families files are written for; module names alone often tell only SDXL from the
# other two, which share every layout rule (SD1_OR_SD2).
UNET_FAMILIES = ("sd1", "sd2", "sdxl")
DIT_FAMILIES = ("flux", "sd3")
FAMILIES = UNET_FAMILIES + DIT_FAMILIES
SD1_OR_SD2 = "sd1/sd2"

# Children of a CLIP text model that live beside ``text_model``, not inside it.
_OUTSIDE_TEXT_MODEL = ("text_projection",)
_T5_ROOTS = ("encoder.block.", "encoder.final_layer_norm", "encoder.embed_tokens", "shared")


class Target(NamedTuple):
    """A module of a pipeline: the component's attribute name and the module's (logical) path."""

    component: str
    path: str


def split_key(key: str) -> tuple[str, str]:
    """``(module name, tensor name)`` split at the first dot; the tensor name may hold dots."""
    name, _, tensor = key.partition(".")
    return name, tensor


def flat(path: str) -> str:
    return path.replace(".", "_")


def is_t5_path(path: str) -> bool:
    """A module path of a T5 encoder (``encoder.block.0.layer.0.SelfAttention.q``); CLIP's
    encoder holds ``encoder.layers`` instead, so the two never share a path."""
    return path.startswith(_T5_ROOTS)


def text_model_path(path: str) -> str:
    """A text encoder module path in the transformers-4 tree (``text_model.encoder...``).

    transformers 5 dropped the ``text_model`` level from ``CLIPTextModel`` only; every CLIP
    text module except the projection sits under it in the files. T5 paths have no such
    level and are returned as they are.
    """
    if path.startswith("text_model.") or path.split(".", 1)[0] in _OUTSIDE_TEXT_MODEL or is_t5_path(path):
        return path
    return "text_model." + path
