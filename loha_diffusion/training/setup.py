"""Adapters on the frozen model: the UNet always, every text encoder with --train_text_encoder."""
from __future__ import annotations

import torch

from ..model import inject_adapter
from .adapters import TEXT_ENCODER_PRESETS, UNET_PRESETS, adapter_config, unused_layers_pattern


def layers_used(family: str, index: int, num_layers: int, clip_skip: int | None) -> int:
    """How many of text encoder ``index``'s layers the conditioning goes through."""
    if family == "sdxl":  # penultimate hidden states; the second encoder's last layer feeds the pooled output
        return num_layers - 1 if index == 0 else num_layers
    return num_layers - (clip_skip or 1) + 1


def add_adapters(args, unet, text_encoders: list, family: str) -> tuple[list, list, tuple[int, int]]:
    """(UNet adapter parameters, text-encoder adapter parameters, (UNet layers, text-encoder layers)).

    Adapters are created in fp32 beside the (possibly half-precision) frozen weights, from
    --seed: the same flags give the same run."""
    torch.manual_seed(args.seed)
    unet_targets = inject_adapter(unet, adapter_config(args, unet, UNET_PRESETS[args.preset]))
    te_layers = 0
    if args.train_text_encoder:
        for index, text_encoder in enumerate(text_encoders):  # SDXL: both, with the same --text_encoder_lr
            total = text_encoder.config.num_hidden_layers
            exclude = unused_layers_pattern(total, layers_used(family, index, total, args.clip_skip))
            te_layers += len(inject_adapter(text_encoder, adapter_config(args, text_encoder,
                                                                         TEXT_ENCODER_PRESETS[args.preset], exclude)))
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            for text_encoder in text_encoders:
                text_encoder.gradient_checkpointing_enable()
    unet_params = [p for p in unet.parameters() if p.requires_grad]
    te_params = [p for te in text_encoders for p in te.parameters() if p.requires_grad]
    return unet_params, te_params, (len(unet_targets), te_layers)
