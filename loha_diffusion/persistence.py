"""``LoHaModel.save_pretrained`` / ``from_pretrained``: one model's adapter as a PEFT folder.

The folder is what ``PeftModel.save_pretrained`` writes (peft 0.21, peft/peft_model.py):
``adapter_config.json`` and ``adapter_model.safetensors`` (``adapter_model.bin``, a pickle, with
``safe_serialization=False``), a non-default adapter in a subfolder named after it. Tensor names
and the config's numbers come from ``formats.peft``, the same code that writes pipeline folders;
this module adds what a single model's folder holds beyond them: the caller's own config fields
(targets, ``layers_to_transform``, ``modules_to_save``, dropouts) and the modules saved whole.

Reading is planned first (config, every key, every shape, against the model) and applied after,
so a folder that does not fit raises one error and leaves the model as it was.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .algorithms import get_algorithm
from .config import CONFIG_CLASSES, AdapterConfig
from .formats.in_memory import AdapterModule
from .formats.peft import algorithm_of, module_tensors, parse_adapter_key, peft_adapter
from .injection import adapter_layers, logical_modules
from .io import AdapterFileError, load_state_dict, read_json_object, save_state_dict
from .layers import SUPPORTED_LAYERS, AdapterLayer, AdapterWeights
from .naming.peft import PEFT_ALGORITHMS, PEFT_PREFIX
from .saved_modules import ModulesToSave, find_modules_to_save, saved_module_wrappers

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# Config fields copied between our configs and PEFT's under the same name.
_SHARED_FIELDS = ("r", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern", "layers_to_transform",
                  "layers_pattern", "modules_to_save")
_LYCORIS_FIELDS = ("rank_dropout", "module_dropout", "use_effective_conv2d")
_LOKR_FIELDS = ("decompose_both", "decompose_factor")
# PEFT LoRA options that change what the adapter computes and that we do not implement:
# field -> the value that means "off"
_UNSUPPORTED_LORA = {"use_dora": False, "bias": "none", "fan_in_fan_out": False, "target_parameters": None,
                     "trainable_token_indices": None, "layer_replication": None, "use_qalora": False}


def adapter_folder(directory, adapter_name: str) -> Path:
    """Where ``save_pretrained`` puts ``adapter_name``: the folder itself for "default", else a
    subfolder named after the adapter (PEFT's layout)."""
    return Path(directory) if adapter_name == "default" else Path(directory) / adapter_name


# -- writing ------------------------------------------------------------------------------------
def adapter_files(model: nn.Module, adapter_name: str, config: AdapterConfig) -> tuple[dict, dict]:
    """(tensors, adapter_config.json fields) of one adapter of ``model``, in PEFT's layout."""
    modules = [AdapterModule("", path, layer, layer.adapters[adapter_name])
               for path, layer in adapter_layers(model) if adapter_name in layer.adapters]
    tensors, peft_config, per_module = peft_adapter(modules)
    own = config.to_dict()
    if _targets_reproduce(model, config, set(per_module)):
        peft_config.update({k: own[k] for k in ("target_modules", "exclude_modules", "layers_to_transform",
                                                 "layers_pattern")})
    peft_config["modules_to_save"] = own["modules_to_save"]
    if _numbers_reproduce(config, per_module):
        peft_config.update({k: own[k] for k in ("r", "rank_pattern", "alpha_pattern")})
        peft_config[PEFT_ALGORITHMS[config.algorithm].alpha_field] = own["alpha"]
    if config.algorithm != "lora":
        peft_config.update(rank_dropout=config.rank_dropout, module_dropout=config.module_dropout)
    for path, saved in saved_module_wrappers(model):
        if adapter_name in saved.modules_to_save:
            for key, tensor in saved.modules_to_save[adapter_name].state_dict().items():
                tensors[f"{PEFT_PREFIX}{path}.{key}"] = tensor.detach().contiguous()
    return tensors, peft_config


def _targets_reproduce(model: nn.Module, config: AdapterConfig, paths: set[str]) -> bool:
    """Whether the config's own targets find exactly the modules that hold the adapter."""
    return {p for p, _ in logical_modules(model) if p and config.matches(p)} == paths


def _numbers_reproduce(config: AdapterConfig, per_module: dict[str, tuple[int, float]]) -> bool:
    """Whether the config's r / alpha / patterns give every module the (r, alpha) PEFT needs
    (not so for a LoKr with both halves full, whose scale is 1, or an adapter read with rsLoRA)."""
    return all(config.rank_for(p) == r and math.isclose(config.alpha_for(p), alpha, rel_tol=1e-6)
               for p, (r, alpha) in per_module.items())


def write_adapter_folder(folder: Path, tensors: dict, peft_config: dict, safe_serialization: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if safe_serialization:
        save_state_dict(tensors, folder / SAFETENSORS_NAME, metadata={"format": "pt"})
    else:
        warnings.warn(f"{folder / PICKLE_NAME} is a pickle (safe_serialization=False), as PEFT writes it; "
                      "LoHaModel.from_pretrained reads it only with allow_pickle=True", stacklevel=3)
        torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, folder / PICKLE_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True))


