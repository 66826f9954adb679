"""Conversions: Kohya/LyCORIS <-> PEFT folders, -> diffusers LoRA files, LoHa -> exact LoRA.

Every conversion goes through the one in-memory form: the source is loaded onto weightless
components (``skeletons.py``, or a diffusers folder's configs), then written out. Module paths
therefore come from a live module tree, never from string rules. A module the target format
cannot express exactly is refused unless the caller asks for an approximation
(``approximate_rank``: truncated SVD of the module's delta).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from .algorithms import lokr
from .algorithms.dora import apply_dora
from .algorithms.loha import half_factors
from .attach import attach, plan
from .io import AdapterFileError, check_finite, load_state_dict, save_state_dict
from .layers import AdapterWeights
from .metadata import family_from_metadata
from .naming.diffusers_lora import diffusers_lora_key
from .naming.kohya import KeyTable, family_from_names, split_key
from .naming.peft import FROM_PEFT_TENSOR, exact_module_pattern, parse_peft_key, peft_key, to_peft_tensor_name
from .skeletons import components_from_folder, skeleton_components
from .state_dict import group_modules
from .writer import adapter_modules, pipeline_family

ADAPTER = "converted"
PEFT_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_PEFT_TYPES = {"LORA": "lora", "LOHA": "loha", "LOKR": "lokr"}


# -- reading any source onto weightless components --------------------------------------------
def _family_from_shapes(tensors: dict[str, torch.Tensor]) -> str | None:
    """SD1 / SD2 / SDXL from the input width of a UNet cross-attention key/value adapter."""
    for key, tensor in tensors.items():
        if "attn2_to_k" in key and key.endswith(("lora_down.weight", "hada_w1_b", "lora_A.weight")):
            return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(tensor.shape[-1])
    return None


def _load_peft_folder(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict]]:
    """{component: {path.tensor: tensor}} and {component: adapter config} of a PEFT folder."""
    tensors, configs = {}, {}
    for component in PEFT_COMPONENTS:
        sub = folder / component
        if (sub / "adapter_config.json").is_file():
            configs[component] = json.loads((sub / "adapter_config.json").read_text())
            tensors[component], _ = load_state_dict(sub / "adapter_model.safetensors")
    if not configs:
        raise AdapterFileError(f"{folder}: no PEFT adapter folders ({', '.join(PEFT_COMPONENTS)}/adapter_config.json)")
    return tensors, configs


def _pattern_value(patterns: dict, path: str, default):
    import re

    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def _peft_to_kohya_names(tensors, configs, table: KeyTable) -> dict[str, torch.Tensor]:
    """Rename a PEFT folder's tensors to Kohya names of ``table``'s model, adding alphas."""
    state = {}
    for component, sd in tensors.items():
        config = configs[component]
        algorithm = _PEFT_TYPES.get(config.get("peft_type", "").upper())
        if algorithm is None:
            raise AdapterFileError(f"{component}: PEFT type {config.get('peft_type')!r} is not LoRA, LoHa or LoKr")
        alpha_default = config.get("lora_alpha" if algorithm == "lora" else "alpha", config.get("r", 8))
        paths = {}
        for key, tensor in sd.items():
            parsed = parse_peft_key(key)
            if parsed is None:
                raise AdapterFileError(f"{component}: {key!r} is not a PEFT adapter key")
            target = table.resolve_path(component, parsed.module_path)
            if target is None:
                raise AdapterFileError(f"{component}: PEFT module {parsed.module_path!r} is not in the base model")
            name = table.kohya_name(component, target.path)
            state[f"{name}.{FROM_PEFT_TENSOR.get(parsed.tensor_name, parsed.tensor_name)}"] = tensor
            paths[name] = parsed.module_path
        for name, path in paths.items():
            alpha = _pattern_value(config.get("alpha_pattern") or {}, path, alpha_default)
            state[f"{name}.alpha"] = torch.tensor(float(alpha))
            if algorithm == "lokr" and f"{name}.lokr_w1" in state and f"{name}.lokr_w2" in state:
                # Both halves full: the community rule is scale 1, PEFT's is alpha / r. Bake it in.
                r = _pattern_value(config.get("rank_pattern") or {}, path, config.get("r", 8))
                state[f"{name}.lokr_w1"] = state[f"{name}.lokr_w1"] * (float(alpha) / r)
    return state


def load_onto_skeleton(source, base_model=None, family: str | None = None, allow_pickle: bool = False,
                       allow_unknown_keys: bool = False, progress: bool = False) -> tuple[dict, str, dict]:
    """(components holding the adapter ``converted``, family, source metadata)."""
    source = Path(source)
    peft = source.is_dir() and any((source / c / "adapter_config.json").is_file() for c in PEFT_COMPONENTS)
    if peft:
        peft_tensors, configs = _load_peft_folder(source)
        metadata = {}
        flat = {f"{c}.{k}": v for c, sd in peft_tensors.items() for k, v in sd.items()}
        family = family or _family_from_shapes({k.replace(".", "_"): v for k, v in flat.items()})
        if "text_encoder_2" in configs:
            family = family or "sdxl"
    else:
        tensors, metadata = load_state_dict(source, allow_pickle=allow_pickle)
        family = family or family_from_metadata(metadata) or _family_from_shapes(tensors)
        if family is None and family_from_names(split_key(k)[0] for k in tensors) == "sdxl":
            family = "sdxl"
    if base_model is not None:
        components = components_from_folder(base_model)
    elif family is None:
        raise AdapterFileError(f"{source}: cannot tell whether it is an SD1, SD2 or SDXL adapter; pass the base "
                               "model folder (--base-model) or the family (--family sd1|sd2|sdxl)")
    else:
        components = skeleton_components(family)
    table = KeyTable(**components)
    if peft:
        tensors = _peft_to_kohya_names(peft_tensors, configs, table)
    check_finite(tensors, str(source))
    modules, _ = group_modules(tensors, str(source), allow_unknown_keys=allow_unknown_keys)
    attach(plan(modules, table, str(source), metadata), table, ADAPTER, progress=progress)
    return components, pipeline_family(components), metadata


# -- exact and approximate low-rank forms --------------------------------------------------------
def lora_pair(adapter: AdapterWeights, weight: torch.Tensor, approximate_rank: int | None = None):
    """(up (out, R), down (R, in*k*k)) with the scale baked in, exactly when the algorithm is
    low-rank (LoRA: rank r, LoHa: the rank-r^2 Khatri-Rao pair), else by truncated SVD if allowed."""
    if adapter.supports_thin_path:
        up, down = adapter.low_rank_factors()
        return up * adapter.scale, down
    if approximate_rank is None:
        raise AdapterFileError(
            f"a {adapter.algorithm.NAME}{' + DoRA' if adapter.dora_scale is not None else ''} module is not a "
            "low-rank product, so LoRA cannot express it exactly; pass approximate_rank=N (--approximate-rank N) "
            "to use a rank-N SVD approximation")
    if weight.is_meta and (adapter.dora_scale is not None or adapter.algorithm.NAME == "ia3"):
        raise AdapterFileError(f"approximating a {adapter.algorithm.NAME} module with DoRA or IA3 needs the base "
                               "weights' values, which a conversion without a model does not have")
    with torch.no_grad():
        full = adapter.delta_weight(weight, adapter.scale)
        if adapter.dora_scale is not None:
            full = apply_dora(weight.float(), full, adapter.dora_scale.float(), 1.0, adapter.dora_semantics)
    u, s, vh = torch.linalg.svd(full.flatten(1), full_matrices=False)
    rank = min(approximate_rank, s.numel())
    return u[:, :rank] * s[:rank], vh[:rank]


def _as_lora_tensors(up, down, weight_shape) -> dict[str, torch.Tensor]:
    kernel = tuple(weight_shape[2:])
    rank = up.shape[1]
    if kernel:
        return {"lora_down.weight": down.reshape(rank, weight_shape[1], *kernel).contiguous(),
                "lora_up.weight": up.reshape(*up.shape, *(1,) * len(kernel)).contiguous()}
    return {"lora_down.weight": down.contiguous(), "lora_up.weight": up.contiguous()}


def _modules_with_weights(components, adapter_name):
    for component, path, adapter in adapter_modules(components, adapter_name):
        layer = components[component].get_submodule(path)
        yield component, path, adapter, layer.base_layer.weight


def as_lora(components, adapter_name: str = ADAPTER, approximate_rank: int | None = None) -> None:
    """Replace every module of the adapter by an equivalent LoRA (scale baked, alpha = rank)."""
    replacements = []
    for component, path, adapter, weight in _modules_with_weights(components, adapter_name):
        if adapter.algorithm.NAME == "lora" and adapter.dora_scale is None and "lora_mid.weight" not in adapter.params:
            continue
        up, down = lora_pair(adapter, weight, approximate_rank)
        tensors = _as_lora_tensors(up.detach(), down.detach(), weight.shape)
        replacements.append((component, path, AdapterWeights("lora", tensors, float(up.shape[1]))))
    for component, path, weights in replacements:
        layer = components[component].get_submodule(path)
        layer.delete_adapter(adapter_name)
        layer.add_adapter(adapter_name, weights)


# -- writers ------------------------------------------------------------------------------------
def _peft_lokr_factor(modules) -> int:
    """The ``decompose_factor`` under which PEFT splits every module's dims as the file does.

    PEFT rebuilds LoKr shapes from the config: out = a*b and in = c*d with (a, b) =
    factorization(out, factor), same for in, and w1 of shape (a, c). One factor serves a whole
    component, so it must reproduce each module's w1 shape.
    """
    from peft.tuners.lokr.layer import factorization

    shapes = [(weight.shape[0], weight.shape[1], lokr.first_factor(adapter.params).shape)
              for adapter, weight in modules]
    candidates = [-1] + sorted({d for *_, w1 in shapes for d in w1})
    for factor in candidates:
        if all(factorization(out, factor)[0] == w1[0] and factorization(inp, factor)[0] == w1[1]
               for out, inp, w1 in shapes):
            return factor
    raise AdapterFileError(
        "PEFT's LoKr builds every module's Kronecker split from one decompose_factor; this adapter's modules "
        f"split their dims in ways no single factor reproduces (w1 shapes {sorted({w for *_, w in shapes})[:6]}); "
        "keep it in the Kohya format")


def _peft_lokr_tensors(adapter: AdapterWeights, weight: torch.Tensor) -> tuple[dict, int, float]:
    """(community tensors in PEFT's LoKr layout, PEFT r, PEFT alpha) for one module, exact.

    PEFT's layout (decompose_both=False, use_effective_conv2d=False): w1 full (a, c), and w2
    factorised (b, r) @ (r, d*k*k) when r < max(b, d)/2, else full (b, d, k...). A factorised
    w1 is multiplied out and a Tucker core folded into w2's down factor (fp32 rounding only).
    PEFT scales by alpha/r always, so alpha is chosen to give the module's own scale.
    """
    params = {k: v.detach() for k, v in adapter.params.items()}
    w1 = lokr.first_factor(params)
    b, d = weight.shape[0] // w1.shape[0], weight.shape[1] // w1.shape[1]
    tensors = {"lokr_w1": w1.contiguous()}
    pair = lokr.second_factor_pair(params)
    if pair is not None and pair[0].shape[1] < max(b, d) / 2:
        r = pair[0].shape[1]
        tensors.update({"lokr_w2_a": pair[0].contiguous(), "lokr_w2_b": pair[1].contiguous()})
    else:
        r = pair[0].shape[1] if pair is not None else max(1, -(-max(b, d) // 2))
        tensors["lokr_w2"] = lokr.second_factor(params).reshape(b, d, *weight.shape[2:]).contiguous()
    return tensors, r, adapter.scale * r


def write_peft_folder(components, adapter_name: str, folder) -> Path:
    """One PEFT adapter folder per component, loadable by ``PeftModel.from_pretrained``."""
    folder = Path(folder)
    by_component: dict[str, list] = {}
    for component, path, adapter, weight in _modules_with_weights(components, adapter_name):
        by_component.setdefault(component, []).append((path, adapter, weight))
    for component, modules in by_component.items():
        algorithms = {a.algorithm.NAME for _, a, _ in modules}
        dora = any(a.dora_scale is not None for _, a, _ in modules)
        if len(algorithms) != 1 or not algorithms <= {"lora", "loha", "lokr"} or dora:
            raise AdapterFileError(f"{component}: PEFT holds one algorithm per adapter, LoRA, LoHa or LoKr without "
                                   f"DoRA; this adapter has {sorted(algorithms)}{' with DoRA' if dora else ''}")
        algorithm = algorithms.pop()
        factor = _peft_lokr_factor([m[1:] for m in modules]) if algorithm == "lokr" else None
        tensors, ranks, alphas = {}, {}, {}
        for path, adapter, weight in modules:
            if algorithm == "lokr":  # its own r and alpha: a LoKr with both halves full has neither
                community, ranks[path], alphas[path] = _peft_lokr_tensors(adapter, weight)
            else:
                ranks[path], alphas[path] = adapter.rank, float(adapter.alpha)
            if algorithm == "lora":
                up, down = adapter.low_rank_factors()
                community = _as_lora_tensors(up.detach(), down.detach(), weight.shape)
            elif algorithm == "loha":  # PEFT's flat LoHa layout; a Tucker core is folded into the _b factor, exactly
                (u1, d1), (u2, d2) = (half_factors(adapter.params, i, adapter.legacy_tucker) for i in (1, 2))
                community = {"hada_w1_a": u1, "hada_w1_b": d1, "hada_w2_a": u2, "hada_w2_b": d2}
            for name, tensor in community.items():
                tensors[peft_key(path, to_peft_tensor_name(name))] = tensor.detach().float().contiguous()
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        config = {"peft_type": algorithm.upper(), "r": r,
                  "target_modules": sorted(ranks), "exclude_modules": None,
                  "rank_pattern": {exact_module_pattern(p): v for p, v in ranks.items() if v != r},
                  "alpha_pattern": {exact_module_pattern(p): v for p, v in alphas.items() if v != alpha},
                  "base_model_name_or_path": None, "inference_mode": True, "task_type": None,
                  "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None}
        if algorithm == "lora":
            config.update({"lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
                           "use_rslora": False, "use_dora": False, "init_lora_weights": True})
        else:
            config.update({"alpha": alpha, "rank_dropout": 0.0, "module_dropout": 0.0,
                           "use_effective_conv2d": False, "init_weights": True})
        if algorithm == "lokr":
            config.update({"decompose_both": False, "decompose_factor": factor, "rank_dropout_scale": False})
        (folder / component).mkdir(parents=True, exist_ok=True)
        save_state_dict(tensors, folder / component / "adapter_model.safetensors")
        (folder / component / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def write_diffusers_lora(components, adapter_name: str, path, approximate_rank: int | None = None) -> Path:
    """One file that diffusers' own ``pipe.load_lora_weights`` applies (no loha_diffusion needed).

    Scales are baked into ``lora_B`` and no alphas are written: diffusers then uses scale 1 for
    every module, sidestepping its per-module alpha handling (formats.md 4.3).
    """
    tensors = {}
    for component, module_path, adapter, weight in _modules_with_weights(components, adapter_name):
        up, down = lora_pair(adapter, weight, approximate_rank)
        for name, tensor in _as_lora_tensors(up.detach(), down.detach(), weight.shape).items():
            tensors[diffusers_lora_key(component, module_path, to_peft_tensor_name(name))] = tensor.float()
    return save_state_dict(tensors, path)


def convert(source, destination, to: str, base_model=None, family: str | None = None, as_lora_exact: bool = False,
            approximate_rank: int | None = None, save_dtype=None, allow_pickle: bool = False,
            progress: bool = False) -> Path:
    """Convert ``source`` (Kohya/LyCORIS file or PEFT folder) to ``to`` = kohya | peft | diffusers."""
    if to not in ("kohya", "peft", "diffusers"):
        raise ValueError(f"to must be 'kohya', 'peft' or 'diffusers', got {to!r}")
    components, family, metadata = load_onto_skeleton(source, base_model, family, allow_pickle, progress=progress)
    if to == "diffusers":
        return write_diffusers_lora(components, ADAPTER, destination, approximate_rank)
    if as_lora_exact or (to == "peft" and approximate_rank is not None):
        as_lora(components, ADAPTER, approximate_rank)
    if to == "peft":
        return write_peft_folder(components, ADAPTER, destination)
    from .writer import save_adapter

    return save_adapter(components, ADAPTER, destination, save_dtype=save_dtype, family=family,
                        metadata={k: v for k, v in metadata.items() if k.startswith("ss_") and k not in (
                            "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                            "ss_base_model_version", "ss_v2")})
