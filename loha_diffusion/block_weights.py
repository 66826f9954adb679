"""Adapter strengths given per component and per UNet block, resolved to one strength per layer.

The forms are diffusers' ``set_adapters`` forms (diffusers/loaders/lora_base.py ``set_adapters``,
diffusers/loaders/unet_loader_utils.py ``_maybe_expand_lora_scales``, diffusers/utils/peft_utils.py
``set_weights_and_activate_adapters``), with their meaning:

* a number: every layer of every component;
* ``{"unet": ..., "text_encoder": t, "text_encoder_2": t2}``: per component; a component not
  named keeps 1.0; a text encoder takes one number;
* the UNet's entry, a number or ``{"down": d, "mid": m, "up": u}``, where ``d`` / ``u`` is a
  number (every block of the level), or ``{"block_i": v}`` with ``v`` a number or one number
  per transformer of block i. Levels, blocks and transformers not named keep 1.0.

Which layer a UNet entry reaches (diffusers' rule, reproduced so the same dict gives the same
image): entry j of ``down.block_i`` sets every layer under ``down_blocks.i.attentions.j`` and
also ``down_blocks.i.resnets.j`` (resnet j runs right before transformer j); the block's
down/upsampler follows entry 0. ``mid`` sets the mid block's transformer only. Layers outside
the blocks (conv_in, conv_out, time and add embeddings), mid-block resnets and the resnets of
blocks without transformers keep 1.0 whenever the UNet's entry is a dict (diffusers raises an
IndexError on the first few of these; it keeps the others at 1.0).

Two deliberate differences: naming a level, block or transformer that does not exist, or a
block with no transformers (whose entry diffusers ignores silently), is an error listing the
valid names; so is a component the pipeline lacks (diffusers warns and drops it).

This module reads only the UNet's block structure (which blocks have transformers, how many);
it never sees an adapter.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .dit_blocks import DitBlocks, DitStrengths, describe_dit, expand_dit, strength_number
from .naming.keys import DENOISERS, TRANSFORMER, UNET

LEVELS = ("down", "mid", "up")
_LEVEL_PREFIX = {"down": "down_blocks", "up": "up_blocks"}


@dataclass(frozen=True)
class UnetBlocks:
    """Which blocks of a UNet have transformers, and how many: {"down": {i: n}, "up": {i: n}},
    and ``mid``, the mid block's count (0 without one)."""
    levels: dict[str, dict[int, int]]
    mid: int

    @classmethod
    def of(cls, unet) -> UnetBlocks:
        levels = {}
        for level, attribute in _LEVEL_PREFIX.items():
            blocks = getattr(unet, attribute, None) or []
            levels[level] = {i: len(block.attentions) for i, block in enumerate(blocks)
                             if getattr(block, "attentions", None) is not None and len(block.attentions)}
        mid_block = getattr(unet, "mid_block", None)
        mid = len(getattr(mid_block, "attentions", None) or []) if mid_block is not None else 0
        return cls(levels, mid)

    def valid_names(self) -> str:
        parts = [f"{level}: " + (", ".join(f"block_{i} ({n} transformers)" for i, n in blocks.items()) or "none")
                 for level, blocks in self.levels.items()]
        return "; ".join(parts) + f"; mid: {'1 transformer' if self.mid else 'none'}"


def _level_slots(level: str, spec, blocks: UnetBlocks) -> dict[str, float]:
    """{"down_blocks.1.attentions.0": strength, ...} for one level's entry."""
    present = blocks.levels[level]
    if not isinstance(spec, Mapping):
        per_block = {f"block_{i}": spec for i in present}
    else:
        unknown = [k for k in spec if not (isinstance(k, str) and k.startswith("block_")
                                           and k[6:].isdigit() and int(k[6:]) in present)]
        if unknown:
            raise ValueError(f"unet {level!r} names {unknown}, which are not blocks with transformers in this "
                             f"UNet; valid names: {blocks.valid_names()}")
        per_block = dict(spec)
    slots = {}
    for i, count in present.items():
        value = per_block.get(f"block_{i}", 1.0)
        where = f"unet {level}.block_{i}"
        if isinstance(value, Sequence) and not isinstance(value, str):
            values = [strength_number(v, where) for v in value]
            if len(values) == 1:
                values = values * count
            if len(values) != count:
                raise ValueError(f"{where} has {count} transformers, got {len(values)} strengths {list(value)}; "
                                 f"pass one number or {count}")
        else:
            values = [strength_number(value, where)] * count
        for j, strength in enumerate(values):
            slots[f"{_LEVEL_PREFIX[level]}.{i}.attentions.{j}"] = strength
    return slots


