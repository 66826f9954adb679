"""Every Kohya / LyCORIS module name the live modules of a pipeline answer to.

The string rules are in ``naming.kohya``; this module walks the components' module trees
(looking through ``LoHaModel`` wrappers and ``AdapterLayer``s) and registers, for each
targetable module, every spelling a file may use for it, so that names are looked up, never
inverted by string replacement.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .family import family_of_components
from .layers import AdapterLayer
from .model import logical_modules, unwrap
from .naming.dit import ORIGINAL_MODULES, OriginalModule
from .naming.keys import (
    COMPONENTS,
    DENOISERS,
    DIT_FAMILIES,
    SD1_OR_SD2,
    TRANSFORMER,
    UNET,
    UNET_PREFIX,
    Target,
    flat,
    text_model_path,
)
from .naming.kohya import kohya_name, spellings, unmatched_reason
from .naming.sgm import SgmPaths

# Leaf layers that carry a weight some adapter algorithm can change (LoRA/LoHa/LoKr on
# Linear/Conv, norm adapters on the norms, full diffs on embeddings).
TARGETABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.GroupNorm, nn.Embedding)


def targetable_modules(model: nn.Module):
    """(logical path, module) for every layer an adapter can target; a wrapped layer appears
    once, under the wrapper's path, with the wrapper as module."""
    for path, module in logical_modules(unwrap(model)):
        if path and isinstance(module, (AdapterLayer, *TARGETABLE_LAYERS)):
            yield path, module


@dataclass(frozen=True)
class Part:
    """One layer fed by a stacked module of a file: the file delta's output ``rows`` it takes,
    in the layer's order."""

    target: Target
    rows: torch.Tensor


@dataclass(frozen=True)
class Stacked:
    """A module of a file that is several layers of the pipeline stacked by output rows (Flux's
    ``qkv``), or one layer with its halves swapped; ``out_features`` rows in all."""

    parts: tuple[Part, ...]
    out_features: int


@dataclass
class Resolution:
    """Where the module names of one file point in a pipeline."""

    found: dict[str, Target | Stacked] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    # a module reached by more than one name of the file (e.g. SGM and diffusers spellings)
    conflicts: dict[Target, list[str]] = field(default_factory=dict)


