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
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .algorithms import get_algorithm

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


class AdapterWeights(nn.Module):
    """One adapter on one layer: its tensors under their community names, plus ``alpha``.

    ``lora_down.weight`` is stored as a parameter ``weight`` of a child ``lora_down`` so that
    ``named_parameters()`` yields exactly the names found in Kohya/LyCORIS files.
    """

    def __init__(self, algorithm: str, tensors: dict[str, torch.Tensor], alpha: float | None,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, legacy_tucker: bool = False):
        super().__init__()
        self.algorithm = get_algorithm(algorithm)
        self.tensor_names = tuple(tensors)
        for name, tensor in tensors.items():
            owner, _, leaf = name.rpartition(".")
            holder = self
            if owner:
                if not hasattr(self, owner):
                    self.add_module(owner, nn.Module())
                holder = getattr(self, owner)
            holder.register_parameter(leaf, nn.Parameter(tensor))
        rank = self.algorithm.rank(tensors)
        # A missing alpha is stored as alpha = rank: same scale (1), and every file we write
        # then carries one alpha per module as consumers expect.
        self.register_buffer("alpha", torch.tensor(float(rank if alpha is None else alpha)))
        self.scale = self.algorithm.scale(tensors, float(self.alpha))
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.legacy_tucker = legacy_tucker
        self.register_load_state_dict_post_hook(lambda module, _: module.refresh_scale())

    def refresh_scale(self) -> None:
        self.scale = self.algorithm.scale(self.params, float(self.alpha))

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return {name: self.get_parameter(name) for name in self.tensor_names}

    @property
    def rank(self) -> int:
        return self.algorithm.rank(self.params)

    @property
    def is_materialized(self) -> bool:
        return not any(p.is_meta for p in self.parameters())

    def versions(self) -> tuple:
        return tuple(p._version for p in self.parameters()) + (self.alpha._version,)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Unscaled fp32 dW for the base ``weight``."""
        return self.algorithm.delta_weight(self.params, weight, legacy_tucker=self.legacy_tucker)

    def low_rank_factors(self):
        return self.algorithm.low_rank_factors(self.params, legacy_tucker=self.legacy_tucker)


def _kernel_size(base: nn.Module) -> tuple[int, ...]:
    return tuple(base.weight.shape[2:])


class AdapterLayer(nn.Module):
    """Wraps a supported layer; ``base_layer`` is the original module object, untouched."""

    def __init__(self, base_layer: nn.Module):
        if not isinstance(base_layer, SUPPORTED_LAYERS):
            raise TypeError(
                f"cannot put an adapter on {type(base_layer).__name__}: supported layers are "
                "nn.Linear, nn.Conv1d and nn.Conv2d (and their subclasses)")
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.strengths: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.adapters_enabled = True
        self.merged_adapters: list[str] = []
        self._weight_backup: torch.Tensor | None = None
        self._cache_key = None
        self._cached_weight: torch.Tensor | None = None

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
        self._cached_weight = None

    # -- math ------------------------------------------------------------------------------
    def _scaled_delta(self, adapter: AdapterWeights, strength: float, training: bool) -> torch.Tensor:
        delta = adapter.delta_weight(self.base_layer.weight)
        if training and adapter.rank_dropout > 0:
            delta = delta * self._row_mask(adapter, delta).view(-1, *(1,) * (delta.dim() - 1))
        return delta * (adapter.scale * strength)

    @staticmethod
    def _row_mask(adapter: AdapterWeights, like: torch.Tensor) -> torch.Tensor:
        # Rows (output channels) of dW are dropped, as LyCORIS and PEFT do for LoHa, and the
        # survivors rescaled by the kept fraction (PEFT's rule) so the expected delta is unchanged.
        keep = (torch.rand(like.shape[0], device=like.device) >= adapter.rank_dropout).to(like.dtype)
        return keep / keep.mean().clamp_min(1.0 / like.shape[0])

    def merged_delta(self, names, training: bool = False) -> torch.Tensor | None:
        """fp32 sum of strength * scale * dW over ``names``."""
        total = None
        for name in names:
            delta = self._scaled_delta(self.adapters[name], self.strengths[name], training)
            total = delta if total is None else total + delta
        return total

    def _run_base(self, x, weight, bias):
        base = self.base_layer
        if isinstance(base, nn.Linear):
            return F.linear(x, weight, bias)
        return base._conv_forward(x, weight, bias)

    def _effective_weight(self, names, training: bool) -> torch.Tensor:
        weight = self.base_layer.weight
        delta = self.merged_delta(names, training)
        if weight.dtype == torch.float32:
            return weight + delta
        # Sum in fp32 and round once, so a half-precision layer sees one rounding, not two.
        return (weight.float() + delta).to(weight.dtype)

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
                kernel = _kernel_size(base)
                down_kernel = down.reshape(down.shape[0], base.in_channels, *kernel)
                hidden = base._conv_forward(xin, down_kernel, None)
                pointwise = F.conv2d if isinstance(base, nn.Conv2d) else F.conv1d
                out = pointwise(hidden, up.reshape(*up.shape, *(1,) * len(kernel)))
            total = out if total is None else total + out
        return total

    def _prefers_thin_path(self, x, names, needs_grad: bool) -> bool:
        """Compare multiply-adds of the two exact ways to apply the adapters to ``x``."""
        base = self.base_layer
        if not isinstance(base, nn.Linear) and base.groups != 1:
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
        stochastic = self.training and any(
            self.adapters[n].rank_dropout > 0 or self.adapters[n].module_dropout > 0 for n in names)
        needs_grad = torch.is_grad_enabled() and any(
            p.requires_grad for n in names for p in self.adapters[n].parameters())
        if not needs_grad and not stochastic:
            return self._run_base(x, self._cached_effective_weight(names), self.base_layer.bias)
        if self._prefers_thin_path(x, names, needs_grad):
            y = self.base_layer(x, *args, **kwargs)
            return y + self._thin_output(x, names, self.training).to(y.dtype)
        return self._run_base(x, self._effective_weight(names, self.training), self.base_layer.bias)

    def _cached_effective_weight(self, names) -> torch.Tensor:
        weight = self.base_layer.weight
        key = (tuple((n, self.strengths[n], self.adapters[n].scale, self.adapters[n].versions()) for n in names),
               weight._version, weight.data_ptr(), weight.dtype, weight.device)
        if key != self._cache_key:
            with torch.no_grad():
                self._cached_weight = self._effective_weight(names, training=False)
            self._cache_key = key
        return self._cached_weight

    # -- merge / unmerge ---------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names=None) -> None:
        """Add the adapters' deltas to the base weight once; keep a backup for an exact unmerge."""
        names = [n for n in (self.active_adapters if names is None else names)
                 if n in self.adapters and n not in self.merged_adapters]
        if not names:
            return
        weight = self.base_layer.weight
        if self._weight_backup is None:
            self._weight_backup = weight.detach().to("cpu", copy=True)
        merged = self._effective_weight(names, training=False)
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"fusing adapters {names} would put NaN/inf into the weights (of shape {tuple(weight.shape)}); "
                "nothing was changed. Check the adapter file for NaN values or absurd alphas.")
        weight.copy_(merged)
        self.merged_adapters.extend(names)
        self._invalidate()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bit-exactly from the backup taken at the first merge."""
        if self._weight_backup is None:
            return
        self.base_layer.weight.copy_(self._weight_backup)
        self._weight_backup = None
        self.merged_adapters = []
        self._invalidate()

    @contextmanager
    def adapters_disabled(self):
        previous = self.adapters_enabled
        self.adapters_enabled = False
        try:
            yield
        finally:
            self.adapters_enabled = previous

    def extra_repr(self) -> str:
        parts = [f"{n}: {a.algorithm.NAME} r={a.rank} alpha={float(a.alpha):g} strength={self.strengths[n]:g}"
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
