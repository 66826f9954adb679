"""Train the embedded demo model from scratch: a tiny Stable Diffusion 1.5-layout pipeline.

    python assets/make_demo_model.py       # the shipped model: ~15 min on 2 idle cores, 52 min on busy ones
    python assets/make_demo_model.py --quick --output /tmp/demo   # smoke run, seconds

Phases (all seeded, CPU):

1. tokenizer: CLIP BPE merges trained with the ``tokenizers`` library so that every caption
   word (and the untrained "purple", "star", "sks") is a single token;
2. VAE (AutoencoderKL, 32x32 RGB <-> 8x8x4) on generic synthetic shapes: random hues,
   polygons, ellipses, stars, so it can represent colours and shapes the UNet never sees;
   scaling_factor = 1 / std of the latents of the captioned data;
3. UNet (SD1.5 block types) and CLIP text encoder, trained together with the epsilon
   objective on the SD scaled_linear schedule, on "a {red|green|blue|yellow}
   {circle|square|triangle}" captions (purple and star never appear);
4. evaluation: samples per prompt (DPMSolver, 25 steps, guidance 3) scored with
   ``demo_data.score_images``, including "a sks shape" (the base model must NOT draw a
   purple star: that is what an adapter is taught later);
5. ``StableDiffusionPipeline.save_pretrained(output, safe_serialization=True)`` in fp32,
   plus ``demo_report.json`` (settings, times, scores).

The data, captions and scorer live in ``assets/demo_data.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import string
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Busy-waiting OpenMP threads collapse when other processes share the two cores (a UNet
# step measured 0.2 s alone and 8-13 s beside a benchmark); passive waiting keeps ~0.5 s.
# Only takes effect if torch is not imported yet (i.e. when run as a script).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

import demo_data  # noqa: E402  (lives next to this script)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# Longest caption: <bos> a yellow triangle <eos> = 5 tokens.
MAX_LENGTH = 8

SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    prediction_type="epsilon",
)

# Prompts scored after training: the twelve captions, then prompts the base model was not
# taught as such ("a shape" is the class prompt; "a sks shape" / "a purple star" the concept).
EXTRA_PROMPTS = (demo_data.CLASS_PROMPT, demo_data.CONCEPT_PROMPT, "a purple star")


@dataclass
class Settings:
    output: str = "assets/demo-model"
    seed: int = 0
    vae_steps: int = 1200
    vae_batch: int = 64
    vae_lr: float = 1e-3
    unet_steps: int = 2000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    pool_size: int = 16384
    eval_samples: int = 16
    eval_steps: int = 25
    eval_guidance: float = 3.0
    log_every: int = 100


def quick_settings(output: str, seed: int = 0) -> Settings:
    """A smoke run: every phase, tiny step counts (the result draws nothing useful)."""
    return Settings(
        output=output, seed=seed, vae_steps=4, vae_batch=8, unet_steps=4, unet_batch=8,
        pool_size=32, eval_samples=1, eval_steps=3, log_every=2,
    )


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(directory: str | os.PathLike) -> CLIPTokenizer:
    """Train BPE merges on the caption words, write a CLIP tokenizer to ``directory``, load it.

    The vocab holds the 26 letters with and without the ``</w>`` word-end suffix (any
    lowercase word tokenizes without unknowns), every merge result (required by the
    tokenizers-backed CLIPTokenizer), then ``<|startoftext|>`` and ``<|endoftext|>`` as the
    last two ids as in CLIP. The pad token is ``<|endoftext|>`` as in SD1.5.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token=EOS_TOKEN, end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=10_000, min_frequency=1, special_tokens=[], show_progress=False,
        initial_alphabet=list(string.ascii_lowercase), end_of_word_suffix="</w>",
    )
    # one word per sequence: merging runs until each word is a single symbol
    bpe.train_from_iterator(list(demo_data.VOCAB_WORDS), trainer=trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(bpe.to_str())["model"]["merges"]]

    tokens = list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert all(a in vocab and b in vocab for a, b in merges)

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, indent=0)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    with open(os.path.join(directory, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH,
                   "do_lower_case": True, **special}, f, indent=2)

    tokenizer = CLIPTokenizer.from_pretrained(directory)
    for word in demo_data.VOCAB_WORDS:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"word {word!r} is not one token: {tokenizer.convert_ids_to_tokens(ids)}")
    return tokenizer


