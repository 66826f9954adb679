"""LoRA / LoCon (kohya, LyCORIS ``locon``): dW = up @ [mid] @ down, docs/formats.md section 2.1.

Tensors: lora_down.weight (r, in) or (r, in, k, k) [Tucker: (r, in, 1, 1)],
lora_up.weight (out, r) or (out, r, 1, 1), optional lora_mid.weight (r, r, k, k).
"""
from __future__ import annotations

import math

import torch

from .common import alpha_scale, pair_shape_error, product_bound, tucker_down, tucker_flat_in

NAME = "lora"
REQUIRED = ("lora_down.weight", "lora_up.weight")
OPTIONAL = ("lora_mid.weight",)
# (fewest, most) dimensions of each tensor in the community layouts (docs/formats.md section 2)
TENSOR_DIMS = {"lora_down.weight": (2, 5), "lora_up.weight": (2, 5), "lora_mid.weight": (3, 5)}
READS_WEIGHT = False


def detect(params) -> bool:
    return "lora_down.weight" in params


def scale(params, alpha) -> float:
    return alpha_scale(alpha, rank(params))


def rank(params) -> int:
    return params["lora_down.weight"].shape[0]


def check_shapes(params, weight_shape) -> str | None:
    """None if the tensors make a delta of ``weight_shape``, else why not."""
    up, down = params["lora_up.weight"].shape, params["lora_down.weight"].shape
    if "lora_mid.weight" in params:
        mid = params["lora_mid.weight"].shape
        if mid[1] != down[0]:
            return f"lora_mid {tuple(mid)} does not fit lora_down {tuple(down)}"
        rank_down, flat_in = tucker_flat_in(mid, down)
    else:
        rank_down, flat_in = down[0], math.prod(down[1:])
    error = pair_shape_error(up[0], math.prod(up[1:]), rank_down, flat_in, weight_shape)
    return None if error is None else f"LoRA: {error}"


def low_rank_factors(params, **_):
    up = params["lora_up.weight"].float().flatten(1)
    down = params["lora_down.weight"].float()
    if "lora_mid.weight" in params:
        return up, tucker_down(params["lora_mid.weight"].float(), down)
    return up, down.flatten(1)


def delta_weight(params, weight, scale: float = 1.0, **_) -> torch.Tensor:
    """fp32 scale * dW shaped like the target ``weight`` (only its shape is used)."""
    up, down = low_rank_factors(params)
    return ((up * scale) @ down).reshape(weight.shape)


def fused_factors(params, **_):
    """The layout ``fused`` ops take: ("product", (up, down)) with dW = up @ down."""
    return "product", low_rank_factors(params)


def delta_bound(params, **_) -> float:
    return product_bound(*low_rank_factors(params))


def take_rows(params, rows):
    """dW's output rows ``rows`` (an index tensor): the up factor's rows; still rank r."""
    return {**params, "lora_up.weight": params["lora_up.weight"].index_select(0, rows)}


def thin_rank(params) -> int:
    return rank(params)


def build_cost(shape, params) -> int:
    return math.prod(shape) * rank(params)


def init_params(shape, r: int, use_tucker: bool = False, scheme: str = "lycoris"):
    """Kaiming-uniform down, zero up (kohya, LyCORIS and PEFT agree), so dW starts at zero."""
    out_dim, in_dim, kernel = shape[0], shape[1], tuple(shape[2:])
    tucker = use_tucker and any(k != 1 for k in kernel)
    if not kernel:
        shapes = {"lora_down.weight": (r, in_dim), "lora_up.weight": (out_dim, r)}
    elif tucker:
        ones = (1,) * len(kernel)
        shapes = {"lora_down.weight": (r, in_dim, *ones), "lora_mid.weight": (r, r, *kernel),
                  "lora_up.weight": (out_dim, r, *ones)}
    else:
        shapes = {"lora_down.weight": (r, in_dim, *kernel), "lora_up.weight": (out_dim, r, *(1,) * len(kernel))}
    params = {name: torch.empty(size) for name, size in shapes.items()}
    if scheme not in ("lycoris", "peft", "random"):
        raise ValueError(f"unknown init scheme {scheme!r}: expected 'lycoris', 'peft' or 'random'")
    for p in params.values():
        torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5))
    if scheme != "random":
        torch.nn.init.zeros_(params["lora_up.weight"])
    return params


# Capabilities this algorithm lacks (base.Algorithm documents each).
delta_bias = None
delta_rows = None  # its rows split into tensors of their own (take_rows), or it has none
