"""Writing in-memory adapters as Kohya/LyCORIS files (and PEFT folders through convert.py).

Names follow what every consumer reads (formats.md 5.2): SD1/SD2 UNet in diffusers names,
SDXL UNet in SGM names, text encoders always with ``text_model``, one ``alpha`` per module.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from .io import save_state_dict
from .layers import AdapterLayer
from .metadata import kohya_metadata
from .model import unwrap
from .naming.kohya import KeyTable

SAVE_DTYPES = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pipeline_family(components: dict) -> str:
    """sd1 / sd2 / sdxl from the UNet config (SD2 has 1024-wide cross attention)."""
    table_family = KeyTable(**components).family
    if table_family == "sdxl":
        return "sdxl"
    return "sd2" if components["unet"].config.cross_attention_dim == 1024 else "sd1"


def adapter_modules(components: dict, adapter_name: str):
    """(component, path, AdapterWeights) of one adapter across the components."""
    for component, model in components.items():
        for path, layer in unwrap(model).named_modules():
            if isinstance(layer, AdapterLayer) and adapter_name in layer.adapters:
                yield component, path, layer.adapters[adapter_name]


def kohya_state_dict(components: dict, adapter_name: str, family: str | None = None,
                     save_dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors keyed ``<kohya name>.<tensor>``, summary for the metadata)."""
    family = family or pipeline_family(components)
    table = KeyTable(**components)
    tensors: dict[str, torch.Tensor] = {}
    algorithms, ranks, alphas = Counter(), Counter(), Counter()
    for component, path, adapter in adapter_modules(components, adapter_name):
        name = table.kohya_name(component, path, family)
        for tensor_name, tensor in adapter.tensors_for_file().items():
            if save_dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(save_dtype)
            tensors[f"{name}.{tensor_name}"] = tensor
        algorithms[adapter.algorithm.NAME] += 1
        if adapter.rank is not None:
            ranks[adapter.rank] += 1
        if adapter.alpha is not None:
            alphas[float(adapter.alpha)] += 1
    if not tensors:
        raise ValueError(f"no layer holds an adapter named {adapter_name!r}")
    summary = {"family": family, "algorithm": algorithms.most_common(1)[0][0],
               "dim": ranks.most_common(1)[0][0] if ranks else None,
               "alpha": alphas.most_common(1)[0][0] if alphas else None}
    return tensors, summary


def save_adapter(components: dict, adapter_name: str, path, format: str = "kohya",
                 save_dtype: torch.dtype | str | None = None, metadata: dict | None = None,
                 family: str | None = None, v_prediction: bool = False) -> Path:
    if isinstance(save_dtype, str):
        save_dtype = SAVE_DTYPES[save_dtype]
    if format == "peft":
        from .convert import write_peft_folder

        return write_peft_folder(components, adapter_name, path)
    if format != "kohya":
        raise ValueError(f"format must be 'kohya' or 'peft', got {format!r}")
    tensors, summary = kohya_state_dict(components, adapter_name, family, save_dtype)
    header = kohya_metadata(summary["family"], summary["algorithm"], summary["dim"], summary["alpha"],
                            v_prediction=v_prediction, title=adapter_name, extra=metadata)
    return save_state_dict(tensors, path, header)
