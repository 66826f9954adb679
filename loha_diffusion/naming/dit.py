"""Module names of DiT adapter files (Flux, SD3) as strings: the original models' names and
the diffusers modules they stand for, read from the transformer's config.

Files name a DiT transformer's modules in one of two trees:

* the original one (BFL's Flux, SAI's MMDiT), as kohya sd-scripts, ComfyUI and the model
  authors do: ``lora_unet_double_blocks_0_img_attn_qkv``, ``diffusion_model.single_blocks.3.linear1``;
* diffusers' tree, as LyCORIS' wrapper / SimpleTuner (``lycoris_transformer_blocks_0_attn_to_q``),
  OneTrainer (``lora_transformer_...``) and diffusers / PEFT (``transformer.<path>.lora_A.weight``) do.

Some original modules are several diffusers modules at once: Flux's ``qkv`` is ``to_q``,
``to_k`` and ``to_v`` stacked by rows, a single block's ``linear1`` is those three and
``proj_mlp``. And the final modulation (``final_layer.adaLN_modulation.1``, SD3's last
``context_block.adaLN_modulation.1``) emits (shift, scale) where diffusers' module emits
(scale, shift). :class:`OriginalModule` records both facts; ``loha_diffusion.key_table``
turns them into row ranges from the live modules' sizes. The tables come from the
transformer's config (how many blocks of each kind), as the SGM tables of the UNet do.
docs/formats.md 6 has the tables with their sources.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

from .keys import TE1_PREFIX, TE2_PREFIX, TE3_PREFIX, TE_PREFIX, TEXT_ENCODER, TEXT_ENCODER_2, TEXT_ENCODER_3


def config_field(config, key: str):
    """A field of a transformer config (a FrozenDict, a dict or an object); None if absent (unlike
    ``sgm.config_value``, which falls back to the UNet's defaults)."""
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


class OriginalModule(NamedTuple):
    """An original-tree module and the diffusers module(s) whose output rows it stacks, in order."""

    path: str
    parts: tuple[str, ...]
    swap_halves: bool = False  # the one part's two output halves come in the other order
    written: bool = True  # False: a name files may use (XLabs'), never written

    @property
    def is_fused(self) -> bool:
        return len(self.parts) > 1 or self.swap_halves


def _one(path: str, part: str) -> OriginalModule:
    return OriginalModule(path, (part,))


def _xlabs(block: str, ours: str, single: bool) -> list[OriginalModule]:
    """XLabs-AI's Flux LoRA names (their attention processors' ``qkv_lora`` / ``proj_lora``, as
    diffusers' ``_convert_xlabs_flux_lora_to_diffusers`` maps them): read, not written. A single
    block's ``qkv_lora`` covers the q, k, v rows of ``linear1`` only."""
    qkv = tuple(f"{ours}.attn.to_{x}" for x in "qkv")
    if single:
        return [OriginalModule(f"{block}.processor.qkv_lora", qkv, written=False),
                OriginalModule(f"{block}.processor.proj_lora", (f"{ours}.proj_out",), written=False)]
    return [OriginalModule(f"{block}.processor.qkv_lora1", qkv, written=False),
            OriginalModule(f"{block}.processor.proj_lora1", (f"{ours}.attn.to_out.0",), written=False),
            OriginalModule(f"{block}.processor.qkv_lora2", tuple(f"{ours}.attn.add_{x}_proj" for x in "qkv"),
                           written=False),
            OriginalModule(f"{block}.processor.proj_lora2", (f"{ours}.attn.to_add_out",), written=False)]


def flux_modules(config) -> list[OriginalModule]:
    """BFL Flux names (``flux/model.py`` of black-forest-labs/flux) of a diffusers
    ``FluxTransformer2DModel``; the mapping is diffusers' own single-file converter's
    (``convert_flux_transformer_checkpoint_to_diffusers``). XLabs' names come along (``_xlabs``)."""
    table = [_one("img_in", "x_embedder"), _one("txt_in", "context_embedder"),
             _one("final_layer.linear", "proj_out"),
             OriginalModule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True)]
    for original, diffusers in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                                ("guidance_in", "guidance_embedder")):
        for side, linear in (("in_layer", "linear_1"), ("out_layer", "linear_2")):
            table.append(_one(f"{original}.{side}", f"time_text_embed.{diffusers}.{linear}"))
    for i in range(config_field(config, "num_layers")):
        block, ours = f"double_blocks.{i}", f"transformer_blocks.{i}"
        table += [
            OriginalModule(f"{block}.img_attn.qkv", tuple(f"{ours}.attn.to_{x}" for x in "qkv")),
            _one(f"{block}.img_attn.proj", f"{ours}.attn.to_out.0"),
            _one(f"{block}.img_mlp.0", f"{ours}.ff.net.0.proj"),
            _one(f"{block}.img_mlp.2", f"{ours}.ff.net.2"),
            _one(f"{block}.img_mod.lin", f"{ours}.norm1.linear"),
            OriginalModule(f"{block}.txt_attn.qkv", tuple(f"{ours}.attn.add_{x}_proj" for x in "qkv")),
            _one(f"{block}.txt_attn.proj", f"{ours}.attn.to_add_out"),
            _one(f"{block}.txt_mlp.0", f"{ours}.ff_context.net.0.proj"),
            _one(f"{block}.txt_mlp.2", f"{ours}.ff_context.net.2"),
            _one(f"{block}.txt_mod.lin", f"{ours}.norm1_context.linear"),
            *_xlabs(block, ours, single=False),
        ]
    for i in range(config_field(config, "num_single_layers")):
        block, ours = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        table += [
            OriginalModule(f"{block}.linear1", (*(f"{ours}.attn.to_{x}" for x in "qkv"), f"{ours}.proj_mlp")),
            _one(f"{block}.linear2", f"{ours}.proj_out"),
            _one(f"{block}.modulation.lin", f"{ours}.norm.linear"),
            *_xlabs(block, ours, single=True),
        ]
    return table