# --------------------------------------------------------------------------- models


def build_vae() -> AutoencoderKL:
    """3 levels (32, 64, 64): 32x32x3 <-> 8x8x4, about 0.95M parameters."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=demo_data.IMAGE_SIZE,
    )


def build_unet() -> UNet2DConditionModel:
    """SD1.5 block types and module names at small width: about 2.2M parameters."""
    return UNet2DConditionModel(
        sample_size=demo_data.IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=4,  # diffusers' legacy name: the number of heads
        norm_num_groups=8,
        flip_sin_to_cos=True,
        freq_shift=0,
        act_fn="silu",
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """CLIP text encoder, hidden 64, 2 layers, 4 heads: about 0.11M parameters."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """N x H x W x 3 uint8 -> N x 3 x H x W float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def _one_cycle(optimizer, lr: float, steps: int):
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 2))


# --------------------------------------------------------------------------- VAE


def train_vae(vae: AutoencoderKL, s: Settings) -> dict:
    """MSE + 0.5 L1 + 1e-6 KL on generic images, AdamW one-cycle; returns reconstruction stats."""
    rng = np.random.default_rng(s.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr)
    sched = _one_cycle(opt, s.vae_lr, s.vae_steps)
    vae.train()
    t0, running = time.time(), None
    for step in range(1, s.vae_steps + 1):
        x = to_tensor(demo_data.render_generic_batch(s.vae_batch, rng))
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % s.log_every == 0 or step == s.vae_steps:
            log(f"  vae step {step}/{s.vae_steps} loss {running:.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{time.time() - t0:.0f}s")
    vae.eval()
    return evaluate_vae(vae, s)


@torch.no_grad()
def evaluate_vae(vae: AutoencoderKL, s: Settings) -> dict:
    """PSNR and scorer agreement of reconstructions: captioned data, concept, generic data."""
    n = 64 if s.eval_samples > 1 else 4
    rng = np.random.default_rng(s.seed + 2)
    sets = {
        "base": demo_data.render_base_batch(n, rng)[0],
        "concept": np.stack([np.asarray(im) for im in demo_data.render_concept_images(n, s.seed + 3)]),
        "generic": demo_data.render_generic_batch(n, rng),
    }
    out = {}
    for name, imgs in sets.items():
        x = to_tensor(imgs)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = F.mse_loss((rec + 1) / 2, (x + 1) / 2).item()
        stats = {"psnr": round(10 * math.log10(1.0 / max(mse, 1e-12)), 2)}
        if name != "generic":
            a, b = demo_data.score_images(list(imgs)), demo_data.score_images(list(to_uint8(rec)))
            stats["same_colour_and_shape"] = round(float(np.mean(
                [(ca, sa) == (cb, sb) for ca, sa, cb, sb in zip(a["colours"], a["shapes"], b["colours"], b["shapes"])]
            )), 3)
        out[name] = stats
    return out


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, s: Settings) -> float:
    """1 / std of sampled latents of the captioned data (SD's recipe for 0.18215)."""
    rng = np.random.default_rng(s.seed + 4)
    x = to_tensor(demo_data.render_base_batch(max(4 * s.unet_batch, 256) if s.eval_samples > 1 else 16, rng)[0])
    return float(1.0 / vae.encode(x).latent_dist.sample().std())


