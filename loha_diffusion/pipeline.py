"""Pipeline methods: load / set / fuse / unfuse / disable / enable / unload / save adapters.

``import loha_diffusion`` attaches these functions to ``diffusers.DiffusionPipeline`` as
methods (``pipe.load_loha_weights(...)``); each is also usable as ``fn(pipe, ...)``.
All state lives in the adapter layers themselves, so several pipelines sharing a UNet see
the same adapters, as with diffusers' own LoRA loader.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from .attach import attach, plan
from .block_weights import UnetBlocks, describe, layer_strength, resolve
from .dit_blocks import DitBlocks
from .formats.kohya import save_kohya
from .formats.peft import write_peft_folder
from .key_table import KeyTable
from .layers import AdapterLayer
from .layers.cache import CacheBudget
from .model import unwrap
from .naming.keys import COMPONENTS, DENOISERS, TRANSFORMER, UNET
from .sources import locate, read_for_table


def _components(pipe) -> dict[str, torch.nn.Module]:
    found = {name: getattr(pipe, name, None) for name in COMPONENTS}
    found = {name: module for name, module in found.items() if module is not None}
    if not any(name in found for name in DENOISERS):
        raise TypeError(f"{type(pipe).__name__} has neither a `unet` nor a `transformer`; adapters load onto "
                        "Stable Diffusion (UNet), Flux and SD3 (transformer) pipelines")
    return found


def _blocks(pipe) -> tuple[UnetBlocks | None, DitBlocks | None]:
    """The UNet's or the transformer's block structure, for per-block strengths."""
    components = _components(pipe)
    unet, transformer = components.get(UNET), components.get(TRANSFORMER)
    return (None if unet is None else UnetBlocks.of(_model(unet)),
            None if transformer is None else DitBlocks.of(_model(transformer)))


def _model(module: torch.nn.Module) -> torch.nn.Module:
    """The model itself, inside a LoHaModel and/or ``torch.compile``'s wrapper."""
    return unwrap(getattr(module, "_orig_mod", module))


def _layers(pipe, component: str | None = None):
    for name, module in _components(pipe).items():
        if component is None or name == component:
            for path, layer in _model(module).named_modules():
                if isinstance(layer, AdapterLayer):
                    yield name, path, layer


def _unique_name(pipe, wanted: str | None, source) -> str:
    existing = set(get_loha_adapters(pipe, flat=True))
    if wanted is not None:
        if wanted in existing:
            raise ValueError(f"an adapter named {wanted!r} is already loaded; unload it or pick another adapter_name")
        return wanted
    stem = Path(os.fspath(source)).stem if not isinstance(source, Mapping) else "default"
    name, n = stem, 0
    while name in existing:
        n += 1
        name = f"{stem}_{n}"
    return name


def load_loha_weights(pipe, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None,
                      weight_name: str | None = None, *, component: str | None = None, allow_pickle: bool = False,
                      allow_unknown_keys: bool = False, dora_semantics: str = "lycoris",
                      legacy_tucker: bool = False, **hub_kwargs) -> str:
    """Load an adapter onto the pipeline; return its name.

    Reads Kohya / LyCORIS files (any algorithm), diffusers' own LoRA files
    (``pytorch_lora_weights.safetensors``), PEFT adapter folders (a pipeline folder with
    ``unet/``, ``text_encoder/``... or one component's folder, applied to the component its
    module paths fit or to ``component``) and state dicts of these layouts.
    ``dora_semantics`` picks how a strength other than 1 acts on DoRA modules: "lycoris"
    (strength scales the magnitude change) or "comfyui" (= A1111: strength interpolates the
    whole weight). ``legacy_tucker`` reproduces LyCORIS <= 1.9 Tucker LoHa files, which were
    trained with ``hada_t1`` in both halves. Nothing is changed if anything does not fit.
    """
    source = pretrained_model_name_or_path_or_dict
    located = locate(source, weight_name, hub_kwargs)
    table = KeyTable.from_pipeline(pipe)
    adapter = read_for_table(located, table, component, allow_pickle, allow_unknown_keys)
    placements = plan(adapter.modules, table, adapter.source, adapter.metadata, dora_semantics=dora_semantics,
                      legacy_tucker=legacy_tucker)
    # a local folder is named after the file found in it; a hub repository after the repository
    local = isinstance(located, Mapping) or Path(os.fspath(source)).exists()
    name = _unique_name(pipe, adapter_name, located if local else source)
    budgets = list({id(layer.weight_cache.budget): layer.weight_cache.budget for _, _, layer in _layers(pipe)}.values())
    attach(placements, table, name)
    for _, _, layer in _layers(pipe) if len(budgets) == 1 else ():  # new layers join the shared budget
        if layer.weight_cache.budget is not budgets[0]:
            layer.set_weight_cache(True, budgets[0])
    return name


