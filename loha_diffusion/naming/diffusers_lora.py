"""diffusers' own LoRA file layout (``StableDiffusion[XL]Pipeline.save_lora_weights``, 0.42.1).

Keys are ``<component>.<module path>.lora_A.weight`` / ``.lora_B.weight`` (PEFT tensor
names, no adapter name), components ``unet``, ``text_encoder``, ``text_encoder_2``. There
are no ``.alpha`` keys: ``load_lora_weights`` rejects them ("Invalid LoRA checkpoint"). The
scale lives in the safetensors metadata entry ``lora_adapter_metadata``, a JSON object of
``"<component>.<LoraConfig field>": value`` (``unet.r``, ``unet.lora_alpha``,
``unet.target_modules``, ``unet.rank_pattern``, ``unet.alpha_pattern``, ...); diffusers
builds ``LoraConfig(**fields)`` per component, so ``target_modules`` must be present. Without
that entry every module gets alpha = rank (scale 1).

Files diffusers wrote before it moved to PEFT (0.14-0.24) name the same LoRA pairs
differently; ``modern_key`` renames them as diffusers itself still does when it loads them
(``diffusers/utils/state_dict_utils.py``: ``UNET_TO_DIFFUSERS``, ``DIFFUSERS_OLD_TO_PEFT``):
attention-processor names ``<attention>.processor.to_q_lora.down.weight`` (``to_out_lora`` is
``to_out.0`` in the UNet and ``out_proj`` in a CLIP text encoder), ``<path>.lora.down.weight``
and ``<path>.lora_linear_layer.down.weight``; ``up`` is ``lora_B``, ``down`` is ``lora_A``.
Such files carry no alphas: scale 1.

Text encoder paths are written in the transformers-4 form (``text_model.encoder...``):
diffusers strips ``text_model.`` itself when the installed text encoder lacks that level.
"""
from __future__ import annotations

from typing import NamedTuple

from .keys import COMPONENTS, DENOISERS, UNET, text_model_path
from .peft import parse_peft_key, peft_key

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"


def diffusers_lora_key(component: str, module_path: str, tensor_name: str) -> str:
    """The key of a community LoRA tensor (``lora_down.weight`` / ``lora_up.weight``)."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    path = module_path if component in DENOISERS else text_model_path(module_path)
    return peft_key(path, tensor_name, prefix=f"{component}.")


class DiffusersLoraKey(NamedTuple):
    component: str
    module_path: str  # as in the file; text encoder paths may or may not have ``text_model.``
    tensor_name: str  # community name


def parse_diffusers_lora_key(key: str) -> DiffusersLoraKey | None:
    component, _, rest = key.partition(".")
    if component not in COMPONENTS:
        return None
    parsed = parse_peft_key(rest, prefix="")
    if parsed is None or parsed.adapter_name is not None:
        return None
    return DiffusersLoraKey(component, parsed.module_path, parsed.tensor_name)


def is_diffusers_lora_key(key: str) -> bool:
    """A key of diffusers' layout, PEFT's DoRA magnitude (``...lora_magnitude_vector``) included."""
    component, _, rest = key.partition(".")
    if component not in COMPONENTS:
        return False
    return rest.removesuffix(".weight").endswith(".lora_magnitude_vector") or parse_diffusers_lora_key(key) is not None


_SIDES = (("down", "lora_A"), ("up", "lora_B"))
# processor attribute -> (module path in the UNet, module path in a CLIP text encoder)
_PROCESSOR_LORAS = {"to_q_lora": ("to_q", "q_proj"), "to_k_lora": ("to_k", "k_proj"),
                    "to_v_lora": ("to_v", "v_proj"), "to_out_lora": ("to_out.0", "out_proj")}


def modern_key(key: str) -> str:
    """The key in today's layout for a key of diffusers' pre-PEFT layouts; others unchanged."""
    component, _, rest = key.partition(".")
    if component not in COMPONENTS:
        return key
    for side, new_side in _SIDES:
        suffix = f".{side}.weight"
        if not rest.endswith(suffix):
            continue
        owner = rest[: -len(suffix)]
        parent, _, leaf = owner.rpartition(".")
        if leaf in _PROCESSOR_LORAS:
            unet_name, text_name = _PROCESSOR_LORAS[leaf]
            parent = parent.removesuffix(".processor")
            return f"{component}.{parent}.{unet_name if component == UNET else text_name}.{new_side}.weight"
        if leaf in ("lora", "lora_linear_layer") and parent:
            return f"{component}.{parent}.{new_side}.weight"
    return key


def metadata_field(component: str, field: str) -> str:
    """Key inside the ``lora_adapter_metadata`` JSON: ``unet.lora_alpha``."""
    return f"{component}.{field}"


def split_metadata_field(key: str) -> tuple[str, str] | None:
    component, _, field = key.partition(".")
    return (component, field) if component in COMPONENTS and field else None
