"""Putting adapters into a model and taking them out again, all checks before the first change."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .algorithms import get_algorithm
from .config import AdapterConfig
from .layers import SUPPORTED_LAYERS, AdapterLayer, AdapterWeights
from .saved_modules import ModulesToSave, saved_module_wrappers


def adapter_layers(model: nn.Module):
    """(path, AdapterLayer) pairs, paths as they were before injection."""
    for path, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield path, module


def logical_modules(model: nn.Module):
    """(path, module) for every module, with an AdapterLayer standing for the layer it wraps and a
    ModulesToSave for the module it copies (nothing inside them is listed)."""
    skip = None
    for path, module in model.named_modules():
        if skip is not None and path.startswith(skip):
            continue
        skip = path + "." if isinstance(module, (AdapterLayer, ModulesToSave)) else None
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

    adapters = {}
    for path, module in targets:
        weight = module.weight
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
        adapters[path] = AdapterWeights(config.algorithm, tensors, config.alpha_for(path),
                                        rank_dropout=config.rank_dropout, module_dropout=config.module_dropout)
    place_adapters(model, adapter_name, adapters)
    return [path for path, _ in targets]


def place_adapters(model: nn.Module, adapter_name: str, adapters: dict[str, AdapterWeights]) -> None:
    """Put each adapter on the layer at its path (checked beforehand: a supported layer, or an
    AdapterLayer without ``adapter_name``), wrapping plain layers; base layers stay frozen."""
    for path, adapter in adapters.items():
        module = model.get_submodule(path)
        layer = module if isinstance(module, AdapterLayer) else AdapterLayer(module)
        layer.add_adapter(adapter_name, adapter)
        if layer is not module:
            model.set_submodule(path, layer)
    for _, layer in adapter_layers(model):
        layer.base_layer.requires_grad_(False)


def remove_adapters(model: nn.Module, merge: bool = False) -> nn.Module:
    """Put every original layer object back; with ``merge`` the fused weights are kept. A module
    trained whole (``modules_to_save``) is replaced by the active adapter's copy, as PEFT does."""
    for path, saved in list(saved_module_wrappers(model)):
        model.set_submodule(path, saved.running_module)
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
    """Run ``models`` without their adapters inside the block (fused adapters are unfused; modules
    trained whole run their original)."""
    layers = [module for model in models for module in model.modules()
              if isinstance(module, (AdapterLayer, ModulesToSave))]
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
    return module.model if isinstance(module, ModelWrapper) else module


class ModelWrapper(nn.Module):
    """A module that stands in for the model it wraps: attributes it lacks and calls go to the
    model, so a pipeline component can be replaced by the wrapper. ``LoHaModel`` is one."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)
