"""``modules_to_save``: modules trained and saved whole, one full copy per adapter (PEFT's meaning).

The wrapper has PEFT's attribute names (``original_module``, ``modules_to_save.<adapter>``), so
a model's state dict reads as a PEFT model's does, and a saved folder names each copy's tensors
``<module path>.<tensor>`` as ``get_peft_model_state_dict`` does (peft/utils/other.py,
``ModulesToSaveWrapper`` in peft 0.21).
"""
from __future__ import annotations

import copy

from torch import nn


class ModulesToSave(nn.Module):
    """Runs the active adapter's copy of a module, or the original when none is active or
    adapters are disabled. At most one adapter's copy can be active (a module has one output)."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.adapters_enabled = True

    def add_copy(self, adapter_name: str, trainable: bool) -> nn.Module:
        """A fresh copy of the original module for ``adapter_name``."""
        module = copy.deepcopy(self.original_module)
        module.requires_grad_(trainable)
        self.modules_to_save[adapter_name] = module
        return module

    def active_names(self, names: list[str]) -> list[str]:
        return [n for n in names if n in self.modules_to_save]

    def set_active(self, names: list[str]) -> None:
        found = self.active_names(names)
        if len(found) > 1:
            raise ValueError(f"adapters {found} each train their own copy of the same module; only one of them can "
                             "be active at a time")
        self.active_adapter = found[0] if found else None

    @property
    def running_module(self) -> nn.Module:
        if self.adapters_enabled and self.active_adapter is not None:
            return self.modules_to_save[self.active_adapter]
        return self.original_module

    def forward(self, *args, **kwargs):
        return self.running_module(*args, **kwargs)

    def __getattr__(self, name):
        # code that reads ``module.weight`` (or ``num_embeddings``...) keeps working
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.running_module, name)


def find_modules_to_save(named_modules, names: list[str] | None) -> list[str]:
    """Paths, among ``named_modules`` ((path, module) pairs), of the modules ``names`` designate:
    every path ending with one of the names (PEFT's plain suffix test), outermost only. Raises
    when a name finds nothing."""
    if not names:
        return []
    paths, found = [], set()
    for path, _ in named_modules:
        if not path or any(path.startswith(p + ".") for p in paths):
            continue
        hits = [name for name in names if path.endswith(name)]
        if hits:
            paths.append(path)
            found.update(hits)
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"modules_to_save {missing} name no module of the model; give the end of a module path, "
                         "e.g. 'token_embedding' or 'conv_in'")
    return paths


def saved_module_wrappers(model: nn.Module):
    """(path, ModulesToSave) pairs of ``model``."""
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield path, module
