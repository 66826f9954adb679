"""The base model: its family read from the model itself, the pipeline loaded the matching way,
the VAE in the precision its config asks for, and the per-family defaults and checks."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..family import family_of_components
from .args import UsageError

logger = logging.getLogger(__name__)

DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024}
# kohya sd-scripts' SDXL single files hold the second text encoder under this prefix
_SDXL_SINGLE_FILE_KEY = "conditioner.embedders.1."


def is_single_file(source) -> bool:
    return str(source).endswith((".safetensors", ".ckpt")) and Path(source).is_file()


def source_is_sdxl(source, revision=None) -> bool:
    """SDXL or not, from model_index.json (folder or hub) or the checkpoint's key names,
    without loading any weights."""
    if is_single_file(source):
        from safetensors import safe_open

        if not str(source).endswith(".safetensors"):
            raise UsageError(f"{source}: only .safetensors single-file checkpoints are read (pickled .ckpt files can "
                             "run code); convert it or use a diffusers folder")
        with safe_open(str(source), "pt") as f:
            return any(k.startswith(_SDXL_SINGLE_FILE_KEY) for k in f.keys())
    folder = Path(str(source))
    try:
        if folder.is_dir():
            index = json.loads((folder / "model_index.json").read_text())
        else:
            from diffusers import DiffusionPipeline

            index = DiffusionPipeline.load_config(source, revision=revision)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--pretrained_model_name_or_path {source}: no diffusers model_index.json could be read "
                         f"({exc.__class__.__name__}: {exc}); give a diffusers folder, a hub id or a single "
                         ".safetensors checkpoint") from exc
    return "XL" in index.get("_class_name", "") or "text_encoder_2" in index


@dataclass
class BaseModel:
    family: str                 # "sd1", "sd2" or "sdxl"
    pipe: object
    tokenizers: list
    text_encoders: list         # one for SD1/SD2, two for SDXL
    text_encoder_names: list    # their pipeline attribute names
    prediction_type: str
    force_zeros_for_empty_prompt: bool


def load_base_model(args, dtype) -> BaseModel:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline

    source = args.pretrained_model_name_or_path
    sdxl = source_is_sdxl(source, args.revision)
    kwargs = {"torch_dtype": dtype}
    if not sdxl:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if args.pretrained_vae_model_name_or_path:
        # e.g. madebyollin/sdxl-vae-fp16-fix: a VAE that stays finite in half precision
        kwargs["vae"] = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, torch_dtype=dtype)
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    if is_single_file(source):
        pipe = cls.from_single_file(source, **kwargs)
    else:
        pipe = cls.from_pretrained(source, revision=args.revision, variant=args.variant, **kwargs)
    family = family_of_components(pipe.components)
    if family not in ("sd1", "sd2", "sdxl"):
        raise UsageError(f"{source}: could not tell SD1 from SD2 from its UNet config")
    if pipe.vae.config.get("force_upcast", False) and dtype != torch.float32:
        # the SD/SDXL VAE overflows in fp16 (its config says so); an fp16-safe VAE opts out
        pipe.vae.to(torch.float32)
    names = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2] if family == "sdxl" else [pipe.tokenizer]
    prediction_type = pipe.scheduler.config.prediction_type
    return BaseModel(family, pipe, tokenizers, [getattr(pipe, n) for n in names], names, prediction_type,
                     bool(pipe.config.get("force_zeros_for_empty_prompt", False)))


def apply_family_defaults(args, family: str, prediction_type: str) -> None:
    """--resolution defaults to the family's native size; flags that do not apply are refused."""
    if args.resolution is None:
        key = "sd2-v" if family == "sd2" and prediction_type == "v_prediction" else family
        args.resolution = DEFAULT_RESOLUTION[key]
        logger.info("--resolution %d (the %s default)", args.resolution, family)
    problems = []
    if family == "sdxl" and args.clip_skip not in (None, 2):
        problems.append(f"SDXL always conditions on the penultimate text-encoder layer (clip skip 2); "
                        f"--clip_skip {args.clip_skip} does not apply: drop it")
    if args.enable_bucket and not args.min_bucket_reso <= args.resolution <= args.max_bucket_reso:
        problems.append(f"--resolution {args.resolution} must lie between --min_bucket_reso {args.min_bucket_reso} and "
                        f"--max_bucket_reso {args.max_bucket_reso}")
    if problems:
        raise UsageError("invalid training setup:\n  - " + "\n  - ".join(problems))


def check_bucket_steps(args, pipe) -> None:
    """Bucket sides must be multiples of what the VAE and the UNet's downsampling need."""
    if not args.enable_bucket:
        return
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    multiple = vae_factor * 2 ** (len(pipe.unet.config.down_block_types) - 1)
    if args.bucket_reso_steps % multiple:
        raise UsageError(f"--bucket_reso_steps {args.bucket_reso_steps} is not a multiple of {multiple} (the VAE's "
                         f"factor {vae_factor} times the UNet's downsampling); use a multiple of {multiple}")
