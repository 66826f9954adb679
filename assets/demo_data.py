"""Synthetic data, captions and scoring for the embedded demo model (numpy + PIL only).

Images are 32x32 RGB: one flat-coloured shape on a light grey background. The base model
knows four colours (red, green, blue, yellow) and three shapes (circle, square, triangle);
purple and star never appear in its captions or images: "a sks shape" = a purple star is
the new concept an adapter is taught later (:func:`render_concept_images`).

The VAE is trained on :func:`render_generic_batch` instead (random hues, polygons, ellipses,
stars, rotations, several shapes, dark and light backgrounds), so that it can represent
colours and shapes the base UNet has never seen.

Scoring (:func:`score_images`, :func:`fraction`) reads generated images without any learned
model: colour = the named hue bin holding most strongly coloured pixels; shape = the best
intersection-over-union of those pixels with rendered shape templates fitted to the largest
coloured blob, ``"none"`` below :data:`SHAPE_IOU_THRESHOLD`. Coloured noise, a coloured
field or a blob therefore score shape ``"none"``: nothing is classified that does not
overlap a template almost pixel for pixel.

Every random draw goes through a ``numpy.random.Generator``, so a seed fixes the data.
"""

from __future__ import annotations

import colorsys
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "IMAGE_SIZE",
    "BASE_COLOURS",
    "BASE_SHAPES",
    "CONCEPT_COLOUR",
    "CONCEPT_SHAPE",
    "CONCEPT_TOKEN",
    "CONCEPT_PROMPT",
    "CLASS_PROMPT",
    "BASE_PROMPTS",
    "VOCAB_WORDS",
    "HUE_NAMES",
    "SHAPE_IOU_THRESHOLD",
    "colour_rgb",
    "shape_polygon",
    "render_shape_image",
    "sample_base_example",
    "base_caption",
    "render_base_batch",
    "render_generic_image",
    "render_generic_batch",
    "render_concept_images",
    "score_image",
    "score_images",
    "fraction",
    "to_array",
]

IMAGE_SIZE = 32
_SUPERSAMPLE = 4  # polygons are drawn at 4x and box-filtered down: anti-aliased edges

BASE_COLOURS = ("red", "green", "blue", "yellow")
BASE_SHAPES = ("circle", "square", "triangle")
CONCEPT_COLOUR = "purple"
CONCEPT_SHAPE = "star"
CONCEPT_TOKEN = "sks"
CONCEPT_PROMPT = f"a {CONCEPT_TOKEN} shape"
CLASS_PROMPT = "a shape"
# The twelve "a {colour} {shape}" captions the base model is trained (and scored) on.
BASE_PROMPTS = tuple(f"a {c} {s}" for c in BASE_COLOURS for s in BASE_SHAPES)
# Every word the tokenizer must keep as one token, trained or not.
VOCAB_WORDS = ("a", *BASE_COLOURS, CONCEPT_COLOUR, *BASE_SHAPES, CONCEPT_SHAPE, "shape", CONCEPT_TOKEN)

# Named hue bins (degrees): centre, and the colour each name is rendered with.
# Bins split halfway between neighbouring centres.
HUE_NAMES = {
    "red": 0.0,
    "orange": 30.0,
    "yellow": 58.0,
    "green": 120.0,
    "cyan": 180.0,
    "blue": 228.0,
    "purple": 275.0,
    "magenta": 320.0,
}
_HUE_JITTER = 5.0  # degrees; stays far inside each bin (the closest edge is 22 degrees away)

# A pixel counts as "coloured" when max(RGB) - min(RGB) exceeds this (0..1). Rendered shapes
# have chroma 0.6-0.85 and backgrounds 0, so the threshold sits at about half coverage.
CHROMA_THRESHOLD = 0.3
SHAPE_IOU_THRESHOLD = 0.7
_MIN_COLOUR_PIXELS = 8
_MIN_SHAPE_PIXELS = 12
_MAX_SHAPE_FRACTION = 0.5  # a mask over half the image is a field, not a shape


