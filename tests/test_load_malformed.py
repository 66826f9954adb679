"""Files that are valid for other tools but odd (full-dimension LoKr with alpha = inf), and
malformed files: each must load as the community tools apply it, or fail with one
AdapterFileError that names the file and the key, leaving the pipeline untouched."""
import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import loha_diffusion  # noqa: F401
from formulas import loha_delta, lokr_delta
from loha_diffusion.cli import main as cli
from loha_diffusion.io import AdapterFileError
from loha_diffusion.layers import AdapterLayer
from tiny_models import run_tiny_pipeline

PROMPT = "a photo"
Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
CONV = "down_blocks.0.resnets.0.conv1"


@pytest.fixture
def pipe(sd15):
    return copy.deepcopy(sd15)


def kohya(path):
    return "lora_unet_" + path.replace(".", "_")


def state_of(pipe):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder")
            for k, v in getattr(pipe, c).state_dict().items()}


def assert_untouched(pipe, before):
    after = state_of(pipe)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, AdapterLayer) for m in pipe.unet.modules())


def full_lokr(weight, dtype=torch.float16, alpha=float("inf"), seed=0):
    """Both Kronecker factors full (LyCORIS' recommended 'full dimension' LoKr): LyCORIS stores
    alpha = dim (e.g. 100000), which an fp16 save turns into inf."""
    from loha_diffusion.algorithms.lokr import factorization  # the dims split only

    g = torch.Generator().manual_seed(seed)
    a, b = factorization(weight.shape[0])
    c, d = factorization(weight.shape[1])
    return {"lokr_w1": (torch.randn(a, c, generator=g) * 0.3).to(dtype),
            "lokr_w2": (torch.randn(b, d, *weight.shape[2:], generator=g) * 0.3).to(dtype),
            "alpha": torch.tensor(alpha, dtype=dtype)}


def test_full_dimension_lokr_with_inf_alpha_loads_at_scale_one(pipe, tmp_path):
    state = {}
    expected = copy.deepcopy(pipe)
    for path in (Q, K, CONV):
        weight = pipe.unet.get_submodule(path).weight
        module = full_lokr(weight)
        assert torch.isinf(module["alpha"])
        state.update({f"{kohya(path)}.{k}": v for k, v in module.items()})
        delta = lokr_delta({k: v for k, v in module.items() if k != "alpha"}, weight.shape)  # scale 1
        with torch.no_grad():
            target = expected.unet.get_submodule(path).weight
            target.copy_((target.double() + delta).float())
    path = tmp_path / "full_lokr.safetensors"
    save_file(state, str(path))
    base_image = run_tiny_pipeline(pipe, PROMPT)
    pipe.load_loha_weights(path)
    reference = run_tiny_pipeline(expected, PROMPT)
    assert np.abs(reference - base_image).max() > 1e-2
    np.testing.assert_allclose(run_tiny_pipeline(pipe, PROMPT), reference, atol=5e-3)

    saved = pipe.save_loha_weights(tmp_path / "again.safetensors")   # saves back to a file that loads
    again = load_file(str(saved))
    fresh = copy.deepcopy(pipe)
    fresh.unload_loha_weights()
    fresh.load_loha_weights(saved)
    np.testing.assert_allclose(run_tiny_pipeline(fresh, PROMPT), reference, atol=5e-3)
    assert all(torch.isfinite(v).all() for v in again.values())
    assert cli(["inspect", str(path)]) == 0


def test_used_alpha_must_be_finite(pipe, tmp_path):
    weight = pipe.unet.get_submodule(Q).weight
    g = torch.Generator().manual_seed(0)
    state = {f"{kohya(Q)}.lora_down.weight": torch.randn(4, weight.shape[1], generator=g),
             f"{kohya(Q)}.lora_up.weight": torch.randn(weight.shape[0], 4, generator=g),
             f"{kohya(Q)}.alpha": torch.tensor(float("inf"))}
    path = tmp_path / "bad_alpha.safetensors"
    save_file(state, str(path))
    before = state_of(pipe)
    with pytest.raises(AdapterFileError, match=rf"{path.name}.*{kohya(Q)}\.alpha|{kohya(Q)}\.alpha.*{path.name}"):
        pipe.load_loha_weights(path)
    assert_untouched(pipe, before)


