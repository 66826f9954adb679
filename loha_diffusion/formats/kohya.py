"""Kohya / LyCORIS adapter files: reading them into modules, writing an in-memory adapter.

A file is a flat safetensors state dict ``<module name>.<tensor name>`` (docs/formats.md 1.1)
plus string metadata: Kohya's ``ss_*`` fields and SAI's ``modelspec.*`` (docs/formats.md 3).
Written names follow what every consumer reads (docs/formats.md 5.2): SD1/SD2 UNet in
diffusers names, SDXL UNet in SGM names, text encoders always with ``text_model``, one
``alpha`` per module. The pipeline, the converter and the trainer all save through
:func:`save_kohya`.
"""
from __future__ import annotations

import datetime
import json
import os
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..family import family_of_components
from ..io import load_state_dict, save_state_dict
from ..naming.dit import config_field
from ..naming.keys import DIT_FAMILIES, FAMILIES, TRANSFORMER, UNET
from ..naming.kohya import kohya_name
from ..naming.sgm import SgmPaths
from ..state_dict import ModuleTensors, group_modules
from .in_memory import adapter_modules
from .original_tree import original_tree_tensors

SAVE_DTYPES = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# sd-scripts' values (library/sai_model_spec.py, train_network.py)
_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "flux": "flux1", "sd3": "sd3"}
_ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base",
                 "flux": "flux-1-dev", "sd3": "stable-diffusion-3-medium"}
# modelspec.implementation tells A1111 which key names to expect: SGM names for SDXL; our DiT
# files name the transformer in diffusers' tree.
_IMPLEMENTATION = {"sd1": "diffusers", "sd2": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models",
                   "flux": "diffusers", "sd3": "diffusers"}
# the ss_* fields that describe the network (what kohya keeps with --no_metadata); the writer
# sets them from the adapter it writes, so a rewritten file does not carry the source's over
_NETWORK_FIELDS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
                  "ss_base_model_version", "ss_v2")


# -- reading ------------------------------------------------------------------------------------
@dataclass
class KohyaFile:
    """A Kohya / LyCORIS state dict, checked and grouped per module."""

    source: str  # for messages: the path, or "the given state dict"
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    modules: dict[str, ModuleTensors]
    unknown_keys: list[str]

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str, *,
                     allow_unknown_keys: bool = False, allow_non_finite: bool = False) -> KohyaFile:
        """Raises one AdapterFileError naming every problem (NaN/inf tensors, unsupported or
        incomplete modules, keys of no known algorithm unless ``allow_unknown_keys``)."""
        modules, unknown = group_modules(tensors, source, allow_unknown_keys=allow_unknown_keys,
                                         allow_non_finite=allow_non_finite)
        if unknown:
            warnings.warn(f"{source}: ignored {len(unknown)} key(s) of no known adapter algorithm: {unknown[:10]}"
                          f"{' ...' if len(unknown) > 10 else ''}", UserWarning, stacklevel=3)
        return cls(source, tensors, metadata, modules, unknown)


def read_kohya(source: str | os.PathLike | Mapping, *, allow_pickle: bool = False, allow_unknown_keys: bool = False,
               allow_non_finite: bool = False) -> KohyaFile:
    """A Kohya / LyCORIS file (safetensors; a pickle only with ``allow_pickle``) or an
    in-memory state dict, checked and grouped per module."""
    if isinstance(source, Mapping):
        tensors, metadata, description = dict(source), {}, "the given state dict"
    else:
        tensors, metadata = load_state_dict(source, allow_pickle=allow_pickle)
        description = str(source)
    return KohyaFile.from_tensors(tensors, metadata, description, allow_unknown_keys=allow_unknown_keys,
                                  allow_non_finite=allow_non_finite)


def training_fields(metadata: Mapping[str, str]) -> dict[str, str]:
    """A file's ``ss_*`` fields about its training (not its network): what a rewrite keeps."""
    return {k: v for k, v in metadata.items() if k.startswith("ss_") and k not in _NETWORK_FIELDS}


# -- writing ------------------------------------------------------------------------------------
@dataclass
class NetworkInfo:
    """What the ``ss_network_*`` fields declare: the algorithm, its rank (``dim``) and alpha,
    and the options kohya keeps in ``ss_network_args``."""

    algorithm: str
    dim: int | None
    alpha: float | None
    args: dict = field(default_factory=dict)


