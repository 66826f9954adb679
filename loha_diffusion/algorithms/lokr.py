"""LoKr (LyCORIS ``lokr``/``kron``): dW = kron(w1, w2), docs/formats.md section 2.3.

Tensors (community names and layouts), with out = a*b and in = c*d:
  w1       lokr_w1 (a, c)  or  lokr_w1_a (a, r), lokr_w1_b (r, c)       (``decompose_both``)
  w2       lokr_w2 (b, d[, k...])  or  lokr_w2_a (b, r), lokr_w2_b (r, d*k*k) - also 4-D
           (r, d, k, k) from LyCORIS' functional API -  or, Tucker, lokr_t2 (r, r, k...),
           lokr_w2_a (r, b) - transposed -, lokr_w2_b (r, d)
For a conv target the kernel lives in w2 only: dW[i*b+p, j*d+q, k...] = w1[i, j] * w2[p, q, k...].

There is no single required tensor (each factor has a full and a factorised form), so
``REQUIRED`` is empty and ``check_shapes`` names whatever is missing. A Kronecker product is
not low rank, so LoKr offers no ``low_rank_factors``: layers run it as a merged weight.
"""
from __future__ import annotations

import math

import torch

from .common import alpha_scale, product_bound, tucker_down

NAME = "lokr"
REQUIRED = ()
OPTIONAL = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
# (fewest, most) dimensions of each tensor in the community layouts (docs/formats.md section 2)
TENSOR_DIMS = {"lokr_w1": (2, 4), "lokr_w1_a": (2, 2), "lokr_w1_b": (2, 2), "lokr_w2": (2, 5), "lokr_w2_a": (2, 2),
               "lokr_w2_b": (2, 5), "lokr_t2": (3, 5)}
READS_WEIGHT = False


def detect(params) -> bool:
    return any(name in params for name in OPTIONAL)


def rank(params) -> int | None:
    """r of the factorised half, w2 first (CUI, A11, diffusers); None when both halves are full."""
    if "lokr_w2_b" in params:
        return params["lokr_w2_b"].shape[0]
    if "lokr_w1_b" in params:
        return params["lokr_w1_b"].shape[0]
    return None


def scale(params, alpha) -> float:
    """alpha/r; 1 when nothing is factorised, whatever alpha says (LyCORIS stores alpha = dim then)."""
    r = rank(params)
    return 1.0 if r is None else alpha_scale(alpha, r)


