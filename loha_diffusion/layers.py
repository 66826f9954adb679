"""The adapter layer: an nn.Linear / nn.Conv1d / nn.Conv2d with named adapters around it.

How a forward is computed (DESIGN.md "Fast by construction"):
* merged weight: ``base(x, W + sum_a s_a * dW_a)`` - one dense matmul; dW comes from a custom
  autograd function that keeps only the low-rank factors;
* thin path: ``base(x) + sum_a s_a * up_a(down_a(x))`` with the exact (up, down) pair of each
  adapter (rank r for LoRA, the rank-r^2 Khatri-Rao pair for LoHa).
The layer picks the cheaper of the two from the shapes of the call (``_prefers_thin_path``).
Without gradients and outside training the merged weight is cached until an adapter tensor,
the base weight, the active set or a strength changes, so unfused inference costs one matmul.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .algorithms import get_algorithm
from .algorithms.dora import apply_dora
from .fused import MergedAdapterOp, ThinAdapterOp, delta_bound, fused_weight, op_spec
from .io import all_finite

# Layers an adapter can be trained on, and the wider set community files patch (``full`` diffs
# on token embeddings, ``norm`` on LayerNorm/GroupNorm).
SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
LOADABLE_LAYERS = (*SUPPORTED_LAYERS, nn.LayerNorm, nn.GroupNorm, nn.Embedding)
# |dW| below this cannot overflow fp32 or bf16 when added to any sane weight.
_SAFE_DELTA = 1e30


class AdapterWeights(nn.Module):
    """One adapter on one layer: its tensors under their community names, plus ``alpha``.

    ``lora_down.weight`` is stored as a parameter ``weight`` of a child ``lora_down`` so that
    ``named_parameters()`` yields exactly the names found in Kohya/LyCORIS files. A DoRA
    magnitude (``dora_scale``) is kept beside the algorithm's tensors.
    """

    def __init__(self, algorithm: str, tensors: dict[str, torch.Tensor], alpha: float | None,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, legacy_tucker: bool = False,
                 dora_scale: torch.Tensor | None = None, dora_semantics: str = "lycoris",
                 source_in_channels: int | None = None):
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
        # a zero delta, as A1111 does (formats.md 5, item 20).
        self.source_in_channels = source_in_channels
        self.refresh_scale()
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh_scale())

    @property
    def algorithm(self):
        return get_algorithm(self.algorithm_name)

    def refresh_scale(self) -> None:
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
    def supports_fused(self) -> bool:
        """``fused_factors`` exists: the single-node ops of ``loha_diffusion.fused`` apply."""
        return hasattr(self.algorithm, "fused_factors") and self.supports_thin_path

    def fused_factors(self):
        """(kind, factors) in the layout ``loha_diffusion.fused`` takes."""
        return self.algorithm.fused_factors(self.params, legacy_tucker=self.legacy_tucker)

    @property
    def reads_base_weight(self) -> bool:
        """The change depends on the base weight's values (IA3, DoRA), so it cannot be taken
        off again by subtracting it: fusing such an adapter always keeps the original weight."""
        return getattr(self.algorithm, "READS_WEIGHT", False) or self.dora_scale is not None

    @property
    def supports_thin_path(self) -> bool:
        """Exact low-rank factors exist and nothing depends on the base weight's values."""
        return (hasattr(self.algorithm, "low_rank_factors") and self.dora_scale is None
                and self.source_in_channels is None)

    def versions(self) -> tuple:
        return tuple(t._version for t in (*self.parameters(), *self.buffers()))

    def delta_weight(self, weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """fp32 ``scale`` * dW for the base ``weight``."""
        if self.source_in_channels is None:
            return self.algorithm.delta_weight(self.params, weight, scale=scale, legacy_tucker=self.legacy_tucker)
        narrow = weight[:, : self.source_in_channels]
        delta = self.algorithm.delta_weight(self.params, narrow, scale=scale, legacy_tucker=self.legacy_tucker)
        return torch.nn.functional.pad(delta, (0,) * (2 * (weight.dim() - 2)) + (0, weight.shape[1] - delta.shape[1]))

    def delta_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        delta_bias = getattr(self.algorithm, "delta_bias", None)
        return None if delta_bias is None else delta_bias(self.params, bias)

    def low_rank_factors(self):
        return self.algorithm.low_rank_factors(self.params, legacy_tucker=self.legacy_tucker)

    def tensors_for_file(self) -> dict[str, torch.Tensor]:
        """This adapter's tensors under their community names (alpha and dora_scale included)."""
        tensors = {name: p.detach() for name, p in self.params.items()}
        if self.alpha is not None:
            tensors["alpha"] = self.alpha.detach()
        if self.dora_scale is not None:
            tensors["dora_scale"] = self.dora_scale.detach()
        return tensors


class AdapterLayer(nn.Module):
    """Wraps a supported layer; ``base_layer`` is the original module object, untouched."""

    def __init__(self, base_layer: nn.Module):
        if not isinstance(base_layer, LOADABLE_LAYERS) or getattr(base_layer, "weight", None) is None:
            raise TypeError(
                f"cannot put an adapter on {type(base_layer).__name__}: supported layers are "
                "nn.Linear, nn.Conv1d and nn.Conv2d (and their subclasses); files may also patch "
                "nn.LayerNorm / nn.GroupNorm with affine weights and nn.Embedding")
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.strengths: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.adapters_enabled = True
        self.merged_adapters: list[str] = []
        self._weight_backup: torch.Tensor | None = None
        self._bias_backup: torch.Tensor | None = None
        self._merged_scale = 1.0
        # Fused by adding the changes in place, without a backup: unmerge subtracts them again,
        # which restores W to rounding only.
        self._merged_in_place = False
        # Unfused inference keeps W + dW per layer (one extra copy of the adapted weights);
        # without it every call applies the adapters again, thin or merged, whichever is cheaper.
        self.cache_weights = True
        self._cache_key = None
        self._cached_params = None
        self._thin_choice: dict = {}  # call signature -> thin path or merged weight
        self._op_spec = op_spec(base_layer)  # None where the fused ops cannot run this layer

    # -- the base layer's surface, so code that reads ``layer.weight`` keeps working -------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # -- adapter management -----------------------------------------------------------------
    def add_adapter(self, name: str, adapter: AdapterWeights, strength: float = 1.0, activate: bool = True):
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer; delete it first or pick another name")
        device = self.base_layer.weight.device
        if adapter.is_materialized and device.type != "meta":
            adapter.to(device)
        self.adapters[name] = adapter
        self.strengths[name] = float(strength)
        if activate and name not in self.active_adapters:
            self.active_adapters.append(name)
        self._invalidate()

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        del self.adapters[name]
        self.strengths.pop(name, None)
        if name in self.active_adapters:
            self.active_adapters.remove(name)
        self._invalidate()

    def set_active(self, names) -> None:
        self.active_adapters = [n for n in names if n in self.adapters]
        self._invalidate()

    def set_strength(self, name: str, strength: float) -> None:
        if name in self.merged_adapters and float(strength) != self.strengths[name]:
            raise RuntimeError(
                f"adapter {name!r} is fused into the weights at strength {self.strengths[name]}; "
                "unfuse before changing its strength")
        self.strengths[name] = float(strength)
        self._invalidate()

    def _invalidate(self) -> None:
        self._cache_key = None
        self._cached_params = None
        self._thin_choice = {}

    # -- math ------------------------------------------------------------------------------
    def _scaled_delta(self, adapter: AdapterWeights, strength: float, training: bool) -> torch.Tensor:
        weight = self.base_layer.weight
        dora = adapter.dora_scale is not None
        # DoRA normalises the alpha-scaled delta and applies the strength afterwards
        delta = adapter.delta_weight(weight, adapter.scale * (1.0 if dora else strength))
        if training and adapter.rank_dropout > 0:
            delta = delta * self._row_mask(adapter, delta).view(-1, *(1,) * (delta.dim() - 1))
        if dora:
            return apply_dora(weight.float(), delta, adapter.dora_scale.float(), strength, adapter.dora_semantics)
        return delta

    @staticmethod
    def _row_mask(adapter: AdapterWeights, like: torch.Tensor) -> torch.Tensor:
        # Rows (output channels) of dW are dropped, as LyCORIS and PEFT do for LoHa, and the
        # survivors rescaled by the kept fraction (PEFT's rule) so the expected delta is unchanged.
        keep = (torch.rand(like.shape[0], device=like.device) >= adapter.rank_dropout).to(like.dtype)
        return keep / keep.mean().clamp_min(1.0 / like.shape[0])

    def merged_delta(self, names, training: bool = False, strength_scale: float = 1.0) -> torch.Tensor | None:
        """fp32 sum of the weight changes of ``names`` (strengths and scales applied)."""
        total = None
        for name in names:
            delta = self._scaled_delta(self.adapters[name], self.strengths[name] * strength_scale, training)
            if total is None:
                total = delta
            elif torch.is_grad_enabled():
                total = total + delta
            else:
                total.add_(delta)  # no graph to keep: accumulate without another weight-sized tensor
        return total

    def merged_bias_delta(self, names, strength_scale: float = 1.0) -> torch.Tensor | None:
        total = None
        for name in names:
            delta = self.adapters[name].delta_bias(self.base_layer.bias)
            if delta is not None:
                delta = delta.float() * (self.strengths[name] * strength_scale)
                total = delta if total is None else total + delta
        return total

    def _run_base(self, x, weight, bias):
        base = self.base_layer
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

    @staticmethod
    def _add_rounded_once(base: torch.Tensor | None, delta: torch.Tensor | None) -> torch.Tensor | None:
        if delta is None:
            return base
        if base is None:
            return delta
        if base.dtype == torch.float32:
            return base + delta
        # Sum in fp32 and round once, so a half-precision layer sees one rounding, not two.
        return (base.float() + delta).to(base.dtype)

    def _effective_params(self, names, training: bool):
        """(weight, bias) with the adapters ``names`` applied, differentiable."""
        weight = self._add_rounded_once(self.base_layer.weight, self.merged_delta(names, training))
        return weight, self._effective_bias(names)

    def _effective_bias(self, names, strength_scale: float = 1.0):
        bias = self.base_layer.bias
        bias_delta = self.merged_bias_delta(names, strength_scale)
        if bias_delta is not None:
            dtype = self.base_layer.weight.dtype
            bias = self._add_rounded_once(bias, bias_delta.to(dtype) if bias is None else bias_delta)
        return bias

    def _thin_output(self, x, names, training: bool):
        base = self.base_layer
        total = None
        for name in names:
            adapter = self.adapters[name]
            up, down = adapter.low_rank_factors()
            if training and adapter.rank_dropout > 0:
                up = up * self._row_mask(adapter, up).unsqueeze(1)
            up = up * (adapter.scale * self.strengths[name])
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

    def _prefers_thin_path(self, x, names, needs_grad: bool) -> bool:
        """Compare multiply-adds of the two exact ways to apply the adapters to ``x``."""
        base = self.base_layer
        if not isinstance(base, SUPPORTED_LAYERS) or (not isinstance(base, nn.Linear) and base.groups != 1):
            return False
        if not all(self.adapters[n].supports_thin_path and self.adapters[n].delta_bias(base.bias) is None
                   for n in names):
            return False
        weight = base.weight
        n_out = weight.shape[0]
        n_in = math.prod(weight.shape[1:])
        if isinstance(base, nn.Linear):
            tokens = x.numel() // max(x.shape[-1], 1)
        else:
            tokens = x.shape[0] * math.prod(_conv_output_size(base, x.shape[2:]))
        thin_rank = 0
        build = 0
        for name in names:
            params = self.adapters[name].params
            thin_rank += self.adapters[name].algorithm.thin_rank(params)
            build += self.adapters[name].algorithm.build_cost(weight.shape, params)
        if needs_grad:
            # merged: grad of the merged weight (one dense matmul) + build, recompute, factor grads
            merged = tokens * n_out * n_in + 4 * build
            thin = 3 * tokens * thin_rank * (n_in + n_out)
        else:
            merged = build
            thin = tokens * thin_rank * (n_in + n_out)
        return thin < merged

    def _live_adapters(self) -> list[str]:
        names = [n for n in self.active_adapters if n not in self.merged_adapters and self.strengths[n] != 0.0]
        if self.training:
            names = [n for n in names
                     if not (self.adapters[n].module_dropout > 0 and torch.rand(()) < self.adapters[n].module_dropout)]
        for name in names:
            if not self.adapters[name].is_materialized:
                raise RuntimeError(
                    f"adapter {name!r} was created with low_cpu_mem_usage=True and its tensors are still on the "
                    "meta device; load its weights (LoHaModel.load_adapter_weights) before running the model")
        return names

    def forward(self, x, *args, **kwargs):
        if not self.adapters_enabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        names = self._live_adapters()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        adapters = [self.adapters[n] for n in names]
        stochastic = self.training and any(a.rank_dropout > 0 or a.module_dropout > 0 for a in adapters)
        needs_grad = torch.is_grad_enabled() and any(a.requires_grad for a in adapters)
        if not needs_grad and not stochastic and self.cache_weights:
            return self._run_base(x, *self._cached_effective_params(names))
        key = (tuple(x.shape), x.dtype, tuple(names), needs_grad)
        thin = self._thin_choice.get(key)
        if thin is None:
            thin = self._thin_choice[key] = self._prefers_thin_path(x, names, needs_grad)
        spec = self._fused_spec(x, adapters)
        if spec is not None:
            return self._fused_forward(x, spec, names[0], thin)
        if thin:
            y = self.base_layer(x, *args, **kwargs)
            return y + self._thin_output(x, names, self.training).to(y.dtype)
        return self._run_base(x, *self._effective_params(names, self.training))

    def _fused_spec(self, x, adapters):
        """The ``fused.OpSpec`` if this call can run as one fused autograd node, else None."""
        if len(adapters) != 1 or self._op_spec is None:
            return None
        weight = self.base_layer.weight
        if not (x.dtype == weight.dtype == adapters[0].dtype == torch.float32) or \
                torch.is_autocast_enabled(x.device.type):
            return None  # reduced or mixed precision: the general path casts where needed
        if not adapters[0].supports_fused:
            return None
        if self._op_spec.dims and x.dim() != self._op_spec.dims + 2:
            return None  # unbatched conv input
        return self._op_spec

    def _fused_forward(self, x, spec, name: str, thin: bool):
        adapter = self.adapters[name]
        kind, factors = adapter.fused_factors()
        row_scale = adapter.scale * self.strengths[name]
        if self.training and adapter.rank_dropout > 0:
            row_scale = self._row_mask(adapter, self.base_layer.weight) * row_scale
        op = ThinAdapterOp if thin else MergedAdapterOp
        base = self.base_layer
        return op.apply(spec, kind, row_scale, x, base.weight, base.bias, *factors)

    def _cache_key_for(self, names) -> tuple:
        weight, bias = self.base_layer.weight, self.base_layer.bias
        return (tuple((n, self.strengths[n], self.adapters[n].scale, self.adapters[n].versions()) for n in names),
                weight._version, weight.data_ptr(), weight.dtype, weight.device,
                None if bias is None else (bias._version, bias.data_ptr()))

    def _cached_effective_params(self, names):
        key = self._cache_key_for(names)
        if key != self._cache_key:
            self._cached_params = None  # free the stale copy before building the new one
            with torch.no_grad():
                self._cached_params = (self._fused_weight(names, 1.0), self._effective_bias(names))
            self._cache_key = key
        return self._cached_params

    # -- merge / unmerge ---------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names=None, scale: float = 1.0, exact_unmerge: bool = True) -> None:
        """Add the adapters' changes (strength x ``scale``) to the base weights once. On error
        nothing is changed.

        ``exact_unmerge`` keeps the original weights, so that ``unmerge`` restores them
        bit-exactly, at the memory of one more copy of this layer's weight; without it the
        changes are added in place and ``unmerge`` subtracts them again (exact to rounding).
        """
        names = [n for n in (self.active_adapters if names is None else names)
                 if n in self.adapters and n not in self.merged_adapters]
        if not names:
            return
        previous = list(self.merged_adapters)
        if previous and scale != self._merged_scale:
            raise ValueError(f"adapters {previous} are fused at scale {self._merged_scale}; unfuse them before "
                             f"fusing {names} at scale {scale}, or fuse them all in one call")
        previous_in_place = self._merged_in_place
        if previous:
            # IA3 and DoRA read the base weight's values: always merge onto the original.
            names = previous + names
            self.unmerge()
        try:
            self._merge_onto_original(names, scale, in_place=not exact_unmerge)
        except Exception:
            if previous:
                self._merge_onto_original(previous, scale, in_place=previous_in_place)
            raise

    def _merge_onto_original(self, names, scale: float, in_place: bool = False) -> None:
        base = self.base_layer
        weight = base.weight
        in_place = in_place and not any(self.adapters[n].reads_base_weight for n in names)
        if base.bias is None and self.merged_bias_delta(names, scale) is not None:
            raise ValueError(f"adapters {names} add a bias to a layer that has none; they cannot be fused, "
                             "use them unfused")
        new_bias = None if base.bias is None else self._effective_bias(names, scale)
        if new_bias is base.bias:
            new_bias = None  # unchanged
        elif new_bias is not None and not all_finite(new_bias):
            raise ValueError(f"fusing adapters {names} would put NaN/inf into the bias; nothing was changed")
        if in_place:
            self._fused_weight(names, scale, out=weight.detach())  # checked before it writes
            new_weight = None
        elif scale == 1.0 and self._cache_key is not None and self._cache_key == self._cache_key_for(names):
            new_weight = self._cached_params[0]  # unfused inference already built exactly this
        else:
            new_weight = self._fused_weight(names, scale)
        # Nothing can fail from here on. On the CPU the original tensors themselves are the
        # backup (unmerge swaps them back); elsewhere a CPU copy is kept, as A1111 and ComfyUI
        # do, so that fusing costs no accelerator memory. A bias is small: it always has one.
        for param, new in ((weight, new_weight), (base.bias, new_bias)):
            if new is None:
                continue
            backup = param.data if param.device.type == "cpu" else param.detach().to("cpu", copy=True)
            if param is weight:
                self._weight_backup = backup
            else:
                self._bias_backup = backup
            if param.device.type == "cpu":
                param.data = new
            else:
                param.copy_(new)
        self.merged_adapters = list(names)
        self._merged_scale = scale
        self._merged_in_place = in_place
        self._invalidate()

    def _fused_weight(self, names, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """The base weight plus the adapters' changes, checked for NaN/inf before it is returned:
        a new tensor, or written into ``out`` (which may be the weight itself)."""
        weight = self.base_layer.weight.detach()
        adapter = self.adapters[names[0]]
        if len(names) == 1 and adapter.supports_fused:
            kind, factors = adapter.fused_factors()
            factors = [f.detach().float() for f in factors]
            row_scale = adapter.scale * self.strengths[names[0]] * scale
            # A finite bound of |scale * dW| far below the dtype's range proves the result finite
            # without reading it again; fp16's small range, or an odd bound, gets the full check.
            bound = abs(row_scale) * delta_bound(kind, factors)
            if weight.dtype != torch.float16 and bound < _SAFE_DELTA:
                return fused_weight(kind, weight, factors, row_scale, out=out)
            new = fused_weight(kind, weight, factors, row_scale)
            if all_finite(new):
                return new if out is None else out.copy_(new)
        else:
            delta = self.merged_delta(names, False, scale)
            if all_finite(delta):
                new = self._add_rounded_once(weight, delta)
                if weight.dtype == torch.float32 or all_finite(new):
                    return new if out is None else out.copy_(new)
        raise ValueError(
            f"adapters {names} would put NaN/inf into the weights (of shape {tuple(weight.shape)}); "
            "nothing was changed. Check the adapter file for NaN values or absurd alphas.")

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weights: bit-exactly from the original tensors or the backup copy, or,
        after an in-place merge, by subtracting the changes again (the adapter tensors must not
        have changed since)."""
        if not self.merged_adapters:
            return
        if self._merged_in_place:
            self._fused_weight(self.merged_adapters, -self._merged_scale, out=self.base_layer.weight.detach())
        for param, backup in ((self.base_layer.weight, self._weight_backup), (self.base_layer.bias, self._bias_backup)):
            if backup is None:
                continue
            if backup.device == param.device and backup.dtype == param.dtype and backup.shape == param.shape:
                param.data = backup
            else:  # the module was moved (e.g. to an accelerator) while fused
                param.copy_(backup)
        self.drop_backup()

    def drop_backup(self) -> None:
        """Make the current (fused) weights the new base: unmerge will no longer undo the fuse."""
        self._weight_backup = self._bias_backup = None
        self.merged_adapters = []
        self._merged_in_place = False
        self._invalidate()

    def extra_repr(self) -> str:
        parts = [f"{n}: {a.algorithm.NAME} r={a.rank} alpha={None if a.alpha is None else float(a.alpha)} "
                 f"strength={self.strengths[n]:g}"
                 for n, a in self.adapters.items()]
        return "adapters={" + ", ".join(parts) + "}, active=" + str(self.active_adapters)


def _conv_output_size(base, spatial) -> list[int]:
    sizes = []
    for i, size in enumerate(spatial):
        pad = base.padding[i] if isinstance(base.padding, tuple) else 0
        if base.padding == "same":
            sizes.append(size)
            continue
        k, s, d = base.kernel_size[i], base.stride[i], base.dilation[i]
        sizes.append((size + 2 * pad - d * (k - 1) - 1) // s + 1)
    return sizes
