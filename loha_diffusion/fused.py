"""The base layer's op, and the frozen base op plus one adapter as a single autograd node.

A training step runs every adapted layer hundreds of times per second on small tensors, where
autograd bookkeeping and Python dispatch cost as much as the arithmetic. Here each layer is one
node whose backward computes exactly the gradients that are needed, from the factors:

* ``ThinAdapterOp``:   y = base(x) + up(down(x)), the adapter as an exact low-rank pair beside
  the base matmul (rank r for LoRA, the rank-r1*r2 Khatri-Rao pair for LoHa);
* ``MergedAdapterOp``: y = base(x; W + dW), one matmul with the merged weight; dW is rebuilt from
  the factors in backward instead of being saved, so a layer keeps no weight-sized activation.

Two factor layouts are handled (``kind``):
* ``"product"``  (up (out, R), down (R, in)):          dW = up @ down                (LoRA)
* ``"hadamard"`` (u1, d1, u2, d2), each pair rank r:   dW = (u1 @ d1) * (u2 @ d2)    (LoHa)
``row_scale`` (a float, or an (out,) tensor when rank dropout masks output rows) multiplies
the rows of dW; it is folded into the first up factor, never into a weight-sized tensor.

Mixed precision (a frozen fp16/bf16 model, fp32 adapters, ``torch.autocast``) runs the same
ops: the matmuls of the base layer and of the thin pair in the compute dtype (the autocast
dtype, else the base weight's), everything built from the factors in fp32 (``build``: the
factors' dtype promoted to at least fp32) and cast once, W + dW summed in fp32 and rounded
once, and the factor gradients delivered in the factors' own dtype.

The layer (``layers.AdapterLayer``) uses these ops only where they apply exactly: one adapter
and a layer ``supports_fused_ops`` accepts. Everything else takes the general autograd path,
which computes the same numbers with the same ``run_base``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .algorithms.common import khatri_rao_pair


def run_base(base: nn.Module, x, weight, bias=None):
    """The base layer's own op on ``x`` with ``weight`` and ``bias`` in place of its parameters.

    It lives here, below the layer package, because the fused ops need it too.
    """
    if isinstance(base, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        return base._conv_forward(x, weight, bias)
    if isinstance(base, nn.LayerNorm):
        return F.layer_norm(x, base.normalized_shape, weight, bias, base.eps)
    if isinstance(base, nn.GroupNorm):
        return F.group_norm(x, base.num_groups, weight, bias, base.eps)
    return F.embedding(x, weight, base.padding_idx, base.max_norm, base.norm_type,
                       base.scale_grad_by_freq, base.sparse)


def supports_fused_ops(base: nn.Module) -> bool:
    """nn.Linear, or an ungrouped nn.Conv1d/nn.Conv2d with explicit zero padding: the layers
    whose backward ``_run_base_backward`` computes."""
    if isinstance(base, nn.Linear):
        return True
    return (isinstance(base, (nn.Conv1d, nn.Conv2d)) and base.groups == 1 and base.padding_mode == "zeros"
            and not isinstance(base.padding, str))


def _run_base_backward(base: nn.Module, grad, x, weight, mask):
    """(grad x, grad weight, grad bias) of ``run_base``, each None unless asked for in ``mask``."""
    need_x, need_w, need_b = mask
    if isinstance(base, nn.Linear):
        grad2 = grad.reshape(-1, grad.shape[-1])
        gx = (grad @ weight) if need_x else None
        gw = (grad2.t() @ x.reshape(-1, x.shape[-1])) if need_w else None
        gb = grad2.sum(0) if need_b else None
        return gx, gw, gb
    if not (need_x or need_w or need_b):
        return None, None, None
    return torch.ops.aten.convolution_backward(
        grad, x, weight, [weight.shape[0]] if need_b else None, list(base.stride), list(base.padding),
        list(base.dilation), False, [0] * (weight.dim() - 2), 1, [need_x, need_w, need_b])


def _scale_rows(t: torch.Tensor, row_scale) -> torch.Tensor:
    if isinstance(row_scale, torch.Tensor):
        return t * row_scale.unsqueeze(1)
    return t if row_scale == 1.0 else t * row_scale  # alpha == rank at strength 1 is common


# -- factor layouts ------------------------------------------------------------------------
def thin_pair(kind: str, factors, row_scale):
    """(up (out, R), down (R, in)) with up @ down == row_scale * dW."""
    if kind == "product":
        up, down = factors
        return _scale_rows(up, row_scale), down
    u1, d1, u2, d2 = factors
    return khatri_rao_pair(_scale_rows(u1, row_scale), d1, u2, d2)


def thin_pair_grads(kind: str, g_up, g_down, factors, row_scale):
    """Gradients of the factors from those of the pair built by ``thin_pair``."""
    if kind == "product":
        return _scale_rows(g_up, row_scale), g_down
    u1, d1, u2, d2 = factors
    r1, r2 = u1.shape[1], u2.shape[1]
    g_up3 = g_up.view(-1, r1, r2)
    g_down3 = g_down.view(r1, r2, -1)
    g_u1 = _scale_rows(torch.bmm(g_up3, u2.unsqueeze(2)).squeeze(2), row_scale)
    g_u2 = torch.bmm(g_up3.transpose(1, 2), _scale_rows(u1, row_scale).unsqueeze(2)).squeeze(2)
    g_d1 = (g_down3 * d2.unsqueeze(0)).sum(1)
    g_d2 = (g_down3 * d1.unsqueeze(1)).sum(0)
    return g_u1, g_d1, g_u2, g_d2


def merged_weight(kind: str, weight, factors, row_scale):
    """(W + row_scale * dW in the factors' dtype, the products ``merged_weight_grads`` needs);
    W keeps its shape and may be of a lower precision (it is then summed in the factors' dtype)."""
    flat = weight.view(weight.shape[0], -1)
    if kind == "product":
        up, down = factors
        scaled_up = _scale_rows(up, row_scale)
        if flat.dtype != up.dtype:  # addmm does not promote: sum into the fp32 product instead
            return (scaled_up @ down).add_(flat).view(weight.shape), (scaled_up,)
        return torch.addmm(flat, scaled_up, down).view(weight.shape), (scaled_up,)
    u1, d1, u2, d2 = factors
    first, second = u1 @ d1, u2 @ d2
    if isinstance(row_scale, torch.Tensor):
        merged = torch.addcmul(flat, _scale_rows(first, row_scale), second)
    else:  # addcmul applies the scalar scale in the same pass
        merged = torch.addcmul(flat, first, second, value=row_scale)
    return merged.view(weight.shape), (first, second)


def merged_weight_grads(kind: str, g_delta, factors, row_scale, saved):
    """Factor gradients from the gradient of the merged weight (flattened); may overwrite ``g_delta``."""
    if kind == "product":
        up, down = factors
        (scaled_up,) = saved
        return _scale_rows(g_delta @ down.t(), row_scale), scaled_up.t() @ g_delta
    u1, d1, u2, d2 = factors
    first, second = saved
    g_delta = _scale_rows(g_delta, row_scale)
    g_first = g_delta * second
    g_second = g_delta.mul_(first)
    return g_first @ d1.t(), u1.t() @ g_first, g_second @ d2.t(), u2.t() @ g_second


# -- dtypes ------------------------------------------------------------------------------------
def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the base layer's op runs in: autocast's where it is on, else the weight's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _build_dtype(factors) -> torch.dtype:
    """What dW and the thin pair are built in: the factors' dtype, at least fp32."""
    return torch.promote_types(factors[0].dtype, torch.float32)


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _remember_dtypes(ctx, x, weight, bias, factors) -> None:
    """The inputs' dtypes, which their gradients must have whatever the compute dtype was."""
    ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.factor_dtypes = [f.dtype for f in factors]


def _input_grads(ctx, gx, gw, gb, factor_grads):
    x_dtype, w_dtype, b_dtype = ctx.dtypes
    return (None, None, None, _cast(gx, x_dtype), _cast(gw, w_dtype), _cast(gb, b_dtype),
            *(_cast(g, dtype) for g, dtype in zip(factor_grads, ctx.factor_dtypes)))


# -- the two ops -----------------------------------------------------------------------------
class ThinAdapterOp(torch.autograd.Function):
    """base(x) + row_scale * x -> down -> up, as one node."""

    @staticmethod
    def forward(ctx, base: nn.Module, kind: str, row_scale, x, weight, bias, *factors):
        _remember_dtypes(ctx, x, weight, bias, factors)
        dtype = compute_dtype(x, weight)
        build = [f.to(_build_dtype(factors)) for f in factors]
        with torch.autocast(x.device.type, enabled=False):  # the casts are explicit below
            return ThinAdapterOp._forward(ctx, base, kind, row_scale, x.to(dtype), weight.to(dtype),
                                          _cast(bias, dtype), build)

    @staticmethod
    def _forward(ctx, base, kind, row_scale, x, weight, bias, factors):
        up, down = thin_pair(kind, factors, row_scale)
        up, down = up.to(x.dtype), down.to(x.dtype)
        y = run_base(base, x, weight, bias)
        if isinstance(base, nn.Linear):
            hidden = x.reshape(-1, x.shape[-1]) @ down.t()
            y.view(-1, y.shape[-1]).addmm_(hidden, up.t())
        else:
            hidden = run_base(base, x, down.view(down.shape[0], *weight.shape[1:]))
            n = y.shape[0]
            y.view(n, y.shape[1], -1).baddbmm_(up.expand(n, -1, -1), hidden.view(n, hidden.shape[1], -1))
        ctx.base, ctx.kind = base, kind
        ctx.row_scale = row_scale  # a float or a mask tensor that takes no gradient
        ctx.save_for_backward(x, weight, hidden, up, down, *factors)
        return y

    @staticmethod
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):
            return ThinAdapterOp._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        base = ctx.base
        x, weight, hidden, up, down, *factors = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[3:6]
        need_factors = any(ctx.needs_input_grad[6:])
        grad = grad.to(x.dtype).contiguous()
        gx, gw, gb = _run_base_backward(base, grad, x, weight, (need_x, need_w, need_b))
        factor_grads = [None] * len(factors)
        if isinstance(base, nn.Linear):
            grad2 = grad.view(-1, grad.shape[-1])
            g_hidden = grad2 @ up
            if need_x:
                gx.view(-1, gx.shape[-1]).addmm_(g_hidden, down)
            if need_factors:
                g_up = grad2.t() @ hidden
                g_down = g_hidden.t() @ x.reshape(-1, x.shape[-1])
        else:
            n = grad.shape[0]
            grad3 = grad.view(n, grad.shape[1], -1)
            hidden3 = hidden.view(n, hidden.shape[1], -1)
            g_hidden = torch.matmul(up.t(), grad3).view(hidden.shape)
            if need_x or need_factors:
                down_kernel = down.view(down.shape[0], *weight.shape[1:])
                gx_down, g_down_kernel, _ = _run_base_backward(base, g_hidden, x, down_kernel,
                                                               (need_x, need_factors, False))
                if need_x:
                    gx.add_(gx_down)
            if need_factors:
                g_up = torch.matmul(grad3, hidden3.transpose(1, 2)).sum(0)
                g_down = g_down_kernel.view(down.shape)
        if need_factors:
            build = factors[0].dtype
            factor_grads = thin_pair_grads(ctx.kind, g_up.to(build), g_down.to(build), factors, ctx.row_scale)
        return _input_grads(ctx, gx, gw, gb, factor_grads)


class MergedAdapterOp(torch.autograd.Function):
    """base(x; W + row_scale * dW) as one node; dW is rebuilt in backward, not saved."""

    @staticmethod
    def forward(ctx, base: nn.Module, kind: str, row_scale, x, weight, bias, *factors):
        _remember_dtypes(ctx, x, weight, bias, factors)
        dtype = compute_dtype(x, weight)
        build = [f.to(_build_dtype(factors)) for f in factors]
        with torch.autocast(x.device.type, enabled=False):  # the casts are explicit here
            merged, _ = merged_weight(kind, weight, build, row_scale)
            x = x.to(dtype)
            ctx.base, ctx.kind, ctx.row_scale = base, kind, row_scale
            ctx.save_for_backward(x, weight, *build)
            return run_base(base, x, merged.to(dtype), _cast(bias, dtype))

    @staticmethod
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):
            return MergedAdapterOp._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        x, weight, *factors = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[3:6]
        need_factors = any(ctx.needs_input_grad[6:])
        merged, saved = merged_weight(ctx.kind, weight, factors, ctx.row_scale)
        gx, g_merged, gb = _run_base_backward(ctx.base, grad.to(x.dtype).contiguous(), x, merged.to(x.dtype),
                                              (need_x, need_w or need_factors, need_b))
        factor_grads = [None] * len(factors)
        if need_factors:
            g_delta = g_merged.reshape(weight.shape[0], -1)
            if g_delta.dtype != factors[0].dtype:
                g_delta = g_delta.to(factors[0].dtype)  # a new tensor
            elif need_w:
                g_delta = g_delta.clone()  # merged_weight_grads may overwrite it
            factor_grads = merged_weight_grads(ctx.kind, g_delta, factors, ctx.row_scale, saved)
        return _input_grads(ctx, gx, g_merged if need_w else None, gb, factor_grads)


