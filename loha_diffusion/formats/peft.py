"""PEFT adapter folders: ``<folder>/<component>/adapter_config.json`` + ``adapter_model.safetensors``.

One folder per pipeline component, each what ``PeftModel.from_pretrained`` loads (keys and
tensor names in ``naming.peft``). Reading renames the tensors to Kohya names of a live module
tree and turns PEFT's config (alpha, ``alpha_pattern``) into per-module ``alpha`` tensors;
writing does the reverse. PEFT has one algorithm per adapter and builds every LoKr module's
Kronecker split from one config value, so not every in-memory adapter fits.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..algorithms import lokr
from ..algorithms.loha import half_factors, is_tucker
from ..config import pattern_key
from ..family import detect_family
from ..io import AdapterFileError, load_state_dict, read_json_object, save_state_dict
from ..layers import AdapterWeights
from ..naming.keys import (
    COMPONENTS,
    LYCORIS_PREFIX,
    TE2_PREFIX,
    TE3_PREFIX,
    TE_PREFIX,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TEXT_ENCODER_3,
    TRANSFORMER,
    UNET,
    UNET_PREFIX,
    flat,
    is_t5_path,
)
from ..naming.peft import (
    PEFT_ALGORITHMS,
    PEFT_PREFIX,
    exact_module_pattern,
    parse_peft_key,
    peft_key,
    to_peft_tensor_name,
)
from .in_memory import adapter_modules, lora_tensors

_ALGORITHM_OF_PEFT_TYPE = {peft.peft_type: algorithm for algorithm, peft in PEFT_ALGORITHMS.items()}
# the Kohya prefix under which each component's modules answer to their diffusers paths
_KOHYA_PREFIX = {UNET: UNET_PREFIX, TRANSFORMER: LYCORIS_PREFIX, TEXT_ENCODER: TE_PREFIX, TEXT_ENCODER_2: TE2_PREFIX,
                 TEXT_ENCODER_3: TE3_PREFIX}


def _kohya_prefix(component: str, module_path: str) -> str:
    """A Kohya prefix for a PEFT component's module, for reports: T5's is ``lora_te3_`` (kohya's
    on Flux and SD3), whichever pipeline attribute holds it."""
    return TE3_PREFIX if component not in (UNET, TRANSFORMER) and is_t5_path(module_path) else _KOHYA_PREFIX[component]


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's split of a LoKr dimension into (m, n) with m * n = ``dimension``.

    The rule of ``factorization`` in peft/tuners/lokr/layer.py (peft 0.21), rewritten so that
    the library does not import peft: a ``factor`` > 0 that divides ``dimension`` gives
    (factor, dimension // factor) in that order, even when factor is the larger (LyCORIS sorts
    them, ``algorithms.lokr.factorization``). Otherwise the divisors of ``dimension`` are taken
    in increasing order while they do not exceed ``factor`` (no bound for -1; any other
    ``factor`` <= 0 stops at 1) and until one reaches its cofactor; the last one taken and its
    cofactor come back smaller first.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m = 1
    for divisor in range(2, dimension + 1):
        if dimension % divisor:
            continue
        if divisor > bound:
            break
        m = divisor
        if divisor >= dimension // divisor:
            break
    return min(m, dimension // m), max(m, dimension // m)


def is_peft_folder(path) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / c / "adapter_config.json").is_file() for c in COMPONENTS)


# -- reading ------------------------------------------------------------------------------------
@dataclass
class PeftFolder:
    """{component: {PEFT key: tensor}} and {component: adapter config} of a PEFT folder."""

    tensors: dict[str, dict[str, torch.Tensor]]
    configs: dict[str, dict]

    @classmethod
    def read(cls, folder) -> PeftFolder:
        folder = Path(folder)
        tensors, configs = {}, {}
        for component in COMPONENTS:
            sub = folder / component
            if (sub / "adapter_config.json").is_file():
                configs[component] = read_json_object(sub / "adapter_config.json")
                tensors[component], _ = load_state_dict(sub / "adapter_model.safetensors")
        if not configs:
            raise AdapterFileError(f"{folder}: no PEFT adapter folders ({', '.join(COMPONENTS)}/adapter_config.json)")
        return cls(tensors, configs)

    def family(self) -> str | None:
        """``detect_family`` from the tensors' shapes and the module paths (as Kohya names)."""
        tensors = {f"{c}.{key}": tensor for c, sd in self.tensors.items() for key, tensor in sd.items()}
        parsed = ((c, parse_peft_key(key)) for c, sd in self.tensors.items() for key in sd)
        names = {_kohya_prefix(c, p.module_path) + flat(p.module_path) for c, p in parsed if p is not None}
        return detect_family(tensors=tensors, names=names)

    @classmethod
    def read_component(cls, folder, table, component: str | None = None) -> PeftFolder:
        """One ``adapter_config.json`` + ``adapter_model.safetensors`` folder, for ``component`` or,
        without it, for the one component of ``table`` (a ``KeyTable``) that holds all its modules."""
        folder = Path(folder)
        config = read_json_object(folder / "adapter_config.json")
        tensors, _ = load_state_dict(folder / "adapter_model.safetensors")
        if component is None:
            paths = {parsed[0] for parsed in map(parse_adapter_key, tensors) if parsed is not None}
            fits = [c for c in table.components if all(table.resolve_path(c, p) for p in paths)]
            if len(fits) != 1:
                raise AdapterFileError(f"{folder}: its PEFT modules fit {'several components ' if fits else 'no '}"
                                       f"component of the pipeline {fits or list(table.components)}; pass "
                                       "component='unet' | 'text_encoder' | 'text_encoder_2'")
            component = fits[0]
        elif component not in table.components:
            raise AdapterFileError(f"component={component!r}: the pipeline has {list(table.components)}")
        return cls({component: tensors}, {component: config})

    def kohya_style_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors under Kohya prefixes + the module paths as the folder names them, with
        one ``alpha`` per module: what ``inspect`` reports on, without a model to resolve against."""
        state = {}
        for component, tensors in self.tensors.items():
            for module_path, module in module_tensors(tensors, self.configs[component], component).items():
                name = _kohya_prefix(component, module_path) + flat(module_path)
                state.update({f"{name}.{tensor_name}": tensor for tensor_name, tensor in module.items()})
        return state

    def kohya_tensors(self, table) -> dict[str, torch.Tensor]:
        """The tensors under the Kohya names of ``table``'s modules (a ``KeyTable``), with one
        ``alpha`` per module (see :func:`module_tensors`)."""
        state = {}
        for component, tensors in self.tensors.items():
            for module_path, module in module_tensors(tensors, self.configs[component], component).items():
                name = table.file_name(component, module_path)
                if name is None:
                    raise AdapterFileError(f"{component}: PEFT module {module_path!r} is not in the base model")
                state.update({f"{name}.{tensor_name}": tensor for tensor_name, tensor in module.items()})
        return state


def algorithm_of(config: dict, source: str) -> str:
    """Our algorithm name for a PEFT ``adapter_config.json``."""
    algorithm = _ALGORITHM_OF_PEFT_TYPE.get(str(config.get("peft_type", "")).upper())
    if algorithm is None:
        raise AdapterFileError(f"{source}: PEFT type {config.get('peft_type')!r} is not LoRA, LoHa or LoKr")
    return algorithm


def module_tensors(tensors: dict[str, torch.Tensor], config: dict, source: str) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {community tensor name: tensor}} of one PEFT adapter, with one ``alpha`` per module.

    A config without an alpha field (a diffusers file without its metadata) means scale 1;
    ``use_rslora`` means scale alpha / sqrt(r). Keys that are no adapter tensor raise.
    """
    algorithm = algorithm_of(config, source)
    alpha_default = config.get(PEFT_ALGORITHMS[algorithm].alpha_field)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = parse_adapter_key(key)
        if parsed is None:
            raise AdapterFileError(f"{source}: {key!r} is not a PEFT adapter key")
        module_path, tensor_name = parsed
        if tensor_name == "dora_scale" and tensor.dim() == 4:  # conv: (1, out, 1, 1) -> (out, 1, 1, 1)
            tensor = tensor.reshape(-1, 1, 1, 1)
        modules.setdefault(module_path, {})[tensor_name] = tensor
    for path, module in modules.items():
        down = module.get("lora_down.weight")
        rank = down.shape[0] if down is not None else None
        alpha = _pattern_value(config.get("alpha_pattern"), path, alpha_default)
        if alpha is None:  # scale 1
            alpha = rank if rank is not None else _pattern_value(config.get("rank_pattern"), path, config.get("r", 8))
        elif config.get("use_rslora") and rank is not None:
            alpha = float(alpha) * math.sqrt(rank)
        module["alpha"] = torch.tensor(float(alpha))
        if algorithm == "lokr" and "lokr_w1" in module and "lokr_w2" in module:
            # Both halves full: the community rule is scale 1, PEFT's is alpha / r. Bake it in.
            r = _pattern_value(config.get("rank_pattern"), path, config.get("r", 8))
            module["lokr_w1"] = module["lokr_w1"] * (float(alpha) / r)
    return modules


