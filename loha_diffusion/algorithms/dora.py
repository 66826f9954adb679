"""DoRA / weight decomposition (``dora_scale``; LoRA, LoHa, LoKr), docs/formats.md section 2.6.

Not an algorithm of its own: a magnitude applied on top of any delta. With V = W + scale*dW
(alpha/r already applied, the strength m not yet), N = ||V|| along one axis and
s = dora_scale / N, two communities disagree on what the strength does:

  "lycoris"            W' = V * (m*(s - 1) + 1)   (the low-rank delta is always applied in full;
                        m only interpolates the magnitude) - LyCORIS' own forward and merge
  "comfyui" / "a1111"  W' = W + m*(V*s - W)        - ComfyUI and AUTOMATIC1111

Both agree at m = 1. The axis is only recoverable from the shape of ``dora_scale``:
(out, 1[, 1, 1]) or 1-D (out,) is per output row (LyCORIS >= 3.2, the DoRA paper, PEFT
magnitudes); (1, in[, 1, 1]) is per input column (LyCORIS <= 3.1).

N gets ``torch.finfo(float32).eps`` added, as LyCORIS does (``functional/general.py``
``_weight_decompose`` adds the eps of the dtype it computes in, which is the fp32 of its
``dora_scale`` parameter): a zero row of V then gives a zero row instead of NaN. The norm is
not detached, as in LyCORIS, so gradients flow through it when training.
"""
from __future__ import annotations

import math

import torch

SEMANTICS = ("lycoris", "comfyui", "a1111")
EPS = torch.finfo(torch.float32).eps


def dora_axis(dora_scale, weight_shape) -> str:
    """"output" or "input": which axis of a weight of ``weight_shape`` the magnitude runs along.

    ``dora_scale`` may be the tensor or its shape. Raises ValueError when it fits neither.
    """
    shape = tuple(getattr(dora_scale, "shape", dora_scale))
    weight_shape = tuple(weight_shape)
    out_dim, in_dim = weight_shape[0], (weight_shape[1] if len(weight_shape) > 1 else None)
    numel = math.prod(shape)
    if shape and shape[0] == out_dim and numel == out_dim:
        return "output"
    if len(shape) >= 2 and shape[0] == 1 and shape[1] == in_dim and numel == in_dim:
        return "input"
    raise ValueError(
        f"dora_scale of shape {shape} fits neither axis of the layer weight {weight_shape}: expected "
        f"({out_dim}, 1, ...) or ({out_dim},) for a per-output magnitude, or (1, {in_dim}, ...) for a "
        "per-input magnitude")


def _norm(weight: torch.Tensor, axis: str) -> torch.Tensor:
    """||weight|| per output row or per input column, shaped to broadcast against ``weight``."""
    if axis == "output":
        return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *(1,) * (weight.dim() - 1))
    columns = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return columns.reshape(1, weight.shape[1], *(1,) * (weight.dim() - 2))


def apply_dora(weight, scaled_delta, dora_scale, strength: float, semantics: str = "lycoris") -> torch.Tensor:
    """The final additive change W' - W in fp32 (the strength is already inside: do not apply it again).

    ``weight`` is the base weight (its values are needed), ``scaled_delta`` the algorithm's
    delta times alpha/r, without the strength.
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"unknown DoRA semantics {semantics!r}: expected one of {', '.join(SEMANTICS)}")
    base = weight.float()
    delta = scaled_delta.float().reshape(base.shape)
    merged = base + delta
    norm = _norm(merged, dora_axis(dora_scale, base.shape)) + EPS
    ratio = dora_scale.float().reshape(norm.shape) / norm
    if semantics == "lycoris":
        # V * (m(s-1) + 1) - W, written so that the small change is not the difference of two big weights
        return delta + strength * merged * (ratio - 1)
    return strength * (merged * ratio - base)
