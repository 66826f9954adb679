"""Tiny, offline Flux and SD3 (MMDiT) fixtures for tests.

Everything here is built from configs (no hub access) with the real Flux.1 / SD3 module
names and block layout, only at tiny widths, so adapter code that targets paths such as
``transformer_blocks.0.attn.add_q_proj``, ``single_transformer_blocks.0.proj_mlp`` or the
T5 encoder's ``encoder.block.0.layer.1.DenseReluDense.wi_0`` can be exercised on CPU in
seconds.

Public helpers:

* :func:`tiny_t5_tokenizer` / :func:`tiny_t5_encoder` -- a working Unigram T5 tokenizer
  (built in memory) and a T5 v1.1-style (gated-gelu) encoder.
* :func:`tiny_flux_transformer` / :func:`tiny_flux_components` / :func:`tiny_flux_pipeline`
  -- Flux.1-dev-shaped pipeline (schnell-like with ``guidance_embeds=False``). The
  components also build ``FluxImg2ImgPipeline(**pipe.components)``.
* :func:`tiny_sd3_transformer` / :func:`tiny_sd3_components` / :func:`tiny_sd3_pipeline`
  -- SD3.5-Medium-shaped pipeline (SD3-Medium-like with ``dual_attention_layers=(),
  qk_norm=None``).
* :func:`run_tiny_dit_pipeline` -- run either pipeline deterministically, return a numpy image.

Widths: transformer inner dim 32 (2 heads x 16), MLP hidden 128; CLIP-L 32 wide, CLIP-G
64 wide (SD3 pooled = 32 + 64 = 96), T5 128 wide (wider than CLIP-L + CLIP-G, so SD3's
padding of the CLIP states to the T5 width is exercised). The VAE has 4 latent channels
and a scale factor of 2 (Flux packs 2x2 latent patches: transformer in_channels 16).

All builders are deterministic: each model is created right after ``torch.manual_seed(0)``
inside :func:`torch.random.fork_rng`, so the caller's global RNG state is left untouched.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

from tiny_models import _load_tokenizer, _seeded, tiny_clip_text_config, write_tiny_clip_tokenizer

__all__ = [
    "TINY_DIT_IMAGE_SIZE",
    "TINY_T5_MAX_LENGTH",
    "tiny_t5_tokenizer",
    "tiny_t5_encoder",
    "tiny_dit_vae",
    "tiny_flux_transformer",
    "tiny_flux_components",
    "tiny_flux_pipeline",
    "tiny_sd3_transformer",
    "tiny_sd3_components",
    "tiny_sd3_pipeline",
    "run_tiny_dit_pipeline",
]

TINY_DIT_IMAGE_SIZE = 32  # 16x16 latents, 8x8 = 64 image tokens (Flux 2x2 packing, SD3 patch 2)
TINY_T5_MAX_LENGTH = 16  # T5 tokens per prompt in run_tiny_dit_pipeline (Flux: 512, SD3: 256)

_HEADS = 2
_HEAD_DIM = 16
_INNER = _HEADS * _HEAD_DIM  # 32
_CLIP_L_HIDDEN = 32
_CLIP_G_HIDDEN = 64
_T5_D_MODEL = 128
_LATENT_CHANNELS = 4

# Unigram vocab of the tiny T5 tokenizer. Ids 0-2 are <pad>, </s>, <unk> as in T5; then the
# metaspace, a few whole words (cheaper than spelling them out, so Viterbi picks them),
# then single characters so that ASCII letters, digits and common punctuation never give <unk>.
_T5_WORDS = ["a", "photo", "of", "sks", "dog", "cat", "the", "in", "style"]
_T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"


# --------------------------------------------------------------------------- T5


def tiny_t5_tokenizer(model_max_length: int = 512) -> T5TokenizerFast:
    """A T5 tokenizer (Unigram + metaspace, ``</s>`` appended) built in memory with the
    ``tokenizers`` library; no sentencepiece file. ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2,
    no ``<extra_id_*>`` sentinels. ``save_pretrained`` / ``from_pretrained`` round-trip."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0) for w in _T5_WORDS] + [(c, -6.0) for c in _T5_CHARS]
    tok = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    meta = dict(replacement="\u2581", prepend_scheme="always", split=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**meta)])
    tok.decoder = decoders.Metaspace(**meta)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    # transformers 5: T5TokenizerFast is T5Tokenizer; tokenizer_object= works in 4.x and 5.x
    return T5TokenizerFast(tokenizer_object=tok, extra_ids=0, model_max_length=model_max_length)