class KeyTable:
    """Every kohya / LyCORIS module name the given components answer to.

    Components are passed by their pipeline attribute names; any may be None. A component
    wrapped in a ``LoHaModel`` is looked through, and layers wrapped in an ``AdapterLayer``
    keep the path they had before wrapping.
    """

    def __init__(self, **components: nn.Module | None):
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise TypeError(f"unknown component(s) {sorted(unknown)}; expected {', '.join(COMPONENTS)}")
        self.components = {name: unwrap(m) for name, m in components.items() if m is not None}
        self.modules: dict[Target, nn.Module] = {}
        self._names: dict[str, Target | Stacked] = {}
        self._canonical: dict[Target, Target] = {}  # text encoder paths in the text_model form
        self.ambiguous: dict[str, set[Target]] = {}
        self._originals: dict[str, str] = {}  # DiT original-tree dotted path -> its kohya name
        self.unet_config = getattr(self.components.get(UNET), "config", None)
        self.sgm = SgmPaths(self.unet_config) if self.unet_config is not None else None
        family = family_of_components(self.components)
        # the layout rules tell SDXL from the rest only; SD1 and SD2 name every module alike
        self.family = family if family in ("sdxl", *DIT_FAMILIES) else SD1_OR_SD2

        for component, model in self.components.items():
            for path, module in targetable_modules(model):
                target = Target(component, path)
                self.modules[target] = module
                self._canonical[self._canonical_target(target)] = target
                for name in spellings(component, path, self.components, self.sgm, self.family):
                    self._register(name, target)
        if self.family in DIT_FAMILIES:
            for original in ORIGINAL_MODULES[self.family](self.components[TRANSFORMER].config):
                self._register_original(original)
        for name in self.ambiguous:
            del self._names[name]

    @classmethod
    def from_pipeline(cls, pipe) -> KeyTable:
        return cls(**{name: getattr(pipe, name, None) for name in COMPONENTS})

    def _register_original(self, original: OriginalModule) -> None:
        """``lora_unet_`` + an original-tree name (``naming.dit``): one layer, or a ``Stacked``
        whose row ranges come from the live layers' sizes; skipped where a layer is missing
        (Flux schnell has no guidance embedder)."""
        targets = [Target(TRANSFORMER, part) for part in original.parts]
        if not all(t in self.modules for t in targets):
            return
        name = UNET_PREFIX + flat(original.path)
        self._originals[original.path] = name
        if not original.is_fused:
            self._register(name, targets[0])
            return
        sizes = [self._out_features(t) for t in targets]
        if original.swap_halves:
            half = sizes[0] // 2
            rows = (torch.cat([torch.arange(half, 2 * half), torch.arange(half)]),)
        else:
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            rows = tuple(torch.arange(start, start + size) for start, size in zip(starts, sizes))
        self._names[name] = Stacked(tuple(Part(t, r) for t, r in zip(targets, rows)), sum(sizes))

    def _out_features(self, target: Target) -> int:
        module = self.modules[target]
        return (module.base_layer if isinstance(module, AdapterLayer) else module).weight.shape[0]

    def _register(self, name: str, target: Target) -> None:
        previous = self._names.setdefault(name, target)
        if previous != target:
            self.ambiguous.setdefault(name, {previous}).add(target)

    # -- reading ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def names(self) -> Iterable[str]:
        return self._names.keys()

    def resolve(self, name: str) -> Target | Stacked | None:
        """(component, logical module path) for a module name, a ``Stacked`` for a module of a
        DiT's original tree that is several layers here, None if nothing answers to it."""
        target = self._names.get(name)
        if target is None and name in self.ambiguous:
            raise ValueError(f"module name {name!r} fits several modules: "
                             f"{sorted(self.ambiguous[name])}; it cannot be loaded unambiguously")
        return target

    @staticmethod
    def _canonical_target(target: Target) -> Target:
        if target.component in DENOISERS:
            return target
        return Target(target.component, text_model_path(target.path))

    def resolve_path(self, component: str, module_path: str) -> Target | None:
        """The live module for a dotted path from a PEFT or diffusers file; text encoder paths
        match with or without ``text_model.``."""
        return self._canonical.get(self._canonical_target(Target(component, module_path)))

    def file_name(self, component: str, module_path: str) -> str | None:
        """The name this table knows for a dotted module path of a PEFT or diffusers file: a
        layer's, or a DiT original-tree module's (``transformer.double_blocks.0.img_attn.qkv``)."""
        target = self.resolve_path(component, module_path)
        if target is not None:
            return self.kohya_name(component, target.path)
        # every original-tree module, not only the stacked ones: a file naming the original tree
        # names its plain modules (img_mlp.0, img_in) that way too
        return self._originals.get(module_path) if component == TRANSFORMER else None

    def unmatched(self, names: Iterable[str]) -> list[str]:
        """The names (sorted, once each) that no module answers to."""
        return sorted({name for name in names if name not in self._names})

    def resolve_all(self, names: Iterable[str]) -> Resolution:
        result = Resolution()
        by_target: dict[Target, list[str]] = {}
        for name in dict.fromkeys(names):
            found = self.resolve(name)
            if found is None:
                result.unmatched.append(name)
                continue
            result.found[name] = found
            for target in [p.target for p in found.parts] if isinstance(found, Stacked) else [found]:
                by_target.setdefault(target, []).append(name)
        result.unmatched.sort()
        result.conflicts = {t: sorted(ns) for t, ns in by_target.items() if len(ns) > 1}
        return result

    def why_unmatched(self, name: str) -> str:
        """A short reason for an unmatched name, for error messages."""
        return unmatched_reason(name, self.components, self.family)

    # -- writing ---------------------------------------------------------------------------
    def kohya_name(self, component: str, module_path: str, family: str | None = None) -> str:
        """The name to write; ``family`` defaults to this pipeline's ("sdxl", "sd1/sd2", "flux", "sd3")."""
        return kohya_name(component, module_path, family or self.family, sgm=self.sgm)