def kohya_state_dict(components: dict, adapter_name: str, family: str, save_dtype: torch.dtype | None = None,
                     naming: str = "diffusers") -> tuple[dict[str, torch.Tensor], NetworkInfo]:
    """(tensors keyed ``<kohya name>.<tensor>``, the most common algorithm, rank and alpha).

    A Flux / SD3 transformer is named in diffusers' tree (``lycoris_``, any adapter) or, with
    ``naming="original"``, in BFL's / SAI's as kohya does (``formats.original_tree``)."""
    if naming not in ("diffusers", "original"):
        raise ValueError(f"naming must be 'diffusers' or 'original', got {naming!r}")
    original = naming == "original" and family in DIT_FAMILIES
    if naming == "original" and not original:
        raise ValueError(f"naming='original' applies to Flux and SD3 transformers, not to a {family} model")
    unet_config = getattr(components.get(UNET), "config", None)
    sgm = SgmPaths(unet_config) if family == "sdxl" and unet_config is not None else None
    tensors: dict[str, torch.Tensor] = original_tree_tensors(components, adapter_name, family) if original else {}
    algorithms, ranks, alphas = Counter(), Counter(), Counter()
    for module in adapter_modules(components, adapter_name):
        adapter = module.adapter
        if not (original and module.component == TRANSFORMER):
            name = kohya_name(module.component, module.path, family, sgm=sgm)
            tensors.update({f"{name}.{k}": v for k, v in adapter.tensors_for_file(module.weight).items()})
        algorithms[adapter.algorithm.NAME] += 1
        if adapter.rank is not None:
            ranks[adapter.rank] += 1
        if adapter.alpha is not None:
            alphas[float(adapter.alpha)] += 1
    if not tensors:
        raise ValueError(f"no layer holds an adapter named {adapter_name!r}")
    if save_dtype is not None:
        tensors = {k: v.to(save_dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors, NetworkInfo(algorithms.most_common(1)[0][0], ranks.most_common(1)[0][0] if ranks else None,
                                alphas.most_common(1)[0][0] if alphas else None)


def dit_architecture(family: str, transformer_config) -> str:
    """modelspec.architecture of a Flux / SD3 transformer: the variant its config shows."""
    if family == "flux":
        return "flux-1-dev" if config_field(transformer_config, "guidance_embeds") else "flux-1-schnell"
    if config_field(transformer_config, "dual_attention_layers"):
        return "stable-diffusion-3.5-medium"
    return "stable-diffusion-3.5-large" if config_field(transformer_config, "qk_norm") else "stable-diffusion-3-medium"


def kohya_metadata(family: str, network: NetworkInfo, v_prediction: bool, title: str,
                   extra: Mapping | None = None, architecture: str | None = None) -> dict[str, str]:
    """The minimum set kohya keeps with --no_metadata, plus modelspec, as strings; ``extra``
    fields are added (non-strings as JSON). ``architecture`` overrides the family's default."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    is_lora = network.algorithm == "lora"
    args = {"algo": network.algorithm, **{k: str(v) for k, v in network.args.items()}}
    base_version = _BASE_MODEL_VERSION[family] + ("_v" if v_prediction and family != "sdxl" else "")
    architecture = architecture or _ARCHITECTURE[family]
    if family == "sd2" and v_prediction:
        architecture = "stable-diffusion-v2-768-v"
    metadata = {
        "ss_network_module": "networks.lora" if is_lora else "lycoris.kohya",
        "ss_network_dim": "None" if network.dim is None else str(network.dim),
        "ss_network_alpha": "None" if network.alpha is None else _number(network.alpha),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": base_version,
        "ss_v2": str(family == "sd2"),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{architecture}/{'lora' if is_lora else 'lycoris'}",
        "modelspec.implementation": _IMPLEMENTATION[family],
        "modelspec.title": title,
        "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.resolution": "1024x1024" if family in ("sdxl", *DIT_FAMILIES) else "512x512",
    }
    if family not in DIT_FAMILIES:  # flow-matching models have no epsilon / v choice
        metadata["modelspec.prediction_type"] = "v" if v_prediction else "epsilon"
    metadata.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()})
    return metadata


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(float(value))


def save_kohya(components: dict, adapter_name: str, path, *, save_dtype: torch.dtype | str | None = None,
               family: str | None = None, network: NetworkInfo | None = None, v_prediction: bool = False,
               title: str | None = None, metadata: Mapping | None = None, naming: str = "diffusers") -> Path:
    """Write adapter ``adapter_name`` of the components as a Kohya / LyCORIS file.

    ``family`` defaults to the components'; ``network`` (what ``ss_network_*`` declare) to the
    adapter's most common algorithm, rank and alpha; ``title`` to the adapter name.
    ``metadata`` adds header fields (a trainer's ``ss_*`` training fields, say). ``naming``:
    see :func:`kohya_state_dict`.
    """
    if isinstance(save_dtype, str):
        save_dtype = SAVE_DTYPES[save_dtype]
    family = family or family_of_components(components)
    tensors, summary = kohya_state_dict(components, adapter_name, family, save_dtype, naming)
    transformer = components.get(TRANSFORMER)
    architecture = None if transformer is None else dit_architecture(family, transformer.config)
    header = kohya_metadata(family, network or summary, v_prediction, title or adapter_name, metadata, architecture)
    return save_state_dict(tensors, path, header)
