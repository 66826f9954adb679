"""LoHa (LyCORIS ``loha``): dW = (w1_a @ w1_b) * (w2_a @ w2_b), docs/formats.md section 2.2.

Tensors (community names and layouts):
  plain   hada_w{1,2}_a (out, r), hada_w{1,2}_b (r, in*k*k)  (conv ``_b`` flattened)
  Tucker  hada_w{1,2}_a (r, out) - transposed -, hada_w{1,2}_b (r, in), hada_t{1,2} (r, r, k...)
"""
from __future__ import annotations

import math

import torch

from .common import alpha_scale, khatri_rao_pair, pair_shape_error, product_bound, tucker_down, tucker_flat_in

NAME = "loha"
REQUIRED = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
OPTIONAL = ("hada_t1", "hada_t2")
# (fewest, most) dimensions of each tensor in the community layouts (docs/formats.md section 2)
TENSOR_DIMS = {"hada_w1_a": (2, 2), "hada_w1_b": (2, 4), "hada_w2_a": (2, 2), "hada_w2_b": (2, 4),
               "hada_t1": (3, 5), "hada_t2": (3, 5)}
READS_WEIGHT = False


def detect(params) -> bool:
    return "hada_w1_a" in params


def scale(params, alpha) -> float:
    return alpha_scale(alpha, rank(params))


def rank(params) -> int:
    return params["hada_w1_b"].shape[0]


def is_tucker(params) -> bool:
    return "hada_t1" in params


def half_factors(params, index: int, legacy_tucker: bool = False):
    """One Hadamard factor as a low-rank pair (up (out, r), down (r, in*k*k))."""
    w_a = params[f"hada_w{index}_a"].float()
    w_b = params[f"hada_w{index}_b"].float()
    if not is_tucker(params):
        return w_a, w_b.flatten(1)
    # LyCORIS <= 1.9 trained Tucker files with t1 in both halves (docs/formats.md 5, item 11).
    core = params["hada_t1" if legacy_tucker else f"hada_t{index}"].float()
    return w_a.t(), tucker_down(core, w_b)


def check_shapes(params, weight_shape) -> str | None:
    """None if the tensors make a delta of ``weight_shape``, else why not."""
    for i in (1, 2):
        w_a, w_b = params[f"hada_w{i}_a"].shape, params[f"hada_w{i}_b"].shape
        if is_tucker(params):
            core = params[f"hada_t{i}"].shape
            rank_a, flat_in = tucker_flat_in(core, w_b)
            error = pair_shape_error(w_a[1], w_a[0], rank_a, flat_in, weight_shape) or (
                None if core[1] == w_b[0] else f"hada_t{i} {tuple(core)} does not fit hada_w{i}_b {tuple(w_b)}")
        else:
            error = pair_shape_error(w_a[0], w_a[1], w_b[0], math.prod(w_b[1:]), weight_shape)
        if error:
            return f"LoHa half {i}: {error}"
    return None


class HadamardOfProducts(torch.autograd.Function):
    """(u1 @ d1) * (u2 @ d2) that keeps only the four factors for backward.

    The two full-size products are recomputed in backward instead of being saved, so a layer
    holds O(r * (out + in)) activations for its adapter instead of two weight-sized tensors.
    """

    @staticmethod
    def forward(ctx, u1, d1, u2, d2):
        ctx.save_for_backward(u1, d1, u2, d2)
        return (u1 @ d1).mul_(u2 @ d2)

    @staticmethod
    def backward(ctx, grad):
        u1, d1, u2, d2 = ctx.saved_tensors
        g1 = grad * (u2 @ d2)
        g2 = grad * (u1 @ d1)
        return g1 @ d1.t(), u1.t() @ g1, g2 @ d2.t(), u2.t() @ g2


