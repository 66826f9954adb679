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


def save_grid(rows, path) -> Path:
    """A PNG with one row of images per entry of ``rows``."""
    from PIL import Image

    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * width, y * height))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def save_before_after(before, after, prompts, path) -> Path:
    """Rows = prompts; left half the base model, right half the trained adapter, same seeds.
    Small images are upscaled so the grid can be looked at."""
    from PIL import Image, ImageDraw

    width, height = before[0][0].size
    zoom = max(1, 96 // width)
    cell_w, cell_h = width * zoom, height * zoom
    label_h, gap = 14, 8
    columns = len(before[0])
    grid = Image.new("RGB", (2 * columns * cell_w + gap, len(prompts) * (cell_h + label_h) + label_h), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((2, 1), "before (base model)", fill="black")
    draw.text((columns * cell_w + gap + 2, 1), "after (with adapter)", fill="black")
    for row, prompt in enumerate(prompts):
        top = label_h + row * (cell_h + label_h)
        draw.text((2, top + 1), repr(prompt), fill="black")
        for half, images in enumerate((before[row], after[row])):
            for col, image in enumerate(images):
                left = half * (columns * cell_w + gap) + col * cell_w
                grid.paste(image.resize((cell_w, cell_h), Image.NEAREST), (left, top + label_h))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