def tiny_t5_encoder(vocab_size: int, d_model: int = _T5_D_MODEL, **overrides: Any) -> T5EncoderModel:
    """T5 v1.1-style encoder (gated-gelu: ``DenseReluDense.wi_0/wi_1/wo``), 2 blocks."""
    kwargs = dict(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=16,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    with _seeded(0):
        model = T5EncoderModel(T5Config(**kwargs))
    return model.eval()


# --------------------------------------------------------------------------- shared


def tiny_dit_vae(scaling_factor: float, shift_factor: float, **overrides: Any) -> AutoencoderKL:
    """Two-level AutoencoderKL (scale factor 2), 4 latent channels, no quant convs (as the
    Flux / SD3 VAEs); the pipelines read ``scaling_factor`` and ``shift_factor``."""
    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=_LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=TINY_DIT_IMAGE_SIZE,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    config.update(overrides)
    with _seeded(0):
        return AutoencoderKL(**config).eval()


def _clip(tokenizer, hidden_size: int, with_projection: bool) -> CLIPTextModel | CLIPTextModelWithProjection:
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    extra = {"projection_dim": hidden_size} if with_projection else {}  # CLIP-L / CLIP-G: projection = width
    with _seeded(0):
        return cls(tiny_clip_text_config(tokenizer, hidden_size, **extra)).eval()


# --------------------------------------------------------------------------- Flux


def tiny_flux_transformer(**overrides: Any) -> FluxTransformer2DModel:
    """Flux.1 layout (double-stream ``transformer_blocks``, single-stream
    ``single_transformer_blocks``) at tiny widths. Overrides go to ``FluxTransformer2DModel``;
    ``guidance_embeds=False`` gives a schnell-like model."""
    config = dict(
        patch_size=1,
        in_channels=4 * _LATENT_CHANNELS,  # 2x2-packed latents
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=_HEAD_DIM,
        num_attention_heads=_HEADS,
        joint_attention_dim=_T5_D_MODEL,
        pooled_projection_dim=_CLIP_L_HIDDEN,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim; Flux: (16, 56, 56)
    )
    config.update(overrides)
    with _seeded(0):
        return FluxTransformer2DModel(**config).eval()


def tiny_flux_components(tokenizer_dir: str | os.PathLike, **transformer_overrides: Any) -> dict[str, Any]:
    """Components dict for ``FluxPipeline`` (and ``FluxImg2ImgPipeline``); ``tokenizer_dir``
    must hold a tokenizer written by :func:`tiny_models.write_tiny_clip_tokenizer`."""
    tokenizer = _load_tokenizer(tokenizer_dir)
    tokenizer_2 = tiny_t5_tokenizer()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                      max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
        "vae": tiny_dit_vae(scaling_factor=0.3611, shift_factor=0.1159),
        "text_encoder": _clip(tokenizer, _CLIP_L_HIDDEN, with_projection=False),
        "tokenizer": tokenizer,
        "text_encoder_2": tiny_t5_encoder(len(tokenizer_2)),
        "tokenizer_2": tokenizer_2,
        "transformer": tiny_flux_transformer(**transformer_overrides),
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_flux_pipeline(tmp_dir: str | os.PathLike, **transformer_overrides: Any) -> FluxPipeline:
    """Tiny Flux.1-dev-shaped pipeline (fp32, eval); the CLIP tokenizer is written under
    ``tmp_dir/tokenizer``. ``FluxImg2ImgPipeline(**pipe.components)`` gives the img2img
    sibling on the same modules."""
    tokenizer_dir = write_tiny_clip_tokenizer(os.path.join(os.fspath(tmp_dir), "tokenizer"))
    pipe = FluxPipeline(**tiny_flux_components(tokenizer_dir, **transformer_overrides))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- SD3


def tiny_sd3_transformer(**overrides: Any) -> SD3Transformer2DModel:
    """SD3.5-Medium layout (MMDiT-X: dual attention ``attn2`` in block 0, RMS qk-norm) at
    tiny widths; the last block is ``context_pre_only``. Overrides go to
    ``SD3Transformer2DModel``; ``dual_attention_layers=(), qk_norm=None`` is SD3-Medium-like."""
    config = dict(
        sample_size=TINY_DIT_IMAGE_SIZE // 2,  # latent side; the default height is this x 2
        patch_size=2,
        in_channels=_LATENT_CHANNELS,
        out_channels=_LATENT_CHANNELS,
        num_layers=3,
        attention_head_dim=_HEAD_DIM,
        num_attention_heads=_HEADS,
        joint_attention_dim=_T5_D_MODEL,
        caption_projection_dim=_INNER,
        pooled_projection_dim=_CLIP_L_HIDDEN + _CLIP_G_HIDDEN,
        pos_embed_max_size=16,  # patch grid side; up to 64x64 images
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    config.update(overrides)
    with _seeded(0):
        return SD3Transformer2DModel(**config).eval()


def tiny_sd3_components(tokenizer_dir: str | os.PathLike, **transformer_overrides: Any) -> dict[str, Any]:
    """Components dict for ``StableDiffusion3Pipeline``.

    text_encoder: CLIP-L-like ``CLIPTextModelWithProjection`` (32 wide, projection 32);
    text_encoder_2: CLIP-G-like (64 wide, projection 64); text_encoder_3: T5 (128 wide).
    """
    tokenizer = _load_tokenizer(tokenizer_dir)
    tokenizer_2 = _load_tokenizer(tokenizer_dir)
    tokenizer_3 = tiny_t5_tokenizer()
    return {
        "transformer": tiny_sd3_transformer(**transformer_overrides),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "vae": tiny_dit_vae(scaling_factor=1.5305, shift_factor=0.0609),
        "text_encoder": _clip(tokenizer, _CLIP_L_HIDDEN, with_projection=True),
        "tokenizer": tokenizer,
        "text_encoder_2": _clip(tokenizer_2, _CLIP_G_HIDDEN, with_projection=True),
        "tokenizer_2": tokenizer_2,
        "text_encoder_3": tiny_t5_encoder(len(tokenizer_3)),
        "tokenizer_3": tokenizer_3,
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_sd3_pipeline(tmp_dir: str | os.PathLike, **transformer_overrides: Any) -> StableDiffusion3Pipeline:
    """Tiny SD3.5-Medium-shaped pipeline (fp32, eval); the CLIP tokenizer is written under
    ``tmp_dir/tokenizer``."""
    tokenizer_dir = write_tiny_clip_tokenizer(os.path.join(os.fspath(tmp_dir), "tokenizer"))
    pipe = StableDiffusion3Pipeline(**tiny_sd3_components(tokenizer_dir, **transformer_overrides))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- running


def run_tiny_dit_pipeline(pipe, prompt: str = "a photo", seed: int = 0, steps: int = 2, **kw: Any) -> np.ndarray:
    """Run a tiny Flux or SD3 pipeline deterministically; return the ``(batch, H, W, 3)`` image.

    Defaults: ``TINY_DIT_IMAGE_SIZE`` square, ``max_sequence_length=TINY_T5_MAX_LENGTH``,
    ``guidance_scale=5.0`` (embedded guidance for Flux, classifier-free for SD3). For
    ``FluxImg2ImgPipeline`` a deterministic ``image`` is supplied unless given. Extra
    keyword arguments go to the call.
    """
    kw.setdefault("height", TINY_DIT_IMAGE_SIZE)
    kw.setdefault("width", TINY_DIT_IMAGE_SIZE)
    kw.setdefault("max_sequence_length", TINY_T5_MAX_LENGTH)
    kw.setdefault("guidance_scale", 5.0)
    if isinstance(pipe, FluxImg2ImgPipeline) and "image" not in kw:
        g = torch.Generator().manual_seed(seed + 1)
        kw["image"] = torch.rand(1, 3, kw["height"], kw["width"], generator=g)  # values in [0, 1]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        out = pipe(prompt=prompt, num_inference_steps=steps, generator=generator, output_type="np", **kw)
    return np.asarray(out.images)
