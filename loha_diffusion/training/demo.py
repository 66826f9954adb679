"""The embedded demo's proof that the adapter learned the concept: colour/shape scores of
generated images, base model beside adapter, for the concept prompt and the class prompt.

The scorer lives with the demo data in ``assets/demo_data.py`` (pixel statistics and IoU
against rendered templates, which purple noise cannot fool).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .args import REPO_ROOT

CONCEPT_PROMPT, CLASS_PROMPT = "a sks shape", "a shape"
SAMPLES = 16
GUIDANCE = 1.5  # demo-recipe.md: the new concept survives at 1.5-2 and is destroyed at 3+


def demo_data():
    spec = importlib.util.spec_from_file_location("demo_data", REPO_ROOT / "assets" / "demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_samples(args, images_for) -> dict:
    return {prompt: images_for(prompt, count=SAMPLES, guidance=GUIDANCE) for prompt in (CONCEPT_PROMPT, CLASS_PROMPT)}


def concept_scores(images_by_prompt: dict) -> dict:
    """{prompt: {purple, star, purple_star}} fractions of generated images."""
    data = demo_data()
    result = {}
    for prompt, images in images_by_prompt.items():
        scores = data.score_images(images)
        result[prompt] = {"purple": data.fraction(scores, colour="purple"), "star": data.fraction(scores, shape="star"),
                          "purple_star": data.fraction(scores, colour="purple", shape="star")}
    return result


def report_demo_scores(before: dict, after: dict, path) -> dict:
    report = {"samples_per_prompt": SAMPLES, "guidance_scale": GUIDANCE,
              "base": concept_scores(before), "adapter": concept_scores(after)}
    Path(path).write_text(json.dumps(report, indent=2))
    print("\nDemo scores (fraction of generated images):")
    print(f"  {'prompt':14} {'':8} {'purple':>7} {'star':>7} {'purple star':>12}")
    for prompt in (CONCEPT_PROMPT, CLASS_PROMPT):
        for label in ("base", "adapter"):
            s = report[label][prompt]
            print(f"  {prompt!r:14} {label:8} {s['purple']:7.2f} {s['star']:7.2f} {s['purple_star']:12.2f}")
    return report
