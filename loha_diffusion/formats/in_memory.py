"""The in-memory adapter every writer starts from, and its modules as LoRA factors.

An adapter lives on the ``AdapterLayer``s of the pipeline components under one name; a
writer walks :func:`adapter_modules`. Formats that only hold LoRA (diffusers' files, PEFT's
LoRA) take :func:`lora_pair`: exact factors when the algorithm is a low-rank product (LoRA:
rank r, LoHa: the rank-r^2 Khatri-Rao pair), else a truncated SVD if the caller allows one.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from ..algorithms.dora import apply_dora
from ..injection import unwrap
from ..io import AdapterFileError
from ..layers import AdapterLayer, AdapterWeights


class AdapterModule(NamedTuple):
    component: str
    path: str
    layer: AdapterLayer
    adapter: AdapterWeights

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (on the meta device in a conversion without a model)."""
        return self.layer.base_layer.weight


def adapter_modules(components: dict, adapter_name: str) -> Iterator[AdapterModule]:
    """The modules of one adapter across the components, in module order."""
    for component, model in components.items():
        for path, layer in unwrap(model).named_modules():
            if isinstance(layer, AdapterLayer) and adapter_name in layer.adapters:
                yield AdapterModule(component, path, layer, layer.adapters[adapter_name])


def lora_pair(adapter: AdapterWeights, weight: torch.Tensor, approximate_rank: int | None = None):
    """(up (out, R), down (R, in*k*k)) with the scale baked in, exactly when the algorithm is
    low-rank, else by a rank-``approximate_rank`` truncated SVD if that is given."""
    if adapter.supports_thin_path:
        up, down = adapter.low_rank_factors()
        return up * adapter.scale, down
    if approximate_rank is None:
        raise AdapterFileError(
            f"a {adapter.algorithm.NAME}{' + DoRA' if adapter.dora_scale is not None else ''} module is not a "
            "low-rank product, so LoRA cannot express it exactly; pass approximate_rank=N (--approximate-rank N) "
            "to use a rank-N SVD approximation")
    if weight.is_meta and (adapter.dora_scale is not None or adapter.algorithm.NAME == "ia3"):
        raise AdapterFileError(f"approximating a {adapter.algorithm.NAME} module with DoRA or IA3 needs the base "
                               "weights' values, which a conversion without a model does not have")
    with torch.no_grad():
        full = adapter.delta_weight(weight, adapter.scale)
        if adapter.dora_scale is not None:
            full = apply_dora(weight.float(), full, adapter.dora_scale.float(), 1.0, adapter.dora_semantics)
    u, s, vh = torch.linalg.svd(full.flatten(1), full_matrices=False)
    rank = min(approximate_rank, s.numel())
    return u[:, :rank] * s[:rank], vh[:rank]


def lora_tensors(up: torch.Tensor, down: torch.Tensor, weight_shape) -> dict[str, torch.Tensor]:
    """``lora_down.weight`` / ``lora_up.weight`` from a flat pair, shaped for the weight (a
    convolution's down factor carries its kernel, its up factor is 1x1)."""
    up, down = up.detach(), down.detach()
    kernel = tuple(weight_shape[2:])
    rank = up.shape[1]
    if kernel:
        return {"lora_down.weight": down.reshape(rank, weight_shape[1], *kernel).contiguous(),
                "lora_up.weight": up.reshape(*up.shape, *(1,) * len(kernel)).contiguous()}
    return {"lora_down.weight": down.contiguous(), "lora_up.weight": up.contiguous()}


def as_lora(components: dict, adapter_name: str, approximate_rank: int | None = None) -> None:
    """Replace every module of the adapter by an equivalent LoRA (scale baked, alpha = rank)."""
    replacements = []
    for module in adapter_modules(components, adapter_name):
        adapter = module.adapter
        if adapter.algorithm.NAME == "lora" and adapter.dora_scale is None and "lora_mid.weight" not in adapter.params:
            continue
        up, down = lora_pair(adapter, module.weight, approximate_rank)
        replacements.append((module.layer, AdapterWeights("lora", lora_tensors(up, down, module.weight.shape),
                                                          float(up.shape[1]))))
    for layer, weights in replacements:
        layer.delete_adapter(adapter_name)
        layer.add_adapter(adapter_name, weights)
