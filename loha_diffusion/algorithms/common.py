"""Helpers shared by the algorithm files: the alpha/rank rule and low-rank products.

A "low-rank pair" is ``(up, down)`` with ``up`` of shape (out, R) and ``down`` of shape
(R, in*k*k), so that ``up @ down`` is the flattened weight delta. Every trainable algorithm
reduces to such pairs, which lets a layer run its adapter either as one merged weight or as a
thin path ``x -> down -> up`` without knowing which algorithm it holds.
"""
from __future__ import annotations

import math

import torch


def alpha_scale(alpha: float | None, rank: int) -> float:
    """scale = alpha / rank, with the community rules for odd alphas (docs/formats.md 2.0).

    A missing alpha means scale 1 (old kohya files). An alpha of 0 also means scale 1: kohya
    and LyCORIS replace 0 by the rank when they build a network, and read files the same way.
    """
    if alpha is None or float(alpha) == 0.0:
        return 1.0
    return float(alpha) / rank


def as_float_scalar(alpha) -> float | None:
    """Alpha as a Python float from a 0-D or 1-element tensor of any dtype (or a number)."""
    if alpha is None:
        return None
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1:
            raise ValueError(f"alpha must hold one number, found a tensor of shape {tuple(alpha.shape)}")
        return float(alpha.reshape(()).float().item())
    return float(alpha)


def tucker_down(core: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Fold a Tucker core (r, r', k...) into the down factor (r', in): result (r, in*k...).

    Implements R[o, i, k...] = sum_ab up[o, a] core[a, b, k...] down[b, i] by contracting the
    core with ``down`` first, so that the result is an ordinary low-rank pair with ``up``.
    """
    return torch.einsum("ab...,bi->ai...", core, down.flatten(1)).flatten(1)


def product_bound(up: torch.Tensor, down: torch.Tensor) -> float:
    """An upper bound of max |up @ down| read off the factors: the largest row sum of |up|
    times the largest |down|. inf or nan when a factor holds either."""
    return float(up.abs().sum(1).max()) * float(down.abs().max())


def khatri_rao_pair(up1, down1, up2, down2):
    """(up1 @ down1) * (up2 @ down2) == up @ down with the rank-r1*r2 Khatri-Rao factors.

    Row-wise on the up factors, column-wise on the down factors: exact, not an approximation.
    """
    up = (up1.unsqueeze(2) * up2.unsqueeze(1)).flatten(1)
    down = (down1.unsqueeze(1) * down2.unsqueeze(0)).flatten(0, 1)
    return up, down


def pair_shape_error(out_dim: int, up_rank: int, down_rank: int, flat_in: int, weight_shape) -> str | None:
    """Why a low-rank pair (out_dim x up_rank) @ (down_rank x flat_in) does not fit ``weight_shape``."""
    expected_in = math.prod(weight_shape[1:])
    if up_rank != down_rank:
        return f"inner ranks differ ({up_rank} vs {down_rank})"
    if out_dim != weight_shape[0] or flat_in != expected_in:
        return (f"the factors make a ({out_dim}, {flat_in}) delta but the layer weight {tuple(weight_shape)} "
                f"needs ({weight_shape[0]}, {expected_in})")
    return None


def tucker_flat_in(core_shape, down_shape) -> tuple[int, int]:
    """(core rank, in*k...) of a Tucker core (r, r', k...) folded into down (r', in[, 1, 1])."""
    return core_shape[0], math.prod(down_shape[1:]) * math.prod(core_shape[2:])
