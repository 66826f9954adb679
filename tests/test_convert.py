"""Conversions and the CLI, checked through peft and diffusers themselves."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import loha_diffusion  # noqa: F401
from adapter_files import make_file_tensors, merged_reference
from loha_diffusion.cli import main
from loha_diffusion.convert import convert
from loha_diffusion.formats.peft import factorization
from tiny_models import run_tiny_pipeline, tiny_sd15_pipeline, tiny_sdxl_pipeline

PROMPT = "a photo"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    pipe = tiny_sd15_pipeline(folder / "tok")
    pipe.save_pretrained(folder / "model")
    return pipe, folder / "model"


def loha_file(pipe, tmp_path, algo="loha"):
    state, mods = make_file_tensors(pipe, algo)
    path = tmp_path / f"{algo}.safetensors"
    save_file(state, str(path))
    return path, run_tiny_pipeline(merged_reference(pipe, mods), PROMPT)


@pytest.mark.parametrize("algo", ["loha", "lora"])
def test_kohya_to_peft_loads_in_peft_and_back(base, tmp_path, algo):
    from peft import PeftModel

    pipe, model = base
    source, reference = loha_file(pipe, tmp_path, algo)
    folder = convert(source, tmp_path / "peft", "peft", base_model=model)
    config = json.loads((folder / "unet" / "adapter_config.json").read_text())
    assert config["peft_type"] == ("LOHA" if algo == "loha" else "LORA")
    through_peft = copy.deepcopy(pipe)
    through_peft.unet = PeftModel.from_pretrained(through_peft.unet, str(folder / "unet"))
    through_peft.text_encoder = PeftModel.from_pretrained(through_peft.text_encoder, str(folder / "text_encoder"))
    np.testing.assert_allclose(run_tiny_pipeline(through_peft, PROMPT), reference, atol=2e-3)

    back = convert(folder, tmp_path / "back.safetensors", "kohya", base_model=model)
    original, roundtrip = load_file(str(source)), load_file(str(back))
    assert original.keys() == roundtrip.keys()
    assert all(torch.equal(original[k], roundtrip[k]) for k in original)


def test_lokr_to_peft_loads_in_peft_and_back(base, tmp_path):
    """Every LoKr layout (both halves full, factorised w2, factorised w1 and w2, Tucker w2) in
    one file: PEFT's LoKr layers must compute the same images, and so must the file read back."""
    from peft import PeftModel

    pipe, model = base
    state, mods = make_file_tensors(pipe, ["lokr", "lokr_w2", "lokr_both", "lokr_tucker"])
    full_halves = next(k for k in state if k.endswith(".lokr_w2") and k.replace(".lokr_w2", ".lokr_w1") in state)
    del state[full_halves.replace(".lokr_w2", ".alpha")]  # both halves full: scale 1, an alpha is optional
    source = tmp_path / "lokr.safetensors"
    save_file(state, str(source))
    reference = run_tiny_pipeline(merged_reference(pipe, mods), PROMPT)
    assert np.abs(reference - run_tiny_pipeline(pipe, PROMPT)).max() > 1e-2
    folder = convert(source, tmp_path / "peft", "peft", base_model=model)
    assert json.loads((folder / "unet" / "adapter_config.json").read_text())["peft_type"] == "LOKR"
    through_peft = copy.deepcopy(pipe)
    through_peft.unet = PeftModel.from_pretrained(through_peft.unet, str(folder / "unet"))
    through_peft.text_encoder = PeftModel.from_pretrained(through_peft.text_encoder, str(folder / "text_encoder"))
    np.testing.assert_allclose(run_tiny_pipeline(through_peft, PROMPT), reference, atol=2e-3)

    back = convert(folder, tmp_path / "back.safetensors", "kohya", base_model=model)
    reloaded = copy.deepcopy(pipe)
    reloaded.load_loha_weights(str(back))
    np.testing.assert_allclose(run_tiny_pipeline(reloaded, PROMPT), reference, atol=2e-3)


def test_peft_lokr_factorization_is_peft_s():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    dims = [*range(1, 400), 640, 768, 1024, 1280, 2048, 2560, 3072, 4096, 5120, 10240]
    for dimension in dims:
        for factor in [-3, -2, -1, 0, *range(1, 40), 64, 320, 1024]:
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)


