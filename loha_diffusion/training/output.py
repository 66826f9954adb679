"""What a finished run leaves in --output_dir: the Kohya/LyCORIS file (+ PEFT folder), the loss
history and its plot, and a model card."""
from __future__ import annotations

import datetime
import json
from pathlib import Path

from ..formats.kohya import NetworkInfo, save_kohya
from ..formats.peft import write_peft_folder
from .plot import plot_losses


def training_metadata(args, steps, n_instance, n_class, started) -> dict[str, str]:
    """kohya's ss_* training fields (strings), for A1111 / sd-webui tools that display them."""
    now = datetime.datetime.now(datetime.timezone.utc)
    fields = {
        "ss_output_name": args.output_name, "ss_learning_rate": args.learning_rate,
        "ss_unet_lr": args.learning_rate,
        "ss_text_encoder_lr": (args.text_encoder_lr or args.learning_rate) if args.train_text_encoder else 0.0,
        "ss_num_train_images": n_instance * args.repeats, "ss_num_reg_images": n_class,
        "ss_max_train_steps": steps, "ss_steps": steps, "ss_lr_scheduler": args.lr_scheduler,
        "ss_lr_warmup_steps": args.lr_warmup_steps, "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
        "ss_gradient_checkpointing": args.gradient_checkpointing, "ss_mixed_precision": args.mixed_precision or "no",
        "ss_clip_skip": args.clip_skip, "ss_seed": args.seed, "ss_noise_offset": args.noise_offset,
        "ss_min_snr_gamma": args.snr_gamma, "ss_prior_loss_weight": args.prior_loss_weight,
        "ss_resolution": f"({args.resolution}, {args.resolution})", "ss_batch_size_per_device": args.train_batch_size,
        "ss_sd_model_name": Path(str(args.pretrained_model_name_or_path)).name,
        "ss_training_started_at": started.timestamp(), "ss_training_finished_at": now.timestamp(),
        "ss_enable_bucket": args.enable_bucket, "ss_min_bucket_reso": args.min_bucket_reso,
        "ss_max_bucket_reso": args.max_bucket_reso, "ss_bucket_no_upscale": args.bucket_no_upscale,
        "ss_cache_latents": args.cache_latents, "ss_flip_aug": args.random_flip,
        "ss_network_dropout": None, "ss_training_comment": "trained with loha_diffusion",
    }
    return {k: "None" if v is None else str(v) for k, v in fields.items()}


def write_outputs(args, models: dict, family: str, history, sample_image, started, steps, n_instance, n_class,
                  prediction_type) -> dict:
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # the trained modules: the UNet and the text encoders present (SDXL: text_encoder and text_encoder_2)
    components = dict(models)
    # what was asked for, not what the modules hold most often (conv layers may have their own rank)
    network = NetworkInfo(args.algo, args.rank, args.alpha, {
        "preset": args.preset, "conv_dim": args.conv_rank or args.rank,
        "conv_alpha": args.alpha if args.conv_alpha is None else args.conv_alpha,
        "use_tucker": args.use_effective_conv2d, "rank_dropout": args.rank_dropout,
        "module_dropout": args.module_dropout})
    paths = {"adapter": save_kohya(components, "default", output_dir / f"{args.output_name}.safetensors",
                                   save_dtype=args.save_precision, family=family, network=network,
                                   v_prediction=prediction_type == "v_prediction", title=args.output_name,
                                   metadata=training_metadata(args, steps, n_instance, n_class, started))}
    if args.save_peft_format:  # one subfolder per trained component: unet/, text_encoder/(, text_encoder_2/)
        paths["peft"] = write_peft_folder(components, "default", output_dir / "peft")
    (output_dir / "loss_history.json").write_text(json.dumps(history))
    paths["loss_plot"] = plot_losses(history, output_dir / "loss.png")
    paths["card"] = output_dir / "README.md"
    paths["card"].write_text(model_card(args, {"family": family}, steps, n_instance, n_class, sample_image,
                                        paths["adapter"].name, history))
    return paths


def model_card(args, summary, steps, n_instance, n_class, sample_image, file_name, history) -> str:
    settings = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) or v is None}
    sample = f"\n![validation sample]({Path(sample_image).relative_to(args.output_dir)})\n" if sample_image else ""
    final_loss = f"{history[-1]['loss']:.4f}" if history else "n/a"
    pipeline_class = "StableDiffusionXLPipeline" if summary["family"] == "sdxl" else "StableDiffusionPipeline"
    return f"""---
tags: [stable-diffusion, lycoris, {args.algo}, loha_diffusion]
base_model: {args.pretrained_model_name_or_path}
---
# {args.output_name}

A {args.algo.upper()} adapter ({summary['family']}, rank {args.rank}, alpha {args.alpha}) trained with
loha_diffusion's DreamBooth trainer for {steps} steps on {n_instance} instance image(s)
{f'and {n_class} class image(s) (prior preservation)' if n_class else ''}. Final loss {final_loss}.
Instance prompt: `{args.instance_prompt}`.
{sample}
`{file_name}` is a Kohya/LyCORIS file: it loads in A1111, ComfyUI and kohya, and in diffusers with

```python
import loha_diffusion
from diffusers import {pipeline_class}
pipe = {pipeline_class}.from_pretrained("{args.pretrained_model_name_or_path}")
pipe.load_loha_weights("{file_name}")
```

## Settings

```json
{json.dumps(settings, indent=2, default=str)}
```
"""
