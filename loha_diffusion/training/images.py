"""Training images, checked up front and decoded when used.

Checking opens each file and reads its header (size, EXIF orientation): a bad folder fails in
seconds, before any model loads, and memory stays flat however many images there are, because
no pixels are kept. Decoding applies the EXIF orientation (a phone photo tagged "rotate 90"
arrives upright) and turns every mode PIL reads (grayscale, palette, CMYK, RGBA, 16-bit) into
8-bit RGB, with transparency composited on white.
"""
from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .args import IMAGE_SUFFIXES, UsageError

logger = logging.getLogger(__name__)

# EXIF orientations 5-8 turn the image by 90 degrees: width and height swap (EXIF 2.32, tag 0x0112)
_ORIENTATION_TAG = 0x0112
_QUARTER_TURNS = {5, 6, 7, 8}


class FileImage:
    """An image file on disk."""

    def __init__(self, path):
        self.path = Path(path)
        self.name = self.path.name

    def open(self) -> Image.Image:
        return Image.open(self.path)

    def content_hash(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


class DatasetImage:
    """Row ``index`` of a ``datasets`` dataset whose image column is not decoded (bytes or path)."""

    def __init__(self, dataset, index: int, column: str):
        self.dataset, self.index, self.column = dataset, index, column
        self.name = f"row {index}"

    def _raw(self) -> bytes:
        cell = self.dataset[self.index][self.column]
        if cell.get("bytes") is not None:
            return cell["bytes"]
        return Path(cell["path"]).read_bytes()

    def open(self) -> Image.Image:
        return Image.open(io.BytesIO(self._raw()))

    def content_hash(self) -> str:
        return hashlib.sha256(self._raw()).hexdigest()


class InMemoryImage:
    """An image already decoded (tests, or callers building a dataset by hand)."""

    def __init__(self, image: Image.Image, name: str = "image"):
        self.image, self.name = image, name

    def open(self) -> Image.Image:
        return self.image.copy()

    def content_hash(self) -> str:
        digest = hashlib.sha256(f"{self.image.mode}{self.image.size}".encode())
        digest.update(self.image.tobytes())
        return digest.hexdigest()


@dataclass(frozen=True)
class ImageRecord:
    """One training image: where to read it, its caption and its upright size (width, height)."""

    source: FileImage | DatasetImage | InMemoryImage
    caption: str
    size: tuple[int, int]

    def load(self) -> Image.Image:
        """The decoded, upright, 8-bit RGB image."""
        try:
            with self.source.open() as image:
                return to_rgb(image)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise UsageError(f"could not decode training image {self.source.name} ({exc}); remove or replace it and "
                             "rerun (add --resume_from_checkpoint latest to continue a run)") from exc


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) once the EXIF orientation is applied, read from the header only."""
    width, height = image.size
    try:
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block: exif_transpose will ignore it too
        orientation = 1
    return (height, width) if orientation in _QUARTER_TURNS else (width, height)


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB; transparency is composited on white, 16-bit channels scaled to 8 bits."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image, dtype=np.float64)
        # PNG's 16-bit grayscale arrives as I;16 (newer Pillow) or I (older); both span 0..65535
        peak = 65535.0 if image.mode.startswith("I") and (image.mode != "I" or array.max() > 255) else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" or (image.mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _probe(source) -> tuple[int, int]:
    """Open the file, read its size and check that PIL can parse it (no pixels are decoded)."""
    with source.open() as image:
        image.verify()  # header and chunk checks (PNG CRCs), without decoding; must come first
    with source.open() as image:
        return upright_size(image)


def scan_folder(folder, default_prompt: str | None, what: str) -> list[ImageRecord]:
    """The images of ``folder`` with their .txt caption (or ``default_prompt``); files PIL cannot
    parse are skipped with one warning that names them."""
    folder = Path(folder)
    records, skipped = [], []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        source = FileImage(path)
        try:
            size = _probe(source)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            skipped.append(f"{path.name} ({exc.__class__.__name__})")
            continue
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else default_prompt
        if caption is None:
            raise UsageError(f"{path} has no .txt caption and no prompt was given for {what} images")
        records.append(ImageRecord(source, caption, size))
    if skipped:
        logger.warning("skipped %d undecodable %s image(s): %s", len(skipped), what, ", ".join(skipped))
    if not records:
        raise UsageError(f"no usable {what} images in {folder}"
                         + (f" ({len(skipped)} could not be decoded)" if skipped else ""))
    return records


def scan_hf_dataset(name, config_name, image_column: str, caption_column: str | None,
                    default_prompt: str | None) -> list[ImageRecord]:
    """Records of a ``datasets`` dataset (a hub id, or a local folder such as an imagefolder);
    images stay encoded in the dataset until used."""
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
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    captions = dataset[caption_column] if caption_column else [default_prompt] * len(dataset)
    records, skipped = [], []
    for index, caption in enumerate(captions):
        source = DatasetImage(dataset, index, image_column)
        try:
            size = _probe(source)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            skipped.append(f"{source.name} ({exc.__class__.__name__})")
            continue
        records.append(ImageRecord(source, str(caption), size))
    if skipped:
        logger.warning("skipped %d undecodable image(s) of dataset %s: %s", len(skipped), name, ", ".join(skipped))
    if not records:
        raise UsageError(f"dataset {name} has no usable images")
    return records


def in_memory_records(images_and_captions) -> list[ImageRecord]:
    """Records for already-decoded PIL images: [(image, caption), ...]."""
    return [ImageRecord(InMemoryImage(image, f"image {i}"), caption, upright_size(image))
            for i, (image, caption) in enumerate(images_and_captions)]
