"""Quick checks of the tiny offline Flux / SD3 fixtures in tests/tiny_dit.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import FluxImg2ImgPipeline, FluxPipeline, StableDiffusion3Pipeline

from tiny_dit import (
    TINY_DIT_IMAGE_SIZE,
    run_tiny_dit_pipeline,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_t5_tokenizer,
)


def _linear(model: torch.nn.Module, path: str) -> torch.nn.Linear:
    module = model.get_submodule(path)
    assert isinstance(module, torch.nn.Linear), (path, type(module))
    return module


def _has(model: torch.nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


# ----------------------------------------------------------------------------- tokenizer


def test_t5_tokenizer(tmp_path):
    tok = tiny_t5_tokenizer()
    tok.save_pretrained(tmp_path / "t5")
    assert type(tok).from_pretrained(tmp_path / "t5")("a photo").input_ids == tok("a photo").input_ids
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    enc = tok("a photo of sks dog", padding="max_length", max_length=8, truncation=True)
    tokens = tok.convert_ids_to_tokens(enc.input_ids)
    assert tokens == ["\u2581a", "\u2581photo", "\u2581of", "\u2581sks", "\u2581dog", "</s>", "<pad>", "<pad>"]
    ids = tok("Hello, World! 123").input_ids
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "Hello, World! 123"


# ----------------------------------------------------------------------------- structure


def test_flux_module_paths(flux):
    tr = flux.transformer
    assert tr.config.num_layers == 2 and tr.config.num_single_layers == 2
    for path in [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_out.0",
        "transformer_blocks.0.attn.add_q_proj",
        "transformer_blocks.0.attn.to_add_out",
        "transformer_blocks.0.ff.net.0.proj",
        "transformer_blocks.0.ff_context.net.2",
        "transformer_blocks.0.norm1.linear",
        "transformer_blocks.1.norm1_context.linear",
        "single_transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.1.proj_mlp",
        "single_transformer_blocks.1.proj_out",
        "single_transformer_blocks.0.norm.linear",
        "x_embedder",
        "context_embedder",
        "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.guidance_embedder.linear_1",
        "time_text_embed.text_embedder.linear_2",
        "norm_out.linear",
        "proj_out",
    ]:
        _linear(tr, path)
    # single blocks have no separate output projection in attention (proj_out fuses attn + mlp)
    assert not _has(tr, "single_transformer_blocks.0.attn.to_out")
    assert _linear(tr, "single_transformer_blocks.0.proj_out").in_features == tr.inner_dim + 4 * tr.inner_dim
    # 2x2 latent packing: in_channels = 4 x VAE latent channels
    assert _linear(tr, "x_embedder").in_features == 4 * flux.vae.config.latent_channels
    assert _linear(tr, "context_embedder").in_features == flux.text_encoder_2.config.d_model
    assert tr.config.pooled_projection_dim == flux.text_encoder.config.hidden_size
    _linear(flux.text_encoder_2, "encoder.block.0.layer.0.SelfAttention.q")
    _linear(flux.text_encoder_2, "encoder.block.1.layer.1.DenseReluDense.wi_1")
    # transformers 5.24's CLIP text models have no `text_model.` level; 4.x ones do
    _linear(getattr(flux.text_encoder, "text_model", flux.text_encoder), "encoder.layers.0.self_attn.q_proj")


def test_sd3_module_paths(sd3):
    tr = sd3.transformer
    last = tr.config.num_layers - 1
    assert isinstance(tr.get_submodule("pos_embed.proj"), torch.nn.Conv2d)
    for path in [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.add_k_proj",
        "transformer_blocks.0.attn.to_add_out",
        "transformer_blocks.0.attn2.to_q",  # MMDiT-X dual attention (SD3.5 Medium)
        "transformer_blocks.0.attn2.to_out.0",
        "transformer_blocks.0.ff.net.0.proj",
        "transformer_blocks.0.ff_context.net.2",
        "transformer_blocks.0.norm1.linear",
        "transformer_blocks.0.norm1_context.linear",
        f"transformer_blocks.{last}.norm1_context.linear",
        f"transformer_blocks.{last}.attn.add_q_proj",
        "context_embedder",
        "time_text_embed.timestep_embedder.linear_1",
        "time_text_embed.text_embedder.linear_1",
        "norm_out.linear",
        "proj_out",
    ]:
        _linear(tr, path)
    assert not _has(tr, "transformer_blocks.1.attn2")
    assert _has(tr, "transformer_blocks.0.attn.norm_q")  # qk_norm="rms_norm"
    # the last block is context_pre_only: no context output projection, no context MLP
    assert not _has(tr, f"transformer_blocks.{last}.attn.to_add_out")
    assert not _has(tr, f"transformer_blocks.{last}.ff_context")
    # text widths: CLIP-L + CLIP-G hidden states padded to the T5 width, pooled outputs concatenated
    clip_l, clip_g, t5 = sd3.text_encoder.config, sd3.text_encoder_2.config, sd3.text_encoder_3.config
    assert clip_l.hidden_size != clip_g.hidden_size
    assert clip_l.hidden_size + clip_g.hidden_size < t5.d_model == tr.config.joint_attention_dim
    assert tr.config.pooled_projection_dim == clip_l.projection_dim + clip_g.projection_dim
    _linear(sd3.text_encoder_3, "encoder.block.0.layer.0.SelfAttention.q")
    _linear(sd3.text_encoder_3, "encoder.block.0.layer.1.DenseReluDense.wi_0")
    _linear(sd3.text_encoder_3, "encoder.block.0.layer.1.DenseReluDense.wo")
    _linear(sd3.text_encoder_2, "text_projection")


# ----------------------------------------------------------------------------- running


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_runs_deterministically(name, request):
    pipe = request.getfixturevalue(name)
    assert isinstance(pipe, {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}[name])
    rng_before = torch.random.get_rng_state()
    img = run_tiny_dit_pipeline(pipe)
    assert img.shape == (1, TINY_DIT_IMAGE_SIZE, TINY_DIT_IMAGE_SIZE, 3)
    assert img.dtype == np.float32 and np.isfinite(img).all()
    assert img.std() > 0.01  # not a flat image
    np.testing.assert_array_equal(img, run_tiny_dit_pipeline(pipe))
    assert not np.array_equal(img, run_tiny_dit_pipeline(pipe, seed=1))
    assert torch.equal(torch.random.get_rng_state(), rng_before)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_transformer_and_t5_weights_reach_the_image(name, request):
    pipe = copy.deepcopy(request.getfixturevalue(name))
    img = run_tiny_dit_pipeline(pipe)
    t5 = pipe.text_encoder_2 if name == "flux" else pipe.text_encoder_3
    for model, path in [(pipe.transformer, "transformer_blocks.0.attn.to_q"),
                        (t5, "encoder.block.0.layer.1.DenseReluDense.wi_0")]:
        with torch.no_grad():
            _linear(model, path).weight.mul_(1.5)
        changed = run_tiny_dit_pipeline(pipe)
        assert np.abs(changed - img).max() > 1e-4, path
        img = changed


def test_builders_are_deterministic(tmp_path, flux):
    again = tiny_flux_pipeline(tmp_path / "flux")
    for a, b in zip(flux.transformer.state_dict().values(), again.transformer.state_dict().values()):
        assert torch.equal(a, b)


def test_variants(tmp_path):
    schnell = tiny_flux_pipeline(tmp_path / "schnell", guidance_embeds=False)
    assert not _has(schnell.transformer, "time_text_embed.guidance_embedder")
    assert np.isfinite(run_tiny_dit_pipeline(schnell, guidance_scale=0.0)).all()
    sd3_medium = tiny_sd3_pipeline(tmp_path / "sd3", dual_attention_layers=(), qk_norm=None)
    assert not _has(sd3_medium.transformer, "transformer_blocks.0.attn2")
    assert not _has(sd3_medium.transformer, "transformer_blocks.0.attn.norm_q")
    assert np.isfinite(run_tiny_dit_pipeline(sd3_medium)).all()


def test_flux_img2img_from_components(flux):
    i2i = FluxImg2ImgPipeline(**flux.components)
    i2i.set_progress_bar_config(disable=True)
    img = run_tiny_dit_pipeline(i2i, strength=0.75, steps=4)
    assert img.shape == (1, TINY_DIT_IMAGE_SIZE, TINY_DIT_IMAGE_SIZE, 3) and np.isfinite(img).all()
    np.testing.assert_array_equal(img, run_tiny_dit_pipeline(i2i, strength=0.75, steps=4))
