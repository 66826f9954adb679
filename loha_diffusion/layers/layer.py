"""The adapter layer: an nn.Linear / nn.Conv1d / nn.Conv2d with named adapters around it.

A forward applies the live adapters by one of the two exact paths of ``paths`` (a thin
rank-r^2 path beside the base matmul, or one matmul with the merged weight), whichever costs
less for the shapes of the call. Without gradients and outside training the merged weight is
cached (``cache``, within a memory budget) until an adapter tensor, the base weight, the
active set or a strength changes, so unfused inference costs one matmul; that a cached weight is
still valid is checked in O(1) per call. Under ``torch.compile`` the layer runs without the cache
(``_traced_forward``). ``merge`` fuses adapters into the weights
(``merge.MergeState`` remembers how to undo it).
"""
from __future__ import annotations

import torch
from torch import nn

from ..fused import run_base
from . import cache, paths
from .cache import CacheBudget, WeightCache
from .merge import MergeSnapshot, MergeState, checked_weight
from .weights import AdapterWeights, Term

# Beyond the layers adapters are trained on, community files patch token embeddings (``full``
# diffs) and LayerNorm/GroupNorm (``norm``); these run the merged weight only.
LOADABLE_LAYERS = (*paths.SUPPORTED_LAYERS, nn.LayerNorm, nn.GroupNorm, nn.Embedding)


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
        self._revision = 0
        self.adapters_enabled = True
        self.merge_state = MergeState()
        self.weight_cache = WeightCache()
        self._path_choice = paths.PathChoice()

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

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda(): the cached weight was built on the old device and dtype
        result = super()._apply(fn, recurse)
        self.invalidate()
        return result

    # -- adapter management -----------------------------------------------------------------
    @property
    def merged_adapters(self) -> list[str]:
        """The adapters fused into the weights now."""
        return list(self.merge_state.adapters)

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
        self.invalidate()

    def delete_adapter(self, name: str) -> None:
        if name in self.merge_state.adapters:
            self.unmerge()
        del self.adapters[name]
        self.strengths.pop(name, None)
        if name in self.active_adapters:
            self.active_adapters.remove(name)
        self.invalidate()

    def set_active(self, names) -> None:
        self.active_adapters = [n for n in names if n in self.adapters]
        self.invalidate()

    def set_strength(self, name: str, strength: float) -> None:
        if name in self.merge_state.adapters and float(strength) != self.strengths[name]:
            raise RuntimeError(
                f"adapter {name!r} is fused into the weights at strength {self.strengths[name]}; "
                "unfuse before changing its strength")
        self.strengths[name] = float(strength)
        self.invalidate()

    def set_weight_cache(self, enabled: bool, budget: CacheBudget | None = None) -> None:
        """Keep the effective weight between unfused inference calls (see ``cache``), within
        ``budget`` (shared by the layers given the same one; default: ``cache.DEFAULT_BUDGET``)."""
        self.invalidate()  # give the held bytes back to the old budget
        self.weight_cache.budget = (budget or cache.DEFAULT_BUDGET) if enabled else CacheBudget(max_bytes=0)

    def invalidate(self) -> None:
        """Forget what was derived from the adapters: call after changing them behind the
        layer's back (e.g. replacing their tensors)."""
        self._revision += 1
        self.weight_cache.invalidate()
        self._path_choice.forget()

    def _terms(self, names) -> list[Term]:
        return [Term(n, self.adapters[n], self.strengths[n]) for n in names]

    def _live_terms(self) -> list[Term]:
        merged = self.merge_state.adapters
        names = [n for n in self.active_adapters if n not in merged and self.strengths[n] != 0.0]
        if self.training:
            names = [n for n in names
                     if not (self.adapters[n].module_dropout > 0 and torch.rand(()) < self.adapters[n].module_dropout)]
        for name in names:
            if not self.adapters[name].is_materialized:
                raise RuntimeError(
                    f"adapter {name!r} was created with low_cpu_mem_usage=True and its tensors are still on the "
                    "meta device; load its weights (LoHaModel.load_adapter_weights) before running the model")
        return self._terms(names)

    def _enabled_terms(self) -> list[Term]:
        """The live terms; none while the adapters are switched off (fused ones are unfused)."""
        if self.adapters_enabled:
            return self._live_terms()
        if self.merge_state.adapters:
            self.unmerge()
        return []

    # -- forward -----------------------------------------------------------------------------
    def _stamp(self) -> tuple:
        weight = self.base_layer.weight
        return self._revision, cache.GENERATION.value, self.training, weight._version, weight.data_ptr()

    def forward(self, x, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self._traced_forward(x, *args, **kwargs)
        base = self.base_layer
        if not self.adapters_enabled:  # switched off: the cache is kept for when they are back on
            if self.merge_state.adapters:
                self.unmerge()
            return base(x, *args, **kwargs)
        grad = torch.is_grad_enabled()
        if not grad:  # the common inference call: one O(1) check, then one op
            entry = self.weight_cache.lookup(self._stamp())
            if entry is cache.RUN_BASE:
                return base(x, *args, **kwargs)
            if entry is not None and entry is not cache.PER_CALL:
                return run_base(base, x, *entry)
        terms = self._live_terms()
        stochastic = self.training and any(
            self.adapters[n].rank_dropout > 0 or self.adapters[n].module_dropout > 0 for n in self.active_adapters)
        adapters = [t.adapter for t in terms]
        needs_grad = grad and any(a.requires_grad for a in adapters)
        if not needs_grad and not stochastic:
            entry = self._cached_entry(terms)
            if entry is cache.RUN_BASE:
                return base(x, *args, **kwargs)
            if entry is not cache.PER_CALL:
                return run_base(base, x, *entry)
        if not terms:
            return base(x, *args, **kwargs)
        thin = self._path_choice.thin(base, x, terms, needs_grad)
        if paths.fused_route_applies(base, x, adapters):
            return paths.fused_forward(base, x, terms[0], thin, self.training)
        if thin:
            y = base(x, *args, **kwargs)
            return y + paths.thin_output(base, x, terms, self.training).to(y.dtype)
        return run_base(base, x, *paths.effective_params(base, terms, self.training))

    def _cached_entry(self, terms):
        """The cache's answer for ``terms`` now: built (within the budget) or remembered."""
        stamp, bias = self._stamp(), self.base_layer.bias
        watched = [t for term in terms for t in term.adapter.watched_tensors()] + ([] if bias is None else [bias])
        entry = self.weight_cache.lookup(stamp)
        if entry is not None:
            return entry
        if not terms:
            self.weight_cache.remember(stamp, watched, cache.RUN_BASE)
            return cache.RUN_BASE
        weight = self.base_layer.weight
        return self.weight_cache.build(stamp, watched, tuple(t.name for t in terms),
                                       weight.numel() * weight.element_size(), weight.device,
                                       lambda: self._build(terms))

    def _traced_forward(self, x, *args, **kwargs):
        """The forward ``torch.compile`` traces: no cache and no remembered path choice (state it
        would have to mutate); the strengths, active set and fuse state it reads are guarded, so
        changing them recompiles instead of running a stale graph."""
        base = self.base_layer
        terms = self._enabled_terms()
        if not terms:
            return base(x, *args, **kwargs)
        needs_grad = torch.is_grad_enabled() and any(t.adapter.requires_grad for t in terms)
        if paths.prefers_thin_path(base, x, [t.adapter for t in terms], needs_grad):
            y = base(x, *args, **kwargs)
            return y + paths.thin_output(base, x, terms, self.training).to(y.dtype)
        return run_base(base, x, *paths.effective_params(base, terms, self.training))

    @torch.no_grad()
    def _build(self, terms) -> tuple:
        """The effective (weight, bias) the cache holds: what fusing ``terms`` would write."""
        return checked_weight(self.base_layer.weight, terms, 1.0), paths.effective_bias(self.base_layer, terms)

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
                 if n in self.adapters and n not in self.merge_state.adapters]
        if not names:
            return
        previous = self.merge_state.snapshot()
        if previous.adapters and scale != previous.scale:
            raise ValueError(f"adapters {list(previous.adapters)} are fused at scale {previous.scale}; unfuse them "
                             f"before fusing {names} at scale {scale}, or fuse them all in one call")
        if previous.adapters:
            # IA3 and DoRA read the base weight's values: always merge onto the original.
            names = [*previous.adapters, *names]
            self.unmerge()
        try:
            self._merge_onto_original(names, scale, in_place=not exact_unmerge)
        except Exception:
            if previous.adapters:
                self._merge_onto_original(list(previous.adapters), scale, in_place=previous.in_place)
            raise

    def _merge_onto_original(self, names, scale: float, in_place: bool) -> None:
        terms = self._terms(names)
        # unfused inference may already hold exactly this weight: adopt it (no recompute, no new memory)
        cached = self.weight_cache.weight_for(self._stamp(), tuple(names)) if scale == 1.0 else None
        self.merge_state.fuse(self.base_layer, terms, scale, in_place, cached_weight=cached)
        self.invalidate()

    def unmerge(self) -> None:
        """Restore the base weights: bit-exactly from the original tensors or the backup copy, or,
        after an in-place merge, by subtracting the changes again (the adapter tensors must not
        have changed since)."""
        if not self.merge_state.adapters:
            return
        self.merge_state.unfuse(self.base_layer, self._terms(self.merge_state.adapters))
        self.invalidate()

    def drop_backup(self) -> None:
        """Make the current (fused) weights the new base: unmerge will no longer undo the fuse."""
        self.merge_state.clear()
        self.invalidate()

    def restore_merge(self, snapshot: MergeSnapshot) -> None:
        """Go back to what was fused when ``snapshot`` (``merge_state.snapshot()``) was taken."""
        self.unmerge()
        if snapshot.adapters:
            self.merge(list(snapshot.adapters), scale=snapshot.scale, exact_unmerge=not snapshot.in_place)

    def extra_repr(self) -> str:
        parts = [f"{n}: {a.algorithm.NAME} r={a.rank} alpha={None if a.alpha is None else float(a.alpha)} "
                 f"strength={self.strengths[n]:g}"
                 for n, a in self.adapters.items()]
        return "adapters={" + ", ".join(parts) + "}, active=" + str(self.active_adapters)
