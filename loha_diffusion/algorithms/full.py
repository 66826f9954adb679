"""Full / diff (LyCORIS ``full``, ``extract_locon`` fallback): dW = diff, docs/formats.md section 2.4.

Tensors: ``diff`` (the trained weight minus the base, exactly the weight's shape) and
optional ``diff_b`` (the bias change). No rank and no alpha: scale 1.
"""
from __future__ import annotations

import math

import torch

NAME = "full"
REQUIRED = ("diff",)
OPTIONAL = ("diff_b",)
# (fewest, most) dimensions of each tensor in the community layouts (docs/formats.md section 2)
TENSOR_DIMS = {"diff": (1, 5), "diff_b": (1, 2)}
READS_WEIGHT = False


def detect(params) -> bool:
    return "diff" in params


def rank(params) -> None:
    return None


def scale(params, alpha) -> float:
    return 1.0


def delta_weight(params, weight, scale: float = 1.0, **_) -> torch.Tensor:
    """scale * the stored diff as a new fp32 tensor shaped like ``weight`` (never a view of ``params``)."""
    return params["diff"].to(torch.float32).mul(scale).reshape(weight.shape)


def delta_bound(params, **_) -> float:
    return float(params["diff"].float().abs().max())


def take_rows(params, rows):
    return {name: tensor.index_select(0, rows) for name, tensor in params.items()}


def delta_bias(params, bias) -> torch.Tensor | None:
    """``diff_b`` in fp32 (a new tensor), shaped like ``bias``; 1-D when the layer has no bias.

    LyCORIS gives a bias-less layer a new bias in that case; deciding that is the caller's job.
    """
    if "diff_b" not in params:
        return None
    delta = params["diff_b"].to(torch.float32, copy=True)
    return delta.reshape(bias.shape) if bias is not None else delta.flatten()


def check_shapes(params, weight_shape) -> str | None:
    """None if ``diff`` is exactly ``weight_shape`` and ``diff_b`` has one value per output."""
    weight_shape = tuple(weight_shape)
    diff = tuple(params["diff"].shape)
    if diff != weight_shape:
        return f"full diff has shape {diff} but the layer weight is {weight_shape}"
    if "diff_b" in params and math.prod(params["diff_b"].shape) != weight_shape[0]:
        return (f"full diff_b has shape {tuple(params['diff_b'].shape)} but the layer has "
                f"{weight_shape[0]} outputs (one bias value each)")
    return None


# Capabilities this algorithm lacks (base.Algorithm documents each).
low_rank_factors = None
fused_factors = None
thin_rank = None
build_cost = None
init_params = None
delta_rows = None  # its rows split into tensors of their own (take_rows), or it has none
