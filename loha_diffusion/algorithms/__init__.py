"""One file per algorithm; each turns community tensors into a weight delta (pure, fp32).

Every algorithm module offers: ``NAME``, ``REQUIRED``/``OPTIONAL`` tensor names, ``detect``,
``rank``, ``delta_weight(params, shape)`` (unscaled), ``low_rank_factors(params)`` (an exact
(up, down) pair), ``thin_rank``, ``build_cost`` and ``init_params``.
"""
from __future__ import annotations

from types import ModuleType

from . import loha, lora
from .common import alpha_scale, as_float_scalar

ALGORITHMS: dict[str, ModuleType] = {loha.NAME: loha, lora.NAME: lora}


def get_algorithm(name: str) -> ModuleType:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; available: {', '.join(sorted(ALGORITHMS))}") from None


def detect_algorithm(params) -> ModuleType | None:
    """The algorithm whose tensors ``params`` (a mapping or a set of tensor names) holds."""
    for algorithm in ALGORITHMS.values():
        if algorithm.detect(params):
            return algorithm
    return None


__all__ = ["ALGORITHMS", "alpha_scale", "as_float_scalar", "detect_algorithm", "get_algorithm", "loha", "lora"]
