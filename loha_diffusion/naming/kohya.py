"""Kohya / LyCORIS module names <-> (pipeline component, module path), formats.md 1.1-1.5.

A name is ``<prefix><module path with "." -> "_">``; ``_`` also occurs inside module names,
so names are never inverted by string replacement. :class:`KeyTable` enumerates the live
modules of the pipeline components and registers every spelling a file may use for each:

* UNet: ``lora_unet_`` + diffusers path, ``lora_unet_`` + SGM path (``sgm.py``, from the
  UNet config), ``lycoris_`` + diffusers path;
* text encoders: ``lora_te_`` / ``lora_te1_`` (first encoder; both spellings on SD1 and SDXL),
  ``lora_te2_`` (second; also ``lora_te_`` when it is the only one, as on the SDXL refiner),
  each with and without ``text_model_`` whatever the installed transformers calls the tree.

Writing (:func:`kohya_name`) follows the community: SD1/SD2 UNet in diffusers names, SDXL
UNet in SGM names, text encoders always with ``text_model_``.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import nn

from ..layers import AdapterLayer
from ..model import logical_modules, unwrap
from .sgm import SgmPaths, config_value

UNET = "unet"
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
COMPONENTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)

UNET_PREFIX = "lora_unet_"
LYCORIS_PREFIX = "lycoris_"
TE_PREFIX = "lora_te_"
TE1_PREFIX = "lora_te1_"
TE2_PREFIX = "lora_te2_"

FAMILIES = ("sd1", "sd2", "sd1/sd2", "sdxl")

# every prefix and the component it names in an SD1/SD2/SDXL pipeline
_PREFIX_OWNERS = {UNET_PREFIX: UNET, LYCORIS_PREFIX: UNET, TE_PREFIX: TEXT_ENCODER, TE1_PREFIX: TEXT_ENCODER,
                  TE2_PREFIX: TEXT_ENCODER_2}

# Leaf layers that carry a weight some adapter algorithm can change (LoRA/LoHa/LoKr on
# Linear/Conv, norm adapters on the norms, full diffs on embeddings).
TARGETABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.GroupNorm, nn.Embedding)

# Children of a CLIP text model that live beside ``text_model``, not inside it.
_OUTSIDE_TEXT_MODEL = ("text_projection",)


class Target(NamedTuple):
    component: str
    path: str


def split_key(key: str) -> tuple[str, str]:
    """``(module name, tensor name)`` split at the first dot; the tensor name may hold dots."""
    name, _, tensor = key.partition(".")
    return name, tensor


def flat(path: str) -> str:
    return path.replace(".", "_")


def text_model_path(path: str) -> str:
    """A text encoder module path in the transformers-4 tree (``text_model.encoder...``).

    transformers 5 dropped the ``text_model`` level from ``CLIPTextModel`` only; every CLIP
    text module except the projection sits under it in the files.
    """
    if path.startswith("text_model.") or path.split(".", 1)[0] in _OUTSIDE_TEXT_MODEL:
        return path
    return "text_model." + path


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    return family


def _write_prefix(component: str, family: str) -> str:
    if component == UNET:
        return UNET_PREFIX
    if family == "sdxl" and component in (TEXT_ENCODER, TEXT_ENCODER_2):
        return TE1_PREFIX if component == TEXT_ENCODER else TE2_PREFIX
    if component == TEXT_ENCODER:
        return TE_PREFIX
    raise ValueError(f"no kohya prefix for component {component!r} of a {family} model; "
                     f"components are {', '.join(COMPONENTS)} (text_encoder_2 only on SDXL)")


def _kohya_name(component: str, module_path: str, family: str, sgm: SgmPaths | None) -> str:
    prefix = _write_prefix(component, _check_family(family))
    if component != UNET:
        return prefix + flat(text_model_path(module_path))
    if family != "sdxl":
        return prefix + flat(module_path)
    if sgm is None:
        raise ValueError("writing SDXL UNet names needs the UNet config (SGM block indices come from it)")
    sgm_path = sgm.to_sgm(module_path)
    if sgm_path is None:
        raise ValueError(f"UNet module {module_path!r} has no SGM (original SDXL) name; kohya SDXL files "
                         "name every UNet module in SGM form")
    return prefix + flat(sgm_path)


def kohya_name(component: str, module_path: str, family: str, unet_config=None) -> str:
    """The kohya module name to write for ``module_path`` of ``component``.

    ``family`` is "sd1", "sd2" (or "sd1/sd2") or "sdxl"; SDXL UNet names need ``unet_config``.
    ``module_path`` is the live (logical) path; text encoder names get ``text_model_`` always.
    """
    sgm = SgmPaths(unet_config) if component == UNET and family == "sdxl" and unet_config is not None else None
    return _kohya_name(component, module_path, family, sgm)


def targetable_modules(model: nn.Module):
    """(logical path, module) for every layer an adapter can target; a wrapped layer appears
    once, under the wrapper's path, with the wrapper as module."""
    for path, module in logical_modules(unwrap(model)):
        if path and isinstance(module, (AdapterLayer, *TARGETABLE_LAYERS)):
            yield path, module