def get_loha_adapters(pipe, flat: bool = False, weights: bool = False):
    """{component: [adapter names]} (or one sorted list with ``flat=True``); ``weights=True``: the
    active adapters' strengths, {adapter: {component: strength}} in ``set_loha_adapters``' forms
    (``set_loha_adapters(list(w), list(w.values()))`` sets them again)."""
    if weights:
        return _active_weights(pipe)
    by_component: dict[str, list[str]] = {}
    for component, _, layer in _layers(pipe):
        names = by_component.setdefault(component, [])
        names.extend(n for n in layer.adapters if n not in names)
    if flat:
        return sorted({n for names in by_component.values() for n in names})
    return by_component


def _active_weights(pipe) -> dict[str, dict]:
    per_layer: dict[str, dict[str, dict[str, float]]] = {}
    for component, path, layer in _layers(pipe):
        for name in layer.active_adapters if layer.adapters_enabled else ():
            per_layer.setdefault(name, {}).setdefault(component, {})[path] = layer.strengths[name]
    return describe(per_layer, *_blocks(pipe))


def _check_known(pipe, names) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    known = get_loha_adapters(pipe, flat=True)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown adapter name(s) {unknown}; loaded: {known}")
    return names


def _per_name(values, names, what: str) -> list:
    if values is None or not isinstance(values, (list, tuple)):
        return [values] * len(names)
    if len(values) != len(names):
        raise ValueError(f"{what} has {len(values)} values for {len(names)} adapters {names}")
    return list(values)


def set_loha_adapters(pipe, adapter_names, weights=None, text_encoder_weights=None) -> None:
    """Make ``adapter_names`` the active adapters (the others inactive), with their strengths.

    ``weights``: one or one per adapter, in diffusers' ``set_adapters`` forms: a number, or
    ``{"unet": ..., "text_encoder": ...}`` where the UNet's entry may be per block, e.g.
    ``{"down": 0.5, "up": {"block_1": [1.0, 0.0, 1.0]}}`` (``block_weights``), and a Flux / SD3
    transformer's per block list, e.g. ``{"single_transformer_blocks": [1.0, 0.5], "rest": 0.8}``
    (``dit_blocks``); what is not named keeps 1.0. ``text_encoder_weights`` sets the text
    encoders' strength apart (ComfyUI's strength_model / strength_clip). Nothing is changed on an
    error.
    """
    names = _check_known(pipe, adapter_names)
    components = list(_components(pipe))
    blocks, dit_blocks = _blocks(pipe)
    te_weights = _per_name(text_encoder_weights, names, "text_encoder_weights")
    resolved = {name: resolve(weight, components, blocks, None if te is None else float(te), dit_blocks)
                for name, weight, te in zip(names, _per_name(weights, names, "weights"), te_weights)}
    changes = []
    for component, path, layer in _layers(pipe):
        strengths = {n: layer_strength(resolved[n][component], path) for n in names if n in layer.adapters}
        for name, strength in strengths.items():
            if name in layer.merged_adapters and strength != layer.strengths[name]:
                raise RuntimeError(f"adapter {name!r} is fused into {component}.{path} at strength "
                                   f"{layer.strengths[name]}; unfuse_loha() before changing its strength to "
                                   f"{strength}. Nothing was changed.")
        changes.append((layer, strengths))
    for layer, strengths in changes:
        for name, strength in strengths.items():
            layer.set_strength(name, strength)
        layer.set_active(names)


def fuse_loha(pipe, adapter_names=None, scale: float = 1.0, components=COMPONENTS,
              exact_unfuse: bool = True) -> None:
    """Add the active (or named) adapters to the weights: deltas in fp32, summed, added once.

    ``scale`` multiplies every strength for this fuse only; strengths stay as they were.
    With ``exact_unfuse`` (the default) the original weights are kept, so ``unfuse_loha``
    restores them bit-exactly; that costs one more copy of the adapted weights (on the CPU; on
    an accelerator the copy is kept in CPU memory). ``exact_unfuse=False`` adds the changes in
    place instead, with no extra memory; ``unfuse_loha`` then subtracts them again, which
    restores the weights to rounding only (as diffusers' ``unfuse_lora`` does). Layers with
    DoRA or IA3 modules, whose change depends on the weight itself, keep their originals.
    """
    names = None if adapter_names is None else _check_known(pipe, adapter_names)
    done = []
    try:
        for component, _, layer in _layers(pipe):
            if component in components:
                before = layer.merge_state.snapshot()
                layer.merge(names, scale=scale, exact_unmerge=exact_unfuse)
                done.append((layer, before))
    except Exception:
        # All or nothing: put back what this call fused (from the backups, or by subtracting).
        for layer, before in reversed(done):
            layer.restore_merge(before)
        raise


def unfuse_loha(pipe) -> None:
    for _, _, layer in _layers(pipe):
        layer.unmerge()


