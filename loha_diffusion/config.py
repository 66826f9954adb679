"""Adapter configs with PEFT's surface (LoHaConfig / LoRAConfig) and PEFT's pattern rules."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import ClassVar


@dataclass
class AdapterConfig:
    """Which modules get an adapter, and with which rank/alpha.

    ``target_modules``: a list of names matched as suffixes of the module path at a dot
    boundary (``"to_q"`` matches ``...attn1.to_q``), or one string used as a regex that must
    match the whole path. ``exclude_modules`` works the same way. ``rank_pattern`` /
    ``alpha_pattern`` follow PEFT: the first key, in the order given, whose regex matches the
    end of the module path at a dot boundary wins. ``alpha`` and its alias ``lora_alpha``
    (the name PEFT's own LoHa docs use) are the same field.

    ``layers_to_transform`` (an index or a list) keeps, of the modules a *list* of
    ``target_modules`` finds by suffix, those inside the numbered layers given: the number after
    ``<layers_pattern>.`` (a name or a list of names) in the path, or without a pattern the first
    number after the second segment (``encoder.layers.3.mlp.fc1`` -> 3). ``modules_to_save``
    names modules (matched as plain path suffixes) that are trained and saved whole, as a copy
    per adapter; no adapter goes on them or inside them. All three follow
    ``check_target_module_exists`` and ``_set_trainable`` of peft 0.21 (peft/tuners/tuners_utils.py,
    peft/utils/other.py).
    """

    algorithm: ClassVar[str] = ""

    r: int = 8
    alpha: float | None = None
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init_weights: bool | str = True
    low_cpu_mem_usage: bool = False
    lora_alpha: float | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self):
        if self.lora_alpha is not None and self.alpha is not None and self.lora_alpha != self.alpha:
            raise ValueError(f"alpha={self.alpha} and lora_alpha={self.lora_alpha} disagree; they are the same "
                             "setting, pass only one")
        if self.alpha is None:
            self.alpha = 8.0 if self.lora_alpha is None else self.lora_alpha  # PEFT's default alpha is 8
        self.lora_alpha = self.alpha
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if not self.target_modules:
            raise ValueError(f"{type(self).__name__} needs target_modules: a list of module names such as "
                             "['to_q', 'to_k', 'to_v', 'to_out.0'] or a regex string")
        for name, value in [("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("rank_dropout", "module_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        self._check_layer_selection()
        if self.init_weights not in (True, False, "lycoris", "peft"):
            raise ValueError(f"init_weights must be True, False, 'lycoris' or 'peft', got {self.init_weights!r}")

    def _check_layer_selection(self) -> None:
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = sorted(self.modules_to_save)
        if isinstance(self.layers_to_transform, (set, tuple)):
            self.layers_to_transform = sorted(self.layers_to_transform)
        layers = self.layers_to_transform
        indices = [layers] if isinstance(layers, int) else layers
        if indices is not None and not (isinstance(indices, list) and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices)):
            raise ValueError(f"layers_to_transform must be a layer index or a list of them, got {layers!r}")
        if self.layers_pattern and layers is None:
            raise ValueError(f"layers_pattern={self.layers_pattern!r} needs layers_to_transform: the indices of the "
                             "layers to adapt")
        if isinstance(self.target_modules, str) and (layers is not None or self.layers_pattern):
            raise ValueError("layers_to_transform / layers_pattern select among the modules a list of target_modules "
                             "finds; with a regex target_modules put the layer numbers into the regex instead")

    @property
    def init_scheme(self) -> str:
        if self.init_weights is False:
            return "random"
        return "lycoris" if self.init_weights is True else self.init_weights

    def matches(self, path: str) -> bool:
        """Whether ``path`` gets an adapter, by PEFT's rule (``check_target_module_exists``)."""
        if self.exclude_modules and _matches(self.exclude_modules, path):
            return False
        if self.modules_to_save and any(re.match(rf"(^|.*\.){name}($|\..*)", path) for name in self.modules_to_save):
            return False  # a module trained whole, or inside one
        if isinstance(self.target_modules, str) or path in self.target_modules:
            return _matches(self.target_modules, path)  # a full path given in the list skips the layer filter
        if not any(path.endswith("." + t) for t in self.target_modules):
            return False
        layers = self.layers_to_transform
        if layers is None or layers == []:
            return True
        index = layer_index(path, self.layers_pattern)
        return index is not None and (index == layers if isinstance(layers, int) else index in layers)

    def rank_for(self, path: str) -> int:
        key = pattern_key(self.rank_pattern, path)
        return self.r if key is None else self.rank_pattern[key]

    def alpha_for(self, path: str) -> float:
        key = pattern_key(self.alpha_pattern, path)
        return float(self.alpha if key is None else self.alpha_pattern[key])

    def to_dict(self) -> dict:
        data = asdict(self)
        data["algorithm"] = self.algorithm
        return data


def _matches(targets, path: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


def layer_index(path: str, layers_pattern: list[str] | str | None) -> int | None:
    """The layer number in ``path`` that ``layers_to_transform`` selects on (PEFT's regexes: the
    first numbered segment, lazily, so that a nested index such as an expert's is not taken)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match is not None:
                break
    return None if match is None else int(match["idx"])


def pattern_key(patterns, path: str) -> str | None:
    """PEFT's ``get_pattern_key``: first key whose regex matches the path's end at a dot boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


@dataclass
class LoHaConfig(AdapterConfig):
    """LoHa: dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r."""

    algorithm: ClassVar[str] = "loha"


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA / LoCon: dW = up @ down * alpha / r (``use_effective_conv2d`` adds the Tucker ``lora_mid``)."""

    algorithm: ClassVar[str] = "lora"


@dataclass
class LoKrConfig(AdapterConfig):
    """LoKr: dW = kron(w1, w2) * alpha / r (w1 full unless ``decompose_both``; both full => scale 1)."""

    algorithm: ClassVar[str] = "lokr"

    decompose_both: bool = False
    decompose_factor: int = -1


CONFIG_CLASSES = {cls.algorithm: cls for cls in (LoHaConfig, LoRAConfig, LoKrConfig)}
