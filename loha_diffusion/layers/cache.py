"""Unfused inference's effective weights: built once, kept until what they were built from
changes, and only as many as a memory budget allows.

Whether a layer's entry is still valid is decided in O(1) per call: the layer's own revision
(bumped by every change to its adapters, strengths, active set, fuse state, device or dtype),
a process-wide generation (bumped by every optimizer step and every adapter parameter that is
registered or reloaded), the base weight's version counter and storage, and the version
counters of the few tensors the entry was built from (in-place edits bump them). The
generation is needed because fused optimizers (``torch.optim.AdamW(fused=True)``) update
parameters without bumping their version counters: training steps between two evaluations
must not leave a stale weight behind.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch.nn.modules.module import register_module_parameter_registration_hook
from torch.optim.optimizer import register_optimizer_step_post_hook


class _Generation:
    value = 0

    @classmethod
    def bump(cls, *_args, **_kwargs) -> None:
        cls.value += 1


GENERATION = _Generation
register_optimizer_step_post_hook(GENERATION.bump)
register_module_parameter_registration_hook(GENERATION.bump)

# What ``WeightCache.lookup`` answers besides a (weight, bias) pair.
RUN_BASE = "run the base layer alone"          # no adapter changes this layer now
PER_CALL = "apply the adapters per call"       # over the budget, or the cache is off

# A budget (without ``max_bytes``) keeps this fraction of the device's memory free.
LEAVE_FREE = 0.2


def _free_and_total(device: torch.device) -> tuple[int, int] | None:
    """Bytes free for new tensors on ``device`` and its total, or None where unknown."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # memory the caching allocator holds but no tensor uses is free for us too
        slack = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + slack, total
    if device.type == "cpu":
        with contextlib.suppress(OSError, ValueError, KeyError):
            with open("/proc/meminfo") as f:
                fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
            return fields["MemAvailable"], fields["MemTotal"]
    return None


class CacheBudget:
    """How many bytes of effective weights the layers sharing this budget may keep.

    ``max_bytes`` caps them; without it an entry is built only while at least ``leave_free``
    of the device's memory stays free (CUDA: free memory plus the allocator's unused
    reserve; CPU: the kernel's MemAvailable), checked when each entry is built. Layers past
    the budget apply their adapters per call (the thin path), with no copy. ``max_bytes=0``
    turns the cache off.
    """

    def __init__(self, max_bytes: int | None = None, leave_free: float = LEAVE_FREE):
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                      or max_bytes < 0):
            raise ValueError(f"max_bytes must be a whole number of bytes >= 0 or None, got {max_bytes!r}")
        if not 0.0 <= leave_free < 1.0:
            raise ValueError(f"leave_free must be a fraction in [0, 1), got {leave_free!r}")
        self.max_bytes = max_bytes
        self.leave_free = leave_free
        self.used = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes != 0

    def admits(self, nbytes: int, device: torch.device) -> bool:
        if self.max_bytes is not None:
            return self.used + nbytes <= self.max_bytes
        memory = _free_and_total(device)
        return memory is None or memory[0] - nbytes >= self.leave_free * memory[1]


DEFAULT_BUDGET = CacheBudget()


class WeightCache:
    """One layer's effective (weight, bias) for unfused inference, or what to do instead, with
    the stamp and tensor versions it is valid for (module doc)."""

    def __init__(self, budget: CacheBudget = DEFAULT_BUDGET):
        self.budget = budget
        self._stamp = None
        self._watched: tuple[torch.Tensor, ...] = ()
        self._versions = 0
        self._entry = None
        self._names: tuple[str, ...] = ()
        self._bytes = 0

    @property
    def enabled(self) -> bool:
        return self.budget.enabled

    @property
    def params(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The (weight, bias) held now, or None."""
        return self._entry if isinstance(self._entry, tuple) else None

    def lookup(self, stamp):
        """The held (weight, bias), RUN_BASE or PER_CALL if valid for ``stamp``, else None."""
        if stamp != self._stamp:
            return None
        # version counters only grow, so an unchanged sum means that none of them moved
        if sum(t._version for t in self._watched) != self._versions:
            return None
        return self._entry

    def remember(self, stamp, watched: Sequence[torch.Tensor], entry, names: tuple[str, ...] = ()) -> None:
        self.invalidate()
        self._stamp, self._watched, self._entry, self._names = stamp, tuple(watched), entry, names
        self._versions = sum(t._version for t in self._watched)

    def build(self, stamp, watched: Sequence[torch.Tensor], names: tuple[str, ...], nbytes: int,
              device: torch.device, build: Callable[[], tuple]):
        """Build and hold the (weight, bias) of ``names`` if the budget admits ``nbytes`` more;
        return it, or PER_CALL (remembered for ``stamp`` too)."""
        self.invalidate()  # free the stale copy before building the new one
        entry = PER_CALL
        if self.budget.admits(nbytes, device):
            try:
                entry = build()
            except torch.OutOfMemoryError:
                pass  # the budget guessed wrong: this layer goes without, as if over it
        self.remember(stamp, watched, entry, names)
        if entry is not PER_CALL:
            self._bytes = nbytes
            self.budget.used += nbytes
        return entry

    def weight_for(self, stamp, names: tuple[str, ...]) -> torch.Tensor | None:
        """The held weight if it is valid for ``stamp`` and was built for exactly ``names``."""
        entry = self.lookup(stamp)
        return entry[0] if isinstance(entry, tuple) and names == self._names else None

    def invalidate(self) -> None:
        self.budget.used -= self._bytes
        self._bytes = 0
        self._stamp = None
        self._watched = ()
        self._entry = None