# -- fusing into the weights (no autograd) -------------------------------------------------------
# Rows per block: about 1M elements (4 MB per fp32 product buffer), so that a block's rank-r
# products are still in cache when they are added to W; smaller blocks make the thin rank-r
# matmuls inefficient.
_BLOCK_ELEMENTS = 1 << 20


@torch.no_grad()
def fused_weight(kind: str, weight: torch.Tensor, factors, scale: float,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """W + scale * dW like ``weight`` (dtype, device, shape), summed in fp32: a new tensor, or
    written into ``out``, which may be ``weight`` itself (fusing in place).

    Built in blocks of rows: the rank-r products of a block are formed in reused buffers,
    still in cache when ``addcmul``/``addmm`` adds them to W, so memory traffic is one read of
    W and one write of the result instead of several weight-sized temporaries. A
    block is read before it is written, so ``out`` may alias ``weight``.
    """
    if out is not None and not out.is_contiguous():  # e.g. a channels_last conv weight
        return out.copy_(fused_weight(kind, weight, factors, scale))
    n_out = weight.shape[0]
    flat_in = weight[0].numel()
    source = weight.reshape(n_out, flat_in)
    result = torch.empty_like(weight, memory_format=torch.contiguous_format) if out is None else out
    target = result.view(n_out, flat_in)
    rows = max(1, min(n_out, _BLOCK_ELEMENTS // max(flat_in, 1)))
    as_fp32 = weight.dtype != torch.float32
    first = torch.empty(rows, flat_in, device=weight.device, dtype=torch.float32)
    second = torch.empty(rows, flat_in, device=weight.device, dtype=torch.float32) if kind == "hadamard" else None
    staging = torch.empty(rows, flat_in, device=weight.device, dtype=torch.float32) if as_fp32 else None
    for start in range(0, n_out, rows):
        stop = min(start + rows, n_out)
        n = stop - start
        out = staging[:n] if as_fp32 else target[start:stop]
        base = source[start:stop].float() if as_fp32 else source[start:stop]
        if kind == "hadamard":
            u1, d1, u2, d2 = factors
            torch.mm(u1[start:stop], d1, out=first[:n])
            torch.mm(u2[start:stop], d2, out=second[:n])
            torch.addcmul(base, first[:n], second[:n], value=scale, out=out)
        else:
            up, down = factors
            torch.addmm(base, up[start:stop], down, alpha=scale, out=out)
        if as_fp32:
            target[start:stop].copy_(out)  # one rounding to the weight's dtype
    return result

