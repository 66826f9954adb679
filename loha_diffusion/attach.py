"""From the modules of an adapter file to adapters on a pipeline's layers, all-or-nothing.

``plan`` resolves every module name and checks every shape without touching the model;
``attach`` then only wraps layers and inserts adapters, steps that cannot fail half-way for
a reason the plan did not already rule out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .algorithms.dora import dora_axis
from .family import detect_family
from .io import AdapterFileError
from .key_table import KeyTable, Stacked
from .layers import LOADABLE_LAYERS, AdapterLayer, AdapterWeights
from .layers.merge import checked_weight
from .layers.weights import Term
from .naming.keys import SD1_OR_SD2, Target
from .state_dict import ModuleTensors


@dataclass
class Placement:
    target: Target
    weights: AdapterWeights


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterLayer) else module


def _inpaint_padding(target: Target, base: nn.Module, module: ModuleTensors) -> int | None:
    """4 when a 4-channel conv_in delta fits this 9-channel inpainting conv_in after padding."""
    if target != Target("unet", "conv_in") or base.weight.shape[1] <= 4:
        return None
    narrow = (base.weight.shape[0], 4, *base.weight.shape[2:])
    return 4 if module.algorithm.check_shapes(module.tensors, narrow) is None else None


def _adapter_weights(module: ModuleTensors, options: dict, **layout) -> AdapterWeights:
    weights = AdapterWeights(module.algorithm.NAME, module.tensors, module.alpha, dora_scale=module.dora_scale,
                             **layout, **options)
    return weights.requires_grad_(False)


def _overflow_problem(name: str, target: Target, base: nn.Module, weights: AdapterWeights) -> str | None:
    """Why applying ``weights`` at strength 1 would put inf/NaN into the layer's weight, if it would.

    Finite factors can still multiply out past the dtype's range (an absurd alpha, or factors
    scaled by 1e20); such a file would load and then fail at the first forward or fuse. A bound
    read off the factors settles nearly every module without building dW; only the rest (a
    huge bound, DoRA, IA3) pay for one exact check, which is what a fuse would compute.
    """
    if weights.dora_scale is None and weights.delta_bound() < torch.finfo(base.weight.dtype).max / 4:
        return None
    try:
        checked_weight(base.weight, [Term(name, weights, 1.0)], 1.0)
    except ValueError:
        return (f"{name} -> {target.component}.{target.path}: its finite tensors multiply out to a weight "
                f"change that overflows {base.weight.dtype} (absurd alpha or factor values)")
    return None


def _place(name: str, module: ModuleTensors, target: Target, table: KeyTable, options: dict,
           **layout) -> Placement | str:
    """The adapter of ``module`` on ``target``, or why it cannot go there."""
    base = _base(table.modules[target])
    if not isinstance(base, LOADABLE_LAYERS) or getattr(base, "weight", None) is None:
        return f"{name}: {target.component}.{target.path} is a {type(base).__name__}, which adapters cannot patch"
    shape = tuple(base.weight.shape)
    if not layout:  # with source_rows, the whole stacked module's shapes were checked already
        error = module.algorithm.check_shapes(module.tensors, shape)
        if error is not None:
            padding = _inpaint_padding(target, base, module)
            if padding is None:
                return f"{name} -> {target.component}.{target.path} {shape}: {error}"
            layout = {"source_in_channels": padding}
    if module.dora_scale is not None:
        try:
            dora_axis(module.dora_scale, shape)
        except ValueError as exc:
            return f"{name}.dora_scale: {exc}"
    weights = _adapter_weights(module, options, **layout)
    return _overflow_problem(name, target, base, weights) or Placement(target, weights)


def _place_stacked(name: str, module: ModuleTensors, stacked: Stacked, table: KeyTable,
                   options: dict) -> list[Placement | str]:
    """One module of a DiT's original tree on the layers it stacks (``key_table.Stacked``): each
    layer gets the rows of the delta that are its own, as tensors of the same algorithm where
    they split that way (LoRA, LoHa: the up factors' rows; aligned LoKr; full), else as the
    whole module with the rows to take from its delta."""
    bases = [_base(table.modules[part.target]) for part in stacked.parts]
    if not all(isinstance(b, LOADABLE_LAYERS) and getattr(b, "weight", None) is not None for b in bases):
        return [f"{name}: the layers it stacks are not all patchable"]
    shape = (stacked.out_features, *bases[0].weight.shape[1:])
    layers = ", ".join(part.target.path for part in stacked.parts)
    error = module.algorithm.check_shapes(module.tensors, shape)
    if error is not None:
        return [f"{name} -> {layers} stacked {shape}: {error}"]
    axis = None
    if module.dora_scale is not None:
        try:  # a dora_scale of neither axis is a problem of this module, listed with the others
            axis = dora_axis(module.dora_scale, shape)
        except ValueError as exc:
            return [f"{name}.dora_scale: {exc}"]
        if axis == "input" and len(stacked.parts) > 1:
            return [f"{name}: its dora_scale runs along the input axis of the stacked weight {shape}, a norm "
                    f"over all of {layers} together, which does not split into those layers"]
    if module.algorithm.take_rows is None:
        return [f"{name}: a {module.algorithm.NAME} module on a stacked weight ({layers}) cannot be split"]
    placed = []
    for part in stacked.parts:
        rows = part.rows
        # A per-input magnitude on one layer whose rows the file only reorders (a swapped final
        # modulation) applies as it is: a column's norm does not depend on the order of its rows.
        dora = None if module.dora_scale is None else (
            module.dora_scale if axis == "input" else module.dora_scale.index_select(0, rows))
        tensors = module.algorithm.take_rows(module.tensors, rows)
        label = f"{name}[{part.target.path}]"
        if tensors is None:
            layout = {"source_rows": rows, "source_out_features": stacked.out_features}
            tensors = module.tensors
        else:
            layout = {}
            # Each layer owns its tensors: the factors take_rows leaves whole (LoRA's down, LoHa's
            # *_b, LoKr's w2) would otherwise be one tensor on several layers, which safetensors
            # refuses to save ("Some tensors share memory") and an in-place edit of one layer's
            # adapter would change the others'. They are low-rank factors: copies cost little.
            tensors = {k: t.clone() if t is module.tensors.get(k) else t for k, t in tensors.items()}
        part_module = ModuleTensors(label, module.algorithm, tensors, module.alpha, dora, module.keys)
        placed.append(_place(label, part_module, part.target, table, options, **layout))
    return placed


def plan(modules: dict[str, ModuleTensors], table: KeyTable, source: str,
         metadata: dict[str, str] | None = None, *, dora_semantics: str = "lycoris",
         legacy_tucker: bool = False, progress: bool = False) -> list[Placement]:
    """Where each module goes and its adapter, built but not yet attached; raises one
    AdapterFileError naming every problem."""
    from tqdm.auto import tqdm

    options = {"dora_semantics": dora_semantics, "legacy_tucker": legacy_tucker}
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
    for name, found in tqdm(resolution.found.items(), desc="modules", unit="module", disable=not progress):
        if isinstance(found, Stacked):
            placed = _place_stacked(name, modules[name], found, table, options)
        else:
            placed = [_place(name, modules[name], found, table, options)]
        problems.extend(p for p in placed if isinstance(p, str))
        placements.extend(p for p in placed if isinstance(p, Placement))
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise AdapterFileError(f"{source} does not fit this pipeline; nothing was changed:\n  - "
                               + "\n  - ".join(shown))
    return placements


def attach(placements: list[Placement], table: KeyTable, adapter_name: str, *,
           strengths: dict[str, float] | None = None) -> list[AdapterLayer]:
    """Insert the planned adapters; ``strengths`` maps component -> initial strength."""
    layers = []
    for placement in placements:
        target, weights = placement.target, placement.weights
        module = table.modules[target]
        if not isinstance(module, AdapterLayer):
            module = AdapterLayer(module)
            table.components[target.component].set_submodule(target.path, module)
            table.modules[target] = module
        module.add_adapter(adapter_name, weights, strength=(strengths or {}).get(target.component, 1.0))
        layers.append(module)
    return layers