@dataclass
class Resolution:
    """Where the module names of one file point in a pipeline."""

    found: dict[str, Target] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    # a module reached by more than one name of the file (e.g. SGM and diffusers spellings)
    conflicts: dict[Target, list[str]] = field(default_factory=dict)


class KeyTable:
    """Every kohya / LyCORIS module name the given components answer to.

    Components are passed by their pipeline attribute names; any may be None. A component
    wrapped in a ``LoHaModel`` is looked through, and layers wrapped in an ``AdapterLayer``
    keep the path they had before wrapping.
    """

    def __init__(self, unet: nn.Module | None = None, text_encoder: nn.Module | None = None,
                 text_encoder_2: nn.Module | None = None):
        given = {UNET: unet, TEXT_ENCODER: text_encoder, TEXT_ENCODER_2: text_encoder_2}
        self.components = {name: unwrap(m) for name, m in given.items() if m is not None}
        self.modules: dict[Target, nn.Module] = {}
        self._names: dict[str, Target] = {}
        self._canonical: dict[Target, Target] = {}  # text encoder paths in the text_model form
        self.ambiguous: dict[str, set[Target]] = {}
        unet = self.components.get(UNET)
        self.unet_config = getattr(unet, "config", None)
        self.sgm = SgmPaths(self.unet_config) if self.unet_config is not None else None
        self.family = "sdxl" if self._looks_sdxl() else "sd1/sd2"

        for component, model in self.components.items():
            for path, module in targetable_modules(model):
                target = Target(component, path)
                self.modules[target] = module
                self._canonical[self._canonical_target(target)] = target
                for name in self._spellings(component, path):
                    self._register(name, target)
        for name in self.ambiguous:
            del self._names[name]

    @classmethod
    def from_pipeline(cls, pipe) -> KeyTable:
        return cls(**{name: getattr(pipe, name, None) for name in COMPONENTS})

    def _looks_sdxl(self) -> bool:
        text_time = (self.unet_config is not None
                     and config_value(self.unet_config, "addition_embed_type") == "text_time")
        return TEXT_ENCODER_2 in self.components or text_time

    def _read_prefixes(self, component: str) -> tuple[str, ...]:
        if component == UNET:
            return UNET_PREFIX, LYCORIS_PREFIX
        if component == TEXT_ENCODER:
            return TE_PREFIX, TE1_PREFIX
        if component == TEXT_ENCODER_2:
            # a lone second encoder (SDXL refiner) also answers to the single-encoder prefix
            return (TE2_PREFIX,) if TEXT_ENCODER in self.components else (TE2_PREFIX, TE_PREFIX)
        raise ValueError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")

    def _spellings(self, component: str, path: str):
        if component == UNET:
            yield UNET_PREFIX + flat(path)
            yield LYCORIS_PREFIX + flat(path)
            sgm_path = self.sgm.to_sgm(path) if self.sgm is not None else None
            if sgm_path is not None:
                yield UNET_PREFIX + flat(sgm_path)
            return
        with_text_model = text_model_path(path)
        for prefix in self._read_prefixes(component):
            yield prefix + flat(with_text_model)
            yield prefix + flat(with_text_model.removeprefix("text_model."))

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

    def resolve(self, name: str) -> Target | None:
        """(component, logical module path) for a module name, None if nothing answers to it."""
        target = self._names.get(name)
        if target is None and name in self.ambiguous:
            raise ValueError(f"module name {name!r} fits several modules: "
                             f"{sorted(self.ambiguous[name])}; it cannot be loaded unambiguously")
        return target

    @staticmethod
    def _canonical_target(target: Target) -> Target:
        if target.component == UNET:
            return target
        return Target(target.component, text_model_path(target.path))

    def resolve_path(self, component: str, module_path: str) -> Target | None:
        """The live module for a dotted path from a PEFT or diffusers file; text encoder paths
        match with or without ``text_model.``."""
        return self._canonical.get(self._canonical_target(Target(component, module_path)))

    def unmatched(self, names: Iterable[str]) -> list[str]:
        """The names (sorted, once each) that no module answers to."""
        return sorted({name for name in names if name not in self._names})

    def resolve_all(self, names: Iterable[str]) -> Resolution:
        result = Resolution()
        by_target: dict[Target, list[str]] = {}
        for name in dict.fromkeys(names):
            target = self.resolve(name)
            if target is None:
                result.unmatched.append(name)
            else:
                result.found[name] = target
                by_target.setdefault(target, []).append(name)
        result.unmatched.sort()
        result.conflicts = {t: sorted(ns) for t, ns in by_target.items() if len(ns) > 1}
        return result

    def why_unmatched(self, name: str) -> str:
        """A short reason for an unmatched name, for error messages."""
        answering = {p: c for c in self.components for p in self._read_prefixes(c)}
        for prefix, owner in _PREFIX_OWNERS.items():
            if name.startswith(prefix):
                component = answering.get(prefix)
                if component is None:
                    return f"prefix {prefix!r} names the {owner}, which this pipeline does not have"
                return f"no module of the {component} is called {name[len(prefix):]!r}"
        return f"unknown prefix (expected one of {', '.join(_PREFIX_OWNERS)})"

    # -- writing ---------------------------------------------------------------------------
    def kohya_name(self, component: str, module_path: str, family: str | None = None) -> str:
        """The name to write; ``family`` defaults to this pipeline's ("sdxl" or "sd1/sd2")."""
        return _kohya_name(component, module_path, family or self.family, self.sgm)


