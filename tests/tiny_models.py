"""Tiny, offline Stable Diffusion fixtures for tests.

Everything here is built from configs (no hub access) with the real SD1.5 / SDXL
module names and block layout, only at tiny widths, so adapter code that targets
paths such as ``down_blocks.1.resnets.1.conv1`` or
``up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k`` can be exercised on CPU
in seconds.

Public helpers:

* :func:`write_tiny_clip_tokenizer` -- a working byte-level CLIP BPE tokenizer on disk.
* :func:`tiny_sd15_components` / :func:`tiny_sd15_pipeline` -- SD1.5-shaped pipeline
  (also SD2-like and inpainting variants through keyword overrides).
* :func:`tiny_sdxl_components` / :func:`tiny_sdxl_pipeline` -- SDXL-shaped pipeline.
* :func:`run_tiny_pipeline` -- run a pipeline deterministically, return a numpy image.

All builders are deterministic: each model is created right after
``torch.manual_seed(0)`` inside :func:`torch.random.fork_rng`, so the caller's global
RNG state is left untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

__all__ = [
    "TINY_MAX_POSITION_EMBEDDINGS",
    "write_tiny_clip_tokenizer",
    "tiny_clip_text_config",
    "tiny_sd15_unet",
    "tiny_sd15_vae",
    "tiny_sd15_components",
    "tiny_sd15_pipeline",
    "tiny_sdxl_unet",
    "tiny_sdxl_vae",
    "tiny_sdxl_components",
    "tiny_sdxl_pipeline",
    "run_tiny_pipeline",
]

# Context length of the tiny text encoders; the tokenizer's model_max_length matches it.
TINY_MAX_POSITION_EMBEDDINGS = 32

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# A few merges so that the BPE path is actually exercised; every merge result is in the
# vocab (required by the tokenizers-backed CLIPTokenizer of transformers 5).
_TINY_MERGES = [
    ("p", "h"),
    ("ph", "o"),
    ("pho", "t"),
    ("phot", "o</w>"),
    ("o", "f</w>"),
    ("s", "k"),
    ("sk", "s</w>"),
    ("d", "o"),
    ("do", "g</w>"),
]

# Scheduler settings shared by SD1.x/2.x and SDXL.
_SD_SCHEDULER_KWARGS = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
)


@contextlib.contextmanager
def _seeded(seed: int = 0):
    """Seed torch for model construction without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def _tiny_clip_vocab() -> dict[str, int]:
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in _TINY_MERGES] + [BOS_TOKEN, EOS_TOKEN]
    assert len(tokens) == len(set(tokens))
    return {tok: i for i, tok in enumerate(tokens)}


