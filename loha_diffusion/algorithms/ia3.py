"""IA3 (LyCORIS ``ia3``): a learned per-channel rescaling, docs/formats.md section 2.5.

W' = W * (1 + m*w), with w broadcast along the output rows, or along the input columns when
``on_input`` is true; as an additive delta, dW = W * w. Unlike the other algorithms the delta
needs the base weight's values.

Tensors: ``weight`` - (out,) or, with ``on_input``, (in,) for Linear; (1, C, 1, 1) for Conv2d -
and ``on_input`` (a 0-D integer, saved in the save dtype; absent means output rows, LyCORIS'
default). No rank and no alpha: scale 1.
"""
from __future__ import annotations

import math

import torch

from .common import as_float_scalar

NAME = "ia3"
REQUIRED = ("weight",)
OPTIONAL = ("on_input",)
# (fewest, most) dimensions of each tensor in the community layouts (docs/formats.md section 2)
TENSOR_DIMS = {"weight": (1, 4), "on_input": (0, 1)}
READS_WEIGHT = True  # the delta is W * w: taking it off again needs the original W


def detect(params) -> bool:
    """``on_input`` is IA3's own key; a bare ``weight`` (and nothing else) is IA3 without it."""
    names = set(params) - {"alpha", "dora_scale"}
    return "on_input" in names or names == {"weight"}


def rank(params) -> None:
    return None


def scale(params, alpha) -> float:
    return 1.0


def on_input(params) -> bool:
    return "on_input" in params and as_float_scalar(params["on_input"]) != 0


def delta_weight(params, weight, scale: float = 1.0, **_) -> torch.Tensor:
    """dW = W * w in fp32, w along dim 1 (input) with ``on_input``, else along dim 0 (output)."""
    base = weight.float()
    axis = 1 if on_input(params) else 0
    factor_shape = [1] * base.dim()
    factor_shape[axis] = base.shape[axis]
    return base * (params["weight"].float() * scale).reshape(factor_shape)


def check_shapes(params, weight_shape) -> str | None:
    """None if ``weight`` holds one value per output (or input, with ``on_input``) channel."""
    weight_shape = tuple(weight_shape)
    if len(weight_shape) < 2:
        return f"IA3 patches 2-D or conv weights, not a weight of shape {weight_shape}"
    axis, side = (1, "input") if on_input(params) else (0, "output")
    shape = tuple(params["weight"].shape)
    channels = [s for s in shape if s != 1] or [1]
    if len(channels) != 1 or math.prod(shape) != weight_shape[axis]:
        return (f"IA3 weight has shape {shape} but the layer weight {weight_shape} has "
                f"{weight_shape[axis]} {side} channels (expected ({weight_shape[axis]},) or "
                f"(1, {weight_shape[axis]}, 1, ...))")
    return None


# Capabilities this algorithm lacks (base.Algorithm documents each).
delta_bias = None
delta_bound = None
low_rank_factors = None
fused_factors = None
thin_rank = None
build_cost = None
init_params = None
take_rows = None  # a norm / IA3 module has no stacked output rows to split
delta_rows = None  # its rows split into tensors of their own (take_rows), or it has none