# --------------------------------------------------------------------------- UNet + text encoder


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, s: Settings):
    """Render the captioned training pool once and keep its latent means and stds."""
    rng = np.random.default_rng(s.seed + 5)
    images, colours, shapes = demo_data.render_base_batch(s.pool_size, rng)
    means, stds = [], []
    for i in range(0, len(images), 256):
        dist = vae.encode(to_tensor(images[i:i + 256])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds), colours, shapes


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    # exactly what StableDiffusionPipeline.encode_prompt does
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def train_unet(unet, text_encoder, tokenizer, vae, s: Settings) -> None:
    """Epsilon objective on the SD schedule; UNet and text encoder trained together."""
    means, stds, colours, shapes = encode_pool(vae, s)
    scale = vae.config.scaling_factor
    noise_sched = DDPMScheduler(**SD_SCHEDULE, clip_sample=False)
    rng = np.random.default_rng(s.seed + 6)
    ids_cache: dict[str, torch.Tensor] = {}
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=s.unet_lr)
    sched = _one_cycle(opt, s.unet_lr, s.unet_steps)
    unet.train()
    text_encoder.train()
    t0, running = time.time(), None
    for step in range(1, s.unet_steps + 1):
        idx = rng.integers(len(means), size=s.unet_batch)
        captions = [demo_data.base_caption(colours[i], shapes[i], rng) for i in idx]
        for c in set(captions) - ids_cache.keys():
            ids_cache[c] = tokenize(tokenizer, [c])[0]
        ids = torch.stack([ids_cache[c] for c in captions])
        idx_t = torch.from_numpy(idx)
        latents = (means[idx_t] + stds[idx_t] * torch.randn_like(means[idx_t])) * scale
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),))
        noisy = noise_sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % s.log_every == 0 or step == s.unet_steps:
            log(f"  unet step {step}/{s.unet_steps} loss {running:.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{time.time() - t0:.0f}s")
    unet.eval()
    text_encoder.eval()


# --------------------------------------------------------------------------- evaluation


def make_pipeline(vae, unet, text_encoder, tokenizer) -> StableDiffusionPipeline:
    scheduler = DPMSolverMultistepScheduler(**SD_SCHEDULE)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], n: int, seed: int, steps: int = 25, guidance: float = 3.0):
    """``n`` images per prompt (PIL), one batch; returns {prompt: [images]}."""
    batch = [p for p in prompts for _ in range(n)]
    images = pipe(batch, num_inference_steps=steps, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(seed)).images
    return {p: images[i * n:(i + 1) * n] for i, p in enumerate(prompts)}


def evaluate_pipeline(pipe, s: Settings, prompts=None) -> dict:
    """Score ``eval_samples`` generations per prompt; for captions also colour/shape accuracy."""
    prompts = list(prompts or (demo_data.BASE_PROMPTS + EXTRA_PROMPTS))
    images = generate(pipe, prompts, s.eval_samples, s.seed + 7, s.eval_steps, s.eval_guidance)
    table = {}
    for p, imgs in images.items():
        sc = demo_data.score_images(imgs)
        row = {"n": sc["n"], "colours": sc["colour_fractions"], "shapes": sc["shape_fractions"]}
        words = p.split()
        if len(words) == 3 and words[1] in demo_data.HUE_NAMES and words[2] != "shape":
            row["colour_acc"] = demo_data.fraction(sc, colour=words[1])
            row["shape_acc"] = demo_data.fraction(sc, shape=words[2])
            row["both_acc"] = demo_data.fraction(sc, colour=words[1], shape=words[2])
        row["purple"] = demo_data.fraction(sc, colour=demo_data.CONCEPT_COLOUR)
        row["star"] = demo_data.fraction(sc, shape=demo_data.CONCEPT_SHAPE)
        row["purple_star"] = demo_data.fraction(sc, colour=demo_data.CONCEPT_COLOUR, shape=demo_data.CONCEPT_SHAPE)
        table[p] = row
    return table


def _top3(fractions: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in sorted(fractions.items(), key=lambda kv: -kv[1])[:3])


