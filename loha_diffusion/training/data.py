"""Training images: instance folders with .txt captions, ``datasets`` datasets, class images.

Images are decoded up front, before any model is loaded, so that a bad folder fails fast.
Augmentations draw from a generator seeded by (seed, epoch, index): a resumed run sees the
same crops and flips as an uninterrupted one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .args import IMAGE_SUFFIXES, UsageError

logger = logging.getLogger(__name__)


@dataclass
class Example:
    image: Image.Image
    caption: str


def load_folder(folder, default_prompt: str | None, what: str) -> list[Example]:
    """Images of ``folder`` with their .txt caption (or ``default_prompt``); bad files are skipped."""
    folder = Path(folder)
    examples, skipped = [], []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            skipped.append(f"{path.name} ({exc.__class__.__name__})")
            continue
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else default_prompt
        if caption is None:
            raise UsageError(f"{path} has no .txt caption and no prompt was given for {what} images")
        examples.append(Example(image, caption))
    if skipped:
        logger.warning("skipped %d undecodable %s image(s): %s", len(skipped), what, ", ".join(skipped[:5]))
    if not examples:
        raise UsageError(f"no usable {what} images in {folder}"
                         + (f" ({len(skipped)} could not be decoded)" if skipped else ""))
    return examples


def load_hf_dataset(name, config_name, image_column: str, caption_column: str | None,
                    default_prompt: str | None) -> list[Example]:
    """Examples from the ``datasets`` library (a hub id, or a local folder such as an imagefolder)."""
    import datasets

    local = Path(name)
    if local.is_dir():
        dataset = datasets.load_dataset("imagefolder", data_dir=str(local), split="train")
    else:
        dataset = datasets.load_dataset(name, config_name, split="train")
    columns = dataset.column_names
    if image_column not in columns:
        raise UsageError(f"--image_column {image_column!r} is not in dataset {name} (columns: {columns})")
    if caption_column is not None and caption_column not in columns:
        raise UsageError(f"--caption_column {caption_column!r} is not in dataset {name} (columns: {columns})")
    if caption_column is None and default_prompt is None:
        raise UsageError(f"dataset {name}: pass --caption_column (columns: {columns}) or --instance_prompt")
    examples = []
    for row in dataset:
        caption = row[caption_column] if caption_column else default_prompt
        examples.append(Example(row[image_column].convert("RGB"), str(caption)))
    if not examples:
        raise UsageError(f"dataset {name} is empty")
    return examples


def class_prompts(class_prompt: str) -> list[str]:
    """One prompt, or the lines of a file of prompts (an empty line is an empty caption)."""
    path = Path(class_prompt)
    if path.is_file():
        prompts = path.read_text().splitlines()
        if not prompts:
            raise UsageError(f"--class_prompt file {path} is empty")
        return prompts
    return [class_prompt]


def preprocess(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
               generator: torch.Generator) -> torch.Tensor:
    """Resize the short side to ``resolution``, crop a square, maybe flip; (3, H, W) in [-1, 1]."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.BILINEAR)
    if center_crop:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    else:
        left = int(torch.randint(0, size[0] - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, size[1] - resolution + 1, (1,), generator=generator))
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    if random_flip and torch.rand((), generator=generator) < 0.5:
        tensor = tensor.flip(-1)
    return tensor


class DreamBoothDataset(torch.utils.data.Dataset):
    """Item i = instance example i (and class example i when prior preservation is on)."""

    def __init__(self, instances: list[Example], classes: list[Example] | None, resolution: int,
                 center_crop: bool, random_flip: bool, repeats: int = 1, seed: int = 0):
        self.instances, self.classes = instances, classes
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.repeats, self.seed, self.epoch = repeats, seed, 0
        self.length = len(instances) * repeats
        if classes:
            self.length = max(self.length, len(classes))

    def use_epoch(self, epoch: int) -> None:
        # deliberately not ``set_epoch``: accelerate's data loader calls that with its own
        # iteration counter, which restarts at 0 after a resume
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def _pixels(self, example: Example, index: int, salt: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index, salt)) & 0x7FFFFFFF)
        return preprocess(example.image, self.resolution, self.center_crop, self.random_flip, generator)

    def __getitem__(self, index: int) -> dict:
        instance = self.instances[index % len(self.instances)]
        item = {"pixels": self._pixels(instance, index, 0), "caption": instance.caption}
        if self.classes:
            cls = self.classes[index % len(self.classes)]
            item.update(class_pixels=self._pixels(cls, index, 1), class_caption=cls.caption)
        return item


def collate(items: list[dict]) -> dict:
    """Instance half first, class half second (the loss splits the batch in two)."""
    pixels = [i["pixels"] for i in items]
    captions = [i["caption"] for i in items]
    with_prior = "class_pixels" in items[0]
    if with_prior:
        pixels += [i["class_pixels"] for i in items]
        captions += [i["class_caption"] for i in items]
    return {"pixels": torch.stack(pixels), "captions": captions, "with_prior": with_prior}
