"""Quick checks of the tiny offline SD1.5 / SDXL fixtures in tests/tiny_models.py."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from transformers import CLIPTokenizer

from tiny_models import (
    TINY_MAX_POSITION_EMBEDDINGS,
    run_tiny_pipeline,
    tiny_sd15_pipeline,
    write_tiny_clip_tokenizer,
)


def _module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    return model.get_submodule(path)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_roundtrip(tmp_path):
    tok = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(tmp_path / "tok"))
    assert tok.model_max_length == TINY_MAX_POSITION_EMBEDDINGS
    enc = tok("a photo of sks dog", padding="max_length", max_length=16)
    ids = enc.input_ids
    assert len(ids) == 16
    assert ids[0] == tok.bos_token_id
    tokens = tok.convert_ids_to_tokens(ids)
    # the merges are applied; padding uses <|endoftext|>
    assert tokens[:7] == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "sks</w>", "dog</w>", "<|endoftext|>"]
    assert all(i == tok.pad_token_id for i in ids[7:])
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of sks dog"
    # arbitrary text (punctuation, digits, non-ASCII) falls back to byte-level tokens, never unk
    ids = tok("Hello, World! 123 é").input_ids
    assert tok.unk_token_id not in ids[1:-1]
    # long prompts truncate to the model length
    long_ids = tok("x " * 100, truncation=True, max_length=tok.model_max_length).input_ids
    assert len(long_ids) == TINY_MAX_POSITION_EMBEDDINGS


# ----------------------------------------------------------------------------- structure


def test_sd15_unet_module_paths(sd15):
    unet = sd15.unet
    assert isinstance(_module(unet, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"), torch.nn.Linear)
    assert isinstance(_module(unet, "down_blocks.1.resnets.0.conv_shortcut"), torch.nn.Conv2d)
    assert isinstance(_module(unet, "down_blocks.0.downsamplers.0.conv"), torch.nn.Conv2d)
    assert isinstance(_module(unet, "up_blocks.0.upsamplers.0.conv"), torch.nn.Conv2d)
    proj_in = _module(unet, "mid_block.attentions.0.proj_in")
    assert isinstance(proj_in, torch.nn.Conv2d) and proj_in.kernel_size == (1, 1)
    assert isinstance(_module(unet, "up_blocks.3.attentions.2.proj_out"), torch.nn.Conv2d)
    # SD1.5 layout: 2 resnets per down block, 3 per up block, attention where SD1.5 has it
    assert isinstance(_module(unet, "down_blocks.1.resnets.1.conv1"), torch.nn.Conv2d)
    assert isinstance(_module(unet, "up_blocks.3.resnets.2.conv2"), torch.nn.Conv2d)
    assert isinstance(_module(unet, "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k"), torch.nn.Linear)
    assert isinstance(_module(unet, "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj"), torch.nn.Linear)
    assert isinstance(_module(unet, "time_embedding.linear_1"), torch.nn.Linear)
    names = {n for n, _ in unet.named_modules()}
    assert "down_blocks.3.attentions" not in names and "up_blocks.0.attentions" not in names
    assert "down_blocks.3.downsamplers" not in names and "up_blocks.3.upsamplers" not in names
    assert "add_embedding" not in names
    assert "down_blocks.0.attentions.0.transformer_blocks.1" not in names


def test_text_encoder_linear_modules(sd15, sdxl):
    te = sd15.text_encoder
    # transformers 5: CLIPTextModel has no `text_model` child
    layer = "encoder.layers.0"
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                 "mlp.fc1", "mlp.fc2"):
        assert isinstance(_module(te, f"{layer}.{name}"), torch.nn.Linear), name
    assert te.config.vocab_size == len(sd15.tokenizer)
    assert te.config.hidden_size == sd15.unet.config.cross_attention_dim
    linear_names = {n for n, m in te.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {n.rsplit(".", 1)[-1] for n in linear_names} == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}

    # CLIPTextModelWithProjection keeps the `text_model` prefix
    assert isinstance(_module(sdxl.text_encoder, "encoder.layers.1.self_attn.q_proj"), torch.nn.Linear)
    assert isinstance(_module(sdxl.text_encoder_2, "text_model.encoder.layers.1.mlp.fc2"), torch.nn.Linear)
    assert isinstance(_module(sdxl.text_encoder_2, "text_projection"), torch.nn.Linear)


def test_sdxl_unet_structure(sdxl):
    unet = sdxl.unet
    cfg = unet.config
    te_dims = sdxl.text_encoder.config.hidden_size + sdxl.text_encoder_2.config.hidden_size
    assert cfg.cross_attention_dim == te_dims
    assert cfg.projection_class_embeddings_input_dim == 6 * cfg.addition_time_embed_dim + (
        sdxl.text_encoder_2.config.projection_dim
    )
    assert isinstance(_module(unet, "add_embedding.linear_1"), torch.nn.Linear)
    assert isinstance(_module(unet, "down_blocks.1.attentions.1.proj_in"), torch.nn.Linear)
    assert isinstance(_module(unet, "down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_k"), torch.nn.Linear)
    assert isinstance(_module(unet, "mid_block.attentions.0.transformer_blocks.1.attn1.to_out.0"), torch.nn.Linear)
    assert isinstance(_module(unet, "up_blocks.1.attentions.2.transformer_blocks.1.ff.net.2"), torch.nn.Linear)
    assert isinstance(_module(unet, "up_blocks.2.resnets.2.conv_shortcut"), torch.nn.Conv2d)
    names = {n for n, _ in unet.named_modules()}
    assert "down_blocks.0.attentions" not in names and "up_blocks.2.attentions" not in names
    assert "down_blocks.2.downsamplers" not in names and "up_blocks.2.upsamplers" not in names


# ----------------------------------------------------------------------------- running


def _expected_shape(pipe):
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return (1, size, size, 3)


def test_sd15_runs(sd15):
    assert isinstance(sd15, StableDiffusionPipeline)
    image = run_tiny_pipeline(sd15)
    assert image.shape == _expected_shape(sd15) == (1, 16, 16, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0


def test_sdxl_runs(sdxl):
    assert isinstance(sdxl, StableDiffusionXLPipeline)
    image = run_tiny_pipeline(sdxl)
    assert image.shape == _expected_shape(sdxl) == (1, 16, 16, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0


def test_inpaint_variant_runs(tmp_path):
    pipe = tiny_sd15_pipeline(tmp_path, in_channels=9)
    assert isinstance(pipe, StableDiffusionInpaintPipeline)
    assert pipe.unet.conv_in.in_channels == 9
    image = run_tiny_pipeline(pipe)
    assert image.shape == _expected_shape(pipe)
    assert np.isfinite(image).all()


def test_sd2_like_variant_runs(tmp_path):
    pipe = tiny_sd15_pipeline(tmp_path, use_linear_projection=True, prediction_type="v_prediction")
    assert isinstance(pipe.unet.get_submodule("mid_block.attentions.0.proj_in"), torch.nn.Linear)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    image = run_tiny_pipeline(pipe)
    assert image.shape == _expected_shape(pipe)
    assert np.isfinite(image).all()


def test_same_seed_is_identical(sd15, sdxl):
    for pipe in (sd15, sdxl):
        a = run_tiny_pipeline(pipe, seed=0)
        b = run_tiny_pipeline(pipe, seed=0)
        np.testing.assert_array_equal(a, b)
        c = run_tiny_pipeline(pipe, seed=1)
        assert np.abs(a - c).max() > 1e-3
        # the prompt reaches the UNet
        d = run_tiny_pipeline(pipe, prompt="a photo of sks dog", seed=0)
        assert np.abs(a - d).max() > 1e-3


def test_construction_is_deterministic(tmp_path, sd15):
    rng_state = torch.get_rng_state()
    other = tiny_sd15_pipeline(tmp_path)
    assert torch.equal(torch.get_rng_state(), rng_state)  # global RNG untouched
    for name in ("unet", "vae", "text_encoder"):
        sd_a = getattr(sd15, name).state_dict()
        sd_b = getattr(other, name).state_dict()
        assert sd_a.keys() == sd_b.keys()
        for key in sd_a:
            assert torch.equal(sd_a[key], sd_b[key]), f"{name}.{key}"
