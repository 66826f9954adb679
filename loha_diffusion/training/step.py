"""One micro-step's loss: latents (from pixels or the latent cache), noise, conditioning, UNet, objective."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .loss import dreambooth_loss, min_snr_weights, snr, training_target


@dataclass
class StepModels:
    family: str
    unet: object
    vae: object
    noise_scheduler: object
    prompts: object          # PromptEncoder or CachedPrompts: captions -> (hidden, pooled)
    weight_dtype: torch.dtype


def latent_params(batch: dict, vae, device) -> torch.Tensor:
    """The VAE's latent distribution parameters (mean, log-variance), fp32: cached, or encoded now."""
    if "latent_params" in batch:
        return batch["latent_params"].to(device, torch.float32)
    with torch.no_grad():
        return vae.encode(batch["pixels"].to(device, vae.dtype)).latent_dist.parameters.float()


def sample_latents(params: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    return DiagonalGaussianDistribution(params).sample(generator)


def micro_step_loss(batch: dict, models: StepModels, args, generator: torch.Generator, device):
    """(loss, instance loss, prior loss or None); every draw comes from ``generator``."""
    vae, scheduler = models.vae, models.noise_scheduler
    latents = sample_latents(latent_params(batch, vae, device), generator) * vae.config.scaling_factor
    latents = latents.to(models.weight_dtype)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if args.noise_offset:
        noise = noise + args.noise_offset * torch.randn(
            (*latents.shape[:2], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                              device=latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    hidden, pooled = models.prompts(batch["captions"], device)
    added = None
    if models.family == "sdxl":
        # SDXL's micro-conditioning: each sample's own original size, crop and target size
        added = {"text_embeds": pooled.to(models.weight_dtype),
                 "time_ids": batch["time_ids"].to(device, models.weight_dtype)}
    pred = models.unet(noisy, timesteps, hidden.to(models.weight_dtype), added_cond_kwargs=added).sample
    target = training_target(scheduler, latents, noise, timesteps)
    weights = None
    if args.snr_gamma is not None:
        weights = min_snr_weights(snr(scheduler.alphas_cumprod, timesteps), args.snr_gamma,
                                  scheduler.config.prediction_type)
    return dreambooth_loss(pred, target, weights, batch["with_prior"], args.prior_loss_weight)
