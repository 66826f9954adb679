"""Which model family (sd1 / sd2 / sdxl / flux / sd3) an adapter file was made for, or live
components are.

One detector for files, :func:`detect_family`, with one precedence:

1. metadata: what the producer declared (``ss_base_model_version``, ``ss_v2``,
   ``modelspec.architecture``, docs/formats.md 3.1, 3.3); the one source that is both exact
   and cheap, and the one A1111 trusts;
2. tensor shapes: the input width of a UNet cross-attention key adapter is the text
   encoder's width (768 SD1, 1024 SD2, 2048 SDXL); exact, but only when the file adapts
   ``attn2.to_k``;
3. module names: the DiT block names (Flux ``double_blocks`` / ``single_transformer_blocks``,
   SD3 ``joint_blocks``), the UNet layout and the text encoder prefixes (docs/formats.md 1.6,
   5 edge case 2); among UNets they tell SDXL from the others only, hence "sd1/sd2".

Each source answers only when it is sure, so a later one fills in where an earlier one is
silent; they never vote.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .naming.dit import dit_family
from .naming.keys import (
    LYCORIS_PREFIX,
    SD1_OR_SD2,
    TE1_PREFIX,
    TE2_PREFIX,
    TE3_PREFIX,
    TE_PREFIX,
    TEXT_ENCODER_2,
    TRANSFORMER,
    TRANSFORMER_PREFIX,
    UNET,
    UNET_PREFIX,
)
from .naming.kohya import unet_body
from .naming.sgm import config_value

# the text encoder width, seen by every UNet cross-attention key/value projection
_CROSS_ATTENTION_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
# a to_k adapter's factor whose last dimension is that width; Kohya keys flatten the module
# path ("..._attn2_to_k.lora_down.weight"), PEFT keys keep its dots ("...attn2.to_k.lora_A.weight")
_CROSS_ATTENTION_KEY_INPUT = re.compile(r"attn2[._]to_k\.(lora_down\.weight|lora_A\.weight|hada_w1_b)$")

# Layout facts (docs/formats.md 1.6): SD1/SD2 have four levels, depth-1 transformers, attentions
# in down levels 0-2 and up levels 1-3, upsampler of up level 0 at SGM index 1; SDXL has three
# levels, depth 2/10 transformers, attentions in down 1-2 and up 0-1, an add_embedding.
_SDXL_UNET = re.compile(
    r"transformer_blocks_[1-9]|^up_blocks_0_attentions|^add_embedding|^label_emb_0"
    r"|^output_blocks_[0-2]_1_(?!conv)|^output_blocks_2_2_conv")
# DiT blocks in the original (BFL, SAI) and diffusers trees; diffusers' SD3 and Flux double blocks
# share ``transformer_blocks`` and their attention names, so those alone say nothing
_FLUX = re.compile(r"^(double_blocks|single_blocks|single_transformer_blocks)_\d|^(img_in|txt_in|guidance_in_)"
                   r"|^time_text_embed_guidance_embedder")
_SD3 = re.compile(r"^joint_blocks_\d|^(x_embedder_proj|pos_embed_proj|t_embedder_mlp|y_embedder_mlp)$"
                  r"|^transformer_blocks_\d+_attn2_to_")
# top-level modules of either DiT that no UNet has at top level
_ANY_DIT = re.compile(r"^(transformer_blocks_\d|context_embedder|x_embedder|norm_out_linear|proj_out|time_text_embed_)")
_DIT_PREFIXES = (UNET_PREFIX, LYCORIS_PREFIX, TRANSFORMER_PREFIX)
_EITHER_DIT = "flux/sd3"
# T5 encoder module paths (``encoder.block.N...``), flattened; CLIP ones are ``[text_model_]encoder_layers_N``
_T5_BODY = re.compile(r"encoder_block_\d")
_SD12_UNET = re.compile(
    r"^(down|up)_blocks_3_|^down_blocks_0_attentions|^up_blocks_3_attentions"
    r"|^(input|output)_blocks_(9|10|11)_|^input_blocks_[12]_1_|^output_blocks_[6-8]_1_|^output_blocks_2_1_conv")


def detect_family(metadata: Mapping[str, str] | None = None, tensors: Mapping | None = None,
                  names: Iterable[str] | None = None) -> str | None:
    """"sd1", "sd2", "sdxl", "flux", "sd3", "sd1/sd2" (the names alone can say no more) or None
    (unknown).

    ``tensors`` are keyed ``<module>.<tensor>`` (Kohya) or by dotted module path (PEFT);
    ``names`` are Kohya / LyCORIS module names.
    """
    return (_from_metadata(metadata or {}) or _from_shapes(tensors or {}) or _from_names(names or ()))


def _from_metadata(metadata: Mapping[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    architecture = metadata.get("modelspec.architecture", "")
    # sd-scripts writes "flux1" / "sd3"; SAI's modelspec "flux-1-dev/lora", "stable-diffusion-3-medium/lora".
    # Flux.2 ("flux2_klein_4b", "flux-2-...") is another architecture: not "flux".
    if version.startswith("flux1") or architecture.startswith("flux-1"):
        return "flux"
    if version.startswith("sd3") or architecture.startswith("stable-diffusion-3"):
        return "sd3"
    if version.startswith("sdxl") or architecture.startswith("stable-diffusion-xl"):
        return "sdxl"
    if version.startswith("sd_v2") or metadata.get("ss_v2") == "True" or architecture.startswith("stable-diffusion-v2"):
        return "sd2"
    if version.startswith("sd_v1") or architecture.startswith("stable-diffusion-v1"):
        return "sd1"
    return None


def _from_shapes(tensors: Mapping) -> str | None:
    for key, tensor in tensors.items():
        if _CROSS_ATTENTION_KEY_INPUT.search(key):
            return _CROSS_ATTENTION_WIDTHS.get(tensor.shape[-1])
    return None


def _from_names(names: Iterable[str]) -> str | None:
    """DiT names first: block names of either tree, T5 prefixes; once a file names a DiT, its
    text encoder prefixes say nothing more (``lora_te2_`` is SD3's CLIP-G or, holding a T5,
    OneTrainer's Flux T5). Otherwise strong hints: ``lora_te2_`` and the UNet layout (block
    depth, which levels have attentions, the upsampler index). Weak hints, used only without
    strong ones: ``lora_te1_`` (SDXL) and ``lora_te_`` (SD1/SD2), since some tools write them the
    other way round. Disagreeing hints say nothing."""
    strong, weak, dit, any_dit = set(), set(), set(), False
    for name in names:
        found = _dit_family_of_name(name)
        if found is not None:
            any_dit = True
            if found != _EITHER_DIT:
                dit.add(found)
            continue
        body = unet_body(name)
        if body is not None:
            if _SDXL_UNET.search(body):
                strong.add("sdxl")
            if _SD12_UNET.search(body):
                strong.add(SD1_OR_SD2)
        elif name.startswith(TE3_PREFIX):
            any_dit = True
        elif name.startswith(TE2_PREFIX) and _T5_BODY.match(name[len(TE2_PREFIX):]):
            # a T5 under lora_te2_ is OneTrainer's Flux (SD3's T5 is lora_te3_, SDXL's te2 a CLIP)
            any_dit = True
            dit.add("flux")
        elif name.startswith(TE2_PREFIX):
            strong.add("sdxl")
        elif name.startswith(TE1_PREFIX):
            weak.add("sdxl")
        elif name.startswith(TE_PREFIX):
            weak.add(SD1_OR_SD2)
    if any_dit:
        return dit.pop() if len(dit) == 1 and not strong else None
    hints = strong or weak
    return hints.pop() if len(hints) == 1 else None


def _dit_family_of_name(name: str) -> str | None:
    for prefix in _DIT_PREFIXES:
        if name.startswith(prefix):
            body = name[len(prefix):]
            if _FLUX.search(body):
                return "flux"
            if _SD3.search(body):
                return "sd3"
            return _EITHER_DIT if _ANY_DIT.search(body) or prefix == TRANSFORMER_PREFIX else None
    return None


def family_of_components(components: Mapping) -> str:
    """"flux", "sd3", "sdxl", "sd2" or "sd1" of live pipeline components ({attribute name:
    module}); "sd1/sd2" when there is no UNet config to tell SD1 from SD2.

    SDXL: a second text encoder or the UNet's ``text_time`` added embedding (the refiner has
    one encoder); SD2: 1024-wide cross attention.
    """
    transformer = components.get(TRANSFORMER)
    if transformer is not None:
        family = dit_family(getattr(transformer, "config", {}))
        if family is None:
            raise TypeError(f"the pipeline's transformer is a {type(transformer).__name__}; adapters load onto "
                            "Flux (FluxTransformer2DModel) and SD3 (SD3Transformer2DModel) transformers and "
                            "Stable Diffusion UNets")
        return family
    config = getattr(components.get(UNET), "config", None)
    text_time = config is not None and config_value(config, "addition_embed_type") == "text_time"
    if components.get(TEXT_ENCODER_2) is not None or text_time:
        return "sdxl"
    if config is None:
        return SD1_OR_SD2
    return "sd2" if config_value(config, "cross_attention_dim") == 1024 else "sd1"
