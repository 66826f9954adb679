"""The training loop: data first, then models, adapters, caches, optimiser, steps, checkpoints, output."""
from __future__ import annotations

import datetime
import gc
import logging
import math
import os
import sys
from pathlib import Path

import torch

from ..model import adapters_disabled
from .args import UsageError, parse_args
from .buckets import BucketBatchSampler, BucketPlan
from .checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from .data import DreamBoothDataset, class_prompts, collate, ensure_class_images
from .demo import demo_samples, report_demo_scores
from .images import scan_folder, scan_hf_dataset
from .latent_cache import build_latent_cache
from .models import apply_family_defaults, check_bucket_steps, load_base_model
from .output import write_outputs
from .runtime import StopRequest, make_optimizer, refuse_parameter_sharding
from .setup import add_adapters
from .step import StepModels, micro_step_loss
from .text import CachedPrompts, PromptEncoder
from .validation import generate, save_before_after, save_grid

logger = logging.getLogger("loha_diffusion.train")

__all__ = ["main", "train", "refuse_parameter_sharding"]


def main(argv=None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        args = parse_args(argv)
        # data before models: a bad folder fails in seconds, not after loading gigabytes
        if args.dataset_name:
            instances = scan_hf_dataset(args.dataset_name, args.dataset_config_name, args.image_column,
                                        args.caption_column, args.instance_prompt)
        else:
            instances = scan_folder(args.instance_data_dir, args.instance_prompt, "instance")
        return train(args, instances)
    except UsageError as exc:
        print(f"train_loha_sd.py: error: {exc}", file=sys.stderr)
        return 2


def train(args, instances) -> int:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    output_dir = Path(args.output_dir)
    # accelerate only enters its multi-CPU (gloo) mode when told to run on the CPU: do that
    # for a torchrun / accelerate launch with several processes on a machine without CUDA
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=multi_cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / args.logging_dir)))
    refuse_parameter_sharding(accelerator)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    started = datetime.datetime.now(datetime.timezone.utc)
    device = accelerator.device

    base = load_base_model(args, weight_dtype)
    apply_family_defaults(args, base.family, base.prediction_type)
    check_bucket_steps(args, base.pipe)
    pipe, family = base.pipe, base.family
    classes = None
    if args.with_prior_preservation:
        ensure_class_images(args, accelerator, pipe)
        classes = scan_folder(args.class_data_dir, class_prompts(args.class_prompt)[0], "class")
    vae, unet, text_encoders = pipe.vae, pipe.unet, list(base.text_encoders)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for model in (vae, unet, *text_encoders):
        model.requires_grad_(False)
        model.to(device)

    unet_params, te_params, counts = add_adapters(args, unet, text_encoders, family)
    groups = [{"params": unet_params, "lr": args.learning_rate}]
    if te_params:
        groups.append({"params": te_params, "lr": args.text_encoder_lr or args.learning_rate})
    optimizer = make_optimizer(args, groups)

    plan = BucketPlan(args.resolution, args.enable_bucket, args.min_bucket_reso, args.max_bucket_reso,
                      args.bucket_reso_steps, args.bucket_no_upscale)
    dataset = DreamBoothDataset(instances, classes, plan, args.center_crop, args.random_flip, args.repeats, args.seed)
    if args.enable_bucket:
        sizes = sorted(set(dataset.bucket_of_index()))
        logger.info("%d bucket(s) in use: %s", len(sizes), ", ".join(f"{w}x{h}" for w, h in sizes))
    if args.cache_latents:
        cache_latents(args, accelerator, dataset, vae, output_dir)
    encoder = PromptEncoder(family, base.tokenizers, text_encoders, args.clip_skip)
    if args.cache_text_encoder_outputs:
        captions = [r.caption for r in instances + (classes or [])] + list(args.validation_prompt or []) + [""]
        # in batches of the training batch size: the same kernels as without the cache
        encoder = CachedPrompts(encoder, captions, device, args.train_batch_size)
        text_encoders = [None] * len(text_encoders)  # the cache holds all they would compute
        for name in base.text_encoder_names:
            setattr(pipe, name, None)
        base.text_encoders = []
        free_memory()

    sampler = BucketBatchSampler(dataset.bucket_of_index(), args.train_batch_size, args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=args.dataloader_num_workers)
    updates_per_epoch = math.ceil(len(loader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    epochs = math.ceil(max_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    if args.train_text_encoder:  # DDP refuses a module with nothing to train
        text_encoders = [accelerator.prepare(te) for te in text_encoders]
        encoder.text_encoders = text_encoders
    trained = {"unet": unet, **{n: te for n, te in zip(base.text_encoder_names, text_encoders) if te is not None}}

    counters = {"global_step": 0, "micro_step": 0, "epoch": 0, "batches_done_in_epoch": 0}
    checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        counters = load_checkpoint(checkpoint, {k: accelerator.unwrap_model(m) for k, m in trained.items()},
                                   optimizer, lr_scheduler)
        logger.info("resumed from %s at step %d", checkpoint, counters["global_step"])
    elif args.resume_from_checkpoint == "latest":
        logger.info("no checkpoint in %s: starting from scratch", output_dir)

    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("loha_diffusion", config={k: v for k, v in vars(args).items()
                                                             if isinstance(v, (int, float, str, bool))})
    logger.info("%s: %d UNet and %d text-encoder layers adapted (%s, rank %d); %d trainable parameters; %d steps",
                family, counts[0], counts[1], args.algo, args.rank,
                sum(p.numel() for p in unet_params + te_params), max_steps)

    stop = StopRequest()
    progress = tqdm(total=max_steps, initial=counters["global_step"], disable=not accelerator.is_local_main_process,
                    desc="steps")
    history = []
    unwrapped = {k: accelerator.unwrap_model(m) for k, m in trained.items()}
    components = {"vae": vae, "unet": unwrapped["unet"], "tokenizer": base.tokenizers[0]}
    for i, name in enumerate(base.text_encoder_names):
        components[name] = unwrapped.get(name, text_encoders[i])
        if i:
            components[f"tokenizer_{i + 1}"] = base.tokenizers[i]
    step_models = StepModels(family, unet, vae, noise_scheduler, encoder, weight_dtype)

    def diverged(what: str) -> int:
        logger.error("%s at step %d (lr %.3g): stopping without saving this state; the last good checkpoint is "
                     "kept. Lower --learning_rate or --alpha, or use --mixed_precision bf16 instead of fp16.",
                     what, counters["global_step"], lr_scheduler.get_last_lr()[0])
        accelerator.end_training()
        return 3

    def checkpoint_now():
        if accelerator.is_main_process:
            path = save_checkpoint(output_dir, counters["global_step"], unwrapped, optimizer, lr_scheduler,
                                   counters, args.checkpoints_total_limit)
            logger.info("saved %s", path)
        accelerator.wait_for_everyone()

    def images_for(prompt, count=None, guidance=None):
        return generate(components, family, encoder, noise_scheduler.config, prompt,
                        count or args.num_validation_images, args.seed, args.validation_inference_steps,
                        args.validation_guidance_scale if guidance is None else guidance, args.resolution,
                        device, base.force_zeros_for_empty_prompt)

    def validate(step):
        """One grid per validation prompt (a row each), saved and logged."""
        if not accelerator.is_main_process or not args.validation_prompt:
            return None
        rows = [images_for(prompt) for prompt in args.validation_prompt]
        path = save_grid(rows, output_dir / "validation" / f"step-{step:06d}.png")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                import numpy as np
                for prompt, images in zip(args.validation_prompt, rows):
                    tracker.writer.add_images(f"validation/{prompt}", np.stack([np.asarray(i) for i in images]), step,
                                              dataformats="NHWC")
        return path

    before = None
    if accelerator.is_main_process and args.validation_prompt:
        with adapters_disabled(*unwrapped.values()):  # the base model, also when resuming
            before = [images_for(prompt) for prompt in args.validation_prompt]
            demo_before = demo_samples(images_for) if args.demo else None

    trainable_params = unet_params + te_params
    unet.train()
    for te in text_encoders:
        if te is not None:
            te.train(args.train_text_encoder)
    finished = counters["global_step"] >= max_steps
    while not finished and counters["epoch"] < epochs:
        epoch = counters["epoch"]
        dataset.use_epoch(epoch)
        sampler.use_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, counters["batches_done_in_epoch"]) \
            if counters["batches_done_in_epoch"] else loader
        for batch in batches:
            with accelerator.accumulate(*trained.values()):
                # every random draw of a micro-step comes from its own seed: resumes are exact
                step_seed = (args.seed * 1_000_003 + counters["micro_step"]) * 101 + accelerator.process_index
                torch.manual_seed(step_seed)
                generator = torch.Generator(device=device).manual_seed(step_seed)
                loss, instance_loss, prior_loss = micro_step_loss(batch, step_models, args, generator, device)
                bad = accelerator.reduce(torch.tensor(float(not torch.isfinite(loss)), device=device),
                                         reduction="sum")
                if bad.item() > 0:
                    return diverged("the loss became NaN/inf")
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(trainable_params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                # an update can overflow while the loss that led to it was finite: never go on
                # (or checkpoint) from weights that are not
                if accelerator.sync_gradients and not torch.isfinite(torch.stack(
                        [torch.linalg.vector_norm(p.detach(), float("inf")) for p in trainable_params])).all():
                    return diverged("the adapter weights became NaN/inf")
            counters["micro_step"] += 1
            counters["batches_done_in_epoch"] += 1
            if not accelerator.sync_gradients:
                continue
            counters["global_step"] += 1
            step = counters["global_step"]
            logs = {"loss": loss.item(), "lr": lr_scheduler.get_last_lr()[0]}
            if prior_loss is not None:
                logs.update(instance_loss=instance_loss.item(), prior_loss=prior_loss.item())
            history.append({"step": step, **logs})
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=step)
            finished = step >= max_steps
            if stop.signal is not None or (args.checkpointing_steps and step % args.checkpointing_steps == 0
                                           and not finished):
                checkpoint_now()
            if stop.signal is not None:
                logger.warning("stopped by signal at step %d; resume with --resume_from_checkpoint latest", step)
                accelerator.end_training()
                return 128 + stop.signal
            if args.validation_steps and step % args.validation_steps == 0 and not finished:
                validate(step)
            if finished:
                break
        else:
            counters["epoch"] += 1
            counters["batches_done_in_epoch"] = 0
    progress.close()

    sample = validate(counters["global_step"])
    if accelerator.is_main_process:
        if before is not None:
            after = [images_for(prompt) for prompt in args.validation_prompt]
            sample = save_before_after(before, after, args.validation_prompt, output_dir / "before_after.png")
        if args.demo:
            report_demo_scores(demo_before, demo_samples(images_for), output_dir / "demo_scores.json",
                               args.demo_assets)
        paths = write_outputs(args, unwrapped, family, history, sample, started, counters["global_step"],
                              len(instances), len(classes or []), base.prediction_type)
        pipeline_class = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
        print(f"\nSaved the adapter to {paths['adapter']}\nLoad it with:\n"
              f"    import loha_diffusion\n"
              f"    from diffusers import {pipeline_class}\n"
              f"    pipe = {pipeline_class}.from_pretrained({str(args.pretrained_model_name_or_path)!r})\n"
              f"    pipe.load_loha_weights({str(paths['adapter'])!r})\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def cache_latents(args, accelerator, dataset, vae, output_dir) -> None:
    """Encode every sample once (the main process first when the cache is on disk, so the others
    read its files), then move the VAE off the accelerator until validation needs it."""
    def latent_shape(bucket):
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        return 2 * vae.config.latent_channels, bucket[1] // factor, bucket[0] // factor

    def build():
        return build_latent_cache(dataset, vae, accelerator.device, args.random_flip, args.cache_latents_to_disk,
                                  output_dir / "latent_cache", accelerator.is_local_main_process, latent_shape)

    if args.cache_latents_to_disk and not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        dataset.use_latent_cache(build())
    else:
        dataset.use_latent_cache(build())
        if args.cache_latents_to_disk:
            accelerator.wait_for_everyone()
    vae.to("cpu")
    free_memory()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