# -- telling files apart by their names alone ----------------------------------------------

_SGM_UNET = re.compile(r"(input_blocks|middle_block|output_blocks)_\d|(time_embed|out)_\d|label_emb(_|$)")
_DIFFUSERS_UNET = re.compile(r"(down_blocks|mid_block|up_blocks)_|(conv_in|conv_out|conv_norm_out)$"
                             r"|(time_embedding|add_embedding|class_embedding)(_|$)")

# Layout facts (formats.md 1.6): SD1/SD2 have four levels, depth-1 transformers, attentions in
# down levels 0-2 and up levels 1-3, upsampler of up level 0 at SGM index 1; SDXL has three
# levels, depth 2/10 transformers, attentions in down 1-2 and up 0-1, an add_embedding.
_SDXL_UNET = re.compile(
    r"transformer_blocks_[1-9]|^up_blocks_0_attentions|^add_embedding|^label_emb_0"
    r"|^output_blocks_[0-2]_1_(?!conv)|^output_blocks_2_2_conv")
_SD12_UNET = re.compile(
    r"^(down|up)_blocks_3_|^down_blocks_0_attentions|^up_blocks_3_attentions"
    r"|^(input|output)_blocks_(9|10|11)_|^input_blocks_[12]_1_|^output_blocks_[6-8]_1_|^output_blocks_2_1_conv")


def _unet_body(name: str) -> str | None:
    for prefix in (UNET_PREFIX, LYCORIS_PREFIX):
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


def detect_unet_naming(names: Iterable[str]) -> str | None:
    """"diffusers", "sgm" or "mixed" for the UNet names among ``names``; None if there are none.

    ``lycoris_`` names are diffusers paths by construction.
    """
    kinds = set()
    for name in names:
        body = _unet_body(name)
        if body is None:
            continue
        if name.startswith(LYCORIS_PREFIX) or _DIFFUSERS_UNET.match(body):
            kinds.add("diffusers")
        elif _SGM_UNET.match(body):
            kinds.add("sgm")
    if len(kinds) > 1:
        return "mixed"
    return kinds.pop() if kinds else None


def family_from_names(names: Iterable[str]) -> str | None:
    """"sdxl" or "sd1/sd2" when the module names say so, None when they do not (or disagree).

    Strong hints: ``lora_te2_`` and UNet layout (block depth, which levels have attentions,
    the upsampler index). Weak hints, used only without strong ones: ``lora_te1_`` (SDXL) and
    ``lora_te_`` (SD1/SD2), since some tools write them the other way round.
    """
    strong, weak = set(), set()
    for name in names:
        body = _unet_body(name)
        if body is not None:
            if _SDXL_UNET.search(body):
                strong.add("sdxl")
            if _SD12_UNET.search(body):
                strong.add("sd1/sd2")
        elif name.startswith(TE2_PREFIX):
            strong.add("sdxl")
        elif name.startswith(TE1_PREFIX):
            weak.add("sdxl")
        elif name.startswith(TE_PREFIX):
            weak.add("sd1/sd2")
    hints = strong or weak
    return hints.pop() if len(hints) == 1 else None
