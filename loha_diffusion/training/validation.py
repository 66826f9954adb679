"""Validation images with a fixed seed, from the modules being trained (adapters unfused),
through the family's own diffusers pipeline."""
from __future__ import annotations

from pathlib import Path

import torch


@torch.no_grad()
def generate(models: dict, family: str, prompts, scheduler_config, prompt: str, num_images: int, seed: int,
             steps: int, guidance_scale: float, resolution: int, device, force_zeros_for_empty_prompt: bool = False):
    """PIL images for ``prompt``. ``models`` holds the pipeline components (text encoders may be
    None once their outputs are cached); prompt embeddings come from ``prompts``, the encoder
    training uses, so clip-skip and cached captions mean the same here."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    trainable = [m for m in (models["unet"], *[models.get(k) for k in ("text_encoder", "text_encoder_2")])
                 if m is not None]
    was_training = [m.training for m in trainable]
    vae_device = next(models["vae"].parameters()).device
    for module in trainable:
        module.eval()
    models["vae"].to(device)  # it may wait on the CPU while latents are cached
    try:
        scheduler = DPMSolverMultistepScheduler.from_config(scheduler_config)
        hidden, pooled = prompts([prompt, ""], device)
        dtype = next(models["unet"].parameters()).dtype
        embeds = {"prompt_embeds": hidden[:1].to(dtype).expand(num_images, -1, -1),
                  "negative_prompt_embeds": hidden[1:].to(dtype).expand(num_images, -1, -1)}
        if family == "sdxl":
            pipe = StableDiffusionXLPipeline(scheduler=scheduler, add_watermarker=False,
                                             force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, **models)
            negative_pooled = pooled[1:]
            if force_zeros_for_empty_prompt:  # what the pipeline does for an empty negative prompt
                embeds["negative_prompt_embeds"] = torch.zeros_like(embeds["negative_prompt_embeds"])
                negative_pooled = torch.zeros_like(negative_pooled)
            embeds.update(pooled_prompt_embeds=pooled[:1].to(dtype).expand(num_images, -1),
                          negative_pooled_prompt_embeds=negative_pooled.to(dtype).expand(num_images, -1))
        else:
            pipe = StableDiffusionPipeline(scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False, **models)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        images = pipe(**embeds, num_inference_steps=steps, guidance_scale=guidance_scale, height=resolution,
                      width=resolution, generator=generator).images
    finally:
        models["vae"].to(vae_device)
        for module, mode in zip(trainable, was_training):
            module.train(mode)
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
