"""Putting adapters into a model (inject / remove) and the PEFT-style ``LoHaModel`` wrapper."""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch
from torch import nn

from .algorithms import get_algorithm
from .config import AdapterConfig
from .layers import SUPPORTED_LAYERS, AdapterLayer, AdapterWeights


def adapter_layers(model: nn.Module):
    """(path, AdapterLayer) pairs, paths as they were before injection."""
    for path, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield path, module


def logical_modules(model: nn.Module):
    """(path, module) for every module, with an AdapterLayer standing for the layer it wraps."""
    skip = None
    for path, module in model.named_modules():
        if skip is not None and path.startswith(skip):
            continue
        skip = path + "." if isinstance(module, AdapterLayer) else None
        yield path, module


def _describe_targets(model: nn.Module) -> str:
    names = sorted({path.rsplit(".", 1)[-1] for path, m in logical_modules(model)
                    if path and isinstance(m, (AdapterLayer, *SUPPORTED_LAYERS))})
    shown = ", ".join(names[:40]) + (", ..." if len(names) > 40 else "")
    return f"Linear/Conv layer names in {type(model).__name__}: {shown}"


def inject_adapter(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> list[str]:
    """Create adapter ``adapter_name`` on every layer ``config`` targets; return their paths.

    All checks run before the first module is replaced, so an error leaves ``model`` unchanged.
    """
    algorithm = get_algorithm(config.algorithm)
    targets = []
    for path, module in logical_modules(model):
        if not path or not config.matches(path):
            continue
        if isinstance(module, AdapterLayer):
            if adapter_name in module.adapters:
                raise ValueError(f"adapter {adapter_name!r} already exists on {path}; use another name "
                                 "or delete it first")
        elif not isinstance(module, SUPPORTED_LAYERS):
            raise TypeError(
                f"target_modules matched {path!r}, a {type(module).__name__}; only nn.Linear, nn.Conv1d and "
                "nn.Conv2d can take an adapter. Name the layers inside it instead (e.g. 'to_out.0' rather "
                "than 'to_out').")
        targets.append((path, module))
    if not targets:
        raise ValueError(f"target_modules={config.target_modules!r} matched no module "
                         f"(exclude_modules={config.exclude_modules!r}). {_describe_targets(model)}")

    for path, module in targets:
        layer = module if isinstance(module, AdapterLayer) else AdapterLayer(module)
        weight = layer.base_layer.weight
        rank = config.rank_for(path)
        options = {"decompose_both": config.decompose_both, "factor": config.decompose_factor} \
            if config.algorithm == "lokr" else {}
        if config.low_cpu_mem_usage:
            with torch.device("meta"):
                tensors = algorithm.init_params(weight.shape, rank, config.use_effective_conv2d, config.init_scheme,
                                                **options)
        else:
            tensors = algorithm.init_params(weight.shape, rank, config.use_effective_conv2d, config.init_scheme,
                                            **options)
            tensors = {k: v.to(weight.device) for k, v in tensors.items()}
        adapter = AdapterWeights(config.algorithm, tensors, config.alpha_for(path),
                                 rank_dropout=config.rank_dropout, module_dropout=config.module_dropout)
        layer.add_adapter(adapter_name, adapter)
        if layer is not module:
            model.set_submodule(path, layer)
    for _, layer in adapter_layers(model):
        layer.base_layer.requires_grad_(False)
    return [path for path, _ in targets]


def remove_adapters(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put every original layer object back; with ``merge`` the fused weights are kept."""
    for path, layer in list(adapter_layers(model)):
        if merge:
            layer.merge(exact_unmerge=False)  # in place: no copy of the weight that is dropped anyway
            layer.drop_backup()
        else:
            layer.unmerge()
        model.set_submodule(path, layer.base_layer)
    return model


@contextmanager
def adapters_disabled(*models: nn.Module):
    """Run ``models`` without their adapters inside the block (fused adapters are unfused)."""
    layers = [layer for model in models for _, layer in adapter_layers(model)]
    previous = [layer.adapters_enabled for layer in layers]
    for layer in layers:
        layer.adapters_enabled = False
    try:
        yield
    finally:
        for layer, state in zip(layers, previous):
            layer.adapters_enabled = state


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a ``LoHaModel`` (or the module itself)."""
    return module.model if isinstance(module, LoHaModel) else module


class LoHaModel(nn.Module):
    """PEFT-style wrapper: ``LoHaModel(model, config, adapter_name)``.

    The wrapped model keeps working wherever it was used (``config``, ``dtype``, ``device``,
    submodules and calls are forwarded), so a pipeline component can be replaced by it.
    Only adapter tensors are trainable; the base model is frozen.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default",
                 low_cpu_mem_usage: bool = False):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, AdapterConfig] = {}
        self.active_adapter: str | list[str] = adapter_name
        model.requires_grad_(False)
        self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

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

    def add_adapter(self, adapter_name: str, config: AdapterConfig, low_cpu_mem_usage: bool = False) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter() it or pick another name")
        if low_cpu_mem_usage and not config.low_cpu_mem_usage:
            config = dataclasses.replace(config, low_cpu_mem_usage=True)
        inject_adapter(self.model, config, adapter_name)
        self.peft_config[adapter_name] = config
        # A new adapter does not change which adapters run, as in PEFT; set_adapter() does.
        for _, layer in adapter_layers(self.model):
            layer.set_active(self.active_adapters)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        names = self._check_names(adapter_name)
        for _, layer in adapter_layers(self.model):
            layer.set_active(names)
        self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_names(adapter_name)
        for path, layer in list(adapter_layers(self.model)):
            if adapter_name in layer.adapters:
                layer.delete_adapter(adapter_name)
            if not layer.adapters:
                layer.unmerge()
                self.model.set_submodule(path, layer.base_layer)
        del self.peft_config[adapter_name]
        remaining = [n for n in self.active_adapters if n != adapter_name]
        self.active_adapter = remaining[0] if len(remaining) == 1 else remaining

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

    # -- parameters ------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")