def sd3_modules(config) -> list[OriginalModule]:
    """SAI MMDiT names (``sd3_impls``/sd-scripts ``sd3_models.MMDiT``) of a diffusers
    ``SD3Transformer2DModel``; the mapping is diffusers' single-file converter's
    (``convert_sd3_transformer_checkpoint_to_diffusers``). The last block's context side has no
    output projection nor MLP, and its modulation emits (shift, scale)."""
    table = [_one("x_embedder.proj", "pos_embed.proj"), _one("context_embedder", "context_embedder"),
             _one("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
             _one("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
             _one("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
             _one("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
             _one("final_layer.linear", "proj_out"),
             OriginalModule("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap_halves=True)]
    layers = config_field(config, "num_layers")
    for i in range(layers):
        block, ours = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        last = i == layers - 1
        table += [
            OriginalModule(f"{block}.x_block.attn.qkv", tuple(f"{ours}.attn.to_{x}" for x in "qkv")),
            _one(f"{block}.x_block.attn.proj", f"{ours}.attn.to_out.0"),
            OriginalModule(f"{block}.x_block.attn2.qkv", tuple(f"{ours}.attn2.to_{x}" for x in "qkv")),
            _one(f"{block}.x_block.attn2.proj", f"{ours}.attn2.to_out.0"),
            _one(f"{block}.x_block.mlp.fc1", f"{ours}.ff.net.0.proj"),
            _one(f"{block}.x_block.mlp.fc2", f"{ours}.ff.net.2"),
            _one(f"{block}.x_block.adaLN_modulation.1", f"{ours}.norm1.linear"),
            OriginalModule(f"{block}.context_block.attn.qkv", tuple(f"{ours}.attn.add_{x}_proj" for x in "qkv")),
            OriginalModule(f"{block}.context_block.adaLN_modulation.1", (f"{ours}.norm1_context.linear",),
                           swap_halves=last),
        ]
        if not last:
            table += [_one(f"{block}.context_block.attn.proj", f"{ours}.attn.to_add_out"),
                      _one(f"{block}.context_block.mlp.fc1", f"{ours}.ff_context.net.0.proj"),
                      _one(f"{block}.context_block.mlp.fc2", f"{ours}.ff_context.net.2")]
    return table


ORIGINAL_MODULES = {"flux": flux_modules, "sd3": sd3_modules}

# kohya's text encoder prefixes per pipeline attribute (sd-scripts ``networks/lora_flux.py``,
# ``networks/lora_sd3.py``): CLIP-L ``lora_te1_``, CLIP-G ``lora_te2_``, T5 ``lora_te3_`` even on
# Flux, where T5 is the second encoder. ``lora_te_`` is ComfyUI's CLIP-L spelling. Flux's T5 also
# answers to ``lora_te2_``: OneTrainer's Flux files (and early sd-scripts ``lora_flux.py``) name it
# so, and ComfyUI maps both (``comfy/lora.py`` "#OneTrainer Flux"); Flux has no CLIP-G to clash.
# The first prefix is the one written.
TEXT_PREFIXES = {
    "flux": {TEXT_ENCODER: (TE1_PREFIX, TE_PREFIX), TEXT_ENCODER_2: (TE3_PREFIX, TE2_PREFIX)},
    "sd3": {TEXT_ENCODER: (TE1_PREFIX, TE_PREFIX), TEXT_ENCODER_2: (TE2_PREFIX,), TEXT_ENCODER_3: (TE3_PREFIX,)},
}
# the pipeline attribute holding T5, whose module paths have no ``text_model`` level
T5_COMPONENT = {"flux": TEXT_ENCODER_2, "sd3": TEXT_ENCODER_3}


def dit_family(config) -> str | None:
    """"flux" or "sd3" for a diffusers transformer config; None for another transformer."""
    if config_field(config, "num_single_layers") is not None:
        return "flux"
    if config_field(config, "caption_projection_dim") is not None:
        return "sd3"
    return None


# first module names of the original trees (BFL Flux, SAI MMDiT) after a Kohya prefix
_ORIGINAL_ROOTS = ("double_blocks_", "single_blocks_", "joint_blocks_", "img_in", "txt_in", "time_in_", "vector_in_",
                   "guidance_in_", "final_layer_", "x_embedder_proj", "t_embedder_", "y_embedder_")


def detect_dit_naming(bodies: Iterable[str]) -> str | None:
    """"original" (BFL / SAI module names, as kohya sd-scripts and ComfyUI write), "diffusers"
    (diffusers' module tree, as LyCORIS' wrapper / SimpleTuner, OneTrainer and PEFT write) or
    "mixed", for transformer module names without their prefix; None if there are none."""
    kinds = {"original" if body.startswith(_ORIGINAL_ROOTS) else "diffusers" for body in bodies}
    if len(kinds) > 1:
        return "mixed"
    return kinds.pop() if kinds else None
