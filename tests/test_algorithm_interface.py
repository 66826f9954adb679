"""Every algorithm module implements ``algorithms.base.Algorithm`` completely and consistently.

The member lists below are written out here, not read from the library, so that a member added
to, dropped from or misspelt in the Protocol or in a module fails this file. The checker is
itself tested on broken copies of a real module.
"""
import importlib
import pkgutil
import types

import pytest
import torch

import loha_diffusion.algorithms as algorithms_package
from loha_diffusion.algorithms import ALGORITHMS, Algorithm, loha

FUNCTIONS = ("detect", "rank", "scale", "delta_weight", "check_shapes")
CAPABILITIES = ("delta_bias", "delta_bound", "low_rank_factors", "fused_factors", "thin_rank", "build_cost",
                "init_params", "take_rows", "delta_rows")
NAME_TUPLES = ("REQUIRED", "OPTIONAL")
CONSTANTS = {"NAME": str, "READS_WEIGHT": bool, "TENSOR_DIMS": dict}
# A capability is only usable with these: the cost model needs the rank and the build cost of a
# thin pair, and the fused ops are a faster form of the thin pair.
NEEDS = {
    "low_rank_factors": ("thin_rank", "build_cost"),
    "thin_rank": ("low_rank_factors",),
    "build_cost": ("low_rank_factors",),
    "fused_factors": ("low_rank_factors",),
}
# What each algorithm offers; dropping one silently sends layers down a slower path.
EXPECTED_CAPABILITIES = {
    "loha": {"delta_bound", "low_rank_factors", "fused_factors", "thin_rank", "build_cost", "init_params",
             "take_rows"},
    "lora": {"delta_bound", "low_rank_factors", "fused_factors", "thin_rank", "build_cost", "init_params",
             "take_rows"},
    "lokr": {"delta_bound", "init_params", "take_rows", "delta_rows"},
    "full": {"delta_bias", "delta_bound", "take_rows"},
    "norm": {"delta_bias", "delta_bound"},
    "ia3": set(),
}


def interface_problems(module) -> list[str]:
    """What ``module`` lacks or gets wrong against the documented interface."""
    problems = [] if isinstance(module, Algorithm) else ["not an instance of the Algorithm protocol"]
    for name in FUNCTIONS:
        if not callable(getattr(module, name, None)):
            problems.append(f"{name} is not a function")
    for name in CAPABILITIES:
        if not hasattr(module, name):
            problems.append(f"{name} is missing (set it to None where unsupported)")
        elif getattr(module, name) is not None and not callable(getattr(module, name)):
            problems.append(f"{name} is neither a function nor None")
    for name in NAME_TUPLES:
        value = getattr(module, name, None)
        if not (isinstance(value, tuple) and all(isinstance(n, str) for n in value)):
            problems.append(f"{name} is not a tuple of tensor names")
    for name, kind in CONSTANTS.items():
        if not isinstance(getattr(module, name, None), kind):
            problems.append(f"{name} is not a {kind.__name__}")
    for capability, needed in NEEDS.items():
        if getattr(module, capability, None) is not None:
            problems.extend(f"{capability} without {other}" for other in needed if getattr(module, other, None) is None)
    return problems


def algorithm_modules():
    """Every module of the package that declares a NAME, registered or not."""
    modules = [importlib.import_module(f"{algorithms_package.__name__}.{info.name}")
               for info in pkgutil.iter_modules(algorithms_package.__path__)]
    return [m for m in modules if hasattr(m, "NAME")]


def test_the_protocol_declares_exactly_the_documented_members():
    members = {n for n in vars(Algorithm) if not n.startswith("_")} | set(Algorithm.__annotations__)
    assert members == {*FUNCTIONS, *CAPABILITIES, *NAME_TUPLES, *CONSTANTS}


def test_every_algorithm_module_is_registered_under_a_unique_name():
    modules = algorithm_modules()
    names = [m.NAME for m in modules]
    assert len(names) == len(set(names))
    assert set(modules) == set(ALGORITHMS.values())
    assert all(ALGORITHMS[name].NAME == name for name in ALGORITHMS)


@pytest.mark.parametrize("name", sorted(EXPECTED_CAPABILITIES))
def test_registered_algorithm_implements_the_interface(name):
    module = ALGORITHMS[name]
    assert interface_problems(module) == []
    assert {c for c in CAPABILITIES if getattr(module, c) is not None} == EXPECTED_CAPABILITIES[name]
    assert module.READS_WEIGHT == (name == "ia3")


@pytest.mark.parametrize("name", [n for n, c in EXPECTED_CAPABILITIES.items() if "low_rank_factors" in c])
def test_thin_rank_and_build_cost_describe_the_low_rank_pair(name):
    module = ALGORITHMS[name]
    shape = (12, 8, 3, 3)
    params = module.init_params(shape, 4, scheme="random")
    up, down = module.low_rank_factors(params)
    assert up.shape[1] == down.shape[0] == module.thin_rank(params)
    assert up.shape[0] == shape[0] and down.shape[1] == 8 * 3 * 3
    assert isinstance(module.build_cost(shape, params), int) and module.build_cost(shape, params) > 0
    kind, factors = module.fused_factors(params)
    assert kind in ("product", "hadamard") and all(isinstance(f, torch.Tensor) for f in factors)


def broken_copy(template, **changes):
    """A module with ``template``'s members, then ``changes`` (a value of ``...`` deletes the member)."""
    module = types.ModuleType(f"broken_{template.NAME}")
    module.__dict__.update({k: v for k, v in vars(template).items() if not k.startswith("__")})
    for name, value in changes.items():
        if value is ...:
            delattr(module, name)
        else:
            setattr(module, name, value)
    return module


@pytest.mark.parametrize("changes,problem", [
    ({"delta_bias": ...}, "delta_bias is missing"),
    ({"low_rank_factor": loha.low_rank_factors, "low_rank_factors": ...}, "low_rank_factors is missing"),
    ({"detect": None}, "detect is not a function"),
    ({"check_shapes": ...}, "check_shapes is not a function"),
    ({"init_params": "lycoris"}, "init_params is neither a function nor None"),
    ({"thin_rank": None}, "low_rank_factors without thin_rank"),
    ({"low_rank_factors": None, "thin_rank": None, "build_cost": None}, "fused_factors without low_rank_factors"),
    ({"REQUIRED": ["hada_w1_a"]}, "REQUIRED is not a tuple of tensor names"),
    ({"READS_WEIGHT": ...}, "READS_WEIGHT is not a bool"),
])
def test_the_checker_finds_a_broken_module(changes, problem):
    module = broken_copy(loha, **changes)
    assert any(p.startswith(problem) for p in interface_problems(module))


def test_a_module_without_a_member_is_not_an_algorithm():
    assert isinstance(broken_copy(loha), Algorithm)
    assert not isinstance(broken_copy(loha, fused_factors=...), Algorithm)
    assert not isinstance(broken_copy(loha, rank=None), Algorithm)
