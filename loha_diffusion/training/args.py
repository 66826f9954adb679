"""Command-line flags of the trainer (diffusers' train_dreambooth_lora.py names where one exists)
and their validation, which runs before any model is loaded."""
from __future__ import annotations

import argparse
import importlib.resources
import sys
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# The embedded demo: the repository's assets/ folder, installed as this subpackage (setup.py).
DEMO_PACKAGE = "loha_diffusion.demo_assets"
DEMO_MODEL, DEMO_INSTANCES, DEMO_CLASS_PROMPTS, DEMO_SCORER = (
    "demo-model", "demo-instance", "demo-class-prompts.txt", "demo_data.py")
DEMO_CONCEPT_PROMPT, DEMO_CLASS_PROMPT = "a sks shape", "a shape"


class UsageError(ValueError):
    """Bad flags or data, reported before any model is loaded."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_loha_sd.py",
        description="DreamBooth-style LoHa / LoRA / LoKr training for Stable Diffusion 1.x/2.x and SDXL "
                    "(the family is read from the model). "
                    "With no flags it trains the embedded demo (a purple star on a small shapes model).")
    add = p.add_argument
    # model and data
    add("--pretrained_model_name_or_path", default=None,
        help="diffusers folder, hub id, or single-file .safetensors checkpoint (default: the embedded demo model)")
    add("--pretrained_vae_model_name_or_path", default=None,
        help="a VAE to use instead of the model's (e.g. an fp16-safe SDXL VAE); folder or hub id")
    add("--revision", default=None)
    add("--variant", default=None)
    add("--instance_data_dir", default=None, help="folder of instance images (optional .txt caption per image)")
    add("--instance_prompt", default=None, help="prompt for instance images without a .txt caption")
    add("--dataset_name", default=None, help="a datasets id or local folder (e.g. imagefolder with metadata.jsonl)")
    add("--dataset_config_name", default=None)
    add("--image_column", default="image")
    add("--caption_column", default=None)
    add("--repeats", type=int, default=1, help="how many times to repeat the instance images per epoch")
    add("--resolution", type=int, default=None, help="default: 1024 for SDXL, 768 for SD2-v, else 512")
    add("--center_crop", action="store_true")
    add("--random_flip", action="store_true")
    # aspect-ratio buckets and caches (kohya sd-scripts' flags)
    add("--enable_bucket", action="store_true",
        help="aspect-ratio buckets of about resolution^2 pixels; each batch comes from one bucket")
    add("--min_bucket_reso", type=int, default=256)
    add("--max_bucket_reso", type=int, default=1024)
    add("--bucket_reso_steps", type=int, default=64, help="bucket sides are multiples of this")
    add("--bucket_no_upscale", action="store_true", help="small images keep their size (bucket rounded down)")
    add("--cache_latents", action="store_true", help="encode every image with the VAE once, before training")
    add("--cache_latents_to_disk", action="store_true",
        help="keep the cached latents beside the images, so the next run skips encoding (implies --cache_latents)")
    add("--cache_text_encoder_outputs", action="store_true",
        help="encode every caption once, then free the text encoders (not with --train_text_encoder)")
    # prior preservation
    add("--with_prior_preservation", action="store_true")
    add("--class_data_dir", default=None)
    add("--class_prompt", default=None,
        help="prompt of the class images; a file path holding one prompt per line cycles through them")
    add("--num_class_images", type=int, default=100)
    add("--prior_loss_weight", type=float, default=1.0)
    add("--sample_batch_size", type=int, default=4, help="batch size when generating class images")
    add("--class_generation_steps", type=int, default=25)
    add("--class_guidance_scale", type=float, default=7.5)
    # adapter
    add("--algo", choices=["loha", "lora", "lokr"], default="loha")
    add("--rank", type=int, default=8)
    add("--alpha", type=float, default=4.0)
    add("--conv_rank", type=int, default=None, help="rank of k x k convolutions (default: --rank)")
    add("--conv_alpha", type=float, default=None, help="alpha of k x k convolutions (default: --alpha)")
    add("--preset", choices=["attn-only", "attn-mlp", "full"], default="full",
        help="full = attention, feed-forward, proj_in/out, ResNet convs, down/upsamplers")
    add("--use_effective_conv2d", action="store_true", help="Tucker form for k x k convs")
    add("--rank_dropout", type=float, default=0.0)
    add("--module_dropout", type=float, default=0.0)
    add("--lokr_factor", type=int, default=-1)
    add("--train_text_encoder", action="store_true")
    add("--text_encoder_lr", type=float, default=None, help="default: --learning_rate")
    # objective
    add("--snr_gamma", type=float, default=None, help="min-SNR weighting (5.0 is the usual choice)")
    add("--noise_offset", type=float, default=0.0)
    add("--clip_skip", type=int, default=None, help="kohya meaning: 1 = last layer, 2 = penultimate")
    # optimisation
    add("--train_batch_size", type=int, default=1)
    add("--max_train_steps", type=int, default=None)
    add("--num_train_epochs", type=int, default=1)
    add("--learning_rate", type=float, default=1e-4)
    add("--lr_scheduler", default="constant")
    add("--lr_warmup_steps", type=int, default=0)
    add("--lr_num_cycles", type=int, default=1)
    add("--adam_beta1", type=float, default=0.9)
    add("--adam_beta2", type=float, default=0.999)
    add("--adam_weight_decay", type=float, default=1e-2)
    add("--adam_epsilon", type=float, default=1e-8)
    add("--use_8bit_adam", action="store_true")
    add("--max_grad_norm", type=float, default=1.0)
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--gradient_checkpointing", action="store_true")
    add("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    add("--seed", type=int, default=0)
    add("--dataloader_num_workers", type=int, default=0)
    # checkpoints, validation, output
    add("--output_dir", default="loha-output")
    add("--output_name", default="loha", help="file name of the adapter (without .safetensors)")
    add("--save_precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    add("--save_peft_format", action="store_true", help="also write a PEFT folder beside the Kohya file")
    add("--checkpointing_steps", type=int, default=500)
    add("--checkpoints_total_limit", type=int, default=None)
    add("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    add("--validation_prompt", action="append", default=None,
        help="prompt for validation images; repeat the flag for several (e.g. the instance and the class prompt)")
    add("--num_validation_images", type=int, default=4)
    add("--validation_steps", type=int, default=100)
    add("--validation_guidance_scale", type=float, default=7.5)
    add("--validation_inference_steps", type=int, default=25)
    add("--report_to", default="tensorboard", help="tensorboard, or none")
    add("--logging_dir", default="logs")
    add("--demo_assets", default=None, metavar="DIR",
        help="the demo's folder (assets/ of a checkout); default: the copy installed with the package")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    demo = args.pretrained_model_name_or_path is None
    args.demo = demo
    if demo:  # flags given on the command line still win over the demo's settings
        apply_demo_defaults(args, sys.argv[1:] if argv is None else argv)
    validate(args)
    return args


def installed_demo_assets() -> Path | None:
    """The demo folder installed with the package, or None (e.g. a checkout that is not installed)."""
    try:
        root = importlib.resources.files(DEMO_PACKAGE)
    except ModuleNotFoundError:
        return None
    # diffusers reads the model from a folder, so only an install on disk will do
    return root if isinstance(root, Path) else None


def find_demo_assets(folder: str | None) -> Path:
    """``--demo_assets`` if given, else the installed copy; UsageError if neither holds the demo."""
    if folder is None:
        root = installed_demo_assets()
        if root is None:
            raise UsageError(
                f"no --pretrained_model_name_or_path, so the embedded demo runs, but its assets ({DEMO_PACKAGE}) are "
                "not installed. Install the package (`pip install -e \".[train]\"` in a checkout), or pass "
                "--demo_assets DIR (the assets/ folder of a loha_diffusion checkout), or give a model to train with "
                "--pretrained_model_name_or_path")
        where = "the installed demo assets"
    else:
        root, where = Path(folder), "--demo_assets"
    wanted = {f"{DEMO_MODEL}/model_index.json": (root / DEMO_MODEL / "model_index.json").is_file(),
              f"{DEMO_INSTANCES}/ with images": (root / DEMO_INSTANCES).is_dir() and _has_images(root / DEMO_INSTANCES),
              DEMO_CLASS_PROMPTS: (root / DEMO_CLASS_PROMPTS).is_file(), DEMO_SCORER: (root / DEMO_SCORER).is_file()}
    missing = [name for name, present in wanted.items() if not present]
    if missing:
        raise UsageError(f"{where} {root} is not the demo's folder: it lacks {', '.join(missing)}; point "
                         "--demo_assets at the assets/ folder of a loha_diffusion checkout")
    return root


def apply_demo_defaults(args, argv) -> None:
    """The embedded demo: teach 'a sks shape' (a purple star) to the small shapes model."""
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    assets = find_demo_assets(args.demo_assets)
    args.demo_assets = str(assets)
    demo = {"pretrained_model_name_or_path": str(assets / DEMO_MODEL),
            "instance_data_dir": str(assets / DEMO_INSTANCES), "instance_prompt": DEMO_CONCEPT_PROMPT,
            "with_prior_preservation": True, "class_prompt": str(assets / DEMO_CLASS_PROMPTS),
            "num_class_images": 100, "class_guidance_scale": 3.0,
            "resolution": 32, "rank": 8, "alpha": 8.0, "learning_rate": 1e-3, "train_text_encoder": True,
            "max_train_steps": 800, "train_batch_size": 5, "checkpointing_steps": 400,
            "validation_prompt": [DEMO_CONCEPT_PROMPT, DEMO_CLASS_PROMPT], "validation_steps": 400,
            "num_validation_images": 4, "validation_guidance_scale": 1.5, "output_dir": "loha-output/demo",
            "output_name": "sks-shape-loha", "random_flip": True}
    for key, value in demo.items():
        if f"--{key}" not in given:
            setattr(args, key, value)
    if "--class_data_dir" not in given:
        args.class_data_dir = str(Path(args.output_dir) / "class-images")


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def validate(args) -> None:
    """Every check that needs no model: one clear message per problem."""
    problems = []
    if args.demo_assets is not None and not args.demo:
        problems.append("--demo_assets is read only by the embedded demo, which runs when no "
                        "--pretrained_model_name_or_path is given")
    if args.instance_data_dir is None and args.dataset_name is None:
        problems.append("give the training images: --instance_data_dir FOLDER or --dataset_name NAME")
    if args.instance_data_dir is not None and args.dataset_name is not None:
        problems.append("--instance_data_dir and --dataset_name are exclusive; pass one")
    if args.instance_data_dir is not None:
        folder = Path(args.instance_data_dir)
        if not folder.is_dir():
            problems.append(f"--instance_data_dir {folder} does not exist")
        elif not _has_images(folder):
            problems.append(f"--instance_data_dir {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        elif args.instance_prompt is None:
            uncaptioned = [p.name for p in folder.iterdir()
                           if p.suffix.lower() in IMAGE_SUFFIXES and not p.with_suffix(".txt").is_file()]
            if uncaptioned:
                problems.append(f"{len(uncaptioned)} image(s) in {folder} have no .txt caption (e.g. "
                                f"{uncaptioned[:3]}) and no --instance_prompt was given")
    if args.with_prior_preservation:
        if args.class_data_dir is None:
            problems.append("--with_prior_preservation needs --class_data_dir")
        if args.class_prompt is None:
            problems.append("--with_prior_preservation needs --class_prompt")
    elif args.class_data_dir is not None or args.class_prompt is not None:
        problems.append("--class_data_dir / --class_prompt are used only with --with_prior_preservation")
    for name in ("rank", "train_batch_size", "gradient_accumulation_steps", "resolution", "repeats",
                 "bucket_reso_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            problems.append(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.conv_rank is not None and args.conv_rank < 1:
        problems.append(f"--conv_rank must be at least 1, got {args.conv_rank}")
    for name in ("rank_dropout", "module_dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            problems.append(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        problems.append(f"--max_train_steps must be positive, got {args.max_train_steps}")
    if args.learning_rate <= 0:
        problems.append(f"--learning_rate must be positive, got {args.learning_rate}")
    if args.text_encoder_lr is not None and not args.train_text_encoder:
        problems.append("--text_encoder_lr is set but --train_text_encoder is not")
    if args.clip_skip is not None and args.clip_skip < 1:
        problems.append(f"--clip_skip counts from 1 (kohya meaning: 1 = last layer), got {args.clip_skip}")
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        problems.append(f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a checkpoint folder")
    problems += cache_and_bucket_problems(args)
    if args.report_to not in ("tensorboard", "none"):
        problems.append(f"--report_to must be tensorboard or none, got {args.report_to!r}")
    if problems:
        raise UsageError("invalid training setup:\n  - " + "\n  - ".join(problems))


def cache_and_bucket_problems(args) -> list[str]:
    problems = []
    args.cache_latents = args.cache_latents or args.cache_latents_to_disk
    if args.cache_latents and not args.center_crop:
        problems.append("--cache_latents stores one crop per image, but random crops change every epoch: add "
                        "--center_crop (with --enable_bucket the crop is at most --bucket_reso_steps pixels)")
    if args.cache_text_encoder_outputs and args.train_text_encoder:
        problems.append("--cache_text_encoder_outputs needs frozen text encoders, but --train_text_encoder trains "
                        "them; drop one of the two")
    if args.bucket_no_upscale and not args.enable_bucket:
        problems.append("--bucket_no_upscale applies only with --enable_bucket")
    if args.enable_bucket and args.bucket_reso_steps >= 1:
        for name in ("min_bucket_reso", "max_bucket_reso"):
            value = getattr(args, name)
            if value < args.bucket_reso_steps or value % args.bucket_reso_steps:
                problems.append(f"--{name} {value} must be a positive multiple of --bucket_reso_steps "
                                f"{args.bucket_reso_steps}")
        if args.min_bucket_reso > args.max_bucket_reso:
            problems.append(f"--min_bucket_reso {args.min_bucket_reso} is above --max_bucket_reso "
                            f"{args.max_bucket_reso}")
    return problems
