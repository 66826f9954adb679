"""Fuzzing the loader: valid SD1.5 / SDXL / Flux files of several algorithms, mutated byte by byte
and tensor by tensor, plus files that are no adapter at all.

The rule asserted for every case: ``load_loha_weights`` either succeeds, and then the adapter
fuses into finite weights and unloads back to the bit-identical pipeline, or it raises one
``AdapterFileError`` (a ``ValueError``) or ``OSError`` whose message names the file, with the
pipeline bit-identical and no adapter left. Any other exception, a hang (hypothesis' deadline)
or a partial change fails. Examples are derandomized, so CI runs the same cases every time.
"""
import copy
import json
import math
import resource
import struct
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

import loha_diffusion  # noqa: F401  (attaches the pipeline methods)
from adapter_files import make_file_tensors
from dit_files import make_original_file, original_modules, text_encoder_file
from loha_diffusion.layers import AdapterLayer
from tiny_dit import tiny_flux_pipeline
from tiny_models import tiny_sd15_pipeline, tiny_sdxl_pipeline

UNET_TARGETS = ("to_q", "to_v", "conv1", "proj_in")
TE_TARGETS = ("q_proj", "fc1")
ALGORITHMS = ["loha", "lora", "lokr_both", "lokr_tucker", "lokr", "full"]

FUZZ = settings(max_examples=60, deadline=timedelta(seconds=20), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
# BFL-named Flux modules (stacked qkv / linear1, the swapped final modulation, plain ones) and
# the algorithm each gets
FLUX_MODULES = {"double_blocks_0_img_attn_qkv": "loha", "double_blocks_1_txt_attn_qkv": "lokr",
                "single_blocks_0_linear1": "lora", "final_layer_adaLN_modulation_1": "lokr_lowrank",
                "double_blocks_0_img_mlp_0": "full", "single_blocks_1_linear2": "loha"}


def flux_file_tensors(pipe) -> dict:
    state = {}
    for i, module in enumerate(m for m in original_modules(pipe) if m[0] in FLUX_MODULES):
        state.update(make_original_file(pipe, FLUX_MODULES[module[0]], modules=[module], seed=i)[0])
    te, _ = text_encoder_file(pipe, [("text_encoder", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                                      "encoder.layers.0.self_attn.q_proj"),
                                     ("text_encoder_2", "lora_te3_encoder_block_0_layer_0_SelfAttention_q",
                                      "encoder.block.0.layer.0.SelfAttention.q")], algo="loha")
    return {**state, **te}


class Source:
    """One valid adapter for one pipeline: its tensors, metadata and serialized bytes."""

    def __init__(self, pipe, family: str, dtype=torch.float32):
        if family == "flux":
            state = flux_file_tensors(pipe)
        else:
            state, _ = make_file_tensors(pipe, ALGORITHMS, sdxl=family == "sdxl", unet_targets=UNET_TARGETS,
                                         te_targets=TE_TARGETS)
        self.tensors = {k: v.to(dtype).contiguous() for k, v in state.items()}
        version = {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1"}[family]
        self.metadata = {"ss_base_model_version": version, "ss_network_dim": "4"}
        self.blob = save(self.tensors, metadata=self.metadata)
        self.header_len = struct.unpack("<Q", self.blob[:8])[0]
        self.header = json.loads(self.blob[8:8 + self.header_len])


class Case:
    """A pipeline with its untouched state, and a folder to write mutated files into."""

    def __init__(self, pipe, folder: Path, sources: list[Source]):
        self.pipe, self.folder, self.sources = pipe, folder, sources
        self.before = self.state()

    def components(self):
        return [getattr(self.pipe, c) for c in COMPONENTS if getattr(self.pipe, c, None) is not None]

    def state(self):
        return {f"{i}.{k}": v.detach().clone() for i, module in enumerate(self.components())
                for k, v in module.state_dict().items()}

    def assert_untouched(self):
        after = self.state()
        assert after.keys() == self.before.keys()
        changed = [k for k in self.before if not torch.equal(after[k], self.before[k])]
        assert not changed, f"changed: {changed[:5]}"
        assert not any(isinstance(m, AdapterLayer) for module in self.components() for m in module.modules())

    def write(self, data: bytes, name: str = "adapter.safetensors") -> Path:
        path = self.folder / name
        path.write_bytes(data)
        return path

    def check(self, path: Path) -> str:
        """Apply the rule to loading ``path``; returns "loaded" or "refused"."""
        try:
            self.pipe.load_loha_weights(path)
        except (ValueError, OSError) as error:
            assert path.name in str(error), f"the message does not name the file: {error}"
            self.assert_untouched()
            return "refused"
        except Exception as error:  # anything else is a bug: show the case
            raise AssertionError(f"raw {type(error).__name__} escaped: {error}") from error
        try:
            self.pipe.fuse_loha()
            for module in self.components():
                assert all(torch.isfinite(p).all() for p in module.parameters()), f"{type(module).__name__} not finite"
            self.pipe.unfuse_loha()
        finally:
            self.pipe.unload_loha_weights()
        self.assert_untouched()
        return "loaded"


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    sd15 = tiny_sd15_pipeline(tmp_path_factory.mktemp("sd15"))
    sdxl = tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))
    flux = tiny_flux_pipeline(tmp_path_factory.mktemp("flux"))
    flux_file = Source(flux, "flux", torch.bfloat16)  # made on the fp32 weights, loaded onto bf16 ones
    flux.to(torch.bfloat16)
    return {
        "sd15": Case(sd15, tmp_path_factory.mktemp("sd15_files"),
                     [Source(sd15, "sd1"), Source(sd15, "sd1", torch.float16)]),
        "sdxl": Case(sdxl, tmp_path_factory.mktemp("sdxl_files"), [Source(sdxl, "sdxl", torch.bfloat16)]),
        "flux": Case(flux, tmp_path_factory.mktemp("flux_files"), [flux_file]),
    }


