"""The two exact ways a layer applies its adapters, and the cost model that picks one.

* merged weight: ``base(x, W + sum_a s_a * dW_a)`` - one dense matmul; dW comes from a custom
  autograd function that keeps only the low-rank factors;
* thin path: ``base(x) + sum_a s_a * up_a(down_a(x))`` with the exact (up, down) pair of each
  adapter (rank r for LoRA, the rank-r^2 Khatri-Rao pair for LoHa).
One adapter runs either path as a single autograd node of ``loha_diffusion.fused``
(``fused_route_applies``, ``fused_forward``), in fp32 or in mixed precision.

The functions take the base layer and ``terms``, the adapters to apply as ``weights.Term``
(name, tensors, strength); ``strength_scale`` multiplies every strength for one fuse.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..fused import MergedAdapterOp, ThinAdapterOp, supports_fused_ops
from .weights import AdapterWeights, Term

# Layers an adapter can be trained on: the thin path and the fused ops run these.
SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


# -- the merged weight -------------------------------------------------------------------------
def add_rounded_once(base: torch.Tensor | None, delta: torch.Tensor | None) -> torch.Tensor | None:
    if delta is None:
        return base
    if base is None:
        return delta
    if base.dtype == torch.float32:
        return base + delta
    # Sum in fp32 and round once, so a half-precision layer sees one rounding, not two.
    return (base.float() + delta).to(base.dtype)


def merged_delta(weight: torch.Tensor, terms, training: bool = False,
                 strength_scale: float = 1.0) -> torch.Tensor | None:
    """fp32 sum of the weight changes of ``terms`` to ``weight`` (strengths and scales applied)."""
    total = None
    for term in terms:
        delta = term.adapter.scaled_delta(weight, term.strength * strength_scale, training)
        if total is None:
            total = delta
        elif torch.is_grad_enabled():
            total = total + delta
        else:
            total.add_(delta)  # no graph to keep: accumulate without another weight-sized tensor
    return total


def merged_bias_delta(bias: torch.Tensor | None, terms, strength_scale: float = 1.0) -> torch.Tensor | None:
    total = None
    for term in terms:
        delta = term.adapter.delta_bias(bias)
        if delta is not None:
            delta = delta.float() * (term.strength * strength_scale)
            total = delta if total is None else total + delta
    return total


def effective_bias(base: nn.Module, terms, strength_scale: float = 1.0) -> torch.Tensor | None:
    bias = base.bias
    bias_delta = merged_bias_delta(bias, terms, strength_scale)
    if bias_delta is not None:
        bias = add_rounded_once(bias, bias_delta.to(base.weight.dtype) if bias is None else bias_delta)
    return bias


def effective_params(base: nn.Module, terms, training: bool):
    """(weight, bias) with ``terms`` applied, differentiable."""
    weight = add_rounded_once(base.weight, merged_delta(base.weight, terms, training))
    return weight, effective_bias(base, terms)


# -- the thin path -----------------------------------------------------------------------------
def thin_output(base: nn.Module, x: torch.Tensor, terms, training: bool) -> torch.Tensor:
    """sum_a s_a * up_a(down_a(x)), what the adapters add to ``base(x)``."""
    total = None
    for term in terms:
        adapter = term.adapter
        up, down = adapter.low_rank_factors()
        if training and adapter.rank_dropout > 0:
            up = up * adapter.rank_dropout_mask(up).unsqueeze(1)
        up = up * (adapter.scale * term.strength)
        xin = x.to(down.dtype)
        if isinstance(base, nn.Linear):
            out = F.linear(F.linear(xin, down), up)
        else:
            kernel = tuple(base.weight.shape[2:])
            down_kernel = down.reshape(down.shape[0], base.in_channels, *kernel)
            hidden = base._conv_forward(xin, down_kernel, None)
            pointwise = F.conv2d if isinstance(base, nn.Conv2d) else F.conv1d
            out = pointwise(hidden, up.reshape(*up.shape, *(1,) * len(kernel)))
        total = out if total is None else total + out
    return total


# -- the cost model ----------------------------------------------------------------------------
def prefers_thin_path(base: nn.Module, x: torch.Tensor, adapters: list[AdapterWeights], needs_grad: bool) -> bool:
    """Compare multiply-adds of the two exact ways to apply ``adapters`` to ``x``."""
    if not isinstance(base, SUPPORTED_LAYERS) or (not isinstance(base, nn.Linear) and base.groups != 1):
        return False
    if not all(a.supports_thin_path and a.delta_bias(base.bias) is None for a in adapters):
        return False
    weight = base.weight
    n_out = weight.shape[0]
    n_in = math.prod(weight.shape[1:])
    if isinstance(base, nn.Linear):
        tokens = x.numel() // max(x.shape[-1], 1)
    else:
        tokens = x.shape[0] * math.prod(conv_output_size(base, x.shape[2:]))
    thin_rank = 0
    build = 0
    for adapter in adapters:
        params = adapter.params
        thin_rank += adapter.algorithm.thin_rank(params)
        build += adapter.algorithm.build_cost(weight.shape, params)
    if needs_grad:
        # merged: grad of the merged weight (one dense matmul) + build, recompute, factor grads
        merged = tokens * n_out * n_in + 4 * build
        thin = 3 * tokens * thin_rank * (n_in + n_out)
    else:
        merged = build
        thin = tokens * thin_rank * (n_in + n_out)
    return thin < merged


def conv_output_size(base: nn.Module, spatial) -> list[int]:
    sizes = []
    for i, size in enumerate(spatial):
        pad = base.padding[i] if isinstance(base.padding, tuple) else 0
        if base.padding == "same":
            sizes.append(size)
            continue
        k, s, d = base.kernel_size[i], base.stride[i], base.dilation[i]
        sizes.append((size + 2 * pad - d * (k - 1) - 1) // s + 1)
    return sizes


class PathChoice:
    """The cost model's answer per call signature (input shape and dtype, adapters, gradients),
    remembered until the layer's adapters change: training asks on every forward."""

    def __init__(self):
        self._answers: dict[tuple, bool] = {}

    def thin(self, base: nn.Module, x: torch.Tensor, terms, needs_grad: bool) -> bool:
        key = (tuple(x.shape), x.dtype, tuple(t.name for t in terms), needs_grad)
        answer = self._answers.get(key)
        if answer is None:
            answer = self._answers[key] = prefers_thin_path(base, x, [t.adapter for t in terms], needs_grad)
        return answer

    def forget(self) -> None:
        self._answers = {}