_MAGNITUDE = "lora_magnitude_vector"


def parse_adapter_key(key: str) -> tuple[str, str] | None:
    """(module path, community tensor name) of a PEFT key; PEFT's DoRA magnitude is our ``dora_scale``
    (saved as ``<path>.lora_magnitude_vector``, live models add ``.weight``)."""
    bare = key.removeprefix(PEFT_PREFIX).removesuffix(".weight")
    if bare.endswith("." + _MAGNITUDE):
        return bare[: -len(_MAGNITUDE) - 1], "dora_scale"
    parsed = parse_peft_key(key)
    return None if parsed is None else (parsed.module_path, parsed.tensor_name)


def _pattern_value(patterns: dict | None, path: str, default):
    key = pattern_key(patterns or {}, path)
    return default if key is None else patterns[key]


# -- writing ------------------------------------------------------------------------------------
def _lokr_factor(modules) -> int:
    """The ``decompose_factor`` under which PEFT splits every module's dims as the file does.

    PEFT rebuilds LoKr shapes from the config: out = a*b and in = c*d with (a, b) =
    factorization(out, factor), same for in, and w1 of shape (a, c). One factor serves a whole
    component, so it must reproduce each module's w1 shape.
    """
    shapes = [(m.weight.shape[0], m.weight.shape[1], lokr.first_factor(m.adapter.params).shape) for m in modules]
    candidates = [-1] + sorted({d for *_, w1 in shapes for d in w1})
    for factor in candidates:
        if all(factorization(out, factor)[0] == w1[0] and factorization(inp, factor)[0] == w1[1]
               for out, inp, w1 in shapes):
            return factor
    raise AdapterFileError(
        "PEFT's LoKr builds every module's Kronecker split from one decompose_factor; this adapter's modules "
        f"split their dims in ways no single factor reproduces (w1 shapes {sorted({w for *_, w in shapes})[:6]}); "
        "keep it in the Kohya format")


