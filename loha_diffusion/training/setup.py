"""Adapters on the frozen model: the UNet always, every text encoder with --train_text_encoder."""
from __future__ import annotations

import torch

from ..model import inject_adapter
from .adapters import TEXT_ENCODER_PRESETS, UNET_PRESETS, adapter_config


def add_adapters(args, unet, text_encoders: list) -> tuple[list, list, tuple[int, int]]:
    """(UNet adapter parameters, text-encoder adapter parameters, (UNet layers, text-encoder layers)).

    Adapters are created in fp32 beside the (possibly half-precision) frozen weights, from
    --seed: the same flags give the same run."""
    torch.manual_seed(args.seed)
    unet_targets = inject_adapter(unet, adapter_config(args, unet, UNET_PRESETS[args.preset]))
    te_layers = 0
    if args.train_text_encoder:
        for text_encoder in text_encoders:  # SDXL: both, with the same --text_encoder_lr
            te_layers += len(inject_adapter(text_encoder, adapter_config(args, text_encoder,
                                                                         TEXT_ENCODER_PRESETS[args.preset])))
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            for text_encoder in text_encoders:
                text_encoder.gradient_checkpointing_enable()
    unet_params = [p for p in unet.parameters() if p.requires_grad]
    te_params = [p for te in text_encoders for p in te.parameters() if p.requires_grad]
    return unet_params, te_params, (len(unet_targets), te_layers)
