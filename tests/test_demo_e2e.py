"""End to end: the default training run teaches the demo model a concept it could not draw.

Runs the trainer with the demo's defaults ("a sks shape" = a purple star, with prior
preservation; the checkout's assets/ given with --demo_assets, so the test does not depend on how
the package is installed), loads the written file into a fresh pipeline with
``pipe.load_loha_weights``, generates with fixed seeds and scores the pixels (assets/demo_data.py)
against the base model.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

import loha_diffusion  # noqa: F401
from loha_diffusion.training.loop import main

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MODEL = ASSETS / "demo-model"
pytestmark = pytest.mark.skipif(not (MODEL / "model_index.json").is_file(), reason="demo model not built")


def demo_data():
    spec = importlib.util.spec_from_file_location("demo_data", ASSETS / "demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sample(pipe, prompt, n=16, seed=1234):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return pipe([prompt] * n, num_inference_steps=20, guidance_scale=1.5, height=32, width=32,
                    generator=generator).images


def test_default_run_teaches_the_concept(tmp_path):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    out = tmp_path / "demo"
    assert main(["--output_dir", str(out), "--report_to", "none", "--demo_assets", str(ASSETS)]) == 0
    adapter = out / "sks-shape-loha.safetensors"
    for produced in (adapter, out / "before_after.png", out / "loss.png", out / "demo_scores.json", out / "README.md"):
        assert produced.is_file(), produced

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    data = demo_data()
    base_concept, base_class = sample(pipe, "a sks shape"), sample(pipe, "a shape")
    pipe.load_loha_weights(adapter)
    concept, cls = sample(pipe, "a sks shape"), sample(pipe, "a shape")

    def purple_star(images):
        return data.fraction(images, colour="purple", shape="star")

    def purple(images):
        return data.fraction(images, colour="purple")

    print(f"purple star on 'a sks shape': base {purple_star(base_concept):.2f} -> adapter {purple_star(concept):.2f}; "
          f"purple on 'a shape': base {purple(base_class):.2f} -> adapter {purple(cls):.2f}")
    assert purple_star(base_concept) <= 0.1                      # the base model cannot draw it
    assert purple(concept) >= 0.6 and purple_star(concept) >= purple_star(base_concept) + 0.25
    assert purple(cls) <= purple(base_class) + 0.35              # the class prompt stays close to the base
