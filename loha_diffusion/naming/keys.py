"""The pure string pieces every file layout shares: component names, Kohya prefixes, key splits.

Nothing here looks at a model or a tensor (docs/formats.md 1.1, 1.2, 1.5).
"""
from __future__ import annotations

from typing import NamedTuple

UNET = "unet"
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
COMPONENTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)

UNET_PREFIX = "lora_unet_"
LYCORIS_PREFIX = "lycoris_"
TE_PREFIX = "lora_te_"
TE1_PREFIX = "lora_te1_"
TE2_PREFIX = "lora_te2_"

# every Kohya / LyCORIS prefix and the component it names in an SD1/SD2/SDXL pipeline
PREFIX_OWNERS = {UNET_PREFIX: UNET, LYCORIS_PREFIX: UNET, TE_PREFIX: TEXT_ENCODER, TE1_PREFIX: TEXT_ENCODER,
                 TE2_PREFIX: TEXT_ENCODER_2}

# The model families files are written for; module names alone often tell only SDXL from the
# other two, which share every layout rule (SD1_OR_SD2).
FAMILIES = ("sd1", "sd2", "sdxl")
SD1_OR_SD2 = "sd1/sd2"

# Children of a CLIP text model that live beside ``text_model``, not inside it.
_OUTSIDE_TEXT_MODEL = ("text_projection",)


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


def text_model_path(path: str) -> str:
    """A text encoder module path in the transformers-4 tree (``text_model.encoder...``).

    transformers 5 dropped the ``text_model`` level from ``CLIPTextModel`` only; every CLIP
    text module except the projection sits under it in the files.
    """
    if path.startswith("text_model.") or path.split(".", 1)[0] in _OUTSIDE_TEXT_MODEL:
        return path
    return "text_model." + path