def loha_module(weight, rank=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    out_dim, flat_in = weight.shape[0], weight[0].numel()
    return {"hada_w1_a": torch.randn(out_dim, rank, generator=g).to(dtype),
            "hada_w1_b": torch.randn(rank, flat_in, generator=g).to(dtype),
            "hada_w2_a": torch.randn(out_dim, rank, generator=g).to(dtype),
            "hada_w2_b": torch.randn(rank, flat_in, generator=g).to(dtype),
            "alpha": torch.tensor(1.0)}


def malformed_cases(weight):
    good = loha_module(weight)
    return {
        "integer factors": ({**good, "hada_w1_a": good["hada_w1_a"].to(torch.int32)}, "hada_w1_a"),
        "bool factors": ({**good, "hada_w2_b": good["hada_w2_b"] > 0}, "hada_w2_b"),
        "1-D factor": ({**good, "hada_w1_a": good["hada_w1_a"][:, 0].contiguous()}, "hada_w1_a"),
        "zero rank": (loha_module(weight, rank=0), "hada_w"),
        "lora zero rank": ({"lora_down.weight": torch.zeros(0, weight.shape[1]),
                            "lora_up.weight": torch.zeros(weight.shape[0], 0), "alpha": torch.tensor(1.0)},
                           "lora_"),
        "alpha only": ({"alpha": torch.tensor(4.0)}, "alpha"),
        "3-D lora up": ({"lora_down.weight": torch.ones(2, weight.shape[1]),
                         "lora_up.weight": torch.ones(weight.shape[0], 2, 3)}, "LoRA"),
    }


@pytest.mark.parametrize("case", ["integer factors", "bool factors", "1-D factor", "zero rank", "lora zero rank",
                                  "alpha only", "3-D lora up"])
def test_malformed_module_is_one_clear_error(pipe, tmp_path, case):
    weight = pipe.unet.get_submodule(Q).weight
    tensors, key_part = malformed_cases(weight)[case]
    good = {f"{kohya(K)}.{k}": v for k, v in loha_module(pipe.unet.get_submodule(K).weight).items()}
    path = tmp_path / "malformed.safetensors"
    save_file({**good, **{f"{kohya(Q)}.{k}": v for k, v in tensors.items()}}, str(path))
    before = state_of(pipe)
    with pytest.raises(AdapterFileError) as info:
        pipe.load_loha_weights(path)
    message = str(info.value)
    assert path.name in message and kohya(Q) in message and key_part in message
    assert_untouched(pipe, before)
    assert pipe.get_loha_adapters(flat=True) == []


def test_alpha_only_module_allowed_with_unknown_keys(pipe, tmp_path):
    good = {f"{kohya(K)}.{k}": v for k, v in loha_module(pipe.unet.get_submodule(K).weight).items()}
    path = tmp_path / "alpha_only.safetensors"
    save_file({**good, f"{kohya(Q)}.alpha": torch.tensor(4.0)}, str(path))
    with pytest.warns(UserWarning, match=f"{kohya(Q)}.alpha"):
        pipe.load_loha_weights(path, allow_unknown_keys=True)
    assert isinstance(pipe.unet.get_submodule(K), AdapterLayer)


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_cli_reports_malformed_files_in_one_line(pipe, tmp_path, capsys, command):
    weight = pipe.unet.get_submodule(Q).weight
    tensors, _ = malformed_cases(weight)["1-D factor"]
    path = tmp_path / "malformed.safetensors"
    save_file({f"{kohya(Q)}.{k}": v for k, v in tensors.items()}, str(path),
              metadata={"ss_base_model_version": "sd_v1"})
    argv = ["inspect", str(path)] if command == "inspect" else ["convert", str(path), str(tmp_path / "o"), "--to",
                                                                "peft", "--family", "sd1"]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and kohya(Q) in err


def overflowing_cases(weight):
    """Finite tensors whose weight change overflows fp32: each factor alone is harmless."""
    huge_loha = {k: (v * 1e10 if k != "alpha" else v) for k, v in loha_module(weight).items()}  # |dW| ~ 1e40
    lokr = full_lokr(weight, dtype=torch.float32, alpha=1.0)
    factored_lokr = {"lokr_w1_a": lokr["lokr_w1"][:, :1].contiguous(), "lokr_w1_b": lokr["lokr_w1"][:1].contiguous(),
                     "lokr_w2": lokr["lokr_w2"] * 1e20, "alpha": torch.tensor(3e38)}  # used alpha: scale 3e38
    return {"loha factors": huge_loha, "lokr alpha": factored_lokr}


@pytest.mark.parametrize("case", ["loha factors", "lokr alpha"])
def test_finite_tensors_that_overflow_are_refused_at_load(pipe, tmp_path, case):
    weight = pipe.unet.get_submodule(Q).weight
    tensors = overflowing_cases(weight)[case]
    formula = lokr_delta if case.startswith("lokr") else loha_delta
    body = {k: v for k, v in tensors.items() if k != "alpha"}  # the oracle: the change is not representable in fp32
    assert not torch.isfinite(formula(body, weight.shape, float(tensors["alpha"])).float()).all()
    good = {f"{kohya(K)}.{k}": v for k, v in loha_module(pipe.unet.get_submodule(K).weight).items()}
    path = tmp_path / "overflow.safetensors"
    save_file({**good, **{f"{kohya(Q)}.{k}": v for k, v in tensors.items()}}, str(path))
    before = state_of(pipe)
    with pytest.raises(AdapterFileError, match="overflows torch.float32") as info:
        pipe.load_loha_weights(path)
    assert path.name in str(info.value) and kohya(Q) in str(info.value)
    assert_untouched(pipe, before)


def test_change_too_large_for_fp16_weights_is_refused_only_there(pipe, tmp_path):
    weight = pipe.unet.get_submodule(Q).weight
    tensors = {k: (v * 300 if k != "alpha" else v) for k, v in loha_module(weight).items()}  # |dW| ~ 1e5 to 1e9
    path = tmp_path / "large.safetensors"
    save_file({f"{kohya(Q)}.{k}": v for k, v in tensors.items()}, str(path))
    half = copy.deepcopy(pipe).to(torch.float16)
    before = state_of(half)
    with pytest.raises(AdapterFileError, match="overflows torch.float16"):
        half.load_loha_weights(path)
    assert_untouched(half, before)
    pipe.load_loha_weights(path)  # representable in fp32: a legitimate, if extreme, file
    assert isinstance(pipe.unet.get_submodule(Q), AdapterLayer)