def test_lokr_to_peft_without_peft_installed(base, tmp_path):
    """The library never imports peft: a LoKr file converts with ``import peft`` failing."""
    pipe, model = base
    state, _ = make_file_tensors(pipe, ["lokr", "lokr_w2"])
    source = tmp_path / "lokr.safetensors"
    save_file(state, str(source))
    script = ("import sys; sys.modules['peft'] = None\n"
              "from loha_diffusion.convert import convert\n"
              f"convert({str(source)!r}, {str(tmp_path / 'peft')!r}, 'peft', base_model={str(model)!r})\n"
              "assert sys.modules['peft'] is None\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((tmp_path / "peft" / "unet" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LOKR" and isinstance(config["decompose_factor"], int)


@pytest.mark.parametrize("algo", ["loha", "lora"])
def test_to_diffusers_format_loads_in_plain_diffusers(base, tmp_path, algo):
    pipe, model = base
    source, reference = loha_file(pipe, tmp_path, algo)
    out = convert(source, tmp_path / "diffusers.safetensors", "diffusers", base_model=model)
    plain = copy.deepcopy(pipe)
    plain.load_lora_weights(str(out))                   # diffusers' own loader
    np.testing.assert_allclose(run_tiny_pipeline(plain, PROMPT), reference, atol=2e-3)


def test_loha_to_exact_lora_matches_to_fp32_rounding(base, tmp_path):
    pipe, model = base
    source, _ = loha_file(pipe, tmp_path)
    out = convert(source, tmp_path / "lora.safetensors", "kohya", base_model=model, as_lora_exact=True)
    loha, lora = load_file(str(source)), load_file(str(out))
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert lora[f"{name}.lora_down.weight"].shape == (16, 16, 3, 3)       # rank 4 -> 16
    assert float(lora[f"{name}.alpha"]) == 16.0
    from formulas import loha_delta, lora_delta
    t = {k.split(".", 1)[1]: v for k, v in loha.items() if k.startswith(name + ".")}
    expected = loha_delta({k: v for k, v in t.items() if k != "alpha"}, (16, 16, 3, 3), float(t["alpha"]))
    pair = {t: lora[f"{name}.{t}"] for t in ("lora_down.weight", "lora_up.weight")}
    got = lora_delta(pair, (16, 16, 3, 3), 16.0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_non_low_rank_needs_an_approximation(base, tmp_path):
    pipe, model = base
    source, reference = loha_file(pipe, tmp_path, "lokr")
    with pytest.raises(ValueError, match="approximate"):
        convert(source, tmp_path / "x.safetensors", "diffusers", base_model=model)
    assert not (tmp_path / "x.safetensors").exists()
    out = convert(source, tmp_path / "x.safetensors", "diffusers", base_model=model, approximate_rank=64)
    plain = copy.deepcopy(pipe)
    plain.load_lora_weights(str(out))
    np.testing.assert_allclose(run_tiny_pipeline(plain, PROMPT), reference, atol=2e-3)  # rank 64 >= full rank here


def test_sdxl_written_with_sgm_names_and_metadata(tmp_path):
    pipe = tiny_sdxl_pipeline(tmp_path)
    state, _ = make_file_tensors(pipe, "loha", sdxl=True)
    pipe.load_loha_weights(state, adapter_name="x")
    out = pipe.save_loha_weights(tmp_path / "out.safetensors", save_dtype=torch.float16)
    written = load_file(str(out))
    assert written.keys() == state.keys()                 # SGM UNet names, te1/te2 with text_model
    assert all(v.dtype == torch.float16 for v in written.values())
    assert all(torch.equal(written[k], state[k].half()) for k in state)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == "loha"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"


def test_written_files_load_in_lycoris_with_same_unet_outputs(base, tmp_path, monkeypatch):
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    # lycoris-lora 4.1.3 lists TimestepEmbedding among its targets and then asserts on the
    # duplicated time_embedding names of a diffusers UNet (docs/formats.md 1.7); drop that class.
    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_MODULE",
                        [m for m in LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE if m != "TimestepEmbedding"])
    pipe, _ = base
    state, _ = make_file_tensors(pipe, "loha")
    ours = copy.deepcopy(pipe)
    ours.load_loha_weights(state, adapter_name="a")
    path = ours.save_loha_weights(tmp_path / "ours.safetensors")
    theirs = copy.deepcopy(pipe)
    network, _ = create_network_from_weights(1.0, str(path), None, theirs.text_encoder, theirs.unet)
    network.apply_to(theirs.text_encoder, theirs.unet, apply_text_encoder=False, apply_unet=True)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs.unet(sample, 10, hidden).sample
        got = ours.unet(sample, 10, hidden).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_cli_inspect_and_convert(base, tmp_path, capsys):
    pipe, model = base
    source, _ = loha_file(pipe, tmp_path)
    assert main(["inspect", str(source), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["algorithms"] == {"loha": report["modules"]} and report["ranks"] == {"4": report["modules"]}
    assert main(["convert", str(source), str(tmp_path / "p"), "--to", "peft", "--base-model", str(model)]) == 0
    assert (tmp_path / "p" / "unet" / "adapter_model.safetensors").is_file()
    garbage = tmp_path / "bad.safetensors"
    garbage.write_bytes(b"nonsense")
    assert main(["inspect", str(garbage)]) == 2
    assert "not a safetensors file" in capsys.readouterr().err


def test_cli_inspect_reads_peft_folders_and_diffusers_files(base, tmp_path, capsys):
    pipe, model = base
    source, _ = loha_file(pipe, tmp_path)
    main(["inspect", str(source), "--json"])
    kohya = json.loads(capsys.readouterr().out)
    for to, destination in (("peft", tmp_path / "p"), ("diffusers", tmp_path / "d.safetensors")):
        assert main(["convert", str(source), str(destination), "--to", to, "--base-model", str(model)]) == 0
        capsys.readouterr()
        assert main(["inspect", str(destination), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["layout"] == {"peft": "PEFT pipeline folder", "diffusers": "diffusers LoRA"}[to]
        assert report["unknown_keys"] == [] and report["modules"] == kohya["modules"]
        # the diffusers file holds each LoHa as its exact rank-r^2 LoRA
        assert report["algorithms"] == ({"loha": kohya["modules"]} if to == "peft" else {"lora": kohya["modules"]})
        assert report["modules_by_prefix"] == kohya["modules_by_prefix"]