def _lokr_tensors(adapter: AdapterWeights, weight: torch.Tensor) -> tuple[dict, int, float]:
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


def _community_tensors(algorithm: str, adapter: AdapterWeights, weight: torch.Tensor,
                       keep_tucker: bool = False) -> dict[str, torch.Tensor]:
    """A LoRA or LoHa module's tensors in PEFT's layout, exactly: flat, a Tucker core folded into
    the _b factor, unless ``keep_tucker`` (a LoHa whose convolutions PEFT builds in Tucker form)."""
    if algorithm == "lora":
        return lora_tensors(*adapter.low_rank_factors(), weight.shape)
    if keep_tucker and is_tucker(adapter.params):
        return {name: tensor.detach() for name, tensor in adapter.params.items()}
    (u1, d1), (u2, d2) = (half_factors(adapter.params, i, adapter.legacy_tucker) for i in (1, 2))
    return {"hada_w1_a": u1, "hada_w1_b": d1, "hada_w2_a": u2, "hada_w2_b": d2}


def _peft_tucker(algorithm: str, modules) -> bool:
    """True when a LoHa adapter is in the Tucker form PEFT's ``use_effective_conv2d`` builds: every
    convolution with a kernel larger than 1 has cores (t1 and t2, not LyCORIS' legacy t1 twice),
    every other module has none."""
    if algorithm != "loha":
        return False
    spatial = [any(k != 1 for k in m.weight.shape[2:]) for m in modules]
    tucker = [is_tucker(m.adapter.params) and not m.adapter.legacy_tucker for m in modules]
    return any(tucker) and spatial == tucker


