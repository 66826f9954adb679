"""Norm (LyCORIS ``norm``, ``train_norm``): additive changes to a LayerNorm / GroupNorm's affine
parameters, docs/formats.md section 2.8: weight' = weight + m*w_norm, bias' = bias + m*b_norm.

Tensors: ``w_norm`` (C,) and optional ``b_norm`` (C,). ComfyUI accepts ``w_norm`` alone;
AUTOMATIC1111 wants both. No rank and no alpha: scale 1.
"""
from __future__ import annotations

import math

import torch

NAME = "norm"
REQUIRED = ("w_norm",)
OPTIONAL = ("b_norm",)
# (fewest, most) dimensions of each tensor in the community layouts (docs/formats.md section 2)
TENSOR_DIMS = {"w_norm": (1, 2), "b_norm": (1, 2)}
READS_WEIGHT = False


def detect(params) -> bool:
    return "w_norm" in params


def rank(params) -> None:
    return None


def scale(params, alpha) -> float:
    return 1.0


def delta_weight(params, weight, scale: float = 1.0, **_) -> torch.Tensor:
    """scale * ``w_norm`` as a new fp32 tensor shaped like the norm's ``weight``."""
    return params["w_norm"].to(torch.float32).mul(scale).reshape(weight.shape)


def delta_bound(params, **_) -> float:
    return float(params["w_norm"].float().abs().max())


def delta_bias(params, bias) -> torch.Tensor | None:
    """``b_norm`` as a new fp32 tensor shaped like ``bias`` (1-D when the norm has no bias)."""
    if "b_norm" not in params:
        return None
    delta = params["b_norm"].to(torch.float32, copy=True)
    return delta.reshape(bias.shape) if bias is not None else delta.flatten()


def check_shapes(params, weight_shape) -> str | None:
    """None if ``w_norm`` (and ``b_norm``) hold one value per element of the norm's weight."""
    weight_shape = tuple(weight_shape)
    for name in ("w_norm", "b_norm"):
        if name in params and math.prod(params[name].shape) != math.prod(weight_shape):
            return (f"norm {name} has shape {tuple(params[name].shape)} but the normalisation layer's "
                    f"weight is {weight_shape}")
    return None


# Capabilities this algorithm lacks (base.Algorithm documents each).
low_rank_factors = None
fused_factors = None
thin_rank = None
build_cost = None
init_params = None
take_rows = None  # a norm / IA3 module has no stacked output rows to split
delta_rows = None  # its rows split into tensors of their own (take_rows), or it has none
