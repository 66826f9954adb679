"""Validation images with a fixed seed, from the modules being trained (adapters unfused)."""
from __future__ import annotations

from pathlib import Path

import torch

from .text import encode, tokenize


@torch.no_grad()
def generate(vae, text_encoder, tokenizer, unet, scheduler_config, prompt: str, num_images: int, seed: int,
             steps: int, guidance_scale: float, resolution: int, clip_skip: int | None, device) -> list:
    """PIL images for ``prompt``; prompt embeddings are computed here so clip-skip means the
    same as in training (diffusers' pipelines count clip_skip from 0)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    was_training = (unet.training, text_encoder.training)
    unet.eval()
    text_encoder.eval()
    try:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=DPMSolverMultistepScheduler.from_config(scheduler_config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        ids = tokenize(tokenizer, [prompt, ""]).to(device)
        embeds = encode(text_encoder, ids, clip_skip)
        dtype = next(unet.parameters()).dtype
        generator = torch.Generator(device="cpu").manual_seed(seed)
        images = pipe(prompt_embeds=embeds[:1].to(dtype).expand(num_images, -1, -1),
                      negative_prompt_embeds=embeds[1:].to(dtype).expand(num_images, -1, -1),
                      num_inference_steps=steps, guidance_scale=guidance_scale, height=resolution,
                      width=resolution, generator=generator).images
    finally:
        unet.train(was_training[0])
        text_encoder.train(was_training[1])
    return images


def save_grid(images, path) -> Path:
    """Side-by-side PNG of ``images``."""
    from PIL import Image

    width, height = images[0].size
    grid = Image.new("RGB", (width * len(images), height))
    for i, image in enumerate(images):
        grid.paste(image, (i * width, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