def delta_weight(params, weight, scale: float = 1.0, legacy_tucker: bool = False) -> torch.Tensor:
    """fp32 scale * dW shaped like the target ``weight`` (only its shape is used); the scale
    multiplies a small factor, not the weight-sized result."""
    u1, d1 = half_factors(params, 1, legacy_tucker)
    u1 = u1 * scale
    u2, d2 = half_factors(params, 2, legacy_tucker)
    return HadamardOfProducts.apply(u1, d1, u2, d2).reshape(weight.shape)


def low_rank_factors(params, legacy_tucker: bool = False):
    """Exact rank-r^2 pair (up (out, r^2), down (r^2, in*k*k)) whose product is dW."""
    return khatri_rao_pair(*half_factors(params, 1, legacy_tucker), *half_factors(params, 2, legacy_tucker))


def fused_factors(params, legacy_tucker: bool = False):
    """The layout ``fused`` ops take: ("hadamard", (u1, d1, u2, d2)) with dW = (u1 @ d1) * (u2 @ d2)."""
    return "hadamard", (*half_factors(params, 1, legacy_tucker), *half_factors(params, 2, legacy_tucker))


def delta_bound(params, legacy_tucker: bool = False) -> float:
    first, second = half_factors(params, 1, legacy_tucker), half_factors(params, 2, legacy_tucker)
    return product_bound(*first) * product_bound(*second)


def take_rows(params, rows):
    """dW's output rows ``rows``: both halves' up factors' rows ((A1 B1) * (A2 B2) is taken row
    by row); still rank r. Tucker files store the up factors transposed."""
    axis = 1 if is_tucker(params) else 0
    return {**params, **{name: params[name].index_select(axis, rows) for name in ("hada_w1_a", "hada_w2_a")}}


def thin_rank(params) -> int:
    return rank(params) ** 2


def build_cost(shape, params) -> int:
    """Multiply-adds to build dW once: two rank-r products (the Tucker fold is negligible)."""
    return 2 * math.prod(shape) * rank(params)


def init_params(shape, r: int, use_tucker: bool = False, scheme: str = "lycoris"):
    """Fresh tensors whose dW is exactly zero.

    ``scheme="lycoris"`` follows LyCORIS/kohya (w1_a ~ N(0, 0.1), w1_b, w2_b ~ N(0, 1),
    w2_a = 0) so that learning rates from those trainers carry over; ``"peft"`` follows PEFT
    (Kaiming-uniform, w2_b = 0); ``"random"`` makes every factor random (non-zero dW).
    """
    out_dim, in_dim, kernel = shape[0], shape[1], tuple(shape[2:])
    tucker = use_tucker and any(k != 1 for k in kernel)
    if tucker:
        shapes = {"hada_w1_a": (r, out_dim), "hada_w1_b": (r, in_dim), "hada_t1": (r, r, *kernel),
                  "hada_w2_a": (r, out_dim), "hada_w2_b": (r, in_dim), "hada_t2": (r, r, *kernel)}
    else:
        flat_in = in_dim * math.prod(kernel)
        shapes = {"hada_w1_a": (out_dim, r), "hada_w1_b": (r, flat_in),
                  "hada_w2_a": (out_dim, r), "hada_w2_b": (r, flat_in)}
    params = {name: torch.empty(size) for name, size in shapes.items()}
    if scheme == "lycoris":
        for name, p in params.items():
            std = 0.1 if name in ("hada_w1_a", "hada_t1", "hada_t2") else 1.0
            torch.nn.init.normal_(p, std=std)
        torch.nn.init.zeros_(params["hada_w2_a"])
    elif scheme in ("peft", "random"):
        for p in params.values():
            torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        if scheme == "peft":
            torch.nn.init.zeros_(params["hada_w2_b"])
    else:
        raise ValueError(f"unknown init scheme {scheme!r}: expected 'lycoris', 'peft' or 'random'")
    return params


# Capabilities this algorithm lacks (base.Algorithm documents each).
delta_bias = None
delta_rows = None  # its rows split into tensors of their own (take_rows), or it has none
