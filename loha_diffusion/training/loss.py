"""The diffusion objective: target by prediction type, min-SNR weights, prior-preservation split.

As diffusers' examples/dreambooth/train_dreambooth_lora.py and examples/text_to_image/train_text_to_image.py
compute them (min-SNR: the same weights as kohya-ss/sd-scripts library/custom_train_functions.py
``apply_snr_weight``); the target's kind comes from the scheduler config, never from a flag."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = a_t / (1 - a_t) with a_t the cumulative product of alphas."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return a / (1.0 - a)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v-prediction."""
    clipped = torch.minimum(snr_values, torch.full_like(snr_values, gamma))
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1.0)
    if prediction_type == "epsilon":
        return clipped / snr_values
    raise ValueError(f"min-SNR weighting is defined for epsilon and v_prediction, not {prediction_type!r}")


def training_target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r} in the scheduler config "
                     "(epsilon and v_prediction are supported)")


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.dim())))


def dreambooth_loss(pred, target, weights: torch.Tensor | None, with_prior: bool, prior_loss_weight: float):
    """(loss, instance loss, prior loss or None). With prior preservation the batch is
    [instance..., class...]: mean over each half, the prior half scaled by its weight."""
    per_sample = per_sample_mse(pred, target)
    if weights is not None:
        per_sample = per_sample * weights
    if not with_prior:
        loss = per_sample.mean()
        return loss, loss, None
    instance, prior = per_sample.chunk(2)
    return instance.mean() + prior_loss_weight * prior.mean(), instance.mean(), prior.mean()
