"""One module per algorithm, each implementing ``base.Algorithm`` (read that for the contract).

``ALGORITHMS`` holds the ones adapters can use: loha, lora, lokr, full, norm, ia3.
``dora.py`` applies a ``dora_scale`` on top of any delta; ``unsupported.py`` names algorithms
(GLoRA, OFT/BOFT, T-LoRA, ...) that loaders must refuse rather than skip.
"""
from __future__ import annotations

from . import full, ia3, loha, lokr, lora, norm
from .base import Algorithm
from .common import alpha_scale, as_float_scalar

ALGORITHMS: dict[str, Algorithm] = {m.NAME: m for m in (loha, lora, lokr, full, norm, ia3)}


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; available: {', '.join(sorted(ALGORITHMS))}") from None


def detect_algorithm(params) -> Algorithm | None:
    """The algorithm whose tensors ``params`` (a mapping or a set of tensor names) holds."""
    for algorithm in ALGORITHMS.values():
        if algorithm.detect(params):
            return algorithm
    return None


__all__ = ["ALGORITHMS", "Algorithm", "alpha_scale", "as_float_scalar", "detect_algorithm", "full", "get_algorithm",
           "ia3", "loha", "lokr", "lora", "norm"]