# -- one adapter as a single autograd node -------------------------------------------------------
# autocast casts only these; other dtypes (fp64) run as they are, which the fused ops leave to autograd
_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fused_route_applies(base: nn.Module, x: torch.Tensor, adapters: list[AdapterWeights]) -> bool:
    """Whether this call can run as one node of ``loha_diffusion.fused``: one adapter with fused
    factors on a layer the ops run, in one dtype or under autocast (``fused.compute_dtype``)."""
    if len(adapters) != 1 or not supports_fused_ops(base) or not adapters[0].supports_fused:
        return False
    if torch.is_autocast_enabled(x.device.type):
        if x.dtype not in _AUTOCAST_DTYPES or base.weight.dtype not in _AUTOCAST_DTYPES:
            return False
    elif x.dtype != base.weight.dtype:
        return False  # the base layer itself would refuse this call
    return isinstance(base, nn.Linear) or x.dim() == base.weight.dim()  # not an unbatched conv input


def fused_forward(base: nn.Module, x: torch.Tensor, term: Term, thin: bool, training: bool) -> torch.Tensor:
    adapter = term.adapter
    kind, factors = adapter.fused_factors()
    row_scale = adapter.scale * term.strength
    if training and adapter.rank_dropout > 0:
        row_scale = adapter.rank_dropout_mask(base.weight) * row_scale
    op = ThinAdapterOp if thin else MergedAdapterOp
    return op.apply(base, kind, row_scale, x, base.weight, base.bias, *factors)
