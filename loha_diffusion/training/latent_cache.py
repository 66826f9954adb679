"""``--cache_latents`` / ``--cache_latents_to_disk``: the VAE encodes each sample once, before training.

What is cached is the VAE's latent *distribution* (mean and log-variance), not one draw from it:
each step still samples its latents with the step's own generator, exactly as without a cache,
so caching changes the speed of a run, not its numbers. With ``--random_flip`` the flipped
sample is encoded too.

On disk, one safetensors file per sample sits beside the image (``<stem>.<key>.latents.safetensors``;
images that are not files go to ``<output_dir>/latent_cache``). Its name and its metadata hold a
key made of the image's content hash, its bucket, resize and crop, the flip, and a fingerprint
of the VAE: a changed image, setting or VAE gives another key and is encoded again. A file that
does not read back as the expected finite tensor under the expected key is re-made, never trusted.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from ..io import all_finite, save_state_dict
from .buckets import crop_origin
from .data import render
from .images import FileImage

logger = logging.getLogger(__name__)

FORMAT = "loha_diffusion latent cache v1"
TENSOR = "latent_params"


def vae_fingerprint(vae) -> str:
    """Config, dtype and first-layer weights of the VAE: another VAE gives other latents."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    first = next(vae.parameters())
    digest.update(str(first.dtype).encode())
    digest.update(first.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def sample_key(content_hash: str, placement, flip: bool, fingerprint: str) -> str:
    settings = f"{content_hash}|resized={placement.resized}|bucket={placement.bucket}|crop=center|flip={flip}" \
               f"|vae={fingerprint}"
    return hashlib.sha256(settings.encode()).hexdigest()[:24]


def cache_path(record, key: str, fallback_dir: Path) -> Path:
    if isinstance(record.source, FileImage):
        path = record.source.path
        return path.with_name(f"{path.stem}.{key}.latents.safetensors")
    return fallback_dir / f"{key}.latents.safetensors"


def read_cached(path: Path, key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The cached tensor, or None when the file is missing, unreadable, stale or not finite."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensor = f.get_tensor(TENSOR)
    except Exception as exc:  # any unreadable file is re-made: its bytes are not trusted
        logger.warning("latent cache file %s is unreadable (%s): encoding it again", path, exc.__class__.__name__)
        return None
    if meta.get("format") != FORMAT or meta.get("key") != key or tuple(tensor.shape) != shape \
            or not all_finite(tensor):
        logger.warning("latent cache file %s does not hold the expected latents: encoding it again", path)
        return None
    return tensor


@torch.no_grad()
def encode_sample(vae, record, placement, flip: bool, device) -> torch.Tensor:
    """Latent distribution parameters (2C, h, w), fp32 on the CPU, of the centre-cropped sample."""
    pixels = render(record, placement, crop_origin(placement, True, None), flip)
    dist = vae.encode(pixels[None].to(device, vae.dtype)).latent_dist
    return dist.parameters[0].float().cpu()


def build_latent_cache(dataset, vae, device, random_flip: bool, to_disk: bool, fallback_dir, show_progress: bool,
                       latent_shape) -> dict:
    """{(record, placement, flip): parameters} for every sample the dataset can produce.

    ``latent_shape(bucket)`` gives the expected (2C, h, w) of a bucket's latents."""
    from tqdm.auto import tqdm

    wanted = []
    seen = set()
    for index in range(len(dataset)):
        for record, placement in dataset.samples(index):
            for flip in ((False, True) if random_flip else (False,)):
                if (record, placement, flip) not in seen:
                    seen.add((record, placement, flip))
                    wanted.append((record, placement, flip))
    fingerprint = vae_fingerprint(vae)
    hashes: dict = {}
    cache, encoded, reused = {}, 0, 0
    for record, placement, flip in tqdm(wanted, desc="caching latents", disable=not show_progress):
        tensor, path, key = None, None, None
        if to_disk:
            if record not in hashes:
                hashes[record] = record.source.content_hash()
            key = sample_key(hashes[record], placement, flip, fingerprint)
            path = cache_path(record, key, Path(fallback_dir))
            tensor = read_cached(path, key, latent_shape(placement.bucket))
        if tensor is None:
            tensor = encode_sample(vae, record, placement, flip, device)
            encoded += 1
            if to_disk:
                save_state_dict({TENSOR: tensor}, path, {"format": FORMAT, "key": key})
        else:
            reused += 1
        cache[(record, placement, flip)] = tensor
    logger.info("latent cache: %d sample(s) encoded, %d read from disk", encoded, reused)
    return cache