# --------------------------------------------------------------------------- geometry


def shape_polygon(shape: str, cx: float, cy: float, size: float, angle: float = 0.0) -> list[tuple[float, float]]:
    """Vertices (pixel units, y down) of an upright ``shape`` around (cx, cy).

    ``size`` is the circle's radius; the other shapes are scaled to look about as big
    (square half-side 0.88 size, triangle circumradius 1.3 size, star outer radius
    1.35 size with inner radius half of it). ``angle`` rotates (radians).
    """
    if shape == "circle":
        pts = [(math.cos(2 * math.pi * k / 48), math.sin(2 * math.pi * k / 48)) for k in range(48)]
        pts = [(x * size, y * size) for x, y in pts]
    elif shape == "square":
        h = 0.88 * size
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        r = 1.3 * size
        # upright: first vertex at the top; centred on the centroid
        pts = [(r * math.sin(2 * math.pi * k / 3), -r * math.cos(2 * math.pi * k / 3)) for k in range(3)]
    elif shape == "star":
        pts = _star_points(5, 1.35 * size, 0.5)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {BASE_SHAPES + (CONCEPT_SHAPE,)}")
    return _place(pts, cx, cy, angle)


def _star_points(points: int, outer: float, inner_ratio: float) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        r = outer if k % 2 == 0 else outer * inner_ratio
        a = math.pi * k / points
        out.append((r * math.sin(a), -r * math.cos(a)))
    return out


