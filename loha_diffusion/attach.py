"""From the modules of an adapter file to adapters on a pipeline's layers, all-or-nothing.

``plan`` resolves every module name and checks every shape without touching the model;
``attach`` then only wraps layers and inserts adapters, steps that cannot fail half-way for
a reason the plan did not already rule out.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .algorithms.dora import dora_axis
from .family import detect_family
from .io import AdapterFileError
from .key_table import KeyTable
from .layers import LOADABLE_LAYERS, AdapterLayer, AdapterWeights
from .naming.keys import SD1_OR_SD2, Target
from .state_dict import ModuleTensors


@dataclass
class Placement:
    target: Target
    module: ModuleTensors
    source_in_channels: int | None = None


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterLayer) else module


def _inpaint_padding(target: Target, base: nn.Module, module: ModuleTensors) -> int | None:
    """4 when a 4-channel conv_in delta fits this 9-channel inpainting conv_in after padding."""
    if target != Target("unet", "conv_in") or base.weight.shape[1] <= 4:
        return None
    narrow = (base.weight.shape[0], 4, *base.weight.shape[2:])
    return 4 if module.algorithm.check_shapes(module.tensors, narrow) is None else None


def plan(modules: dict[str, ModuleTensors], table: KeyTable, source: str,
         metadata: dict[str, str] | None = None) -> list[Placement]:
    """Where each module goes; raises one AdapterFileError naming every problem."""
    resolution = table.resolve_all(modules)
    problems = []
    if resolution.unmatched:
        tensors = {f"{name}.{t}": tensor for name, module in modules.items() for t, tensor in module.tensors.items()}
        file_family = detect_family(metadata, tensors, modules)
        examples = "; ".join(f"{n} ({table.why_unmatched(n)})" for n in resolution.unmatched[:4])
        hint = (f" The file looks like a {file_family} adapter and the pipeline is {table.family}."
                if file_family and file_family != table.family and not (
                    table.family == SD1_OR_SD2 and file_family in ("sd1", "sd2")) else "")
        problems.append(f"{len(resolution.unmatched)} of {len(modules)} module(s) match no layer of this "
                        f"{table.family} pipeline, e.g. {examples}.{hint}")
    for target, names in resolution.conflicts.items():
        problems.append(f"{names} all name {target.component}.{target.path}")
    placements = []
    for name, target in resolution.found.items():
        module = modules[name]
        base = _base(table.modules[target])
        if not isinstance(base, LOADABLE_LAYERS) or getattr(base, "weight", None) is None:
            problems.append(f"{name}: {target.component}.{target.path} is a {type(base).__name__}, "
                            "which adapters cannot patch")
            continue
        shape = tuple(base.weight.shape)
        padding = None
        error = module.algorithm.check_shapes(module.tensors, shape)
        if error is not None:
            padding = _inpaint_padding(target, base, module)
            if padding is None:
                problems.append(f"{name} -> {target.component}.{target.path} {shape}: {error}")
                continue
        if module.dora_scale is not None:
            try:
                dora_axis(module.dora_scale, shape)
            except ValueError as exc:
                problems.append(f"{name}.dora_scale: {exc}")
                continue
        placements.append(Placement(target, module, padding))
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise AdapterFileError(f"{source} does not fit this pipeline; nothing was changed:\n  - "
                               + "\n  - ".join(shown))
    return placements


def attach(placements: list[Placement], table: KeyTable, adapter_name: str, *, dora_semantics: str = "lycoris",
           legacy_tucker: bool = False, strengths: dict[str, float] | None = None,
           progress: bool = False) -> list[AdapterLayer]:
    """Insert the planned adapters; ``strengths`` maps component -> initial strength."""
    from tqdm.auto import tqdm

    built = []
    for placement in tqdm(placements, desc="modules", unit="module", disable=not progress):
        module = placement.module
        weights = AdapterWeights(module.algorithm.NAME, module.tensors, module.alpha, legacy_tucker=legacy_tucker,
                                 dora_scale=module.dora_scale, dora_semantics=dora_semantics,
                                 source_in_channels=placement.source_in_channels)
        weights.requires_grad_(False)
        built.append((placement.target, weights))
    layers = []
    for target, weights in built:
        module = table.modules[target]
        if not isinstance(module, AdapterLayer):
            module = AdapterLayer(module)
            table.components[target.component].set_submodule(target.path, module)
            table.modules[target] = module
        module.add_adapter(adapter_name, weights, strength=(strengths or {}).get(target.component, 1.0))
        layers.append(module)
    return layers