def is_tucker(params) -> bool:
    return "lokr_t2" in params


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dim and m <= n, the split LyCORIS uses for out and in dims.

    ``factor`` > 0 dividing ``dim``: (factor, dim / factor), sorted. Otherwise m is the largest
    divisor of ``dim`` not above sqrt(dim) nor above ``factor`` (no bound when ``factor`` < 0),
    so -1 gives the most square split and 0 gives (1, dim), as in LyCORIS.
    """
    if factor > 0 and dim % factor == 0:
        return min(factor, dim // factor), max(factor, dim // factor)
    bound = math.isqrt(dim) if factor < 0 else min(factor, math.isqrt(dim))
    m = max((d for d in range(1, bound + 1) if dim % d == 0), default=1)
    return m, dim // m


def first_factor(params) -> torch.Tensor:
    """w1 as an (a, c) fp32 matrix, multiplied out if factorised."""
    if "lokr_w1" in params:
        return params["lokr_w1"].float().flatten(1)
    return params["lokr_w1_a"].float() @ params["lokr_w1_b"].float()


def second_factor_pair(params):
    """w2 as a low-rank pair (up (b, r), down (r, d*k...)), the Tucker core folded into the
    down factor; None when w2 is stored full."""
    if "lokr_w2" in params:
        return None
    w2_a, w2_b = params["lokr_w2_a"].float(), params["lokr_w2_b"].float()
    if is_tucker(params):
        return w2_a.t(), tucker_down(params["lokr_t2"].float(), w2_b)
    return w2_a, w2_b.flatten(1)


def second_factor(params) -> torch.Tensor:
    """w2 flattened to (b, d*k...) whatever its stored form."""
    pair = second_factor_pair(params)
    return params["lokr_w2"].float().flatten(1) if pair is None else pair[0] @ pair[1]


def delta_weight(params, weight, scale: float = 1.0, **_) -> torch.Tensor:
    """fp32 scale * kron(w1, w2) shaped like the target ``weight`` (only its shape is used);
    the scale multiplies the small w1, not the result."""
    shape = tuple(weight.shape)
    w1 = first_factor(params) * scale
    a, c = w1.shape
    b, d = shape[0] // a, shape[1] // c
    w2 = second_factor(params).reshape(b, d, *shape[2:])
    return torch.einsum("ij,pq...->ipjq...", w1, w2).reshape(shape)


def delta_rows(params, weight_shape, rows, scale: float = 1.0) -> torch.Tensor:
    """fp32 ``scale`` * kron(w1, w2)[rows] for a weight of ``weight_shape``, built from the rows'
    own factor rows (row i*b + p is w1[i] (x) w2[p]) at the cost of those rows only."""
    w1 = first_factor(params) * scale
    a, c = w1.shape
    b, d = weight_shape[0] // a, weight_shape[1] // c
    w2 = second_factor(params).reshape(b, d, *weight_shape[2:])
    rows = rows.to(w1.device)
    delta = torch.einsum("rj,rq...->rjq...", w1.index_select(0, rows // b), w2.index_select(0, rows % b))
    return delta.reshape(len(rows), *weight_shape[1:])


def delta_bound(params, **_) -> float:
    """Every entry of kron(w1, w2) is a product of one entry of each."""
    pair = second_factor_pair(params)
    second = float(params["lokr_w2"].float().abs().max()) if pair is None else product_bound(*pair)
    return float(first_factor(params).abs().max()) * second


def take_rows(params, rows):
    """dW's output rows ``rows`` as a LoKr when they are whole row blocks of kron(w1, w2) (runs of
    w2's row count, each starting on a multiple of it, in any order): those rows of w1. None
    otherwise: the rows cut through w2's blocks and are no Kronecker product."""
    pair = second_factor_pair(params)
    block = params["lokr_w2"].shape[0] if pair is None else pair[0].shape[0]
    if len(rows) % block:
        return None
    runs = rows.reshape(-1, block)
    starts = runs[:, 0]
    if bool((starts % block).any()) or not torch.equal(runs, starts[:, None] + torch.arange(block, device=rows.device)):
        return None
    name = "lokr_w1" if "lokr_w1" in params else "lokr_w1_a"
    return {**params, name: params[name].index_select(0, starts // block)}


def check_shapes(params, weight_shape) -> str | None:
    """None if the tensors make a delta of ``weight_shape``, else why not."""
    weight_shape = tuple(weight_shape)
    found = sorted(n for n in params if n in OPTIONAL)
    if "lokr_w1" not in params and not ("lokr_w1_a" in params and "lokr_w1_b" in params):
        return f"LoKr needs lokr_w1 or lokr_w1_a + lokr_w1_b, found {found}"
    if "lokr_w2" not in params and not ("lokr_w2_a" in params and "lokr_w2_b" in params):
        return f"LoKr needs lokr_w2 or lokr_w2_a + lokr_w2_b, found {found}"
    if len(weight_shape) < 2:
        return f"LoKr patches 2-D or conv weights, not a weight of shape {tuple(weight_shape)}"
    kernel = math.prod(weight_shape[2:])

    if "lokr_w1" in params:
        w1 = params["lokr_w1"].shape
        if len(w1) < 2 or math.prod(w1[2:]) != 1:
            return f"lokr_w1 {tuple(w1)} should be 2-D (a, c)"
        a, c = w1[0], w1[1]
    else:
        w1_a, w1_b = params["lokr_w1_a"].shape, params["lokr_w1_b"].shape
        if len(w1_a) != 2 or len(w1_b) != 2 or w1_a[1] != w1_b[0]:
            return f"lokr_w1_a {tuple(w1_a)} and lokr_w1_b {tuple(w1_b)} should be (a, r) and (r, c)"
        a, c = w1_a[0], w1_b[1]

    if "lokr_w2" in params:
        w2 = params["lokr_w2"].shape
        if len(w2) < 2:
            return f"lokr_w2 {tuple(w2)} should be (b, d[, k...])"
        b, d_flat = w2[0], math.prod(w2[1:])
    elif is_tucker(params):
        core, w2_a, w2_b = params["lokr_t2"].shape, params["lokr_w2_a"].shape, params["lokr_w2_b"].shape
        if len(core) < 2 or len(w2_a) != 2 or core[0] != w2_a[0] or core[1] != w2_b[0]:
            return (f"Tucker LoKr tensors lokr_t2 {tuple(core)}, lokr_w2_a {tuple(w2_a)}, lokr_w2_b {tuple(w2_b)} "
                    "should be (r, r, k...), (r, b), (r, d)")
        b, d_flat = w2_a[1], math.prod(w2_b[1:]) * math.prod(core[2:])
    else:
        w2_a, w2_b = params["lokr_w2_a"].shape, params["lokr_w2_b"].shape
        if len(w2_a) != 2 or w2_a[1] != w2_b[0]:
            return f"lokr_w2_a {tuple(w2_a)} and lokr_w2_b {tuple(w2_b)} should be (b, r) and (r, d*k*k)"
        b, d_flat = w2_a[0], math.prod(w2_b[1:])

    if a * b != weight_shape[0] or c * d_flat != weight_shape[1] * kernel or weight_shape[1] % c:
        return (f"LoKr factors w1 ({a}, {c}) and w2 ({b}, {d_flat}) make a ({a * b}, {c * d_flat}) delta "
                f"but the layer weight {tuple(weight_shape)} needs ({weight_shape[0]}, {weight_shape[1] * kernel})")
    return None


def init_params(shape, r: int, use_tucker: bool = False, scheme: str = "lycoris", factor: int = -1,
                decompose_both: bool = False):
    """Fresh tensors in LyCORIS' layout and with LyCORIS' choices of full vs factorised halves.

    out and in are split by ``factorization(dim, factor)``; w1 is factorised only with
    ``decompose_both`` and r < max(a, c)/2, w2 only when r < max(b, d)/2 (else it is full and
    alpha is ignored). ``scheme="lycoris"`` zeroes w2 (or w2_b) and draws the rest
    Kaiming-uniform, as LyCORIS does; ``"peft"`` zeroes w1 (or w1_a) as PEFT's LoKr does;
    ``"random"`` draws every tensor (non-zero dW).
    """
    out_dim, in_dim, kernel = shape[0], shape[1], tuple(shape[2:])
    a, b = factorization(out_dim, factor)
    c, d = factorization(in_dim, factor)
    if decompose_both and r < max(a, c) / 2:
        shapes = {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
    else:
        shapes = {"lokr_w1": (a, c)}
    if r >= max(b, d) / 2:
        shapes["lokr_w2"] = (b, d, *kernel)
    elif use_tucker and any(k != 1 for k in kernel):
        shapes.update({"lokr_w2_a": (r, b), "lokr_w2_b": (r, d), "lokr_t2": (r, r, *kernel)})
    else:
        shapes.update({"lokr_w2_a": (b, r), "lokr_w2_b": (r, d * math.prod(kernel))})
    if scheme == "lycoris":
        zero = {"lokr_w2", "lokr_w2_b"}
    elif scheme == "peft":
        zero = {"lokr_w1", "lokr_w1_a"}
    elif scheme == "random":
        zero = set()
    else:
        raise ValueError(f"unknown init scheme {scheme!r}: expected 'lycoris', 'peft' or 'random'")
    params = {name: torch.empty(size) for name, size in shapes.items()}
    for name, p in params.items():
        if name in zero:
            torch.nn.init.zeros_(p)
        else:
            torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5))
    return params


# Capabilities this algorithm lacks (base.Algorithm documents each).
delta_bias = None
low_rank_factors = None
fused_factors = None
thin_rank = None
build_cost = None