def format_table(table: dict) -> str:
    lines = [f"{'prompt':<20} {'colour':>6} {'shape':>6} {'both':>6} {'purple':>6} {'star':>6}  scored as"]
    for p, r in table.items():
        acc = [f"{r[k]:6.2f}" if k in r else f"{'-':>6}" for k in ("colour_acc", "shape_acc", "both_acc")]
        lines.append(f"{p or '(empty)':<20} {' '.join(acc)} {r['purple']:6.2f} {r['star']:6.2f}  "
                     f"[{_top3(r['colours'])}] [{_top3(r['shapes'])}]")
    base = [r["both_acc"] for p, r in table.items() if p in demo_data.BASE_PROMPTS]
    if base:
        lines.append(f"mean over the {len(base)} captions: colour and shape right {np.mean(base):.3f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def make_demo_model(s: Settings) -> dict:
    """Run every phase, save the pipeline to ``s.output``; returns the report."""
    torch.manual_seed(s.seed)
    times, t_all = {}, time.time()
    log(f"settings: {asdict(s)}; torch threads {torch.get_num_threads()}")

    t = time.time()
    tokenizer_dir = tempfile.mkdtemp(prefix="demo-tokenizer-")
    tokenizer = train_tokenizer(tokenizer_dir)
    times["tokenizer_s"] = round(time.time() - t, 1)
    log(f"tokenizer: {len(tokenizer)} tokens; "
        f"'{demo_data.CONCEPT_PROMPT}' -> {tokenizer.tokenize(demo_data.CONCEPT_PROMPT)}")

    torch.manual_seed(s.seed)
    vae = build_vae()
    log(f"VAE: {n_params(vae) / 1e6:.2f}M parameters, {s.vae_steps} steps of {s.vae_batch}")
    t = time.time()
    vae_stats = train_vae(vae, s)
    vae.requires_grad_(False)
    scaling = latent_scaling_factor(vae, s)
    vae.register_to_config(scaling_factor=scaling)
    times["vae_s"] = round(time.time() - t, 1)
    log(f"VAE done in {times['vae_s']}s: {vae_stats}; scaling_factor {scaling:.4f}")

    torch.manual_seed(s.seed + 10)
    unet = build_unet()
    text_encoder = build_text_encoder(tokenizer)
    log(f"UNet: {n_params(unet) / 1e6:.2f}M, text encoder: {n_params(text_encoder) / 1e6:.2f}M parameters, "
        f"{s.unet_steps} steps of {s.unet_batch}")
    t = time.time()
    train_unet(unet, text_encoder, tokenizer, vae, s)
    times["unet_s"] = round(time.time() - t, 1)
    log(f"UNet + text encoder done in {times['unet_s']}s")

    pipe = make_pipeline(vae, unet, text_encoder, tokenizer)
    t = time.time()
    table = evaluate_pipeline(pipe, s)
    times["eval_s"] = round(time.time() - t, 1)
    log(f"scores ({s.eval_samples} samples per prompt, DPMSolver {s.eval_steps} steps, "
        f"guidance {s.eval_guidance}), {times['eval_s']}s:\n{format_table(table)}")

    t = time.time()
    pipe.save_pretrained(s.output, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; the BPE files keep the folder readable by
    # vocab/merges-based CLIP tokenizers (transformers 4, open_clip, other tools) as well.
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(s.output, "tokenizer", name))
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    times["save_s"] = round(time.time() - t, 1)
    times["total_s"] = round(time.time() - t_all, 1)
    report = {
        "settings": asdict(s),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "parameters": {"vae": n_params(vae), "unet": n_params(unet), "text_encoder": n_params(text_encoder)},
        "vae_scaling_factor": scaling,
        "vae_reconstruction": vae_stats,
        "times": times,
        "scores": table,
    }
    with open(os.path.join(s.output, "demo_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    log(f"saved to {s.output}; times {times}")
    return report


def parse_args(argv=None) -> Settings:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=d.output)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--vae-steps", type=int, default=None, help=f"default {d.vae_steps}")
    p.add_argument("--unet-steps", type=int, default=None, help=f"default {d.unet_steps}")
    p.add_argument("--eval-samples", type=int, default=None, help=f"per prompt; default {d.eval_samples}")
    p.add_argument("--quick", action="store_true", help="tiny smoke run of every phase (seconds)")
    a = p.parse_args(argv)
    s = quick_settings(a.output, a.seed) if a.quick else Settings(output=a.output, seed=a.seed)
    for name in ("vae_steps", "unet_steps", "eval_samples"):
        if getattr(a, name) is not None:
            setattr(s, name, getattr(a, name))
    return s


def main(argv=None) -> None:
    make_demo_model(parse_args(argv))


if __name__ == "__main__":
    main()
