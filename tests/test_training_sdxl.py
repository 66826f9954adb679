"""The trainer on a tiny SDXL-layout model: kohya's SDXL file that StableDiffusionXLPipeline
loads, conditioning against diffusers' own encode_prompt, exact resume with buckets and cached
latents, and caches that change the speed of a run, not its numbers."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import loha_diffusion  # noqa: F401
from loha_diffusion.training.loop import main
from loha_diffusion.training.step import StepModels, micro_step_loss
from loha_diffusion.training.text import CachedPrompts, PromptEncoder
from tiny_models import tiny_sdxl_pipeline

PROMPT = "a photo of sks toy"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    tiny_sdxl_pipeline(root / "tok").save_pretrained(root / "model")
    (root / "inst").mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(24, 24), (40, 20), (20, 40)]):   # three buckets at resolution 16
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "inst" / f"{i}.png")
    return root


def sdxl_args(root, out, *extra, steps=3, data=None):
    return ["--pretrained_model_name_or_path", str(root / "model"), "--instance_data_dir", str(data or root / "inst"),
            "--instance_prompt", PROMPT, "--resolution", "16", "--max_train_steps", str(steps), "--output_dir",
            str(out), "--report_to", "none", "--checkpointing_steps", "1000", "--enable_bucket", "--min_bucket_reso",
            "8", "--max_bucket_reso", "32", "--bucket_reso_steps", "8", *extra]


@pytest.fixture
def one_thread():
    """Bit-equality across runs needs a fixed reduction order in the CPU kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unet_output(pipe, prompt=PROMPT):
    """The UNet's prediction for a fixed latent, with the pipeline's own prompt encoding."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])}
    with torch.no_grad():
        return pipe.unet(sample, torch.tensor([500]), embeds, added_cond_kwargs=added).sample


def test_sdxl_run_writes_kohyas_sdxl_file_that_the_sdxl_pipeline_applies(sdxl, tmp_path):
    out = tmp_path / "out"
    classes = tmp_path / "class"
    assert main(sdxl_args(sdxl, out, "--train_text_encoder", "--learning_rate", "1e-3", "--save_peft_format",
                          "--validation_prompt", PROMPT, "--num_validation_images", "1",
                          "--validation_inference_steps", "2", "--with_prior_preservation", "--class_prompt",
                          "a photo of a toy", "--class_data_dir", str(classes), "--num_class_images", "2",
                          "--class_generation_steps", "2", "--sample_batch_size", "2")) == 0
    # class images come from the SDXL pipeline at the training resolution
    assert [Image.open(p).size for p in sorted(classes.glob("*.png"))] == [(16, 16), (16, 16)]
    path = out / "loha.safetensors"
    tensors = load_file(str(path))
    modules = {k.split(".", 1)[0] for k in tensors}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in modules        # SGM names
    assert not any(m.startswith("lora_unet_down_blocks") for m in modules)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in modules
    # text_encoder's last layer (of two) feeds nothing SDXL uses: no adapter that never learns
    assert not any(m.startswith("lora_te1_text_model_encoder_layers_1_") for m in modules)
    assert all(tensors[f"{m}.hada_w2_a"].abs().max() > 0 for m in modules if m.startswith("lora_te"))
    assert all(f"{m}.alpha" in tensors for m in modules)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lycoris"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert sorted(p.name for p in (out / "peft").iterdir()) == ["text_encoder", "text_encoder_2", "unet"]
    assert (out / "before_after.png").is_file() and "StableDiffusionXLPipeline" in (out / "README.md").read_text()

    pipe = tiny_sdxl_pipeline(tmp_path / "tok")
    base = unet_output(pipe)
    te2_base = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)[2]
    pipe.load_loha_weights(path)
    assert (unet_output(pipe) - base).abs().max() > 1e-4
    te2_after = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)[2]
    assert (te2_after - te2_base).abs().max() > 1e-5                                         # te2 trained too


def test_conditioning_equals_diffusers_encode_prompt(tmp_path):
    pipe = tiny_sdxl_pipeline(tmp_path)
    encoder = PromptEncoder("sdxl", [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2])
    prompts = [PROMPT, "another, longer caption of a dog"]
    with torch.no_grad():
        hidden, pooled = encoder(prompts, "cpu")
        cached = CachedPrompts(encoder, prompts, "cpu")(prompts[::-1], "cpu")
    expected, _, expected_pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                         do_classifier_free_guidance=False)
    torch.testing.assert_close(hidden, expected)
    torch.testing.assert_close(pooled, expected_pooled)
    torch.testing.assert_close(cached[0], expected.flip(0))
    torch.testing.assert_close(cached[1], expected_pooled.flip(0))


def test_each_samples_time_ids_reach_the_unet(tmp_path):
    pipe = tiny_sdxl_pipeline(tmp_path)
    seen = {}

    class SpyUNet(torch.nn.Module):
        def forward(self, sample, timesteps, hidden, added_cond_kwargs=None):
            seen.update(added_cond_kwargs)
            return type("Output", (), {"sample": torch.zeros_like(sample)})()

    encoder = PromptEncoder("sdxl", [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2])
    models = StepModels("sdxl", SpyUNet(), pipe.vae, pipe.scheduler, encoder, torch.float32)
    ids = torch.tensor([[40.0, 90.0, 2.0, 0.0, 16.0, 48.0], [30.0, 30.0, 0.0, 1.0, 16.0, 48.0]])
    batch = {"pixels": torch.zeros(2, 3, 16, 48), "captions": [PROMPT, "x"], "time_ids": ids, "with_prior": False}
    from types import SimpleNamespace
    args = SimpleNamespace(noise_offset=0.0, snr_gamma=None, prior_loss_weight=1.0)
    from diffusers import DDPMScheduler
    models.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    micro_step_loss(batch, models, args, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(seen["time_ids"], ids)
    expected_pooled = pipe.encode_prompt([PROMPT, "x"], device="cpu", do_classifier_free_guidance=False)[2]
    torch.testing.assert_close(seen["text_embeds"], expected_pooled)


def test_resume_with_buckets_and_cached_latents_is_exact(sdxl, tmp_path, one_thread):
    flags = ["--cache_latents_to_disk", "--center_crop", "--random_flip", "--train_batch_size", "2",
             "--checkpointing_steps", "2", "--learning_rate", "1e-3", "--train_text_encoder", "--repeats", "2"]
    data = tmp_path / "data"
    data.mkdir()
    for image in (sdxl / "inst").glob("*.png"):
        (data / image.name).write_bytes(image.read_bytes())
    full = tmp_path / "full"
    assert main(sdxl_args(sdxl, full, *flags, steps=4, data=data)) == 0
    assert len(list(data.glob("*.latents.safetensors"))) == 6          # 3 images, plain and flipped
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    os.rename(full / "checkpoint-2", resumed / "checkpoint-2")
    assert main(sdxl_args(sdxl, resumed, *flags, "--resume_from_checkpoint", "latest", steps=4, data=data)) == 0
    a, b = load_file(str(full / "loha.safetensors")), load_file(str(resumed / "loha.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_caches_change_the_speed_of_a_run_not_its_numbers(sdxl, tmp_path, one_thread):
    # batch size 1: the VAE and the text encoders then see the same shapes with and without the
    # caches, so the runs agree to the bit
    flags = ["--center_crop", "--random_flip", "--learning_rate", "1e-3", "--repeats", "2"]
    plain = load_file(str(Path(_run(sdxl, tmp_path / "plain", *flags)) / "loha.safetensors"))
    cached = load_file(str(Path(_run(sdxl, tmp_path / "cached", *flags, "--cache_latents",
                                     "--cache_text_encoder_outputs")) / "loha.safetensors"))
    assert plain.keys() == cached.keys()
    assert all(torch.equal(cached[key], plain[key]) for key in plain)


def _run(root, out, *flags):
    assert main(sdxl_args(root, out, *flags)) == 0
    return out


def test_bucket_steps_that_the_model_cannot_take_are_refused(sdxl, tmp_path, capsys):
    # tiny SDXL: VAE factor 2 x two UNet downsamplings = multiples of 8
    assert main(sdxl_args(sdxl, tmp_path / "x", "--bucket_reso_steps", "4", "--min_bucket_reso", "8")) == 2
    assert "--bucket_reso_steps 4 is not a multiple of 8" in capsys.readouterr().err


def test_the_vae_runs_in_fp32_when_its_config_asks_unless_another_vae_is_given(sdxl, tmp_path):
    from types import SimpleNamespace

    from diffusers import AutoencoderKL

    from loha_diffusion.training.models import load_base_model

    args = SimpleNamespace(pretrained_model_name_or_path=str(sdxl / "model"), revision=None, variant=None,
                           pretrained_vae_model_name_or_path=None)
    base = load_base_model(args, torch.bfloat16)
    assert base.family == "sdxl" and base.pipe.vae.config.force_upcast
    assert base.pipe.vae.dtype == torch.float32 and base.pipe.unet.dtype == torch.bfloat16
    fp16_safe = AutoencoderKL.from_pretrained(sdxl / "model" / "vae")
    fp16_safe.register_to_config(force_upcast=False)
    fp16_safe.save_pretrained(tmp_path / "vae")
    args.pretrained_vae_model_name_or_path = str(tmp_path / "vae")
    assert load_base_model(args, torch.bfloat16).pipe.vae.dtype == torch.bfloat16


def test_single_file_checkpoints_are_told_apart_by_their_keys(tmp_path):
    from safetensors.torch import save_file

    from loha_diffusion.training.args import UsageError
    from loha_diffusion.training.models import source_is_sdxl

    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, str(tmp_path / "xl.safetensors"))
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(1)},
              str(tmp_path / "sd15.safetensors"))
    assert source_is_sdxl(tmp_path / "xl.safetensors") and not source_is_sdxl(tmp_path / "sd15.safetensors")
    (tmp_path / "old.ckpt").write_bytes(b"pickle")
    with pytest.raises(UsageError, match="only .safetensors"):
        source_is_sdxl(tmp_path / "old.ckpt")