def disable_loha(pipe) -> None:
    """Run the pipeline without its adapters (fused ones are unfused first)."""
    for _, _, layer in _layers(pipe):
        layer.unmerge()
        layer.adapters_enabled = False


def enable_loha(pipe) -> None:
    for _, _, layer in _layers(pipe):
        layer.adapters_enabled = True


def enable_loha_weight_cache(pipe, max_bytes: int | None = None, leave_free: float = 0.2) -> None:
    """Unfused inference keeps each adapted layer's effective weight W + dW (the default): one
    matmul per layer and call, at the memory of one more weight copy, within a budget: at most
    ``max_bytes``, or else while ``leave_free`` of the device's memory stays free (CUDA: when
    each copy is made; CPU: available RAM). Layers past it apply their adapters per call (the
    thin rank-r^2 path, no copy): the same images, a little slower."""
    _set_weight_cache(pipe, CacheBudget(max_bytes, leave_free))


def disable_loha_weight_cache(pipe) -> None:
    """Unfused inference without that extra copy: each call applies the adapters again, as a
    thin rank-r^2 path beside the base matmul or a merged weight, whichever costs less."""
    _set_weight_cache(pipe, CacheBudget(max_bytes=0))


def _set_weight_cache(pipe, budget: CacheBudget) -> None:
    for _, _, layer in _layers(pipe):
        layer.set_weight_cache(True, budget)


def delete_loha_adapters(pipe, adapter_names) -> None:
    names = _check_known(pipe, adapter_names)
    for component, path, layer in list(_layers(pipe)):
        for name in names:
            if name in layer.adapters:
                layer.delete_adapter(name)
        if not layer.adapters:
            layer.unmerge()
            _model(_components(pipe)[component]).set_submodule(path, layer.base_layer)


def unload_loha_weights(pipe, keep_fused: bool = False) -> None:
    """Remove every adapter and put the original module objects back.

    Fused adapters are unfused first, so the weights are the original ones (bit-exact unless
    fused with ``exact_unfuse=False``). ``keep_fused=True`` keeps what is fused in the weights
    instead, as diffusers' ``fuse_lora()`` + ``unload_lora_weights()`` does: a pipeline with
    the adapters baked in and no adapter memory left.
    """
    unfused = []
    for component, path, layer in list(_layers(pipe)):
        if keep_fused:
            layer.drop_backup()
        elif layer.merged_adapters:
            unfused.extend(n for n in layer.merged_adapters if n not in unfused)
            layer.unmerge()
        layer.invalidate()  # the cached weight's bytes go back to the budget
        _model(_components(pipe)[component]).set_submodule(path, layer.base_layer)
    if unfused:
        warnings.warn(f"unload_loha_weights took the fused adapters {unfused} out of the weights again; to keep "
                      "them baked in (diffusers' fuse_lora + unload_lora_weights), call "
                      "unload_loha_weights(keep_fused=True)", UserWarning, stacklevel=2)


def save_loha_weights(pipe, path, adapter_name: str | None = None, format: str = "kohya",
                      save_dtype: torch.dtype | None = None, metadata: dict | None = None, naming: str = "diffusers"):
    """Write one adapter as a Kohya/LyCORIS file (``format="kohya"``) or a PEFT folder ("peft").

    A Flux / SD3 transformer's modules are written in diffusers' tree under LyCORIS' prefix
    (``lycoris_transformer_blocks_0_attn_to_q``: SimpleTuner's layout, read by ComfyUI), or with
    ``naming="original"`` under BFL's / SAI's names as kohya sd-scripts writes them
    (``lora_unet_double_blocks_0_img_attn_qkv``; diffusers' own loader reads such LoRA files too),
    where the layers' adapters stack into those modules exactly."""
    names = get_loha_adapters(pipe, flat=True)
    if adapter_name is None:
        if len(names) != 1:
            raise ValueError(f"the pipeline has adapters {names}; pass adapter_name= to pick one")
        adapter_name = names[0]
    _check_known(pipe, adapter_name)
    if format == "peft":
        return write_peft_folder(_components(pipe), adapter_name, path)
    if format != "kohya":
        raise ValueError(f"format must be 'kohya' or 'peft', got {format!r}")
    return save_kohya(_components(pipe), adapter_name, path, save_dtype=save_dtype, metadata=metadata, naming=naming)


PIPELINE_METHODS = {f.__name__: f for f in (
    load_loha_weights, set_loha_adapters, fuse_loha, unfuse_loha, disable_loha, enable_loha,
    enable_loha_weight_cache, disable_loha_weight_cache, delete_loha_adapters, unload_loha_weights,
    get_loha_adapters, save_loha_weights)}


def install_pipeline_methods() -> None:
    """Attach the functions above to every diffusers pipeline class."""
    from diffusers import DiffusionPipeline

    for name, function in PIPELINE_METHODS.items():
        setattr(DiffusionPipeline, name, function)