def expand_unet(spec, blocks: UnetBlocks) -> float | dict[str, float]:
    """A number as it is; a dict as {transformer path prefix: strength} over every transformer."""
    if not isinstance(spec, Mapping):
        return strength_number(spec, "unet strength")
    unknown = [k for k in spec if k not in LEVELS]
    if unknown:
        raise ValueError(f"the unet strength dict names {unknown}; it takes 'down', 'mid' and 'up' "
                         f"(valid blocks: {blocks.valid_names()})")
    slots = {}
    if blocks.mid or "mid" in spec:
        mid = spec.get("mid", 1.0)
        if isinstance(mid, Sequence) and not isinstance(mid, str):
            if len(mid) != 1:
                raise ValueError(f"unet mid has one transformer, got {len(mid)} strengths {list(mid)}")
            mid = mid[0]
        if not blocks.mid:
            raise ValueError(f"this UNet's mid block has no transformer; valid names: {blocks.valid_names()}")
        slots["mid_block.attentions.0"] = strength_number(mid, "unet mid")
    for level in ("down", "up"):
        slots.update(_level_slots(level, spec.get(level, 1.0), blocks))
    return slots


def slot_of(path: str, slots: Mapping[str, float]) -> str | None:
    """The transformer entry a UNet layer at ``path`` follows (diffusers' rule, module doc)."""
    for prefix in slots:
        if prefix in path:
            return prefix
    parts = path.split(".")
    if len(parts) < 4:
        return None
    key = f"{parts[0]}.{parts[1]}.attentions.{parts[3]}"
    return key if key in slots else None


def layer_strength(resolved: float | Mapping[str, float] | DitStrengths, path: str) -> float:
    if isinstance(resolved, DitStrengths):
        return resolved.of(path)
    if not isinstance(resolved, Mapping):
        return resolved
    slot = slot_of(path, resolved)
    return 1.0 if slot is None else resolved[slot]


def resolve(weight, components: Sequence[str], blocks: UnetBlocks | None, text_encoder_weight: float | None = None,
            dit_blocks: DitBlocks | None = None) -> dict[str, float | dict[str, float] | DitStrengths]:
    """One adapter's ``weight`` as {component: number, {UNet transformer prefix: strength} or
    the DiT transformer's ``DitStrengths`` (``dit_blocks``)}."""
    weight = 1.0 if weight is None else weight
    if isinstance(weight, Mapping):
        unknown = [k for k in weight if k not in components]
        if unknown:
            raise ValueError(f"the strength dict names {unknown}, which this pipeline does not have; valid "
                             f"components: {list(components)} (per-block strengths go under 'unet' or "
                             "'transformer')")
        per_component = {c: weight.get(c, 1.0) for c in components}
        named_te = [c for c in weight if c not in DENOISERS]
    else:
        per_component = {c: weight for c in components}
        named_te = []
    if text_encoder_weight is not None:
        if named_te:
            raise ValueError(f"text_encoder_weights= and a strength dict naming {named_te} both set the text "
                             "encoders' strength; pass one of them")
        per_component.update({c: text_encoder_weight for c in components if c not in DENOISERS})
    resolved = {}
    for component, spec in per_component.items():
        if component == UNET and blocks is not None:
            resolved[component] = expand_unet(spec, blocks)
        elif component == TRANSFORMER and dit_blocks is not None:
            resolved[component] = expand_dit(spec, dit_blocks)
        elif isinstance(spec, Mapping):
            raise ValueError(f"{component} takes one strength (a number), got {spec!r}; per-block strengths "
                             "apply to the UNet or the transformer")
        else:
            resolved[component] = strength_number(spec, f"{component} strength")
    return resolved


def describe_unet(strengths: Mapping[str, float], blocks: UnetBlocks) -> float | dict:
    """The UNet's per-layer strengths ({layer path: strength}) in the form ``expand_unet`` takes:
    one number when every layer has it, else the per-block dict (one list per block)."""
    values = set(strengths.values())
    if len(values) <= 1:
        return values.pop() if values else 1.0
    slots = expand_unet({}, blocks)
    found: dict[str, float] = {}
    for path, strength in strengths.items():
        slot = slot_of(path, slots)
        if slot is not None:
            found.setdefault(slot, strength)
    described: dict = {}
    if blocks.mid:
        described["mid"] = found.get("mid_block.attentions.0", 1.0)
    for level, present in blocks.levels.items():
        described[level] = {f"block_{i}": [found.get(f"{_LEVEL_PREFIX[level]}.{i}.attentions.{j}", 1.0)
                                           for j in range(count)] for i, count in present.items()}
    return described


def describe(per_layer: Mapping[str, Mapping[str, Mapping[str, float]]], blocks: UnetBlocks | None,
             dit_blocks: DitBlocks | None = None) -> dict[str, dict]:
    """{adapter: {component: {layer path: strength}}} as {adapter: {component: strength}} in the
    forms ``resolve`` takes (a text encoder's layers all share one strength)."""
    def one(component, strengths):
        if component == UNET:
            return describe_unet(strengths, blocks)
        if component == TRANSFORMER:
            return describe_dit(strengths, dit_blocks)
        return next(iter(strengths.values()))

    return {name: {component: one(component, strengths) for component, strengths in by_component.items()}
            for name, by_component in per_layer.items()}
