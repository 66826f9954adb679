"""Fusing adapters into a layer's weights, and taking them out again.

A fuse either keeps the original weight (``unfuse`` puts it back bit-exactly) or adds the
changes in place with no copy (``unfuse`` subtracts them again, exact to rounding). Adapters
whose change reads the base weight's values (IA3, DoRA) always keep the original. Nothing is
written before every new tensor has been built and checked for NaN/inf, so a failed fuse
leaves the layer as it was.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..fused import fused_weight
from ..io import all_finite
from .paths import add_rounded_once, effective_bias, merged_bias_delta, merged_delta

# |dW| below this cannot overflow fp32 or bf16 when added to any sane weight.
_SAFE_DELTA = 1e30


@torch.no_grad()
def checked_weight(weight: torch.Tensor, terms, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """The base weight plus the changes of ``terms`` (strengths times ``scale``), checked for
    NaN/inf before it is returned: a new tensor, or written into ``out`` (which may be the
    weight itself). Unfused inference caches exactly this, so that a fuse can adopt it."""
    weight = weight.detach()
    adapter, strength = terms[0].adapter, terms[0].strength
    if len(terms) == 1 and adapter.supports_fused:
        kind, factors = adapter.fused_factors()
        factors = [f.detach().float() for f in factors]
        row_scale = adapter.scale * strength * scale
        # A finite bound of |scale * dW| far below the dtype's range proves the result finite
        # without reading it again; fp16's small range, or an odd bound, gets the full check.
        bound = abs(strength * scale) * adapter.delta_bound()
        if weight.dtype != torch.float16 and bound < _SAFE_DELTA:
            return fused_weight(kind, weight, factors, row_scale, out=out)
        new = fused_weight(kind, weight, factors, row_scale)
        if all_finite(new):
            return new if out is None else out.copy_(new)
    else:
        delta = merged_delta(weight, terms, False, scale)
        if all_finite(delta):
            new = add_rounded_once(weight, delta)
            if weight.dtype == torch.float32 or all_finite(new):
                return new if out is None else out.copy_(new)
    raise ValueError(
        f"adapters {[t.name for t in terms]} would put NaN/inf into the weights (of shape {tuple(weight.shape)}); "
        "nothing was changed. Check the adapter file for NaN values or absurd alphas.")


def _checked_bias(base: nn.Module, terms, scale: float) -> torch.Tensor | None:
    """The new bias, or None when the adapters leave it as it is."""
    names = [t.name for t in terms]
    if base.bias is None:
        if merged_bias_delta(None, terms, scale) is not None:
            raise ValueError(f"adapters {names} add a bias to a layer that has none; they cannot be fused, "
                             "use them unfused")
        return None
    new_bias = effective_bias(base, terms, scale)
    if new_bias is base.bias:
        return None
    if not all_finite(new_bias):
        raise ValueError(f"fusing adapters {names} would put NaN/inf into the bias; nothing was changed")
    return new_bias


@dataclass(frozen=True)
class MergeSnapshot:
    """What a layer had fused at one moment; ``AdapterLayer.restore_merge`` goes back to it."""
    adapters: tuple[str, ...]
    scale: float
    in_place: bool


class MergeState:
    """Which adapters are fused into one layer's weights, at which scale, and how to undo it."""

    def __init__(self):
        self.adapters: list[str] = []
        self.scale = 1.0
        # Fused by adding the changes in place, without a backup: unfuse subtracts them again,
        # which restores W to rounding only.
        self.in_place = False
        self.weight_backup: torch.Tensor | None = None
        self.bias_backup: torch.Tensor | None = None

    def snapshot(self) -> MergeSnapshot:
        return MergeSnapshot(tuple(self.adapters), self.scale, self.in_place)

    @torch.no_grad()
    def fuse(self, base: nn.Module, terms, scale: float, in_place: bool,
             cached_weight: torch.Tensor | None = None) -> None:
        """Fuse ``terms`` into the original (unfused) weights of ``base``. ``cached_weight``,
        if given, is exactly ``checked_weight(base.weight, terms, scale)``, already built."""
        weight = base.weight
        in_place = in_place and not any(t.adapter.reads_base_weight for t in terms)
        new_bias = _checked_bias(base, terms, scale)
        if in_place:
            checked_weight(weight, terms, scale, out=weight.detach())
            new_weight = None
        elif cached_weight is not None:
            new_weight = cached_weight
        else:
            new_weight = checked_weight(weight, terms, scale)
        # Nothing can fail from here on. On the CPU the original tensors themselves are the
        # backup (unfuse swaps them back); elsewhere a CPU copy is kept, as A1111 and ComfyUI
        # do, so that fusing costs no accelerator memory. A bias is small: it always has one.
        if new_weight is not None:
            self.weight_backup = _swap_in(weight, new_weight)
        if new_bias is not None:
            self.bias_backup = _swap_in(base.bias, new_bias)
        self.adapters = [t.name for t in terms]
        self.scale = scale
        self.in_place = in_place

    @torch.no_grad()
    def unfuse(self, base: nn.Module, terms) -> None:
        """Restore the original weights of ``base``: bit-exactly from the backups, or, after an
        in-place fuse, by subtracting the changes of ``terms`` (the fused adapters, whose tensors
        must not have changed since)."""
        if self.in_place:
            checked_weight(base.weight, terms, -self.scale, out=base.weight.detach())
        for param, backup in ((base.weight, self.weight_backup), (base.bias, self.bias_backup)):
            if backup is None:
                continue
            if backup.device == param.device and backup.dtype == param.dtype and backup.shape == param.shape:
                param.data = backup
            else:  # the module was moved (e.g. to an accelerator) while fused
                param.copy_(backup)
        self.clear()

    def clear(self) -> None:
        """Forget the fuse: the current weights become the new base."""
        self.weight_backup = self.bias_backup = None
        self.adapters = []
        self.in_place = False


def _swap_in(param: nn.Parameter, new: torch.Tensor) -> torch.Tensor:
    """Put ``new`` into ``param``; return the backup of what was there."""
    if param.device.type == "cpu":
        backup = param.data
        param.data = new
    else:
        backup = param.detach().to("cpu", copy=True)
        param.copy_(new)
    return backup
