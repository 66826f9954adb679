"""The PEFT-style ``LoHaModel`` wrapper: adapters on one model, their management and persistence."""
from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from .config import AdapterConfig
from .injection import (
    ModelWrapper,
    adapter_layers,
    adapters_disabled,
    inject_adapter,
    logical_modules,
    place_adapters,
    remove_adapters,
    unwrap,
)
from .layers import AdapterLayer
from .persistence import (
    AdapterPlan,
    adapter_files,
    adapter_folder,
    plan_adapter,
    read_adapter_folder,
    write_adapter_folder,
)
from .saved_modules import ModulesToSave, find_modules_to_save, saved_module_wrappers

# the injection helpers, importable from here as before
__all__ = ["LoHaModel", "adapter_layers", "adapters_disabled", "inject_adapter", "logical_modules", "remove_adapters",
           "unwrap"]


class LoHaModel(ModelWrapper):
    """PEFT-style wrapper: ``LoHaModel(model, config, adapter_name)``.

    The wrapped model keeps working wherever it was used (``config``, ``dtype``, ``device``,
    submodules and calls are forwarded), so a pipeline component can be replaced by it; the
    wrapper's own methods and ``peft_config`` / ``active_adapter(s)`` are never the model's.
    Only adapter tensors (and copies of ``modules_to_save``) are trainable; the base model is
    frozen. ``config=None`` gives a wrapper without adapters, for ``load_adapter``.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig | None = None, adapter_name: str = "default",
                 low_cpu_mem_usage: bool = False):
        super().__init__(model)
        self.peft_config: dict[str, AdapterConfig] = {}
        self.active_adapter: str | list[str] = adapter_name
        trainable = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(False)
        if config is not None:
            try:
                self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)
            except Exception:  # a config that does not fit leaves the model as it was
                for param, flag in zip(model.parameters(), trainable):
                    param.requires_grad_(flag)
                raise

    def get_base_model(self) -> nn.Module:
        return self.model

    # -- adapters ------------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if isinstance(self.active_adapter, str) else list(self.active_adapter)

    def _check_names(self, names) -> list[str]:
        names = [names] if isinstance(names, str) else list(names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter name(s) {unknown}; this model has {sorted(self.peft_config)}")
        return names

    def _check_new_name(self, adapter_name: str) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter() it or pick another name")

    def add_adapter(self, adapter_name: str, config: AdapterConfig, low_cpu_mem_usage: bool = False) -> None:
        self._check_new_name(adapter_name)
        if low_cpu_mem_usage and not config.low_cpu_mem_usage:
            config = dataclasses.replace(config, low_cpu_mem_usage=True)
        saved = find_modules_to_save(logical_modules(self.model), config.modules_to_save)
        for path in saved:
            module = self.model.get_submodule(path)
            if isinstance(module, AdapterLayer) or any(isinstance(m, AdapterLayer) for m in module.modules()):
                raise ValueError(f"modules_to_save names {path!r}, which holds adapter layers of another adapter; "
                                 "a module cannot be both adapted and trained whole")
        inject_adapter(self.model, config, adapter_name)
        self._register(adapter_name, config, {path: None for path in saved}, trainable=True)

    def _register(self, adapter_name: str, config: AdapterConfig, saved: dict, trainable: bool) -> None:
        """Copy the ``saved`` modules for the adapter (loading a state dict where one is given)
        and record its config. A new adapter does not change which adapters run, as in PEFT;
        set_adapter() does."""
        for path, state in saved.items():
            wrapper = self.model.get_submodule(path)
            if not isinstance(wrapper, ModulesToSave):
                wrapper = ModulesToSave(wrapper)
                self.model.set_submodule(path, wrapper)
            copy = wrapper.add_copy(adapter_name, trainable)
            if state is not None:
                copy.load_state_dict(state)
        self.peft_config[adapter_name] = config
        self._activate(self.active_adapters)

    def _activate(self, names: list[str]) -> None:
        for _, layer in adapter_layers(self.model):
            layer.set_active(names)
        for _, wrapper in saved_module_wrappers(self.model):
            wrapper.set_active(names)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        names = self._check_names(adapter_name)
        for path, wrapper in saved_module_wrappers(self.model):
            if len(wrapper.active_names(names)) > 1:
                raise ValueError(f"adapters {wrapper.active_names(names)} each train their own copy of {path!r} "
                                 "(modules_to_save); only one of them can be active at a time")
        self._activate(names)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_names(adapter_name)
        for path, layer in list(adapter_layers(self.model)):
            if adapter_name in layer.adapters:
                layer.delete_adapter(adapter_name)
            if not layer.adapters:
                layer.unmerge()
                self.model.set_submodule(path, layer.base_layer)
        for path, wrapper in list(saved_module_wrappers(self.model)):
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]
            if not len(wrapper.modules_to_save):
                self.model.set_submodule(path, wrapper.original_module)
        del self.peft_config[adapter_name]
        remaining = [n for n in self.active_adapters if n != adapter_name]
        self.active_adapter = remaining[0] if len(remaining) == 1 else remaining
        self._activate(self.active_adapters)

    def disable_adapter(self):
        """Context manager: run the base model inside the block."""
        return adapters_disabled(self.model)

    def merge_adapter(self, adapter_names=None) -> None:
        names = self.active_adapters if adapter_names is None else self._check_names(adapter_names)
        for _, layer in adapter_layers(self.model):
            layer.merge(names)

    def unmerge_adapter(self) -> None:
        for _, layer in adapter_layers(self.model):
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        return remove_adapters(self.model, merge=True)

    def unload(self) -> nn.Module:
        return remove_adapters(self.model, merge=False)

    def load_adapter_weights(self, state_dict: dict[str, torch.Tensor], adapter_name: str | None = None) -> None:
        """Copy (or, for meta tensors, assign) adapter tensors keyed ``<module path>.<tensor name>``.

        PEFT-style keys (``base_model.model.`` prefix) are accepted. Every key and shape is
        checked before any tensor changes.
        """
        adapter_name = adapter_name or self.active_adapters[0]
        self._check_names(adapter_name)
        state_dict = {k.removeprefix("base_model.model."): v for k, v in state_dict.items()}
        expected, alphas = {}, {}
        for path, layer in adapter_layers(self.model):
            if adapter_name in layer.adapters:
                adapter = layer.adapters[adapter_name]
                alphas[f"{path}.alpha"] = adapter
                for name, param in adapter.params.items():
                    expected[f"{path}.{name}"] = (adapter, name, param)
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(k for k in state_dict if k not in expected and k not in alphas)
        wrong = [f"{k}: expected {tuple(expected[k][2].shape)}, found {tuple(v.shape)}"
                 for k, v in state_dict.items() if k in expected and v.shape != expected[k][2].shape]
        if missing or unexpected or wrong:
            raise ValueError(f"state dict does not fit adapter {adapter_name!r}: missing {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}, "
                             f"wrong shapes {wrong[:5]}; nothing was loaded")
        for key, (adapter, name, param) in expected.items():
            owner, _, leaf = name.rpartition(".")
            holder = adapter.get_submodule(owner) if owner else adapter
            device = adapter.alpha.device if param.is_meta else param.device
            value = state_dict[key].to(device=device, dtype=torch.float32 if param.is_meta else param.dtype)
            if param.is_meta:
                holder.register_parameter(leaf, nn.Parameter(value, requires_grad=param.requires_grad))
            else:
                with torch.no_grad():
                    param.copy_(value)
        for key, adapter in alphas.items():
            if key in state_dict:
                adapter.alpha = torch.tensor(float(state_dict[key]))
                adapter.refresh_scale()
        for _, layer in adapter_layers(self.model):
            if adapter_name in layer.adapters:
                layer.adapters[adapter_name].to(layer.base_layer.weight.device)
                layer.invalidate()

    # -- persistence (PEFT's folder layout) ------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None,
                        safe_serialization: bool = True) -> None:
        """Write each adapter (all by default) as ``PeftModel.save_pretrained`` does: the "default"
        adapter into ``save_directory``, any other into ``save_directory/<name>``.

        ``safe_serialization=False`` writes ``adapter_model.bin``, a pickle, as PEFT does, and
        warns: ``from_pretrained`` / ``load_adapter`` read it only with ``allow_pickle=True``.
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; pass a folder (created if missing)")
        names = list(self.peft_config) if selected_adapters is None else self._check_names(selected_adapters)
        # everything is computed before the first file is written
        contents = [(name, *adapter_files(self.model, name, self.peft_config[name])) for name in names]
        for name, tensors, config in contents:
            write_adapter_folder(adapter_folder(save_directory, name), tensors, config, safe_serialization)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, allow_pickle: bool = False) -> LoHaModel:
        """``model`` with the adapter of a PEFT LoRA / LoHa / LoKr folder (PEFT's or ours) on it,
        active; frozen and in eval mode unless ``is_trainable``. Raises before touching ``model``
        when the folder does not fit it."""
        if isinstance(model, ModelWrapper):
            raise TypeError("from_pretrained takes the base model; to add an adapter to a LoHaModel, call its "
                            "load_adapter(folder, adapter_name)")
        plan = _plan(model, model_id, adapter_name, allow_pickle)
        wrapper = cls(model, adapter_name=adapter_name)  # the adapter is active from the start
        wrapper._apply(plan, adapter_name, is_trainable)
        return wrapper

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     allow_pickle: bool = False) -> None:
        """Add the adapter of a PEFT folder under ``adapter_name``, not active (``set_adapter``
        activates it), as ``PeftModel.load_adapter`` does."""
        self._check_new_name(adapter_name)
        self._apply(_plan(self.model, model_id, adapter_name, allow_pickle), adapter_name, is_trainable)

    def _apply(self, plan: AdapterPlan, adapter_name: str, trainable: bool) -> None:
        for adapter in plan.adapters.values():
            adapter.requires_grad_(trainable)
        place_adapters(self.model, adapter_name, plan.adapters)
        self._register(adapter_name, plan.config, plan.saved, trainable)
        if not trainable:
            self.eval()

    # -- parameters ------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")


def _plan(model: nn.Module, model_id, adapter_name: str, allow_pickle: bool) -> AdapterPlan:
    config, tensors = read_adapter_folder(model_id, allow_pickle=allow_pickle)
    return plan_adapter(model, config, tensors, adapter_name, str(model_id))
