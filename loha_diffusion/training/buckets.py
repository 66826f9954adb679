"""Aspect-ratio buckets with kohya sd-scripts' flags and maths (library/train_util.py:
``make_bucket_resolutions`` and ``BucketManager.select_bucket``), and the batch order drawn from
(seed, epoch).

A bucket is a (width, height) of about ``resolution**2`` pixels, both multiples of
``bucket_reso_steps``. An image goes to the bucket nearest its aspect ratio, is resized to cover
it and cropped. Without ``--enable_bucket`` there is one bucket, the ``resolution`` square: the
short side is resized to ``resolution`` and a square cropped, as diffusers' DreamBooth scripts do.
With ``--bucket_no_upscale`` an image smaller than the bucket area keeps its size, and its
bucket is its size rounded down to the steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    """How one image becomes one training sample: sizes are (width, height)."""

    original: tuple[int, int]
    resized: tuple[int, int]
    bucket: tuple[int, int]


def bucket_resolutions(resolution: int, min_reso: int, max_reso: int, steps: int) -> list[tuple[int, int]]:
    """kohya's bucket list: the largest square of the area, then every width from min to max in
    steps with the tallest height that keeps the area (and its transpose)."""
    max_area = resolution * resolution
    side = int(math.sqrt(max_area) // steps) * steps
    resolutions = {(side, side)}
    width = min_reso
    while width <= max_reso:
        height = min(max_reso, int((max_area // width) // steps) * steps)
        if height >= min_reso:
            resolutions.add((width, height))
            resolutions.add((height, width))
        width += steps
    return sorted(resolutions)


class BucketPlan:
    """Where each image size goes; built from the trainer's flags."""

    def __init__(self, resolution: int, enable: bool = False, min_reso: int = 256, max_reso: int = 1024,
                 steps: int = 64, no_upscale: bool = False):
        self.resolution, self.enable, self.steps, self.no_upscale = resolution, enable, steps, no_upscale
        self.max_area = resolution * resolution
        self.resolutions = bucket_resolutions(resolution, min_reso, max_reso, steps) if enable else []
        self.aspects = [w / h for w, h in self.resolutions]

    def place(self, width: int, height: int) -> Placement:
        if not self.enable:
            return cover((width, height), (self.resolution, self.resolution))
        aspect = width / height
        if self.no_upscale:
            return self._place_no_upscale(width, height, aspect)
        nearest = min(range(len(self.aspects)), key=lambda i: abs(self.aspects[i] - aspect))
        return cover((width, height), self.resolutions[nearest])

    def _round(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.steps

    def _place_no_upscale(self, width: int, height: int, aspect: float) -> Placement:
        resized = (width, height)
        if width * height > self.max_area:
            # shrink to the area, rounding the side that keeps the aspect ratio closer
            fit_w = math.sqrt(self.max_area * aspect)
            fit_h = self.max_area / fit_w
            w_rounded = self._round(fit_w)
            h_for_w = self._round(w_rounded / aspect)
            h_rounded = self._round(fit_h)
            w_for_h = self._round(h_rounded * aspect)
            if abs(w_rounded / h_for_w - aspect) < abs(w_for_h / h_rounded - aspect):
                resized = (w_rounded, int(w_rounded / aspect + 0.5))
            else:
                resized = (int(h_rounded * aspect + 0.5), h_rounded)
        bucket = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
        if min(bucket) == 0:
            raise ValueError(f"a {width}x{height} image is smaller than --bucket_reso_steps {self.steps} on one side; "
                             "remove it, or train without --bucket_no_upscale so it is upscaled")
        return Placement((width, height), resized, bucket)


def cover(size: tuple[int, int], bucket: tuple[int, int]) -> Placement:
    """Resize ``size`` to the smallest size that covers ``bucket`` (aspect ratio kept)."""
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    resized = (max(bucket[0], int(size[0] * scale + 0.5)), max(bucket[1], int(size[1] * scale + 0.5)))
    return Placement(size, resized, bucket)


def crop_origin(placement: Placement, center: bool, generator: torch.Generator) -> tuple[int, int]:
    """(left, top) of the bucket-sized crop in the resized image."""
    slack_w = placement.resized[0] - placement.bucket[0]
    slack_h = placement.resized[1] - placement.bucket[1]
    if center:
        return slack_w // 2, slack_h // 2
    left = int(torch.randint(0, slack_w + 1, (1,), generator=generator))
    top = int(torch.randint(0, slack_h + 1, (1,), generator=generator))
    return left, top


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices, each from one bucket, in an order drawn from (seed, epoch):
    a resumed run sees the same batches as an uninterrupted one.

    ``batch_size`` is None on purpose: it tells accelerate's shard that batches vary in length,
    so on several processes it hands out whole batches and never tops one up with indices from
    another bucket.
    """

    batch_size = None
    drop_last = False

    def __init__(self, bucket_of_index: list, max_batch_size: int, seed: int):
        self.bucket_of_index, self.max_batch_size, self.seed, self.epoch = bucket_of_index, max_batch_size, seed, 0
        sizes: dict = {}
        for bucket in bucket_of_index:
            sizes[bucket] = sizes.get(bucket, 0) + 1
        self.length = sum(math.ceil(n / max_batch_size) for n in sizes.values())

    def use_epoch(self, epoch: int) -> None:
        # deliberately not ``set_epoch``: accelerate's data loader calls that with its own
        # iteration counter, which restarts at 0 after a resume
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.bucket_of_index), generator=generator).tolist()
        by_bucket: dict = {}
        for index in order:  # buckets in order of first appearance, images in drawn order
            by_bucket.setdefault(self.bucket_of_index[index], []).append(index)
        batches = [indices[i:i + self.max_batch_size] for indices in by_bucket.values()
                   for i in range(0, len(indices), self.max_batch_size)]
        return iter([batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()])