# -- reading ------------------------------------------------------------------------------------
def read_adapter_folder(directory, allow_pickle: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of a PEFT adapter folder."""
    folder = Path(directory)
    if not (folder / CONFIG_NAME).is_file():
        inside = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG_NAME}")) if folder.is_dir() else []
        hint = (f"; it holds the adapters {inside}: pass {folder}/<name>" if inside else
                "; a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors")
        raise AdapterFileError(f"{folder}: no {CONFIG_NAME}, so not a PEFT adapter folder{hint}")
    config = read_json_object(folder / CONFIG_NAME)
    if (folder / SAFETENSORS_NAME).is_file():
        weights = folder / SAFETENSORS_NAME
    elif (folder / PICKLE_NAME).is_file():
        if not allow_pickle:
            raise AdapterFileError(
                f"{folder} holds {PICKLE_NAME}, a pickle (what save_pretrained(safe_serialization=False) writes); "
                "pickles can run code when loaded, so pass allow_pickle=True if you trust the folder (it is then "
                "read with torch.load(weights_only=True)), or save it again with safe_serialization=True")
        weights = folder / PICKLE_NAME
    else:
        raise AdapterFileError(f"{folder}: no {SAFETENSORS_NAME} (or {PICKLE_NAME}) beside {CONFIG_NAME}")
    tensors, _ = load_state_dict(weights, allow_pickle=allow_pickle)
    return config, tensors


def config_from_peft(peft_config: dict, source: str) -> AdapterConfig:
    """Our config for a PEFT LoRA / LoHa / LoKr ``adapter_config.json``; options that change what
    the adapter computes and that we lack raise."""
    algorithm = algorithm_of(peft_config, source)
    if algorithm == "lora":
        unsupported = {k: peft_config[k] for k, off in _UNSUPPORTED_LORA.items()
                       if peft_config.get(k, off) not in (off, None, [], {})}
        if unsupported:
            raise AdapterFileError(f"{source}: LoRA options {unsupported} are not supported; only plain LoRA "
                                   "(optionally rsLoRA) loads")
    names = _SHARED_FIELDS + (() if algorithm == "lora" else _LYCORIS_FIELDS) + (
        _LOKR_FIELDS if algorithm == "lokr" else ())
    kwargs = {k: peft_config[k] for k in names if peft_config.get(k) is not None}
    alpha = peft_config.get(PEFT_ALGORITHMS[algorithm].alpha_field)
    if alpha is not None:
        kwargs["alpha"] = alpha
    if isinstance(kwargs.get("target_modules"), str):
        kwargs.pop("layers_to_transform", None)  # PEFT's LoHa / LoKr ignore them with a regex
        kwargs.pop("layers_pattern", None)
    try:
        return CONFIG_CLASSES[algorithm](**kwargs)
    except (TypeError, ValueError) as exc:
        raise AdapterFileError(f"{source}: {exc}") from None


@dataclass
class AdapterPlan:
    """What loading a folder will do to a model, every part of it already checked."""

    config: AdapterConfig
    adapters: dict[str, AdapterWeights]  # module path -> adapter
    saved: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # modules_to_save path -> state dict


def plan_adapter(model: nn.Module, peft_config: dict, tensors: dict[str, torch.Tensor], adapter_name: str,
                 source: str) -> AdapterPlan:
    config = config_from_peft(peft_config, source)
    algorithm = get_algorithm(config.algorithm)
    modules = dict(logical_modules(model))
    try:
        saved_paths = find_modules_to_save(modules.items(), config.modules_to_save)
    except ValueError as exc:
        raise AdapterFileError(f"{source}: {exc}") from None
    adapter_keys = {k: v for k, v in tensors.items() if parse_adapter_key(k) is not None}
    problems = []
    saved = {path: {} for path in saved_paths}
    for key, tensor in tensors.items():
        if key in adapter_keys:
            continue
        path = next((p for p in saved_paths if key.startswith(f"{PEFT_PREFIX}{p}.")), None)
        if path is None:
            problems.append(f"{key!r} is neither an adapter tensor nor part of a module in modules_to_save")
        else:
            saved[path][key.removeprefix(f"{PEFT_PREFIX}{path}.")] = tensor
    for path, state in saved.items():
        problems += _saved_module_problems(path, modules[path], state, adapter_name)
    by_path = module_tensors(adapter_keys, peft_config, source)
    targeted = {p for p in modules if p and config.matches(p)}
    missing, unexpected = sorted(targeted - set(by_path)), sorted(set(by_path) - targeted)
    if missing:
        problems.append(f"the config targets {missing[:5]}{' ...' if len(missing) > 5 else ''} but the folder holds "
                        "no tensors for them")
    if unexpected:
        problems.append(f"tensors for {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}, which the config does "
                        "not target or the model does not have")
    adapters = {}
    for path in sorted(targeted & set(by_path)):
        module_state = dict(by_path[path])
        alpha = float(module_state.pop("alpha"))
        problem = _module_problem(path, modules[path], algorithm, module_state, adapter_name)
        if problem:
            problems.append(problem)
            continue
        adapters[path] = AdapterWeights(config.algorithm, {k: v.float() for k, v in module_state.items()}, alpha,
                                        rank_dropout=config.rank_dropout, module_dropout=config.module_dropout)
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise AdapterFileError(f"{source} does not fit this {type(model).__name__}; nothing was changed:\n  - "
                               + "\n  - ".join(shown))
    return AdapterPlan(config, adapters, saved)


def _module_problem(path: str, module: nn.Module, algorithm, tensors: dict, adapter_name: str) -> str | None:
    if isinstance(module, AdapterLayer):
        if adapter_name in module.adapters:
            return f"{path} already has an adapter named {adapter_name!r}"
    elif not isinstance(module, SUPPORTED_LAYERS):
        return f"{path} is a {type(module).__name__}; adapters go on nn.Linear, nn.Conv1d and nn.Conv2d"
    missing = [t for t in algorithm.REQUIRED if t not in tensors]
    extra = [t for t in tensors if t not in (*algorithm.REQUIRED, *algorithm.OPTIONAL)]
    if missing or extra:
        return f"{path}: a {algorithm.NAME} module needs {list(algorithm.REQUIRED)}; missing {missing}, extra {extra}"
    error = algorithm.check_shapes(tensors, tuple(module.weight.shape))
    return None if error is None else f"{path} {tuple(module.weight.shape)}: {error}"


def _saved_module_problems(path: str, module: nn.Module, state: dict, adapter_name: str) -> list[str]:
    if isinstance(module, ModulesToSave):
        if adapter_name in module.modules_to_save:
            return [f"{path} already holds a copy for adapter {adapter_name!r}"]
        module = module.original_module
    if any(isinstance(m, AdapterLayer) for m in module.modules()):
        return [f"{path} (in modules_to_save) holds adapter layers; it cannot also be trained whole"]
    expected = {k: v.shape for k, v in module.state_dict().items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k}: expected {tuple(expected[k])}, found {tuple(v.shape)}" for k, v in state.items()
             if k in expected and v.shape != expected[k]]
    parts = [f"{label} {items[:5]}" for label, items in
             (("missing", missing), ("unexpected", extra), ("wrong shapes", wrong)) if items]
    return [f"{path} (in modules_to_save): {', '.join(parts)}"] if parts else []
