"""The interface every algorithm module implements (loha, lora, lokr, full, norm, ia3).

An algorithm is a module, not a class: its functions are pure fp32 math on ``params``, a dict
{community tensor name: tensor} of one adapter on one layer, without ``alpha`` and
``dora_scale`` (a DoRA magnitude is applied on top of any delta by ``dora.py``).

Every module defines every member of ``Algorithm``. A capability an algorithm lacks is set to
None explicitly (``low_rank_factors = None`` in lokr.py), so that callers test
``algorithm.low_rank_factors is not None`` and a misspelt function fails the registry test
(tests/test_algorithm_interface.py) instead of silently sending a layer down the slow path.
The capabilities come in groups: ``low_rank_factors`` goes with ``thin_rank`` and ``build_cost``
(the layer's cost model needs all three), and ``fused_factors`` needs ``low_rank_factors``.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol, runtime_checkable

import torch

Params = Mapping[str, torch.Tensor]


@runtime_checkable
class Algorithm(Protocol):
    """One adapter algorithm. The functions below are always present; the capabilities after
    them are callables or None."""

    NAME: str
    """The algorithm's name in files and configs (``"loha"``, ``"lora"``, ...); unique."""
    REQUIRED: tuple[str, ...]
    """Tensor names a module of this algorithm must hold. LoKr has none: each of its factors has
    a full and a factorised form, and ``check_shapes`` names whatever is missing."""
    OPTIONAL: tuple[str, ...]
    """The other tensor names it may hold; any name outside REQUIRED + OPTIONAL is not its own."""
    TENSOR_DIMS: dict[str, tuple[int, int]]
    """(fewest, most) dimensions of each of its tensors (REQUIRED + OPTIONAL), checked when a file
    is read so that ``rank`` and ``check_shapes`` only ever see tensors of a sane layout."""
    READS_WEIGHT: bool
    """The delta depends on the base weight's values (IA3: dW = W * w), so it cannot be taken off
    again by subtracting it: fusing such an adapter always keeps the original weight."""

    def detect(self, params: Params | Collection[str]) -> bool:
        """Whether ``params`` (a mapping or a set of tensor names) holds this algorithm's tensors.
        Every ``detect`` looks for names no other algorithm uses, so the order does not matter."""

    def rank(self, params: Params) -> int | None:
        """The rank the tensor shapes give; None where there is none (full, norm, ia3, and LoKr
        with both halves full)."""

    def scale(self, params: Params, alpha: float | None) -> float:
        """alpha / rank by ``common.alpha_scale``; 1 where there is no rank."""

    def delta_weight(self, params: Params, weight: torch.Tensor, scale: float = 1.0,
                     **options: Any) -> torch.Tensor:
        """fp32 ``scale`` * dW with ``weight.shape``; the scale multiplies the smallest operand.
        Only ``READS_WEIGHT`` algorithms read ``weight``'s values, the others its shape. Options
        an algorithm does not know (``legacy_tucker``) are ignored."""

    def check_shapes(self, params: Params, weight_shape: tuple[int, ...]) -> str | None:
        """None when the tensors make a delta of ``weight_shape``, else a one-line reason."""

    delta_bias: Callable[[Params, torch.Tensor | None], torch.Tensor | None] | None
    """``delta_bias(params, bias)``: the fp32 bias change (a new tensor shaped like ``bias``, 1-D
    when the layer has none), or None when this module changes no bias. Defined where a file can
    change the bias (full, norm); None elsewhere."""
    low_rank_factors: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None
    """``low_rank_factors(params, legacy_tucker=False)``: an exact pair (up (out, R), down
    (R, in*k*k)) with ``up @ down`` the flattened dW (scale not applied): what the thin path
    ``x -> down -> up`` and the conversion to LoRA use. LoRA: rank r; LoHa: the rank-r^2
    Khatri-Rao pair. None where dW is not low rank (LoKr, full, norm, ia3)."""
    fused_factors: Callable[..., tuple[str, tuple[torch.Tensor, ...]]] | None
    """``fused_factors(params, legacy_tucker=False)``: (kind, factors) in the layout of
    ``loha_diffusion.fused``: ("product", (up, down)) or ("hadamard", (u1, d1, u2, d2))."""
    thin_rank: Callable[[Params], int] | None
    """``thin_rank(params)``: the inner size R of the ``low_rank_factors`` pair."""
    build_cost: Callable[[tuple[int, ...], Params], int] | None
    """``build_cost(weight_shape, params)``: multiply-adds to build dW once."""
    delta_bound: Callable[..., float] | None
    """``delta_bound(params, legacy_tucker=False)``: an upper bound of max |dW| (scale not applied)
    read off the tensors without building dW, so that a load can rule out an overflow cheaply.
    None where dW depends on the base weight's values (ia3)."""
    take_rows: Callable[[Params, torch.Tensor], dict[str, torch.Tensor] | None] | None
    """``take_rows(params, rows)``: tensors of the same algorithm, alpha and scale whose dW is the
    given output rows (an index tensor) of this dW, or None where these rows are not of that
    form (LoKr rows that cut through its blocks). How one original module of a DiT file (Flux's
    stacked ``qkv``) becomes adapters on diffusers' separate modules. None for norm and ia3."""
    delta_rows: Callable[..., torch.Tensor] | None
    """``delta_rows(params, weight_shape, rows, scale=1.0)``: fp32 ``scale`` * dW[rows] for a weight
    of ``weight_shape``, at the cost of those rows only: how a layer builds its rows of a stacked
    module that ``take_rows`` could not split (LoKr). None where ``take_rows`` always splits.
    """
    init_params: Callable[..., dict[str, torch.Tensor]] | None
    """``init_params(shape, r, use_tucker=False, scheme="lycoris", ...)``: fresh tensors for
    training, in the community layout, for a weight of ``shape``. None for the algorithms that
    are only loaded from files (full, norm, ia3)."""