def peft_adapter(modules: list) -> tuple[dict[str, torch.Tensor], dict, dict[str, tuple[int, float]]]:
    """(PEFT tensors, ``adapter_config.json`` fields, {module path: (r, alpha)}) of one adapter on one model.

    ``modules``: the adapter's ``AdapterModule``s on that model. ``r``, the alpha field,
    ``rank_pattern`` and ``alpha_pattern`` reproduce every module's rank and scale under PEFT's
    rules (the most common value, exact per-module patterns for the rest); the (r, alpha) of each
    module path come back too, so that a caller can check a config of its own against them.
    """
    component = modules[0].component or "model"
    algorithms = {m.adapter.algorithm.NAME for m in modules}
    dora = any(m.adapter.dora_scale is not None for m in modules)
    if len(algorithms) != 1 or not algorithms <= PEFT_ALGORITHMS.keys() or dora:
        raise AdapterFileError(f"{component}: PEFT holds one algorithm per adapter, LoRA, LoHa or LoKr without "
                               f"DoRA; this adapter has {sorted(algorithms)}{' with DoRA' if dora else ''}")
    algorithm = algorithms.pop()
    taking_rows = [m.path for m in modules if m.adapter.source_rows is not None]
    if taking_rows:
        raise AdapterFileError(f"{component}: {len(taking_rows)} layer(s) (e.g. {taking_rows[0]}) take rows of a LoKr "
                               "that a Flux / SD3 file stacks over several layers and whose Kronecker blocks do not "
                               "line up with them: no PEFT LoKr holds that; keep the Kohya format")
    factor = _lokr_factor(modules) if algorithm == "lokr" else None
    tucker = _peft_tucker(algorithm, modules)
    tensors, ranks, alphas = {}, {}, {}
    for module in modules:
        adapter, path = module.adapter, module.path
        if algorithm == "lokr":  # its own r and alpha: a LoKr with both halves full has neither
            community, ranks[path], alphas[path] = _lokr_tensors(adapter, module.weight)
        else:
            ranks[path], alphas[path] = adapter.rank, float(adapter.alpha)
            community = _community_tensors(algorithm, adapter, module.weight, keep_tucker=tucker)
        for name, tensor in community.items():
            tensors[peft_key(path, to_peft_tensor_name(name))] = tensor.detach().float().contiguous()
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {"peft_type": PEFT_ALGORITHMS[algorithm].peft_type, "r": r,
              "target_modules": sorted(ranks), "exclude_modules": None,
              "rank_pattern": {exact_module_pattern(p): v for p, v in ranks.items() if v != r},
              "alpha_pattern": {exact_module_pattern(p): v for p, v in alphas.items() if v != alpha},
              "base_model_name_or_path": None, "inference_mode": True, "task_type": None,
              "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None}
    if algorithm == "lora":
        options = {"lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
                   "use_dora": False, "init_lora_weights": True}
    else:
        options = {"rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": tucker, "init_weights": True}
    config.update({PEFT_ALGORITHMS[algorithm].alpha_field: alpha, **options})
    if algorithm == "lokr":
        config.update({"decompose_both": False, "decompose_factor": factor, "rank_dropout_scale": False})
    return tensors, config, {path: (ranks[path], alphas[path]) for path in ranks}


def write_peft_folder(components: dict, adapter_name: str, folder) -> Path:
    """One PEFT adapter folder per component, loadable by ``PeftModel.from_pretrained``."""
    folder = Path(folder)
    by_component: dict[str, list] = {}
    for module in adapter_modules(components, adapter_name):
        by_component.setdefault(module.component, []).append(module)
    for component, modules in by_component.items():
        tensors, config, _ = peft_adapter(modules)
        (folder / component).mkdir(parents=True, exist_ok=True)
        save_state_dict(tensors, folder / component / "adapter_model.safetensors")
        (folder / component / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder
