"""diffusers' own LoRA files: ``<component>.<module path>.lora_A.weight`` / ``.lora_B.weight``.

The key layout and the ``lora_adapter_metadata`` entry are in ``naming.diffusers_lora``. A
written file is what ``pipe.load_lora_weights`` of plain diffusers applies, without
loha_diffusion installed.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..family import family_of_components
from ..io import AdapterFileError, save_state_dict
from ..naming.diffusers_lora import (
    LORA_ADAPTER_METADATA_KEY,
    diffusers_lora_key,
    is_diffusers_lora_key,
    modern_key,
    split_metadata_field,
)
from ..naming.dit import T5_COMPONENT
from ..naming.keys import COMPONENTS
from ..naming.peft import PEFT_PREFIX, to_peft_tensor_name
from .in_memory import adapter_modules, lora_pair, lora_tensors
from .peft import PeftFolder


def is_diffusers_lora(tensors) -> bool:
    """Whether a state dict is in diffusers' layout (every key ``<component>.<module path>...``),
    today's or a pre-PEFT one."""
    return bool(tensors) and all(is_diffusers_lora_key(modern_key(key)) for key in tensors)


def _modernized(tensors: dict, source: str) -> dict:
    renamed = {}
    for key, tensor in tensors.items():
        new = modern_key(key)
        if new in renamed:
            raise AdapterFileError(f"{source}: two keys name the same tensor {new!r} (one in diffusers' current "
                                   f"layout, one in a pre-PEFT layout, e.g. {key!r}); keep one of them")
        renamed[new] = tensor
    return renamed


def read_diffusers_lora(tensors: dict, metadata: dict, source: str) -> PeftFolder:
    """A diffusers LoRA state dict (today's layout or a pre-PEFT one) as one PEFT LoRA adapter
    per component.

    The per-component ``LoraConfig`` fields come from the ``lora_adapter_metadata`` entry
    (docs/formats.md 4.3); a component without them gets no alpha, which means scale 1.
    """
    tensors = _modernized(tensors, source)
    try:
        fields = json.loads(metadata.get(LORA_ADAPTER_METADATA_KEY) or "{}")
    except json.JSONDecodeError as error:
        raise AdapterFileError(f"{source}: the {LORA_ADAPTER_METADATA_KEY!r} metadata entry is not JSON: "
                               f"{error}") from error
    configs = {c: {"peft_type": "LORA"} for c in COMPONENTS}
    for key, value in fields.items():
        split = split_metadata_field(key)
        if split is not None:
            configs[split[0]][split[1]] = value
    by_component: dict[str, dict] = {}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        by_component.setdefault(component, {})[PEFT_PREFIX + rest] = tensor
    return PeftFolder(by_component, {c: configs[c] for c in by_component})


def write_diffusers_lora(components: dict, adapter_name: str, path, approximate_rank: int | None = None) -> Path:
    """One file holding every module of the adapter as LoRA (see ``in_memory.lora_pair``).

    Scales are baked into ``lora_B`` and no alphas are written: diffusers then uses scale 1 for
    every module, sidestepping its per-module alpha handling (docs/formats.md 4.3).
    """
    family = family_of_components(components)
    modules = list(adapter_modules(components, adapter_name))
    t5 = [m for m in modules if family in T5_COMPONENT and m.component == T5_COMPONENT[family]]
    if t5:
        # diffusers' Flux / SD3 loaders take transformer and CLIP keys only and would drop these silently
        raise ValueError(f"diffusers' {family} LoRA format has no T5 text encoder, and the adapter changes "
                         f"{len(t5)} module(s) of {t5[0].component} (T5), e.g. {t5[0].path}; write it as kohya "
                         "(LyCORIS names, read by ComfyUI) or as a PEFT folder instead")
    tensors = {}
    for module in modules:
        up, down = lora_pair(module.adapter, module.weight, approximate_rank)
        for name, tensor in lora_tensors(up, down, module.weight.shape).items():
            tensors[diffusers_lora_key(module.component, module.path, to_peft_tensor_name(name))] = tensor.float()
    return save_state_dict(tensors, path)