def test_sources_are_valid(cases):
    """The unmutated files load (the fuzz starts from real, working files)."""
    for case in cases.values():
        for source in case.sources:
            assert case.check(case.write(source.blob)) == "loaded"


# -- byte-level mutations --------------------------------------------------------------------------------
def with_header(source: Source, header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + source.blob[8 + source.header_len:]


def tensor_entries(source: Source) -> list[str]:
    return sorted(k for k in source.header if k != "__metadata__")


@st.composite
def byte_mutations(draw, source: Source) -> bytes:
    blob, data_start = source.blob, 8 + source.header_len
    kind = draw(st.sampled_from(["truncate", "header_byte", "header_length", "dtype", "offsets", "shape",
                                 "data_bytes", "metadata"]))
    if kind == "truncate":
        return blob[:draw(st.integers(0, len(blob) - 1))]
    if kind == "header_byte":
        i = draw(st.integers(0, data_start - 1))
        return blob[:i] + bytes([draw(st.integers(0, 255))]) + blob[i + 1:]
    if kind == "header_length":
        claimed = draw(st.one_of(st.integers(0, 2 * source.header_len), st.integers(0, 2 ** 64 - 1)))
        return struct.pack("<Q", claimed) + blob[8:]
    if kind == "data_bytes":
        i = draw(st.integers(data_start, len(blob) - 1))
        n = draw(st.integers(1, 8))
        return blob[:i] + draw(st.binary(min_size=n, max_size=n)) + blob[i + n:]
    header = copy.deepcopy(source.header)
    if kind == "metadata":
        header["__metadata__"] = draw(st.one_of(st.none(), st.integers(), st.lists(st.text(max_size=3), max_size=2),
                                                st.dictionaries(st.text(max_size=5), st.integers(), max_size=2)))
        return with_header(source, header)
    entry = header[draw(st.sampled_from(tensor_entries(source)))]
    if kind == "dtype":
        entry["dtype"] = draw(st.sampled_from(["F32", "F16", "BF16", "F64", "I32", "I64", "I8", "U8", "BOOL",
                                               "F8_E4M3", "C64", "XX", "", 7]))
    elif kind == "offsets":
        entry["data_offsets"] = draw(st.one_of(
            st.lists(st.integers(-2, len(blob) + 2), min_size=2, max_size=2),
            st.lists(st.integers(0, 2 ** 63), min_size=2, max_size=2),
            st.sampled_from([None, "0", [0], [0, 1, 2], [1.5, 2]])))
    else:
        entry["shape"] = draw(st.one_of(st.lists(st.integers(0, 64), max_size=5),
                                        st.lists(st.integers(-3, 2 ** 40), min_size=1, max_size=3),
                                        st.sampled_from([None, "4", [2.0, 2], [[1]]])))
    return with_header(source, header)


@FUZZ
@given(data=st.data())
def test_byte_mutations(cases, data):
    name = data.draw(st.sampled_from(sorted(cases)))
    case = cases[name]
    source = data.draw(st.sampled_from(case.sources))
    event(f"{name}: {case.check(case.write(data.draw(byte_mutations(source))))}")


# -- tensor-level mutations ------------------------------------------------------------------------------
LONG = "lora_unet_" + "x" * 5000


@st.composite
def tensor_mutations(draw, source: Source) -> dict:
    tensors = dict(source.tensors)
    key = draw(st.sampled_from(sorted(tensors)))
    module, _, tensor_name = key.partition(".")  # Kohya module names hold no dots
    tensor = tensors[key]
    kind = draw(st.sampled_from(["non_finite", "dtype", "rank", "rename", "drop", "second_algorithm", "huge",
                                 "alpha"]))
    if kind == "non_finite" and tensor.numel() and tensor.is_floating_point():
        changed = tensor.clone().flatten()
        changed[draw(st.integers(0, changed.numel() - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        tensors[key] = changed.reshape(tensor.shape)
    elif kind == "dtype":
        tensors[key] = tensor.to(draw(st.sampled_from([torch.int32, torch.int8, torch.bool, torch.float16,
                                                       torch.bfloat16, torch.float64, torch.uint8])))
    elif kind == "rank":
        how = draw(st.sampled_from(["unsqueeze", "flatten", "first_row", "empty"]))
        tensors[key] = {"unsqueeze": lambda t: t.unsqueeze(0), "flatten": lambda t: t.flatten(),
                        "first_row": lambda t: t[0].contiguous() if t.dim() else t.reshape(1),
                        "empty": lambda t: t.new_zeros((0, *t.shape[1:]) if t.dim() else (0,))}[how](tensor)
    elif kind == "rename":
        new_module = draw(st.sampled_from([LONG, module + "_ü", module + "_", module + ".", "lora_foo_" + module,
                                           "", module.upper(), module.replace("lora_", "lycoris_")]))
        del tensors[key]
        tensors[f"{new_module}.{tensor_name}"] = tensor
    elif kind == "drop":
        del tensors[key]
    elif kind == "second_algorithm":
        extra = draw(st.sampled_from(["hada_w1_a", "lora_down.weight", "lokr_w1", "diff", "w_norm", "on_input"]))
        tensors[f"{module}.{extra}"] = torch.ones(2, 2)
    elif kind == "huge":  # every tensor of the module scaled: finite in fp32, the product may not be
        factor = draw(st.sampled_from([1e4, 1e10, 1e20, 1e30]))
        for name in [k for k in tensors if k.startswith(module + ".") and not k.endswith(".alpha")]:
            tensors[name] = tensors[name].float() * factor
    elif kind == "alpha":
        tensors[f"{module}.alpha"] = torch.tensor(draw(st.sampled_from(
            [math.nan, math.inf, -math.inf, 0.0, -4.0, 1e38, 1e5, 65504.0])), dtype=tensor.dtype
            if tensor.is_floating_point() else torch.float32)
    return tensors


@FUZZ
@given(data=st.data())
def test_tensor_mutations(cases, data):
    name = data.draw(st.sampled_from(sorted(cases)))
    case = cases[name]
    source = data.draw(st.sampled_from(case.sources))
    tensors = data.draw(tensor_mutations(source))
    blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata=source.metadata)
    event(f"{name}: {case.check(case.write(blob))}")


# -- things that are no adapter file ---------------------------------------------------------------------
def test_files_and_folders_that_are_no_adapter(cases, tmp_path):
    case = cases["sd15"]
    source = case.sources[0]
    empty_folder = tmp_path / "empty_folder"
    empty_folder.mkdir()
    pickled = tmp_path / "pickled.pt"
    torch.save(source.tensors, pickled)
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(pickled.read_bytes())
    pickle_folder = tmp_path / "pickle_folder"
    pickle_folder.mkdir()
    (pickle_folder / "adapter_model.bin").write_bytes(pickled.read_bytes())
    bad_config = tmp_path / "bad_config"
    bad_config.mkdir()
    (bad_config / "adapter_config.json").write_text("{not json")
    (bad_config / "adapter_model.safetensors").write_bytes(source.blob)
    list_config = tmp_path / "list_config"
    list_config.mkdir()
    (list_config / "adapter_config.json").write_text("[1, 2]")
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    named_like_a_file = tmp_path / "folder.safetensors"
    named_like_a_file.mkdir()
    for path in (case.write(b"", "empty.safetensors"), case.write(b"\0" * 8, "zeros.safetensors"),
                 case.write(save({}), "no_tensors.safetensors"), empty_folder, pickled, disguised, pickle_folder,
                 bad_config, list_config, config_only, named_like_a_file):
        assert case.check(path) == "refused", path


def test_huge_header_claims_allocate_nothing(cases):
    """A header that claims gigabytes of tensor data in a small file is refused before any
    allocation: the process' peak memory does not move."""
    case = cases["sd15"]
    source = case.sources[0]
    header = copy.deepcopy(source.header)
    entry = header[tensor_entries(source)[0]]
    entry["shape"], entry["data_offsets"] = [1 << 30], [0, 4 << 30]  # 4 GiB of F32 claimed, a few KB present
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for blob in (with_header(source, header), struct.pack("<Q", 1 << 40) + source.blob[8:]):
        assert case.check(case.write(blob)) == "refused"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200 * 1024
