"""Per-block strengths on a DiT transformer (Flux, SD3), resolved to one strength per layer.

diffusers' ``set_adapters`` takes one number for a transformer; per-block weighting of Flux
adapters is what A1111/Forge users do with sd-webui-lora-block-weight (one weight per double
block D00-D18, single block S00-S37, and the layers outside them). The form here follows the
UNet's (``block_weights``) with diffusers' attribute names as keys::

    {"transformer_blocks": 0.5,                        # every double (Flux) / joint (SD3) block
     "single_transformer_blocks": [1.0] * 19 + [0.0] * 19,   # Flux: one per single block
     "rest": 1.0}                                      # embedders, final norm and projection

A block list takes a number, one number per block, or ``{"block_i": v}``; what is not named keeps
1.0. Naming a block list the transformer lacks, or a block past its end, is an error listing the
valid names. This module reads only how many blocks the transformer has; it never sees an adapter.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
REST = "rest"


def strength_number(value, where: str) -> float:
    """``value`` as a strength: a number (not a bool), or a ValueError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DitBlocks:
    """How many blocks each block list of a transformer has."""

    counts: dict[str, int]

    @classmethod
    def of(cls, transformer) -> DitBlocks:
        return cls({name: len(getattr(transformer, name)) for name in BLOCK_LISTS
                    if getattr(transformer, name, None) is not None})

    def valid_names(self) -> str:
        return ", ".join([*(f"{name} ({n} blocks)" for name, n in self.counts.items()), REST])


@dataclass(frozen=True)
class DitStrengths:
    """One strength per block of each block list, and one for the layers outside them."""

    blocks: dict[str, tuple[float, ...]]
    rest: float

    def of(self, path: str) -> float:
        name, _, inner = path.partition(".")
        if name in self.blocks:
            return self.blocks[name][int(inner.partition(".")[0])]
        return self.rest


def _block_list(name: str, value, count: int) -> tuple[float, ...]:
    where = f"transformer {name}"
    if isinstance(value, Mapping):
        unknown = [k for k in value if not (isinstance(k, str) and k.startswith("block_") and k[6:].isdigit()
                                            and int(k[6:]) < count)]
        if unknown:
            raise ValueError(f"{where} names {unknown}; it has block_0 to block_{count - 1}")
        return tuple(strength_number(value.get(f"block_{i}", 1.0), f"{where}.block_{i}") for i in range(count))
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != count:
            raise ValueError(f"{where} has {count} blocks, got {len(value)} strengths; pass one number or {count}")
        return tuple(strength_number(v, where) for v in value)
    return (strength_number(value, where),) * count


def expand_dit(spec, blocks: DitBlocks) -> float | DitStrengths:
    """A number as it is; a dict as a ``DitStrengths``."""
    if not isinstance(spec, Mapping):
        return strength_number(spec, "transformer strength")
    unknown = [k for k in spec if k not in blocks.counts and k != REST]
    if unknown:
        raise ValueError(f"the transformer strength dict names {unknown}; valid: {blocks.valid_names()}")
    return DitStrengths({name: _block_list(name, spec.get(name, 1.0), count) for name, count in blocks.counts.items()},
                        strength_number(spec.get(REST, 1.0), f"transformer {REST}"))


def describe_dit(strengths: Mapping[str, float], blocks: DitBlocks) -> float | dict:
    """The transformer's per-layer strengths ({layer path: strength}) in the form ``expand_dit``
    takes: one number when every layer has it, else one list per block list and ``rest``."""
    values = set(strengths.values())
    if len(values) <= 1:
        return values.pop() if values else 1.0
    described = {name: [1.0] * count for name, count in blocks.counts.items()}
    described[REST] = 1.0
    for path, strength in strengths.items():
        name, _, inner = path.partition(".")
        if name in blocks.counts:
            described[name][int(inner.partition(".")[0])] = strength
        else:
            described[REST] = strength
    return described