def _place(pts, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _bbox(pts):
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    return min(xs), min(ys), max(xs), max(ys)


def _fit_inside(pts, rng: np.random.Generator, margin: float = 1.0):
    """Translate ``pts`` (drawn around the origin) to a random spot fully inside the image."""
    x0, y0, x1, y1 = _bbox(pts)
    lo_x, hi_x = margin - x0, IMAGE_SIZE - margin - x1
    lo_y, hi_y = margin - y0, IMAGE_SIZE - margin - y1
    dx = rng.uniform(lo_x, hi_x) if hi_x > lo_x else (lo_x + hi_x) / 2
    dy = rng.uniform(lo_y, hi_y) if hi_y > lo_y else (lo_y + hi_y) / 2
    return [(x + dx, y + dy) for x, y in pts]


# --------------------------------------------------------------------------- rendering


def _render(polys: Sequence[tuple[Sequence[tuple[float, float]], tuple[int, int, int]]], background) -> np.ndarray:
    """Draw filled polygons (in order) over a flat background; returns HxWx3 uint8."""
    ss = _SUPERSAMPLE
    canvas = Image.new("RGB", (IMAGE_SIZE * ss, IMAGE_SIZE * ss), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(canvas)
    for pts, rgb in polys:
        draw.polygon([(x * ss, y * ss) for x, y in pts], fill=tuple(int(v) for v in rgb))
    return np.asarray(canvas.reduce(ss), dtype=np.uint8)


def _coverage_mask(pts) -> np.ndarray:
    """Boolean mask of the pixels a polygon covers at least half of (scorer templates)."""
    ss = _SUPERSAMPLE
    canvas = Image.new("L", (IMAGE_SIZE * ss, IMAGE_SIZE * ss), 0)
    ImageDraw.Draw(canvas).polygon([(x * ss, y * ss) for x, y in pts], fill=255)
    return np.asarray(canvas.reduce(ss)) >= 128


def _hsv_rgb(h_deg: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((h_deg % 360.0) / 360.0, s, v)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def colour_rgb(name: str, rng: np.random.Generator | None = None) -> tuple[int, int, int]:
    """RGB of a named colour; with ``rng``, slightly jittered in hue, saturation and value."""
    if name not in HUE_NAMES:
        raise ValueError(f"unknown colour {name!r}; expected one of {tuple(HUE_NAMES)}")
    hue = HUE_NAMES[name]
    if rng is None:
        return _hsv_rgb(hue, 0.82, 0.88)
    return _hsv_rgb(hue + rng.uniform(-_HUE_JITTER, _HUE_JITTER), rng.uniform(0.75, 0.9), rng.uniform(0.8, 0.95))


def _background(rng: np.random.Generator | None) -> tuple[int, int, int]:
    g = 235 if rng is None else int(rng.integers(215, 250))
    return (g, g, g)


def render_shape_image(
    colour: str,
    shape: str,
    cx: float = 16.0,
    cy: float = 16.0,
    size: float = 8.0,
    background: tuple[int, int, int] = (235, 235, 235),
) -> Image.Image:
    """One exactly specified image (no jitter): ``colour`` ``shape`` centred at (cx, cy)."""
    return Image.fromarray(_render([(shape_polygon(shape, cx, cy, size), colour_rgb(colour))], background))


def _random_shape_image(colour: str, shape: str, rng: np.random.Generator, size_range=(6.0, 10.0)) -> np.ndarray:
    size = rng.uniform(*size_range)
    pts = _fit_inside(shape_polygon(shape, 0.0, 0.0, size), rng)
    return _render([(pts, colour_rgb(colour, rng))], _background(rng))


def sample_base_example(rng: np.random.Generator) -> tuple[np.ndarray, str, str]:
    """A base-training image (HxWx3 uint8) with its colour and shape (never purple, never star)."""
    colour = BASE_COLOURS[rng.integers(len(BASE_COLOURS))]
    shape = BASE_SHAPES[rng.integers(len(BASE_SHAPES))]
    return _random_shape_image(colour, shape, rng), colour, shape


def base_caption(colour: str, shape: str, rng: np.random.Generator) -> str:
    """Caption for an image: 65% "a {colour} {shape}", 10% "a {shape}", 10% "a {colour} shape",
    5% "a shape", 10% "" (the empty caption the pipeline uses for classifier-free guidance)."""
    u = rng.random()
    if u < 0.65:
        return f"a {colour} {shape}"
    if u < 0.75:
        return f"a {shape}"
    if u < 0.85:
        return f"a {colour} shape"
    if u < 0.90:
        return CLASS_PROMPT
    return ""


def render_base_batch(n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str], list[str]]:
    """``n`` base-training images (n x 32 x 32 x 3 uint8) with their colours and shapes."""
    images, colours, shapes = [], [], []
    for _ in range(n):
        img, c, s = sample_base_example(rng)
        images.append(img)
        colours.append(c)
        shapes.append(s)
    return np.stack(images), colours, shapes


def render_concept_images(n: int, seed: int = 0) -> list[Image.Image]:
    """``n`` images of the new concept (a purple star) at varied positions and sizes."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(_random_shape_image(CONCEPT_COLOUR, CONCEPT_SHAPE, rng)) for _ in range(n)]


# --------------------------------------------------------------------------- generic data (VAE)


def _generic_polygon(rng: np.random.Generator, size: float) -> list[tuple[float, float]]:
    kind = rng.integers(8)
    if kind == 0:  # circle
        return shape_polygon("circle", 0, 0, size)
    if kind == 1:  # ellipse
        a, b = size, size * rng.uniform(0.35, 0.9)
        return [(a * math.cos(2 * math.pi * k / 40), b * math.sin(2 * math.pi * k / 40)) for k in range(40)]
    if kind == 2:  # square
        return shape_polygon("square", 0, 0, size)
    if kind == 3:  # rectangle
        w, h = size, size * rng.uniform(0.3, 0.9)
        return [(-w, -h), (w, -h), (w, h), (-w, h)]
    if kind == 4:  # regular polygon, 3-8 sides
        m = int(rng.integers(3, 9))
        return [(size * math.sin(2 * math.pi * k / m), -size * math.cos(2 * math.pi * k / m)) for k in range(m)]
    if kind == 5:  # irregular star-shaped polygon
        m = int(rng.integers(4, 10))
        angles = np.sort(rng.uniform(0, 2 * math.pi, m))
        radii = size * rng.uniform(0.5, 1.2, m)
        return [(r * math.cos(a), r * math.sin(a)) for a, r in zip(angles, radii)]
    if kind == 6:  # star, 4-7 points
        return _star_points(int(rng.integers(4, 8)), 1.35 * size, rng.uniform(0.35, 0.6))
    return shape_polygon("star", 0, 0, size)  # the concept's exact star geometry


def render_generic_image(rng: np.random.Generator) -> np.ndarray:
    """A generic image for the VAE: random hues, shapes, rotations, backgrounds (HxWx3 uint8).

    40% look like the captioned data (one upright circle/square/triangle/star in a named
    colour, purple included, on light grey); the rest have 1-3 arbitrary polygons in random
    colours over light, dark or tinted backgrounds.
    """
    if rng.random() < 0.4:
        colour = list(HUE_NAMES)[rng.integers(len(HUE_NAMES))]
        shape = (*BASE_SHAPES, CONCEPT_SHAPE)[rng.integers(4)]
        return _random_shape_image(colour, shape, rng, size_range=(4.0, 11.0))
    u = rng.random()
    if u < 0.5:
        bg = _background(rng)
    elif u < 0.75:
        g = int(rng.integers(10, 120))
        bg = (g, g, g)
    else:
        bg = _hsv_rgb(rng.uniform(0, 360), rng.uniform(0.05, 0.35), rng.uniform(0.3, 1.0))
    polys = []
    for _ in range(int(rng.integers(1, 4))):
        size = rng.uniform(3.0, 12.0)
        pts = _place(_generic_polygon(rng, size), 0, 0, rng.uniform(0, 2 * math.pi))
        pts = _fit_inside(pts, rng, margin=-2.0)  # may touch or cross the border a little
        rgb = _hsv_rgb(rng.uniform(0, 360), rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0))
        polys.append((pts, rgb))
    return _render(polys, bg)


def render_generic_batch(n: int, rng: np.random.Generator) -> np.ndarray:
    return np.stack([render_generic_image(rng) for _ in range(n)])


# --------------------------------------------------------------------------- scoring


def to_array(image: Any) -> np.ndarray:
    """PIL image, HxWx3 uint8 array or HxWx3 float array in [0, 1] -> 32x32x3 float in [0, 1]."""
    if isinstance(image, Image.Image):
        img = image.convert("RGB")
        if img.size != (IMAGE_SIZE, IMAGE_SIZE):
            img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
        return np.asarray(img, dtype=np.float64) / 255.0
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 image, got an array of shape {arr.shape}")
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float64) / 255.0
    arr = np.clip(arr.astype(np.float64), 0.0, 1.0)
    if arr.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        return to_array(Image.fromarray((arr * 255).round().astype(np.uint8)))
    return arr


def _hue_bins(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coloured mask, hue-bin index per pixel) for a float HxWx3 image."""
    mx, mn = arr.max(-1), arr.min(-1)
    chroma = mx - mn
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
    safe = np.where(chroma > 0, chroma, 1.0)
    hue = np.where(
        mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    ) * 60.0
    centres = np.array(list(HUE_NAMES.values()))
    dist = np.abs((hue[..., None] - centres + 180.0) % 360.0 - 180.0)
    return chroma > CHROMA_THRESHOLD, dist.argmin(-1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean mask."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for y0 in range(h):
        for x0 in range(w):
            if not mask[y0, x0] or seen[y0, x0]:
                continue
            stack, comp = [(y0, x0)], []
            seen[y0, x0] = True
            while stack:
                y, x = stack.pop()
                comp.append((y, x))
                for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        stack.append((yy, xx))
            if len(comp) > len(best):
                best = comp
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best)
        out[list(ys), list(xs)] = True
    return out


_TEMPLATE_SHAPES = (*BASE_SHAPES, CONCEPT_SHAPE)
_UNIT_BBOX = {s: _bbox(shape_polygon(s, 0.0, 0.0, 1.0)) for s in _TEMPLATE_SHAPES}
_SCALES = (0.9, 0.95, 1.0, 1.05, 1.1)
_SHIFTS = (-0.5, 0.0, 0.5)


def _shape_ious(mask: np.ndarray, blob: np.ndarray) -> dict[str, float]:
    """Best IoU of ``mask`` with each template, fitted to the bounding box of ``blob``."""
    ys, xs = np.nonzero(blob)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1.0, ys.min(), ys.max() + 1.0
    area = mask.sum()
    out = {}
    for shape in _TEMPLATE_SHAPES:
        ux0, uy0, ux1, uy1 = _UNIT_BBOX[shape]
        base = math.sqrt(((x1 - x0) / (ux1 - ux0)) * ((y1 - y0) / (uy1 - uy0)))
        best = 0.0
        for k in _SCALES:
            size = base * k
            cx = (x0 + x1) / 2 - (ux0 + ux1) / 2 * size
            cy = (y0 + y1) / 2 - (uy0 + uy1) / 2 * size
            for dx in _SHIFTS:
                for dy in _SHIFTS:
                    tmpl = _coverage_mask(shape_polygon(shape, cx + dx, cy + dy, size))
                    inter = np.logical_and(tmpl, mask).sum()
                    union = area + tmpl.sum() - inter
                    best = max(best, inter / union if union else 0.0)
        out[shape] = float(best)
    return out


def score_image(image: Any) -> dict[str, Any]:
    """Colour and shape of one image.

    Returns ``{"colour": name or "none", "shape": name or "none", "iou": best IoU,
    "coloured_pixels": count}``. Colour: the hue bin (:data:`HUE_NAMES`) holding most
    pixels whose chroma exceeds :data:`CHROMA_THRESHOLD` ("none" under 8 such pixels).
    Shape: the template (circle, square, triangle, star) with the best IoU against all
    coloured pixels, each template fitted (scale and half-pixel shifts) to the bounding
    box of the largest coloured blob; "none" under IoU 0.7, under 12 pixels, or when
    coloured pixels cover over half the image.
    """
    arr = to_array(image)
    mask, bins = _hue_bins(arr)
    count = int(mask.sum())
    colour = "none"
    if count >= _MIN_COLOUR_PIXELS:
        names = list(HUE_NAMES)
        colour = names[np.bincount(bins[mask], minlength=len(names)).argmax()]
    shape, iou = "none", 0.0
    if _MIN_SHAPE_PIXELS <= count <= _MAX_SHAPE_FRACTION * mask.size:
        ious = _shape_ious(mask, _largest_component(mask))
        best = max(ious, key=ious.get)
        iou = ious[best]
        if iou >= SHAPE_IOU_THRESHOLD:
            shape = best
    return {"colour": colour, "shape": shape, "iou": iou, "coloured_pixels": count}


def score_images(images: Iterable[Any]) -> dict[str, Any]:
    """Score many images: per-image lists and summary fractions.

    Returns ``{"n", "colours": [...], "shapes": [...], "ious": [...],
    "colour_fractions": {name: fraction}, "shape_fractions": {name: fraction}}``
    (fractions over all images, "none" included).
    """
    per = [score_image(im) for im in images]
    n = len(per)
    colours = [p["colour"] for p in per]
    shapes = [p["shape"] for p in per]
    return {
        "n": n,
        "colours": colours,
        "shapes": shapes,
        "ious": [p["iou"] for p in per],
        "colour_fractions": {k: v / n for k, v in sorted(Counter(colours).items())} if n else {},
        "shape_fractions": {k: v / n for k, v in sorted(Counter(shapes).items())} if n else {},
    }


def fraction(images_or_scores: Any, colour: str | None = None, shape: str | None = None) -> float:
    """Fraction of images with the given colour and/or shape (both must match when both given).

    Accepts images or the dict returned by :func:`score_images`.
    """
    if colour is None and shape is None:
        raise ValueError("give colour=, shape= or both")
    scores = images_or_scores if isinstance(images_or_scores, dict) else score_images(images_or_scores)
    if scores["n"] == 0:
        return 0.0
    hits = sum(
        (colour is None or c == colour) and (shape is None or s == shape)
        for c, s in zip(scores["colours"], scores["shapes"])
    )
    return hits / scores["n"]
