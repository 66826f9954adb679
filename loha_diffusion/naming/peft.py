"""PEFT key layout: ``base_model.model.<module path>.<tensor>`` (peft 0.21).

``get_peft_model_state_dict`` (what PEFT saves) drops the adapter name:
``base_model.model.blk.lora_A.weight``, ``base_model.model.blk.hada_w1_a``. A live
``PeftModel.state_dict()`` keeps it after the tensor's first segment:
``base_model.model.blk.lora_A.default.weight``, ``base_model.model.blk.hada_w1_a.default``.

Tensor names: LoHa (``hada_*``) and LoKr (``lokr_*``) are the community names; LoRA uses
``lora_A.weight`` for ``lora_down.weight`` and ``lora_B.weight`` for ``lora_up.weight``.
PEFT keeps alpha in the adapter config (``lora_alpha`` / ``alpha`` + ``alpha_pattern``), not
in the state dict.

:data:`PEFT_ALGORITHMS` is the one table of what PEFT holds: which of our algorithms, under
which ``peft_type``, with which config field for alpha.
"""
from __future__ import annotations

import re
from typing import NamedTuple

from ..algorithms import get_algorithm

PEFT_PREFIX = "base_model.model."


class PeftType(NamedTuple):
    peft_type: str  # adapter_config.json "peft_type"
    alpha_field: str  # the config field holding alpha


PEFT_ALGORITHMS = {"lora": PeftType("LORA", "lora_alpha"), "loha": PeftType("LOHA", "alpha"),
                   "lokr": PeftType("LOKR", "alpha")}

# community tensor name -> PEFT tensor name, where they differ (the one table of it)
TO_PEFT_TENSOR = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
FROM_PEFT_TENSOR = {peft: community for community, peft in TO_PEFT_TENSOR.items()}

# The tensors PEFT's LoRA, LoHa and LoKr layers hold. LoRA's ``lora_mid.weight`` has no PEFT
# counterpart; a converter must refuse it.
PEFT_TENSORS = frozenset(
    TO_PEFT_TENSOR.get(name, name)
    for algorithm in map(get_algorithm, PEFT_ALGORITHMS)
    for name in (*algorithm.REQUIRED, *algorithm.OPTIONAL)
    if name != "lora_mid.weight"
)
_ROOTS = {name.split(".", 1)[0]: name for name in PEFT_TENSORS}


def to_peft_tensor_name(tensor_name: str) -> str:
    return TO_PEFT_TENSOR.get(tensor_name, tensor_name)


def from_peft_tensor_name(tensor_name: str) -> str:
    return FROM_PEFT_TENSOR.get(tensor_name, tensor_name)


def peft_key(module_path: str, tensor_name: str, adapter_name: str | None = None,
             prefix: str = PEFT_PREFIX) -> str:
    """The PEFT key of a community tensor; with ``adapter_name`` the live-model layout."""
    root, dot, rest = to_peft_tensor_name(tensor_name).partition(".")
    if adapter_name is not None:
        root = f"{root}.{adapter_name}"
    return f"{prefix}{module_path}.{root}{dot}{rest}"


class PeftKey(NamedTuple):
    module_path: str
    tensor_name: str  # community name (lora_down.weight, hada_w1_a, ...)
    adapter_name: str | None


def parse_peft_key(key: str, prefix: str = PEFT_PREFIX) -> PeftKey | None:
    """(module path, community tensor name, adapter name or None); None if ``key`` does not
    end in a LoRA/LoHa/LoKr tensor. ``prefix`` is optional in ``key``."""
    parts = key.removeprefix(prefix).split(".")
    # The module path may itself contain a segment named like a tensor only in theory;
    # search from the right so the tensor found is the last one.
    for i in range(len(parts) - 1, 0, -1):
        full = _ROOTS.get(parts[i])
        if full is None:
            continue
        tail = parts[i + 1:]
        expected_tail = full.split(".")[1:]  # ["weight"] for lora_A/B, [] for the others
        adapter = None
        if len(tail) == len(expected_tail) + 1:
            adapter, tail = tail[0], tail[1:]
        if tail != expected_tail:
            return None
        return PeftKey(".".join(parts[:i]), from_peft_tensor_name(full), adapter)
    return None


def exact_module_pattern(module_path: str) -> str:
    """A ``rank_pattern`` / ``alpha_pattern`` key that matches ``module_path`` and nothing else.

    PEFT matches pattern keys with ``re.match(rf"(.*\\.)?({key})$", name)``; the anchor
    stops a path from also matching longer names that end with it.
    """
    return "^" + re.escape(module_path)
