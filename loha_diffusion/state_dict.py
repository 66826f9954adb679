"""A community state dict grouped per module: which algorithm, its tensors, alpha, DoRA scale.

Keys are ``<module name>.<tensor name>`` split at the first dot (docs/formats.md 1.1). Nothing here
knows about models: that is the resolver's job (``attach.py``).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from types import ModuleType

import torch

from .algorithms import as_float_scalar, detect_algorithm
from .algorithms.unsupported import unsupported_algorithm
from .io import AdapterFileError, all_finite
from .naming.keys import split_key


@dataclass
class ModuleTensors:
    """One module's adapter as stored in a file."""

    name: str
    algorithm: ModuleType
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None
    keys: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int | None:
        return self.algorithm.rank(self.tensors)

    @property
    def scale(self) -> float:
        return self.algorithm.scale(self.tensors, self.alpha)


def _module_problem(name: str, algorithm, tensors: dict[str, torch.Tensor], alpha, dora_scale,
                    allow_non_finite: bool) -> str | None:
    """Why a module's tensors cannot be used as ``algorithm``, naming the key; None if they can."""
    for tensor_name, tensor in tensors.items():
        key = f"{name}.{tensor_name}"
        low, high = algorithm.TENSOR_DIMS[tensor_name]
        if not low <= tensor.dim() <= high:
            return (f"{key} has {tensor.dim()} dimension(s) {tuple(tensor.shape)}; a {algorithm.NAME} "
                    f"{tensor_name} has {low}" + (f" to {high}" if high != low else ""))
        integer_flag = algorithm.READS_WEIGHT and tensor_name == "on_input"  # IA3's flag is an integer
        if not tensor.is_floating_point() and not integer_flag:
            return f"{key} holds {str(tensor.dtype).removeprefix('torch.')} values; adapter tensors are floating point"
        if tensor.numel() == 0:
            return f"{key} is empty (shape {tuple(tensor.shape)}): a rank-0 adapter changes nothing and has no scale"
        if tensor.is_floating_point() and not allow_non_finite and not all_finite(tensor):
            return f"{key} holds NaN or inf values (a diverged training run?)"
    if dora_scale is not None and (not dora_scale.is_floating_point()
                                   or not (allow_non_finite or all_finite(dora_scale))):
        return f"{name}.dora_scale must hold finite floating-point values"
    if alpha is not None and algorithm.rank(tensors) is not None and not (allow_non_finite or math.isfinite(alpha)):
        return f"{name}.alpha is {alpha}; its scale alpha / rank must be a finite number"
    return None


def group_modules(state_dict: dict[str, torch.Tensor], source: str = "adapter", allow_unknown_keys: bool = False,
                  allow_non_finite: bool = False) -> tuple[dict[str, ModuleTensors], list[str]]:
    """({module name: ModuleTensors}, ignored keys). Raises one error listing every problem.

    Every tensor is checked before anything uses it: its number of dimensions, a floating-point
    dtype, a non-zero size and finite values (unless ``allow_non_finite``, for inspecting). An
    alpha is checked only where the algorithm uses it: LoKr with both factors full and the
    rank-less algorithms apply scale 1 whatever the file says (as ComfyUI and A1111 do), so
    LyCORIS' "full dimension" LoKr files, whose alpha = dim overflows to inf in fp16, load.
    """
    by_module: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in state_dict.items():
        name, tensor_name = split_key(key)
        by_module[name][tensor_name] = tensor

    modules: dict[str, ModuleTensors] = {}
    unknown: list[str] = []
    unsupported: dict[str, list[str]] = defaultdict(list)
    broken: list[str] = []
    for name, tensors in by_module.items():
        tensors = dict(tensors)
        alpha = tensors.pop("alpha", None)
        dora_scale = tensors.pop("dora_scale", None)
        algorithm = detect_algorithm(tensors)
        if algorithm is None:
            kind = unsupported_algorithm(tensors)
            if kind is not None:
                unsupported[kind].append(name)
            else:  # a module of unknown tensors, or one that holds nothing but an alpha / dora_scale
                unknown.extend(f"{name}.{t}" for t in [*tensors, *(["alpha"] if alpha is not None else []),
                                                       *(["dora_scale"] if dora_scale is not None else [])])
            continue
        allowed = set(algorithm.REQUIRED) | set(algorithm.OPTIONAL)
        missing = [t for t in algorithm.REQUIRED if t not in tensors]
        extra = [t for t in tensors if t not in allowed]
        if missing:
            broken.append(f"{name} ({algorithm.NAME}) lacks {missing}")
            continue
        if extra:
            kind = unsupported_algorithm({t: tensors[t] for t in extra})
            if kind is not None:
                unsupported[kind].append(name)
                continue
            other = detect_algorithm({t: tensors[t] for t in extra})
            if other is not None:
                broken.append(f"{name} holds tensors of two algorithms ({algorithm.NAME}: "
                              f"{sorted(allowed & set(tensors))}, {other.NAME}: {sorted(extra)})")
                continue
            unknown.extend(f"{name}.{t}" for t in extra)
            for t in extra:
                tensors.pop(t)
        try:
            alpha_value = as_float_scalar(alpha)
        except ValueError as exc:
            broken.append(f"{name}.alpha: {exc}")
            continue
        problem = _module_problem(name, algorithm, tensors, alpha_value, dora_scale, allow_non_finite)
        if problem is not None:
            broken.append(problem)
            continue
        if alpha_value is not None and not math.isfinite(alpha_value):
            alpha_value = None  # unused (checked above): keep no inf/NaN around to be written again
        stored = [*tensors, *(["alpha"] if alpha is not None else []),
                  *(["dora_scale"] if dora_scale is not None else [])]
        modules[name] = ModuleTensors(name, algorithm, tensors, alpha_value, dora_scale,
                                      keys=[f"{name}.{t}" for t in stored])
    problems = []
    for kind, names in unsupported.items():
        problems.append(f"{len(names)} module(s) use {kind}, which loha_diffusion does not support "
                        f"(e.g. {names[:3]}); remove them from the file or use a tool that applies {kind}")
    if broken:
        problems.append(f"{len(broken)} unusable module(s): " + "; ".join(broken[:5])
                        + (" ..." if len(broken) > 5 else ""))
    if unknown and not allow_unknown_keys:
        problems.append(f"{len(unknown)} key(s) belong to no known adapter algorithm, e.g. {sorted(unknown)[:5]}; "
                        "pass allow_unknown_keys=True to ignore them")
    if problems:
        raise AdapterFileError(f"{source}: " + "; ".join(problems))
    if not modules:
        raise AdapterFileError(f"{source}: holds no adapter tensors ({len(state_dict)} keys)")
    return modules, sorted(unknown)
