"""The training loop: data first, then models, adapters, optimiser, steps, checkpoints, output."""
from __future__ import annotations

import datetime
import functools
import logging
import math
import os
import signal
import sys
from pathlib import Path

import torch

from ..model import adapters_disabled, inject_adapter
from .adapters import TEXT_ENCODER_PRESETS, UNET_PRESETS, adapter_config
from .args import UsageError, parse_args
from .checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from .data import (
    DreamBoothDataset,
    EpochSampler,
    class_prompts,
    collate,
    ensure_class_images,
    load_folder,
    load_hf_dataset,
)
from .demo import demo_samples, report_demo_scores
from .loss import dreambooth_loss, min_snr_weights, snr, training_target
from .output import write_outputs
from .text import encode, tokenize
from .validation import generate, save_before_after, save_grid

logger = logging.getLogger("loha_diffusion.train")


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint after the current step and exits."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signum
        logger.warning("received %s: saving a checkpoint after this step, then stopping",
                       signal.Signals(signum).name)


def load_pipeline(args, dtype):
    from diffusers import StableDiffusionPipeline

    source = args.pretrained_model_name_or_path
    kwargs = dict(torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    if str(source).endswith((".safetensors", ".ckpt")) and Path(source).is_file():
        return StableDiffusionPipeline.from_single_file(source, **kwargs)
    return StableDiffusionPipeline.from_pretrained(source, revision=args.revision, variant=args.variant, **kwargs)


def refuse_parameter_sharding(accelerator) -> None:
    """FSDP and DeepSpeed ZeRO-3 split every parameter across processes. The adapter tensors
    are a few MB and the frozen model is only read, so sharding saves little here, and the
    checkpoints, validation images and the final file are all made from whole parameters on the
    main process. Multi-GPU DDP and ZeRO stages 1-2 (optimizer state sharded, parameters whole)
    keep all of that working."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if kind == DistributedType.FSDP or (kind == DistributedType.DEEPSPEED and plugin is not None
                                       and plugin.zero_stage == 3):
        raise UsageError(f"{'FSDP' if kind == DistributedType.FSDP else 'DeepSpeed ZeRO-3'} shards the parameters, "
                         "which this trainer does not support; launch with --multi_gpu (DDP) or a DeepSpeed config "
                         "with zero_stage 1 or 2 instead")


def main(argv=None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        args = parse_args(argv)
        # data before models: a bad folder fails in a second, not after loading gigabytes
        if args.dataset_name:
            instances = load_hf_dataset(args.dataset_name, args.dataset_config_name, args.image_column,
                                        args.caption_column, args.instance_prompt)
        else:
            instances = load_folder(args.instance_data_dir, args.instance_prompt, "instance")
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

    pipe = load_pipeline(args, weight_dtype)
    classes = None
    if args.with_prior_preservation:
        ensure_class_images(args, accelerator, pipe)
        classes = load_folder(args.class_data_dir, class_prompts(args.class_prompt)[0], "class")
    tokenizer, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    for model in (vae, text_encoder, unet):
        model.requires_grad_(False)
        model.to(accelerator.device)

    # adapters are created in fp32 beside the (possibly half-precision) frozen weights, from
    # --seed: the same flags give the same run
    torch.manual_seed(args.seed)
    unet_targets = inject_adapter(unet, adapter_config(args, unet, UNET_PRESETS[args.preset]))
    te_targets = []
    if args.train_text_encoder:
        te_targets = inject_adapter(text_encoder, adapter_config(args, text_encoder, TEXT_ENCODER_PRESETS[args.preset]))
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    unet_params = [p for p in unet.parameters() if p.requires_grad]
    te_params = [p for p in text_encoder.parameters() if p.requires_grad]
    groups = [{"params": unet_params, "lr": args.learning_rate}]
    if te_params:
        groups.append({"params": te_params, "lr": args.text_encoder_lr or args.learning_rate})
    # One fused kernel for all adapter tensors: a LoHa has four per layer, and the per-tensor
    # loop of the default AdamW costs several times the fused update on CPU as on GPU.
    optimizer_class = functools.partial(torch.optim.AdamW, fused=True)
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UsageError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        optimizer_class = bnb.optim.AdamW8bit
    optimizer = optimizer_class(groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                                eps=args.adam_epsilon)

    dataset = DreamBoothDataset(instances, classes, args.resolution, args.center_crop, args.random_flip,
                                args.repeats, args.seed)
    sampler = EpochSampler(len(dataset), args.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler,
                                         collate_fn=collate, num_workers=args.dataloader_num_workers)
    updates_per_epoch = math.ceil(len(loader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    epochs = math.ceil(max_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    if args.train_text_encoder:  # DDP refuses a module with nothing to train
        text_encoder = accelerator.prepare(text_encoder)
    trained = {"unet": unet, "text_encoder": text_encoder}

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
    logger.info("%d UNet and %d text-encoder layers adapted (%s, rank %d); %d trainable parameters; %d steps",
                len(unet_targets), len(te_targets), args.algo, args.rank,
                sum(p.numel() for p in unet_params + te_params), max_steps)

    stop = StopRequest()
    progress = tqdm(total=max_steps, initial=counters["global_step"], disable=not accelerator.is_local_main_process,
                    desc="steps")
    history = []
    scaling = vae.config.scaling_factor
    unwrapped = {k: accelerator.unwrap_model(m) for k, m in trained.items()}

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
        return generate(vae, unwrapped["text_encoder"], tokenizer, unwrapped["unet"], noise_scheduler.config, prompt,
                        count or args.num_validation_images, args.seed, args.validation_inference_steps,
                        args.validation_guidance_scale if guidance is None else guidance, args.resolution,
                        args.clip_skip, accelerator.device)

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

    unet.train()
    text_encoder.train(args.train_text_encoder)
    finished = counters["global_step"] >= max_steps
    while not finished and counters["epoch"] < epochs:
        epoch = counters["epoch"]
        dataset.use_epoch(epoch)
        sampler.use_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, counters["batches_done_in_epoch"]) \
            if counters["batches_done_in_epoch"] else loader
        for batch in batches:
            with accelerator.accumulate(unet, text_encoder):
                # every random draw of a micro-step comes from its own seed: resumes are exact
                step_seed = (args.seed * 1_000_003 + counters["micro_step"]) * 101 + accelerator.process_index
                torch.manual_seed(step_seed)
                generator = torch.Generator(device=accelerator.device).manual_seed(step_seed)
                pixels = batch["pixels"].to(accelerator.device, weight_dtype)
                latents = vae.encode(pixels).latent_dist.sample(generator) * scaling
                noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
                if args.noise_offset:
                    noise = noise + args.noise_offset * torch.randn(
                        (*latents.shape[:2], 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          generator=generator, device=latents.device)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                ids = tokenize(tokenizer, batch["captions"]).to(accelerator.device)
                hidden = encode(text_encoder, ids, args.clip_skip)
                pred = unet(noisy, timesteps, hidden.to(weight_dtype)).sample
                target = training_target(noise_scheduler, latents, noise, timesteps)
                weights = None
                if args.snr_gamma is not None:
                    weights = min_snr_weights(snr(noise_scheduler.alphas_cumprod, timesteps), args.snr_gamma,
                                              prediction_type)
                loss, instance_loss, prior_loss = dreambooth_loss(pred, target, weights, batch["with_prior"],
                                                                  args.prior_loss_weight)
                bad = accelerator.reduce(torch.tensor(float(not torch.isfinite(loss)), device=accelerator.device),
                                         reduction="sum")
                if bad.item() > 0:
                    return diverged("the loss became NaN/inf")
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(unet_params + te_params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                # an update can overflow while the loss that led to it was finite: never go on
                # (or checkpoint) from weights that are not
                if accelerator.sync_gradients and not torch.isfinite(torch.stack(
                        [torch.linalg.vector_norm(p.detach(), float("inf")) for p in unet_params + te_params])).all():
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
        paths = write_outputs(args, unwrapped, history, sample, started, counters["global_step"], len(instances),
                              len(classes or []), prediction_type)
        print(f"\nSaved the adapter to {paths['adapter']}\nLoad it with:\n"
              f"    import loha_diffusion\n"
              f"    from diffusers import StableDiffusionPipeline\n"
              f"    pipe = StableDiffusionPipeline.from_pretrained({str(args.pretrained_model_name_or_path)!r})\n"
              f"    pipe.load_loha_weights({str(paths['adapter'])!r})\n")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0
