"""Kohya ``ss_*`` and SAI ``modelspec.*`` metadata: what we write, and what we read back.

All safetensors metadata values are strings (formats.md 3 and 5.2).
"""
from __future__ import annotations

import datetime
import json

FAMILIES = ("sd1", "sd2", "sdxl")

_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
_ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}
# modelspec.implementation tells A1111 which key names to expect: SGM names for SDXL.
_IMPLEMENTATION = {"sd1": "diffusers", "sd2": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models"}


def kohya_metadata(family: str, algorithm: str, dim: int | None, alpha: float | None,
                   network_args: dict | None = None, v_prediction: bool = False, title: str = "loha_diffusion adapter",
                   extra: dict | None = None) -> dict[str, str]:
    """The minimum set kohya keeps with --no_metadata, plus modelspec, as strings."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    is_lora = algorithm == "lora"
    args = {"algo": algorithm, **{k: str(v) for k, v in (network_args or {}).items()}}
    base_version = _BASE_MODEL_VERSION[family] + ("_v" if v_prediction and family != "sdxl" else "")
    architecture = _ARCHITECTURE[family]
    if family == "sd2" and v_prediction:
        architecture = "stable-diffusion-v2-768-v"
    metadata = {
        "ss_network_module": "networks.lora" if is_lora else "lycoris.kohya",
        "ss_network_dim": "None" if dim is None else str(dim),
        "ss_network_alpha": "None" if alpha is None else _number(alpha),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": base_version,
        "ss_v2": str(family == "sd2"),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{architecture}/{'lora' if is_lora else 'lycoris'}",
        "modelspec.implementation": _IMPLEMENTATION[family],
        "modelspec.title": title,
        "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.resolution": "1024x1024" if family == "sdxl" else "512x512",
    }
    metadata.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra or {}).items()})
    return metadata


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(float(value))


def family_from_metadata(metadata: dict[str, str]) -> str | None:
    """sd1 / sd2 / sdxl from ``ss_base_model_version``, ``ss_v2`` or ``modelspec.architecture``."""
    version = metadata.get("ss_base_model_version", "")
    architecture = metadata.get("modelspec.architecture", "")
    if version.startswith("sdxl") or architecture.startswith("stable-diffusion-xl"):
        return "sdxl"
    if version.startswith("sd_v2") or metadata.get("ss_v2") == "True" or architecture.startswith("stable-diffusion-v2"):
        return "sd2"
    if version.startswith("sd_v1") or architecture.startswith("stable-diffusion-v1"):
        return "sd1"
    return None


def network_args(metadata: dict[str, str]) -> dict:
    """``ss_network_args`` parsed (values stay as kohya wrote them: mostly strings)."""
    raw = metadata.get("ss_network_args")
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}
