"""One file per algorithm; each turns community tensors into a weight delta (pure, fp32).

Every algorithm module (loha, lora, lokr, full, norm, ia3) offers, on a dict ``params``
{community tensor name: tensor} without ``alpha`` and ``dora_scale``:

* ``NAME``, ``REQUIRED``/``OPTIONAL`` tensor names (LoKr has no single required tensor:
  ``check_shapes`` names its missing halves), ``detect(params)`` (a mapping or a set of names);
* ``rank(params)`` (None for full, norm, ia3 and for LoKr with both halves full);
* ``scale(params, alpha)``: alpha/rank by ``common.alpha_scale``, 1 where there is no rank;
* ``delta_weight(params, weight, scale=1.0, **options)``: fp32 ``scale`` * dW with
  ``weight.shape``, the scale applied to the smallest operand (only IA3 reads the base
  weight's values, and says so with ``READS_WEIGHT = True``; unknown options are ignored);
* ``check_shapes(params, weight_shape)``: None, or a one-line reason why they do not fit;
* ``delta_bias(params, bias)`` where a file can change the bias (full, norm); absent = None;
* for the low-rank ones (loha, lora): ``low_rank_factors(params)`` (an exact (up, down) pair),
  ``fused_factors(params)`` (the factor layout ``loha_diffusion.fused`` takes), ``thin_rank``
  and ``build_cost``; for the trainable ones (loha, lora, lokr): ``init_params``.

``dora.py`` applies a ``dora_scale`` on top of any delta; ``unsupported.py`` names algorithms
(GLoRA, OFT/BOFT, T-LoRA, ...) that loaders must refuse rather than skip.
Detection order does not matter: every ``detect`` looks for names no other algorithm uses.
"""
from __future__ import annotations

from types import ModuleType

from . import full, ia3, loha, lokr, lora, norm
from .common import alpha_scale, as_float_scalar

ALGORITHMS: dict[str, ModuleType] = {m.NAME: m for m in (loha, lora, lokr, full, norm, ia3)}


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


__all__ = ["ALGORITHMS", "alpha_scale", "as_float_scalar", "detect_algorithm", "full", "get_algorithm", "ia3", "loha",
           "lokr", "lora", "norm"]
