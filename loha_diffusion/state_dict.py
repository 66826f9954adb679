"""A community state dict grouped per module: which algorithm, its tensors, alpha, DoRA scale.

Keys are ``<module name>.<tensor name>`` split at the first dot (docs/formats.md 1.1). Nothing here
knows about models: that is the resolver's job (``attach.py``).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from types import ModuleType

import torch

from .algorithms import as_float_scalar, detect_algorithm
from .algorithms.unsupported import unsupported_algorithm
from .io import AdapterFileError
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


def group_modules(state_dict: dict[str, torch.Tensor], source: str = "adapter",
                  allow_unknown_keys: bool = False) -> tuple[dict[str, ModuleTensors], list[str]]:
    """({module name: ModuleTensors}, ignored keys). Raises one error listing every problem."""
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
            else:
                unknown.extend(f"{name}.{t}" for t in tensors)
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
            unknown.extend(f"{name}.{t}" for t in extra)
            for t in extra:
                tensors.pop(t)
        try:
            alpha_value = as_float_scalar(alpha)
        except ValueError as exc:
            broken.append(f"{name}.alpha: {exc}")
            continue
        stored = [*tensors, *(["alpha"] if alpha is not None else []),
                  *(["dora_scale"] if dora_scale is not None else [])]
        modules[name] = ModuleTensors(name, algorithm, tensors, alpha_value, dora_scale,
                                      keys=[f"{name}.{t}" for t in stored])
    problems = []
    for kind, names in unsupported.items():
        problems.append(f"{len(names)} module(s) use {kind}, which loha_diffusion does not support "
                        f"(e.g. {names[:3]}); remove them from the file or use a tool that applies {kind}")
    if broken:
        problems.append(f"incomplete modules: {broken[:5]}")
    if unknown and not allow_unknown_keys:
        problems.append(f"{len(unknown)} key(s) belong to no known adapter algorithm, e.g. {sorted(unknown)[:5]}; "
                        "pass allow_unknown_keys=True to ignore them")
    if problems:
        raise AdapterFileError(f"{source}: " + "; ".join(problems))
    if not modules:
        raise AdapterFileError(f"{source}: holds no adapter tensors ({len(state_dict)} keys)")
    return modules, sorted(unknown)
