"""Unfused inference's effective weights: built once, kept until what they were built from changes."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def cache_key(base: nn.Module, terms) -> tuple:
    """Everything the effective weight of ``terms`` on ``base`` is built from: each adapter's
    strength, scale and tensor versions (in-place edits bump them), and the base weight and
    bias themselves (their storage and in-place edits)."""
    weight, bias = base.weight, base.bias
    return (tuple((t.name, t.strength, t.adapter.scale, t.adapter.versions()) for t in terms),
            weight._version, weight.data_ptr(), weight.dtype, weight.device,
            None if bias is None else (bias._version, bias.data_ptr()))


class WeightCache:
    """One layer's effective (weight, bias) for unfused inference, with the key it was built for.

    It costs one more copy of the adapted weight per layer; with ``enabled`` False every call
    applies the adapters again instead (thin or merged, whichever is cheaper). The layer drops
    the entry (``invalidate``) whenever its adapters, strengths or active set change.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._key = None
        self._params: tuple | None = None

    @property
    def params(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The (weight, bias) held now, or None."""
        return self._params

    def take(self, key, build: Callable[[], tuple]) -> tuple:
        """The (weight, bias) built for ``key``: the held ones, or ``build()``'s, then held."""
        if key != self._key:
            self.invalidate()  # free the stale copy before building the new one
            self._params = build()
            self._key = key
        return self._params

    def weight_for(self, key) -> torch.Tensor | None:
        """The held weight if it was built for exactly ``key``, else None."""
        if self._key is None or key != self._key:
            return None
        return self._params[0]

    def invalidate(self) -> None:
        self._key = None
        self._params = None
