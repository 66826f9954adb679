"""Dotted-path adapter files of DiT models: ComfyUI's, BFL's and XLabs' layouts.

ComfyUI saves (and BFL, ai-toolkit and others publish) Flux / SD3 adapters keyed by the
original model's dotted module paths instead of Kohya's flattened names, with Kohya's tensor
names or PEFT's ``lora_A`` / ``lora_B``::

    diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight      (also "transformer.")
    text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.alpha
    text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_up.weight

XLabs-AI's Flux LoRAs name their attention processors' layers, with ``down`` / ``up`` tensors
and no alphas (scale 1), with or without ``diffusion_model.``::

    double_blocks.0.processor.qkv_lora1.down.weight

The same adapter under Kohya names is ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``
etc. (``lora_te1_`` CLIP-L, ``lora_te2_`` CLIP-G, ``lora_te3_`` T5), which is how these files are
read: renamed, then resolved like any Kohya file. diffusers does the same renaming in
``_convert_kohya_flux_lora_to_diffusers`` (diffusers/loaders/lora_conversion_utils.py).
"""
from __future__ import annotations

from ..io import AdapterFileError
from ..naming.keys import TE1_PREFIX, TE2_PREFIX, TE3_PREFIX, UNET_PREFIX, flat

_PREFIXES = {"diffusion_model.": UNET_PREFIX, "text_encoders.clip_l.transformer.": TE1_PREFIX,
             "text_encoders.clip_g.transformer.": TE2_PREFIX, "text_encoders.t5xxl.transformer.": TE3_PREFIX}
# "transformer." also starts diffusers' own files (transformer.<path>.lora_A.weight), which are
# read as those; it is a dotted original-tree file only with Kohya / LyCORIS tensor names.
_TRANSFORMER = "transformer."
# PEFT's and XLabs' names of a LoRA pair
_PAIR_TENSORS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                 "down.weight": "lora_down.weight", "up.weight": "lora_up.weight"}
# original-tree block lists, which files also name without any prefix (XLabs)
_BARE_ROOTS = ("double_blocks.", "single_blocks.", "joint_blocks.")
_KOHYA_TENSOR_STARTS = ("lora_down.", "lora_up.", "lora_mid.", "hada_", "lokr_", "alpha", "dora_scale", "diff",
                        "w_norm", "b_norm")


def _split(rest: str) -> tuple[str, str]:
    """(module path, tensor name): the tensor name is the last segment, or the last two when that
    is ``weight`` / ``bias`` (``lora_down.weight``)."""
    path, _, last = rest.rpartition(".")
    if last in ("weight", "bias"):
        path, _, owner = path.rpartition(".")
        last = f"{owner}.{last}"
    return path, last


def _renamed(key: str) -> str | None:
    for prefix, kohya_prefix in _PREFIXES.items():
        if key.startswith(prefix):
            path, tensor = _split(key[len(prefix):])
            return f"{kohya_prefix}{flat(path)}.{_PAIR_TENSORS.get(tensor, tensor)}"
    if key.startswith(_BARE_ROOTS):
        path, tensor = _split(key)
        return f"{UNET_PREFIX}{flat(path)}.{_PAIR_TENSORS.get(tensor, tensor)}"
    if key.startswith(_TRANSFORMER):
        path, tensor = _split(key[len(_TRANSFORMER):])
        if tensor.startswith(_KOHYA_TENSOR_STARTS):
            return f"{UNET_PREFIX}{flat(path)}.{tensor}"
    return None


def is_dotted_dit(tensors) -> bool:
    """Whether any key is in this layout (one is enough: such files mix in nothing else)."""
    return any(_renamed(key) is not None for key in tensors)


def read_dotted_dit(tensors: dict, source: str) -> dict:
    """The state dict under Kohya names; every key must be in this layout."""
    renamed, strays = {}, []
    for key, tensor in tensors.items():
        new = _renamed(key)
        if new is None:
            strays.append(key)
        elif new in renamed:
            raise AdapterFileError(f"{source}: two keys name the tensor {new!r} (e.g. {key!r}); keep one of them")
        else:
            renamed[new] = tensor
    if strays:
        raise AdapterFileError(f"{source}: a ComfyUI/BFL dotted-path file (diffusion_model.<path>...) that also holds "
                               f"{len(strays)} key(s) of another layout, e.g. {strays[:3]}; expected every key to "
                               "start with diffusion_model., transformer., text_encoders.<clip_l|clip_g|t5xxl>."
                               "transformer. or an original block list (double_blocks., single_blocks., "
                               "joint_blocks.)")
    return renamed
