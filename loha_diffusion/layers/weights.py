"""One adapter on one layer: its tensors under their community names, and what it adds to a weight."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from ..algorithms import Algorithm, get_algorithm
from ..algorithms.dora import apply_dora
from . import cache


class AdapterWeights(nn.Module):
    """One adapter on one layer: its tensors under their community names, plus ``alpha``.

    ``lora_down.weight`` is stored as a parameter ``weight`` of a child ``lora_down`` so that
    ``named_parameters()`` yields exactly the names found in Kohya/LyCORIS files. A DoRA
    magnitude (``dora_scale``) is kept beside the algorithm's tensors.
    """

    def __init__(self, algorithm: str, tensors: dict[str, torch.Tensor], alpha: float | None,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, legacy_tucker: bool = False,
                 dora_scale: torch.Tensor | None = None, dora_semantics: str = "lycoris",
                 source_in_channels: int | None = None, source_rows: torch.Tensor | None = None,
                 source_out_features: int | None = None):
        super().__init__()
        get_algorithm(algorithm)  # fail early on an unknown name
        # the name, not the module object, so that adapters can be deep-copied and pickled
        self.algorithm_name = algorithm
        self.tensor_names = tuple(tensors)
        for name, tensor in tensors.items():
            owner, _, leaf = name.rpartition(".")
            holder = self
            if owner:
                if not hasattr(self, owner):
                    self.add_module(owner, nn.Module())
                holder = getattr(self, owner)
            if tensor.is_floating_point():
                holder.register_parameter(leaf, nn.Parameter(tensor))
            else:  # flags such as IA3's ``on_input`` are data, not trainable
                holder.register_buffer(leaf, tensor)
        rank = self.algorithm.rank(tensors)
        if rank is not None and alpha is None:
            # A missing alpha is stored as alpha = rank: the same scale (1), and every file we
            # write then carries one alpha per module as consumers expect.
            alpha = rank
        self.register_buffer("alpha", None if alpha is None else torch.tensor(float(alpha)))
        self.dora_scale = None if dora_scale is None else nn.Parameter(dora_scale)
        if dora_semantics not in ("lycoris", "comfyui"):
            raise ValueError(f"dora_semantics must be 'lycoris' or 'comfyui', got {dora_semantics!r}")
        self.dora_semantics = dora_semantics
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.legacy_tucker = legacy_tucker
        # A 4-channel conv_in delta on a 9-channel inpainting UNet: the extra input channels get
        # a zero delta, as A1111 does (docs/formats.md 5, item 20).
        self.source_in_channels = source_in_channels
        # One module of the file stacks several of this model's layers by output rows (Flux's
        # qkv) and its tensors do not split (LoKr rows through its Kronecker blocks): the whole
        # module's delta, ``source_out_features`` rows, is built and rows ``source_rows`` taken.
        self.register_buffer("source_rows", source_rows)
        self.source_out_features = source_out_features
        self.refresh_scale()
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh_scale())

    @property
    def algorithm(self) -> Algorithm:
        return get_algorithm(self.algorithm_name)

    def refresh_scale(self) -> None:
        # called after a load or an alpha change: weights cached from the old tensors are stale
        cache.GENERATION.bump()
        self.scale = self.algorithm.scale(self.params, None if self.alpha is None else float(self.alpha))

    @property
    def params(self) -> dict[str, torch.Tensor]:
        # Read through the holders each time (a load may replace a Parameter object); the
        # holder modules themselves never change. This runs on every training forward.
        return {name: getattr(holder, leaf) for name, holder, leaf in self._tensor_slots()}

    def _tensor_slots(self):
        slots = self.__dict__.get("_slots")
        if slots is None:
            slots = []
            for name in self.tensor_names:
                owner, _, leaf = name.rpartition(".")
                slots.append((name, self.get_submodule(owner) if owner else self, leaf))
            self.__dict__["_slots"] = slots
        return slots

    @property
    def requires_grad(self) -> bool:
        return any(getattr(holder, leaf).requires_grad for _, holder, leaf in self._tensor_slots()) or (
            self.dora_scale is not None and self.dora_scale.requires_grad)

    @property
    def rank(self) -> int | None:
        return self.algorithm.rank(self.params)

    @property
    def is_materialized(self) -> bool:
        # Adapter tensors are created and loaded all together, so the first one tells.
        _, holder, leaf = self._tensor_slots()[0]
        return not getattr(holder, leaf).is_meta

    @property
    def dtype(self) -> torch.dtype:
        _, holder, leaf = self._tensor_slots()[0]
        return getattr(holder, leaf).dtype

    @property
    def supports_thin_path(self) -> bool:
        """Exact low-rank factors exist and nothing depends on the base weight's values."""
        return (self.algorithm.low_rank_factors is not None and self.dora_scale is None
                and self.source_in_channels is None and self.source_rows is None)

    @property
    def supports_fused(self) -> bool:
        """The single-node ops of ``loha_diffusion.fused`` apply (``fused_factors`` exists)."""
        return self.algorithm.fused_factors is not None and self.supports_thin_path

    @property
    def reads_base_weight(self) -> bool:
        """The change depends on the base weight's values (IA3, DoRA), so it cannot be taken
        off again by subtracting it: fusing such an adapter always keeps the original weight."""
        return self.algorithm.READS_WEIGHT or self.dora_scale is not None

    def watched_tensors(self) -> list[torch.Tensor]:
        """Every tensor the change is built from: in-place edits of these bump their versions."""
        extra = [t for t in (self.alpha, self.dora_scale) if t is not None]
        return [getattr(holder, leaf) for _, holder, leaf in self._tensor_slots()] + extra

    def delta_weight(self, weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """fp32 ``scale`` * dW for the base ``weight``."""
        if self.source_rows is not None:
            stacked = (self.source_out_features, *weight.shape[1:])
            return self.algorithm.delta_rows(self.params, stacked, self.source_rows, scale=scale)
        if self.source_in_channels is None:
            return self.algorithm.delta_weight(self.params, weight, scale=scale, legacy_tucker=self.legacy_tucker)
        narrow = weight[:, : self.source_in_channels]
        delta = self.algorithm.delta_weight(self.params, narrow, scale=scale, legacy_tucker=self.legacy_tucker)
        return torch.nn.functional.pad(delta, (0,) * (2 * (weight.dim() - 2)) + (0, weight.shape[1] - delta.shape[1]))

    def scaled_delta(self, weight: torch.Tensor, strength: float, training: bool) -> torch.Tensor:
        """fp32 W' - W at ``strength``: alpha/r, rank dropout (when ``training``) and DoRA applied."""
        dora = self.dora_scale is not None
        # DoRA normalises the alpha-scaled delta and applies the strength afterwards
        delta = self.delta_weight(weight, self.scale * (1.0 if dora else strength))
        if training and self.rank_dropout > 0:
            delta = delta * self.rank_dropout_mask(delta).view(-1, *(1,) * (delta.dim() - 1))
        if dora:
            return apply_dora(weight.float(), delta, self.dora_scale.float(), strength, self.dora_semantics)
        return delta

    def rank_dropout_mask(self, like: torch.Tensor) -> torch.Tensor:
        """A fresh (rows,) mask for the rows of ``like``, a tensor with one row per output."""
        # Rows (output channels) of dW are dropped, as LyCORIS and PEFT do for LoHa, and the
        # survivors rescaled by the kept fraction (PEFT's rule) so the expected delta is unchanged.
        keep = (torch.rand(like.shape[0], device=like.device) >= self.rank_dropout).to(like.dtype)
        return keep / keep.mean().clamp_min(1.0 / like.shape[0])

    def delta_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        delta_bias = self.algorithm.delta_bias
        return None if delta_bias is None else delta_bias(self.params, bias)

    def delta_bound(self) -> float:
        """An upper bound of max |scale * dW| (strength 1, DoRA not applied) read off the tensors
        without building dW; inf where none is known (IA3). nan or inf also when a tensor is."""
        bound = self.algorithm.delta_bound
        if bound is None:
            return math.inf
        with torch.no_grad():
            return abs(self.scale) * bound(self.params, legacy_tucker=self.legacy_tucker)

    def low_rank_factors(self):
        return self.algorithm.low_rank_factors(self.params, legacy_tucker=self.legacy_tucker)

    def fused_factors(self):
        """(kind, factors) in the layout ``loha_diffusion.fused`` takes."""
        return self.algorithm.fused_factors(self.params, legacy_tucker=self.legacy_tucker)

    def tensors_for_file(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """This adapter's tensors under their community names (alpha and dora_scale included),
        for a layer of ``weight``.

        Rows taken from a stacked module are no tensors of their own: they are written as the
        exact ``diff`` of this layer (alpha applied), built to the shape of ``weight``."""
        if self.source_rows is not None:
            with torch.no_grad():
                tensors = {"diff": self.delta_weight(weight, self.scale)}
            if self.dora_scale is not None:  # applied to W + diff as to W + scale * dW
                tensors["dora_scale"] = self.dora_scale.detach()
            return tensors
        tensors = {name: p.detach() for name, p in self.params.items()}
        if self.alpha is not None:
            tensors["alpha"] = self.alpha.detach()
        if self.dora_scale is not None:
            tensors["dora_scale"] = self.dora_scale.detach()
        return tensors


class Term(NamedTuple):
    """An adapter as a layer applies it: its name on the layer, its tensors, its strength."""
    name: str
    adapter: AdapterWeights
    strength: float