def write_tiny_clip_tokenizer(directory: str | os.PathLike,
                              model_max_length: int = TINY_MAX_POSITION_EMBEDDINGS) -> str:
    """Write a small byte-level CLIP BPE tokenizer to ``directory`` and return the path.

    Vocab: the 256 byte-level characters, the same with the ``</w>`` suffix, the results
    of a handful of merges (``photo``, ``of``, ``sks``, ``dog``), then ``<|startoftext|>``
    and ``<|endoftext|>`` (last two ids, as in real CLIP). ``model_max_length`` defaults
    to the tiny text encoders' ``max_position_embeddings``.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    vocab = _tiny_clip_vocab()
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in _TINY_MERGES:
            f.write(f"{a} {b}\n")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    with open(os.path.join(directory, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f)
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": model_max_length,
                "do_lower_case": True,
                "errors": "replace",
                "add_prefix_space": False,
                **special,
            },
            f,
            indent=2,
        )
    return directory


def _load_tokenizer(tokenizer_dir: str | os.PathLike) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(os.fspath(tokenizer_dir))


# --------------------------------------------------------------------------- text encoders


def tiny_clip_text_config(
    tokenizer: CLIPTokenizer,
    hidden_size: int = 32,
    projection_dim: int | None = None,
    **overrides: Any,
) -> CLIPTextConfig:
    """CLIPTextConfig sized for tests, with vocab and special ids matching ``tokenizer``."""
    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TINY_MAX_POSITION_EMBEDDINGS,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    kwargs.update(overrides)
    return CLIPTextConfig(**kwargs)


# --------------------------------------------------------------------------- SD 1.5


def tiny_sd15_unet(**overrides: Any) -> UNet2DConditionModel:
    """SD1.5 block layout at tiny widths. Overrides go to ``UNet2DConditionModel``.

    Useful overrides: ``in_channels=9`` (inpainting), ``use_linear_projection=True``
    (SD2-style linear proj_in/proj_out), ``cross_attention_dim``.
    """
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=2,
        norm_num_groups=8,
        cross_attention_dim=32,
        # diffusers' legacy naming: this is the number of heads (SD1.5 uses 8).
        attention_head_dim=4,
        use_linear_projection=False,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    config.update(overrides)
    with _seeded(0):
        return UNet2DConditionModel(**config)


def tiny_sd15_vae(scaling_factor: float = 0.18215, **overrides: Any) -> AutoencoderKL:
    """Two-level AutoencoderKL: the image is 2x the latent (vae_scale_factor 2)."""
    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=scaling_factor,
    )
    config.update(overrides)
    with _seeded(0):
        return AutoencoderKL(**config)


def tiny_sd15_components(
    tokenizer_dir: str | os.PathLike,
    *,
    prediction_type: str = "epsilon",
    scheduler_cls: type = DDIMScheduler,
    **unet_overrides: Any,
) -> dict[str, Any]:
    """Components dict for ``StableDiffusionPipeline`` (and its img2img/inpaint siblings).

    ``tokenizer_dir`` must hold a tokenizer written by :func:`write_tiny_clip_tokenizer`.
    The text encoder's hidden size follows the UNet's ``cross_attention_dim``.
    ``prediction_type`` goes to the scheduler (``"v_prediction"`` for SD2-v-like).
    """
    unet = tiny_sd15_unet(**unet_overrides)
    tokenizer = _load_tokenizer(tokenizer_dir)
    with _seeded(0):
        text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer, hidden_size=unet.config.cross_attention_dim))
    text_encoder.eval()
    scheduler_kwargs = dict(_SD_SCHEDULER_KWARGS, prediction_type=prediction_type)
    if scheduler_cls is DDIMScheduler:
        scheduler_kwargs.update(clip_sample=False, set_alpha_to_one=False)
    scheduler = scheduler_cls(**scheduler_kwargs)
    return {
        "unet": unet,
        "vae": tiny_sd15_vae(),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def tiny_sd15_pipeline(
    tmp_dir: str | os.PathLike,
    *,
    pipeline_cls: type | None = None,
    prediction_type: str = "epsilon",
    scheduler_cls: type = DDIMScheduler,
    **unet_overrides: Any,
) -> StableDiffusionPipeline:
    """Tiny SD1.5-shaped pipeline; the tokenizer is written under ``tmp_dir/tokenizer``.

    ``pipeline_cls`` defaults to ``StableDiffusionPipeline``, or to
    ``StableDiffusionInpaintPipeline`` when ``in_channels=9``. Examples::

        tiny_sd15_pipeline(tmp)                                   # SD1.5
        tiny_sd15_pipeline(tmp, in_channels=9)                    # SD1.5 inpainting
        tiny_sd15_pipeline(tmp, use_linear_projection=True,
                           prediction_type="v_prediction")        # SD2-like
    """
    tokenizer_dir = write_tiny_clip_tokenizer(os.path.join(os.fspath(tmp_dir), "tokenizer"))
    components = tiny_sd15_components(
        tokenizer_dir, prediction_type=prediction_type, scheduler_cls=scheduler_cls, **unet_overrides
    )
    if pipeline_cls is None:
        pipeline_cls = (
            StableDiffusionInpaintPipeline if components["unet"].config.in_channels == 9 else StableDiffusionPipeline
        )
    pipe = pipeline_cls(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- SDXL

_SDXL_TE1_HIDDEN = 32
_SDXL_TE2_HIDDEN = 64
_SDXL_TE2_PROJECTION = 32
_SDXL_ADDITION_TIME_EMBED_DIM = 8
_SDXL_NUM_TIME_IDS = 6  # original_size (2) + crop coords (2) + target_size (2)


def tiny_sdxl_unet(**overrides: Any) -> UNet2DConditionModel:
    """SDXL block layout at tiny widths. Overrides go to ``UNet2DConditionModel``."""
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 2),
        norm_num_groups=8,
        cross_attention_dim=_SDXL_TE1_HIDDEN + _SDXL_TE2_HIDDEN,
        # Number of heads per level (SDXL: 5, 10, 20); head dim 8 here.
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=_SDXL_ADDITION_TIME_EMBED_DIM * _SDXL_NUM_TIME_IDS
        + _SDXL_TE2_PROJECTION,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    config.update(overrides)
    with _seeded(0):
        return UNet2DConditionModel(**config)


def tiny_sdxl_vae(**overrides: Any) -> AutoencoderKL:
    return tiny_sd15_vae(scaling_factor=0.13025, **overrides)


def tiny_sdxl_components(
    tokenizer_dir: str | os.PathLike,
    *,
    prediction_type: str = "epsilon",
    scheduler_cls: type = EulerDiscreteScheduler,
    **unet_overrides: Any,
) -> dict[str, Any]:
    """Components dict for ``StableDiffusionXLPipeline`` (and its img2img/inpaint siblings).

    text_encoder: CLIPTextModel (hidden 32); text_encoder_2: CLIPTextModelWithProjection
    (hidden 64, projection 32); UNet cross_attention_dim = 32 + 64 = 96.
    """
    unet = tiny_sdxl_unet(**unet_overrides)
    tokenizer = _load_tokenizer(tokenizer_dir)
    tokenizer_2 = _load_tokenizer(tokenizer_dir)
    with _seeded(0):
        text_encoder = CLIPTextModel(tiny_clip_text_config(tokenizer, hidden_size=_SDXL_TE1_HIDDEN))
    with _seeded(0):
        text_encoder_2 = CLIPTextModelWithProjection(
            tiny_clip_text_config(tokenizer_2, hidden_size=_SDXL_TE2_HIDDEN, projection_dim=_SDXL_TE2_PROJECTION)
        )
    text_encoder.eval()
    text_encoder_2.eval()
    scheduler_kwargs = dict(_SD_SCHEDULER_KWARGS, prediction_type=prediction_type)
    if scheduler_cls is EulerDiscreteScheduler:
        scheduler_kwargs.update(interpolation_type="linear", timestep_spacing="leading", use_karras_sigmas=False)
    elif scheduler_cls is DDIMScheduler:
        scheduler_kwargs.update(clip_sample=False, set_alpha_to_one=False)
    scheduler = scheduler_cls(**scheduler_kwargs)
    return {
        "unet": unet,
        "vae": tiny_sdxl_vae(),
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_sdxl_pipeline(
    tmp_dir: str | os.PathLike,
    *,
    pipeline_cls: type | None = None,
    prediction_type: str = "epsilon",
    scheduler_cls: type = EulerDiscreteScheduler,
    **unet_overrides: Any,
) -> StableDiffusionXLPipeline:
    """Tiny SDXL-shaped pipeline; the tokenizer is written under ``tmp_dir/tokenizer``.

    ``pipeline_cls`` defaults to ``StableDiffusionXLPipeline``, or to
    ``StableDiffusionXLInpaintPipeline`` when ``in_channels=9``.
    """
    tokenizer_dir = write_tiny_clip_tokenizer(os.path.join(os.fspath(tmp_dir), "tokenizer"))
    components = tiny_sdxl_components(
        tokenizer_dir, prediction_type=prediction_type, scheduler_cls=scheduler_cls, **unet_overrides
    )
    if pipeline_cls is None:
        pipeline_cls = (
            StableDiffusionXLInpaintPipeline
            if components["unet"].config.in_channels == 9
            else StableDiffusionXLPipeline
        )
    kwargs: dict[str, Any] = {"force_zeros_for_empty_prompt": True}
    if pipeline_cls is not StableDiffusionXLPipeline:
        # img2img / inpaint have the aesthetics-score switch; the base pipeline does not.
        kwargs["requires_aesthetics_score"] = False
    pipe = pipeline_cls(**components, add_watermarker=False, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- running


def _tiny_init_image(size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.rand(1, 3, size, size, generator=g)  # values in [0, 1]


def _tiny_mask(size: int) -> torch.Tensor:
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0  # repaint the centre
    return mask


def run_tiny_pipeline(pipe, prompt: str = "a photo", seed: int = 0, steps: int = 2, **kw: Any) -> np.ndarray:
    """Run ``pipe`` deterministically and return the ``(batch, H, W, 3)`` float image array.

    Height/width default to ``unet.config.sample_size * pipe.vae_scale_factor`` (16 for
    the tiny models). For img2img/inpaint pipelines a deterministic ``image`` (and centre
    ``mask_image``) are supplied unless given. Extra keyword arguments go to the call.
    """
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    kw.setdefault("height", size)
    kw.setdefault("width", size)
    kw.setdefault("guidance_scale", 5.0)
    inpaint_types = (StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline)
    img2img_types = (StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline)
    if isinstance(pipe, inpaint_types + img2img_types):
        kw.setdefault("image", _tiny_init_image(kw["height"], seed))
        if isinstance(pipe, img2img_types):
            kw.pop("height")
            kw.pop("width")
    if isinstance(pipe, inpaint_types):
        kw.setdefault("mask_image", _tiny_mask(kw["height"]))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        out = pipe(prompt=prompt, num_inference_steps=steps, generator=generator, output_type="np", **kw)
    return np.asarray(out.images)
