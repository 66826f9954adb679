"""diffusers' own LoRA files: ``<component>.<module path>.lora_A.weight`` / ``.lora_B.weight``.

The key layout and the ``lora_adapter_metadata`` entry are in ``naming.diffusers_lora``. A
written file is what ``pipe.load_lora_weights`` of plain diffusers applies, without
loha_diffusion installed.
"""
from __future__ import annotations

from pathlib import Path

from ..io import save_state_dict
from ..naming.diffusers_lora import diffusers_lora_key
from ..naming.peft import to_peft_tensor_name
from .in_memory import adapter_modules, lora_pair, lora_tensors


def write_diffusers_lora(components: dict, adapter_name: str, path, approximate_rank: int | None = None) -> Path:
    """One file holding every module of the adapter as LoRA (see ``in_memory.lora_pair``).

    Scales are baked into ``lora_B`` and no alphas are written: diffusers then uses scale 1 for
    every module, sidestepping its per-module alpha handling (docs/formats.md 4.3).
    """
    tensors = {}
    for module in adapter_modules(components, adapter_name):
        up, down = lora_pair(module.adapter, module.weight, approximate_rank)
        for name, tensor in lora_tensors(up, down, module.weight.shape).items():
            tensors[diffusers_lora_key(module.component, module.path, to_peft_tensor_name(name))] = tensor.float()
    return save_state_dict(tensors, path)
