"""Which layers get an adapter (presets) and with which rank: --algo/--rank/--conv_rank/..."""
from __future__ import annotations

import re

from torch import nn

from ..config import CONFIG_CLASSES, AdapterConfig
from ..model import logical_modules
from ..naming.peft import exact_module_pattern

UNET_PRESETS = {
    "attn-only": ["to_q", "to_k", "to_v", "to_out.0"],
    "attn-mlp": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"],
}
UNET_PRESETS["full"] = UNET_PRESETS["attn-mlp"] + ["conv1", "conv2", "conv_shortcut", "time_emb_proj",
                                                   "downsamplers.0.conv", "upsamplers.0.conv"]
TEXT_ENCODER_PRESETS = {"attn-only": ["q_proj", "k_proj", "v_proj", "out_proj"],
                        "attn-mlp": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]}
TEXT_ENCODER_PRESETS["full"] = TEXT_ENCODER_PRESETS["attn-mlp"]


def unused_layers_pattern(num_layers: int, layers_used: int) -> str | None:
    """A regex for the text-encoder layers after the one whose hidden states condition the UNet
    (kohya's clip skip N uses layer -N; SDXL's first encoder its penultimate layer): an adapter
    there would never get a gradient, and DDP refuses parameters that get none."""
    unused = list(range(layers_used, num_layers))
    if not unused:
        return None
    return r"(.*\.)?encoder\.layers\.(" + "|".join(map(str, unused)) + r")\..*"


def adapter_config(args, model: nn.Module, targets: list[str], exclude: str | None = None) -> AdapterConfig:
    """The config for ``model``; k x k convolutions get --conv_rank / --conv_alpha; modules whose
    whole path matches the regex ``exclude`` get none."""
    conv_paths = [path for path, module in logical_modules(model)
                  if isinstance(module, nn.Conv2d) and any(k > 1 for k in module.kernel_size)
                  and any(path == t or path.endswith("." + t) for t in targets)
                  and not (exclude and re.fullmatch(exclude, path))]
    conv_rank = args.conv_rank or args.rank
    conv_alpha = args.alpha if args.conv_alpha is None else args.conv_alpha
    options = {"decompose_factor": args.lokr_factor} if args.algo == "lokr" else {}
    return CONFIG_CLASSES[args.algo](
        r=args.rank, alpha=args.alpha, target_modules=targets, exclude_modules=exclude,
        rank_pattern={exact_module_pattern(p): conv_rank for p in conv_paths} if conv_rank != args.rank else {},
        alpha_pattern={exact_module_pattern(p): conv_alpha for p in conv_paths} if conv_alpha != args.alpha else {},
        use_effective_conv2d=args.use_effective_conv2d, rank_dropout=args.rank_dropout,
        module_dropout=args.module_dropout, **options)
