"""One training step of an SD1.5-shaped UNet + CLIP text encoder, per adapter implementation.

Implementations, side by side in one process (each on its own deep copy of the same base models):
  loha_diffusion  this package's LoHaModel on the UNet and on the text encoder
  loha_general    the same with the single-node fused ops switched off (every layer on the general
                  autograd path): what the fused ops buy. Only with --only.
  peft_loha       peft.LoHaConfig + peft.inject_adapter_in_model
  peft_lora       peft.LoraConfig (r=8, lora_alpha=8) + peft.inject_adapter_in_model
  lycoris_loha    lycoris.create_lycoris(..., algo="loha") restricted by a target_name preset
  no_adapter      reference: the same step with one learnable scalar (see build_no_adapter)

A step: text encoder forward on fixed token ids (batch 2 x 77), UNet forward on noisy latents
(2 x 4 x 32 x 32) at random timesteps, MSE against the noise, backward, AdamW(lr=1e-4) step,
zero_grad. The AdamW variant is the same for every implementation: ``--optimizer fused`` (the
default, what train_scripts/train_loha_sd.py uses), ``foreach`` or ``loop`` (torch's CPU default).
Train mode; fp32 throughout, or with ``--mixed-precision bf16|fp16`` as real runs train: the
frozen models in that dtype, every adapter tensor in fp32, the forward under ``torch.autocast``
(CPU autocast bf16 uses AMX where the CPU has it). Timing: one warm-up step each, then ``--rounds`` rounds of one step
per implementation (the starting implementation rotates each round); the median is reported.
The machine's cores may be shared: each timed step first waits (``--idle-wait``) for other
processes to go idle and is re-run (``--retries``) if they were busy during it; the CPU cores
other processes used during each kept step are reported ("other").
Peak step memory is measured per implementation in a fresh subprocess (``--measure-memory``).

    python bench/train_step.py [--rounds 5] [--only loha_diffusion,peft_loha] [--json out.json]
    python bench/train_step.py --unet-channels 320,640,1280,1280   # full-size SD1.5 widths
    python bench/train_step.py --mixed-precision bf16 --unet-channels 320,640,1280,1280   # the targets
    python bench/train_step.py --family sdxl --rounds 3             # SDXL layout (bf16 by default)

``--family sdxl``: an SDXL-layout UNet at full widths (320, 640, 1280; transformer depth
reduced to (1, 2, 2) to fit a small machine), CLIP-L and CLIP-G-width text encoders (two layers
each; penultimate states concatenated, CLIP-G's projected pooled output and six time ids as
added conditioning), frozen weights in bf16 and fp32 adapters under bf16 autocast unless
--mixed-precision says otherwise, as the trainer runs with --mixed_precision bf16; LoHa vs PEFT
LoHa vs PEFT LoRA (r=8).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from _common import (  # noqa: E402
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    OtherLoad,
    build_clip_l_text_encoder,
    build_sd15_unet,
    clip_token_ids,
    configure_threads,
    current_rss_mib,
    max_rss_mib,
    release_freed_memory,
    reset_peak_rss,
    seeded,
    status_mib,
    wait_for_idle,
)

RANK = 8
ALPHA = 8
LR = 1e-4
BATCH = 2
CONTENDED_CORES = 0.25  # other processes' CPU use (in cores) that marks a step as contended
OPTIMIZERS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}
optimizer_variant = "fused"
DEFAULT_CHANNELS = (64, 128, 256, 256)  # a quick geometry
SD15_CHANNELS = (320, 640, 1280, 1280)  # the real one, where the targets are set
unet_channels = DEFAULT_CHANNELS
MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
mixed_precision = "no"
# Targets (issue "training speed where users train"): bf16 mixed precision, SD1.5 widths and SDXL layout.
TARGETS = {"time_vs_peft_loha": 0.30, "time_vs_peft_lora": 1.0, "memory_vs_peft_lora": 1.0}
NAMES = ("loha_diffusion", "peft_loha", "peft_lora", "lycoris_loha", "no_adapter")
ABLATIONS = ("loha_general",)
family = "sd15"
SDXL_NAMES = ("loha_diffusion", "peft_loha", "peft_lora")
sdxl_latent = 32  # 256 px images: the full widths at a size two CPU cores can step (--sdxl-latent)


@dataclass
class Impl:
    name: str
    text_encoder: nn.Module          # called as text_encoder(ids) -> output with last_hidden_state
    unet: nn.Module                  # called as unet(x, t, encoder_hidden_states=...) -> .sample
    params: list[nn.Parameter]
    adapted: dict[str, list[str]]    # model -> adapted module paths
    keep: list = field(default_factory=list)  # objects that must stay alive (networks, hooks)
    optimizer: torch.optim.Optimizer | None = None

    @property
    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    def module_counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.adapted.items()}


# -- implementations ---------------------------------------------------------------------------
def expected_paths(unet: nn.Module, text_encoder: nn.Module) -> dict[str, list[str]]:
    """Linear/Conv paths that the target names select (dotted-suffix rule), per model."""
    def select(model, targets):
        return [p for p, m in model.named_modules()
                if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
                and any(p == t or p.endswith("." + t) for t in targets)]
    return {"unet": select(unet, UNET_TARGETS), "text_encoder": select(text_encoder, TEXT_ENCODER_TARGETS)}


def _trainable(*models) -> list[nn.Parameter]:
    return [p for m in models for p in m.parameters() if p.requires_grad]


def build_loha_diffusion(unet, text_encoder) -> Impl:
    from loha_diffusion import LoHaConfig, LoHaModel
    from loha_diffusion.model import adapter_layers

    te = LoHaModel(text_encoder, LoHaConfig(r=RANK, alpha=ALPHA, target_modules=TEXT_ENCODER_TARGETS), "default")
    un = LoHaModel(unet, LoHaConfig(r=RANK, alpha=ALPHA, target_modules=UNET_TARGETS), "default")
    adapted = {"unet": [p for p, _ in adapter_layers(un.model)],
               "text_encoder": [p for p, _ in adapter_layers(te.model)]}
    return Impl("loha_diffusion", te, un, _trainable(te, un), adapted)


def _build_peft(name, unet, text_encoder, make_config) -> Impl:
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    unet = inject_adapter_in_model(make_config(UNET_TARGETS), unet)
    text_encoder = inject_adapter_in_model(make_config(TEXT_ENCODER_TARGETS), text_encoder)
    adapted = {key: [p for p, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
               for key, model in (("unet", unet), ("text_encoder", text_encoder))}
    params = _trainable(text_encoder, unet)
    frozen_ok = all(any(k in n for k in ("hada_", "lora_")) for m in (unet, text_encoder)
                    for n, p in m.named_parameters() if p.requires_grad)
    assert frozen_ok, f"{name}: some base-model parameters are trainable"
    return Impl(name, text_encoder, unet, params, adapted)


def build_peft_loha(unet, text_encoder) -> Impl:
    from peft import LoHaConfig as PeftLoHaConfig
    return _build_peft("peft_loha", unet, text_encoder,
                       lambda targets: PeftLoHaConfig(r=RANK, alpha=ALPHA, target_modules=targets))


def build_peft_lora(unet, text_encoder) -> Impl:
    from peft import LoraConfig
    return _build_peft("peft_lora", unet, text_encoder,
                       lambda targets: LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets))


def lycoris_target_regex(targets) -> str:
    """One regex for LyCORIS' ``target_name``: the dotted-suffix rule of PEFT / loha_diffusion.

    LyCORIS matches ``target_name`` entries with ``re.match`` (anchored at the start only)
    against the module path relative to the model it is given, so the pattern spells out an
    optional ``prefix.`` and anchors the end.
    """
    return r"^(.*\.)?(" + "|".join(t.replace(".", r"\.") for t in targets) + r")$"


def build_lycoris_loha(unet, text_encoder) -> Impl:
    """LyCORIS LoHa on exactly the target modules.

    ``create_lycoris`` resolves ``preset`` (a builtin name or a TOML path, see
    ``lycoris.utils.preset.read_preset``) and hands it to ``LycorisNetwork.apply_preset``, which
    sets class attributes. Our preset: ``target_module = []`` (no class-wide block matching, which
    would adapt every Linear/Conv inside e.g. ResnetBlock2D / Transformer2DModel), ``target_name``
    = one regex selecting the same paths as the other implementations, ``use_fnmatch = false``.
    Linear and 1x1 conv layers take linear_dim/linear_alpha, 3x3 convs conv_dim/conv_alpha, which
    default to linear_dim/linear_alpha; use_tucker defaults to False (flattened conv factors, like
    PEFT's and ours).
    """
    import lycoris
    from lycoris.wrapper import LycorisNetwork

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)
    # A previous preset could have left per-module algo maps on the class; ours must not inherit them.
    LycorisNetwork.apply_preset({"module_algo_map": {}, "name_algo_map": {}, "exclude_name": []})
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    adapted, networks = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for key, model, targets in (("unet", unet, UNET_TARGETS), ("text_encoder", text_encoder, TEXT_ENCODER_TARGETS)):
            preset = Path(tmp, f"{key}.toml")
            preset.write_text("enable_conv = true\ntarget_module = []\nuse_fnmatch = false\n"
                              f"target_name = ['{lycoris_target_regex(targets)}']\n")
            net = lycoris.create_lycoris(model, 1.0, linear_dim=RANK, linear_alpha=ALPHA, algo="loha",
                                         preset=str(preset))
            net.apply_to()
            net.train()
            prefix = LycorisNetwork.LORA_PREFIX + "_"
            adapted[key] = [lora.lora_name.removeprefix(prefix) for lora in net.loras]  # '_' for '.'
            networks.append(net)
    params = [p for net in networks for p in net.parameters() if p.requires_grad]
    return Impl("lycoris_loha", text_encoder, unet, params, adapted, keep=networks)


def build_no_adapter(unet, text_encoder) -> Impl:
    """Reference without adapters: frozen models, one learnable scalar ``gain`` (init 1).

    Choice: ``gain`` multiplies the text encoder's embedding output and the UNet's input (a
    pre-hook on ``conv_in``). Autograd then has to carry activation gradients back through
    every layer of both models - as it must for adapters, which sit in every block - but
    computes no weight gradients. Its step time is thus "forward + input-gradient backward +
    a trivial optimizer step", the floor that any adapter method adds its own cost to.
    (A scalar on the text-encoder *output* only would skip the text encoder's backward and the
    UNet layers before the first cross-attention, so it would understate the floor.)
    """
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    gain = nn.Parameter(torch.ones(()))
    embeddings = getattr(text_encoder, "text_model", text_encoder).embeddings  # transformers 4 / 5 layouts
    hooks = [embeddings.register_forward_hook(lambda m, args, out: out * gain),
             unet.conv_in.register_forward_pre_hook(lambda m, args: (args[0] * gain, *args[1:]))]
    return Impl("no_adapter", text_encoder, unet, [gain], {"unet": [], "text_encoder": []}, keep=[gain, *hooks])


BUILDERS = {"loha_diffusion": build_loha_diffusion, "peft_loha": build_peft_loha, "peft_lora": build_peft_lora,
            "lycoris_loha": build_lycoris_loha, "no_adapter": build_no_adapter,
            "loha_general": lambda unet, text_encoder: dataclasses.replace(build_loha_diffusion(unet, text_encoder),
                                                                          name="loha_general")}


def precision_label() -> str:
    return "fp32" if mixed_precision == "no" else f"{mixed_precision} autocast, frozen {mixed_precision}, adapters fp32"


def frozen_dtype() -> torch.dtype:
    return MIXED_PRECISION[mixed_precision] or torch.float32


def autocast():
    dtype = MIXED_PRECISION[mixed_precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype)


def build_impl(name: str, unet, text_encoder, seed: int) -> Impl:
    with seeded(seed):
        impl = BUILDERS[name](unet.to(frozen_dtype()), text_encoder.to(frozen_dtype()))
    for param in impl.params:  # adapters train in fp32 whatever the frozen model's dtype (as the trainer does)
        param.data = param.data.float()
    impl.text_encoder.train()
    impl.unet.train()
    impl.optimizer = torch.optim.AdamW(impl.params, lr=LR, **OPTIMIZERS[optimizer_variant])
    return impl


# -- the step ----------------------------------------------------------------------------------
_SCHEDULER = None


def make_inputs(seed: int) -> dict[str, torch.Tensor]:
    global _SCHEDULER
    if _SCHEDULER is None:
        from diffusers import DDPMScheduler
        _SCHEDULER = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear")
    gen = torch.Generator().manual_seed(seed)
    size = sdxl_latent if family == "sdxl" else 32
    latents = torch.randn(BATCH, 4, size, size, generator=gen)
    noise = torch.randn(BATCH, 4, size, size, generator=gen)
    timesteps = torch.randint(0, 1000, (BATCH,), generator=gen)
    inputs = {"ids": clip_token_ids(BATCH, 77, seed=0), "noisy": _SCHEDULER.add_noise(latents, noise, timesteps),
              "noise": noise, "timesteps": timesteps}
    if family == "sdxl":  # (original h, w, crop top, left, target h, w) of 256 px images
        inputs["time_ids"] = torch.tensor([[8.0 * size, 8.0 * size, 0.0, 0.0, 8.0 * size, 8.0 * size]] * BATCH)
    return inputs


@contextlib.contextmanager
def fused_ops_off():
    """The layers decide their route in forward (backward follows the graph built there)."""
    from loha_diffusion.layers import paths

    original = paths.fused_route_applies
    paths.fused_route_applies = lambda *args: False
    try:
        yield
    finally:
        paths.fused_route_applies = original


def forward_loss(impl: Impl, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    with autocast(), (fused_ops_off() if impl.name == "loha_general" else contextlib.nullcontext()):
        if family == "sdxl":
            encoded = impl.text_encoder(inputs["ids"])
            added = {"text_embeds": encoded.pooled, "time_ids": inputs["time_ids"]}
            pred = impl.unet(inputs["noisy"], inputs["timesteps"], encoder_hidden_states=encoded.last_hidden_state,
                             added_cond_kwargs=added).sample
        else:
            hidden = impl.text_encoder(inputs["ids"]).last_hidden_state
            pred = impl.unet(inputs["noisy"], inputs["timesteps"], encoder_hidden_states=hidden).sample
    return F.mse_loss(pred.float(), inputs["noise"]), pred


def train_step(impl: Impl, inputs) -> float:
    loss, _ = forward_loss(impl, inputs)
    loss.backward()
    impl.optimizer.step()
    impl.optimizer.zero_grad(set_to_none=True)
    return loss.item()


# -- setup check -------------------------------------------------------------------------------
def check_same_computation(ours: Impl, peft: Impl, inputs) -> dict:
    """Random adapter tensors in ours, copied into PEFT's LoHa; outputs and gradients must agree."""
    copied = 0
    with torch.no_grad(), seeded(1234):
        for key in ("unet", "text_encoder"):
            wrapped = getattr(ours, key).model
            theirs = getattr(peft, key)
            for name, param in wrapped.named_parameters():
                if ".adapters.default." not in name:
                    continue
                torch.nn.init.normal_(param, std=0.1)
                path, tensor_name = name.split(".adapters.default.")
                target = getattr(theirs.get_submodule(path), tensor_name)["default"]
                assert target.shape == param.shape, f"{name}: ours {tuple(param.shape)}, PEFT {tuple(target.shape)}"
                target.copy_(param)
                copied += 1
    n_peft = sum(1 for p in peft.params)
    assert copied == n_peft == len(ours.params), f"copied {copied} tensors; PEFT has {n_peft}, ours {len(ours.params)}"

    # Training path (grad enabled, train mode): outputs and every adapter gradient.
    # fp32: the same to rounding. Mixed precision: to bf16's precision, accumulated over the whole
    # network; against an fp32 run of the same adapters, ours and PEFT's LoHa were equally far off
    # (output 1.4%, worst tensor gradient 7.7% vs 7.2% at the default widths), so a gap of that
    # size between the two is rounding, not a different computation.
    rtol, atol_rel, grad_tol = (1e-3, 1e-4, 1e-3) if mixed_precision == "no" else (0.0, 3e-2, 0.15)
    loss_o, pred_o = forward_loss(ours, inputs)
    loss_p, pred_p = forward_loss(peft, inputs)
    atol = atol_rel * max(1.0, pred_p.abs().max().item())
    torch.testing.assert_close(pred_o.float(), pred_p.float(), rtol=rtol, atol=atol)
    loss_o.backward()
    loss_p.backward()
    grad_err = 0.0
    peft_grads = {}
    for key in ("unet", "text_encoder"):
        theirs = getattr(peft, key)
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                layer_path, tensor_name, _ = name.rsplit(".", 2)
                peft_grads[(key, layer_path, tensor_name)] = param.grad
    for key in ("unet", "text_encoder"):
        for name, param in getattr(ours, key).model.named_parameters():
            if ".adapters.default." in name:
                path, tensor_name = name.split(".adapters.default.")
                g_p = peft_grads[(key, path, tensor_name)]
                if param.grad is None and g_p is None:  # SDXL: text_encoder's last layer feeds nothing
                    continue
                err = ((param.grad - g_p).norm() / g_p.norm().clamp_min(1e-30)).item()
                grad_err = max(grad_err, err)
    for impl in (ours, peft):
        impl.optimizer.zero_grad(set_to_none=True)
    assert grad_err < grad_tol, f"adapter gradients differ: max relative error {grad_err:.2e}"

    # Inference path (no_grad: our layers use the cached merged weight) and the adapters' effect.
    with torch.no_grad():
        _, inf_o = forward_loss(ours, inputs)
        _, inf_p = forward_loss(peft, inputs)
        with ours.unet.disable_adapter(), ours.text_encoder.disable_adapter():
            _, base = forward_loss(ours, inputs)
    torch.testing.assert_close(inf_o.float(), inf_p.float(), rtol=rtol, atol=atol)
    effect = ((pred_o.float() - base.float()).norm() / base.float().norm()).item()
    assert effect > 1e-2, f"random adapters barely change the output (relative change {effect:.1e}); check is vacuous"
    return {"tensors_copied": copied,
            "max_abs_diff_train": (pred_o - pred_p).abs().max().item(),
            "max_abs_diff_no_grad": (inf_o - inf_p).abs().max().item(),
            "max_rel_grad_err": grad_err,
            "adapter_effect_rel": effect,
            "output_abs_max": pred_o.abs().max().item()}


def check_same_modules(impls: list[Impl], expected: dict[str, list[str]]) -> None:
    """Every adapter implementation must wrap exactly the expected module paths."""
    want = {k: sorted(p.replace(".", "_") for p in v) for k, v in expected.items()}
    for impl in impls:
        if impl.name == "no_adapter":
            continue
        got = {k: sorted(p.replace(".", "_") for p in v) for k, v in impl.adapted.items()}
        if got != want:
            diff = {k: (sorted(set(got[k]) - set(want[k]))[:5], sorted(set(want[k]) - set(got[k]))[:5]) for k in want}
            raise AssertionError(f"{impl.name} adapts other modules than expected (extra, missing): {diff}")


# -- memory subprocess ---------------------------------------------------------------------------
def measure_memory(name: str) -> dict:
    """Peak RSS growth over 2 training steps (optimizer state included) above the RSS after setup.

    ru_maxrss - RSS after setup, where ru_maxrss only sees the steps because the kernel's
    high-water mark is reset after setup (``reset_peak_rss``) and freed setup memory is
    trimmed first. The parent spawns these subprocesses before it builds its own models, so
    the RSS it hands down through exec (see ``max_rss_mib``) stays below the child's; the
    VmHWM cross-check catches the case where it does not.
    """
    threads = configure_threads()
    unet, text_encoder = build_base_models()
    impl = build_impl(name, unet, text_encoder, seed=1)
    inputs = [make_inputs(1000 + i) for i in range(2)]
    release_freed_memory()
    reset_ok = reset_peak_rss()
    setup_rss = current_rss_mib()
    maxrss_at_start = max_rss_mib()
    losses = [train_step(impl, x) for x in inputs]
    peak, hwm = max_rss_mib(), status_mib("VmHWM")
    inherited = peak > hwm + 1.0  # ru_maxrss carries a larger RSS from before exec: use VmHWM
    return {"name": name, "threads": threads, "setup_rss_mib": setup_rss, "peak_rss_mib": peak,
            "vm_hwm_mib": hwm, "peak_step_mib": (hwm if inherited else peak) - setup_rss,
            "ru_maxrss_inherited": inherited, "peak_reset": reset_ok, "maxrss_at_start_mib": maxrss_at_start,
            "losses": losses}


def memory_in_subprocess(name: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--measure-memory", name, "--optimizer", optimizer_variant,
           "--unet-channels", ",".join(map(str, unet_channels)), "--mixed-precision", mixed_precision,
           "--family", family, "--sdxl-latent", str(sdxl_latent)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("MEMORY_JSON "):
            return json.loads(line[len("MEMORY_JSON "):])
    raise RuntimeError(f"memory subprocess for {name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


# -- SDXL layout ----------------------------------------------------------------------------------
class DualTextEncoder(nn.Module):
    """SDXL's two text encoders as one module: penultimate hidden states of both, concatenated,
    and the second encoder's projected pooled output (as StableDiffusionXLPipeline.encode_prompt)."""

    # PEFT's injection asks transformers for weight-renaming rules of the model it is given,
    # which reads this attribute of a transformers model: the container has no prefix
    base_model_prefix = ""

    def __init__(self, text_encoder, text_encoder_2):
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2

    @property
    def config(self):  # what the report prints (attention implementation)
        return self.text_encoder.config

    def forward(self, ids):
        from types import SimpleNamespace

        first = self.text_encoder(ids, output_hidden_states=True)
        second = self.text_encoder_2(ids, output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return SimpleNamespace(last_hidden_state=hidden, pooled=second.text_embeds)


def build_sdxl_models(seed: int = 0):
    """SDXL-layout UNet at full widths (transformer depth (1, 2, 2)) and CLIP-L / CLIP-G-width
    text encoders with two layers each; frozen weights in bf16."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with seeded(seed):
        unet = UNet2DConditionModel(
            sample_size=sdxl_latent, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 2),
            cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=6 * 256 + 1280, norm_num_groups=32, act_fn="silu",
            flip_sin_to_cos=True, freq_shift=0)
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=2, num_attention_heads=20,
            max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=1280,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    text_encoders = DualTextEncoder(build_clip_l_text_encoder(seed, num_hidden_layers=2), clip_g)
    return unet.to(torch.bfloat16), text_encoders.to(torch.bfloat16)


def build_base_models():
    if family == "sdxl":
        return build_sdxl_models()
    return build_sd15_unet(block_out_channels=unet_channels), build_clip_l_text_encoder()


def report_targets(ours, ref_loha, ref_lora, memory) -> dict:
    """Print and return the ratios the targets are set for (``TARGETS``)."""
    if mixed_precision == "no" or (family == "sd15" and unet_channels != SD15_CHANNELS):
        print("(the targets are set for --mixed-precision bf16" + (f" at UNet channels {SD15_CHANNELS}"
              if family == "sd15" else "") + "; shown here for reference)")
    prefix = "SDXL " if family == "sdxl" else ""
    mem = {n: memory.get(n, {}).get("peak_step_mib") for n in ("loha_diffusion", "peft_lora")}
    targets = {}
    for key, label, value in (
            ("time_vs_peft_loha", "loha_diffusion / PEFT LoHa", ratio(ours, ref_loha)),
            ("time_vs_peft_lora", "loha_diffusion / PEFT LoRA", ratio(ours, ref_lora)),
            ("memory_vs_peft_lora", "peak memory loha_diffusion / PEFT LoRA",
             ratio(mem["loha_diffusion"], mem["peft_lora"]))):
        limit = TARGETS[key]
        targets[key] = {"value": value, "target_max": limit, "met": None if value is None else value <= limit}
        verdict = "n/a" if value is None else ("met" if value <= limit else "MISSED")
        print(f"{prefix}{label} = {fmt(value, '.2f')} (target <= {limit}) {verdict}")
    return targets


# -- main ----------------------------------------------------------------------------------------
def ratio(a, b):
    return None if a is None or b is None else a / b


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (one step of each implementation)")
    parser.add_argument("--only", default=None,
                        help=f"comma-separated subset of {','.join(NAMES + ABLATIONS)}")
    parser.add_argument("--json", default=None, help="write the figures to this path")
    parser.add_argument("--skip-memory", action="store_true", help="do not run the peak-memory subprocesses")
    parser.add_argument("--idle-wait", type=float, default=60.0,
                        help="before each timed step, wait up to this many seconds for other processes to go idle "
                             "(0: do not wait)")
    parser.add_argument("--retries", type=int, default=2,
                        help="re-run a timed step up to this many times when other processes were busy during it")
    parser.add_argument("--unet-channels", default=",".join(map(str, DEFAULT_CHANNELS)),
                        help="UNet block_out_channels; 320,640,1280,1280 is full-size SD1.5 (the targets "
                             "are set for the default)")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="fused",
                        help="AdamW variant used for every implementation (default: fused, as the trainer)")
    parser.add_argument("--mixed-precision", choices=sorted(MIXED_PRECISION), default=None,
                        help="frozen models in this dtype, adapters fp32, forward under CPU autocast (default: no "
                             "for sd15, fp32 throughout; bf16 for sdxl); the targets are set for bf16")
    parser.add_argument("--family", choices=["sd15", "sdxl"], default="sd15",
                        help="sdxl: SDXL layout at full widths, two text encoders, fp32 adapters; "
                             f"compares {', '.join(SDXL_NAMES)}")
    parser.add_argument("--sdxl-latent", type=int, default=32, help="latent side for --family sdxl (image / 8)")
    parser.add_argument("--measure-memory", default=None, metavar="NAME", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global optimizer_variant, unet_channels, mixed_precision, family, sdxl_latent
    optimizer_variant = args.optimizer
    family, sdxl_latent = args.family, args.sdxl_latent
    mixed_precision = args.mixed_precision or ("bf16" if family == "sdxl" else "no")
    try:
        unet_channels = tuple(int(c) for c in args.unet_channels.split(","))
    except ValueError:
        parser.error(f"--unet-channels: expected 4 comma-separated integers, got {args.unet_channels!r}")
    if len(unet_channels) != 4 or any(c <= 0 or c % 32 for c in unet_channels):
        parser.error("--unet-channels: expected 4 positive multiples of 32 (GroupNorm groups), "
                     f"got {args.unet_channels!r}")

    if args.measure_memory:
        if args.measure_memory not in NAMES + ABLATIONS:
            parser.error(f"unknown implementation {args.measure_memory!r}")
        print("MEMORY_JSON " + json.dumps(measure_memory(args.measure_memory)), flush=True)
        return 0

    allowed = SDXL_NAMES if family == "sdxl" else NAMES
    names = list(allowed) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed + ABLATIONS]
    if unknown or not names:
        parser.error(f"--only: unknown {unknown}; choose from {', '.join(allowed + ABLATIONS)}")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.retries < 0:
        parser.error("--retries must be >= 0")

    threads = configure_threads()
    import diffusers
    import peft
    import transformers
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}; threads {threads}; CPU, "
          + ("SDXL layout, " if family == "sdxl" else "") + precision_label())
    # Memory first: each subprocess inherits this process's RSS through exec (see max_rss_mib),
    # which must stay below the child's own footprint, so no models are built here yet.
    memory = {}
    if not args.skip_memory:
        print("peak step memory (fresh subprocess each: setup, reset high-water mark, 2 steps) ...", flush=True)
        for name in names:
            memory[name] = m = memory_in_subprocess(name)
            print(f"  {name:15s} RSS after setup {m['setup_rss_mib']:.0f} MiB, ru_maxrss after 2 steps "
                  f"{m['peak_rss_mib']:.0f} MiB (VmHWM {m['vm_hwm_mib']:.0f}) -> {m['peak_step_mib']:.0f} MiB"
                  + ("" if m["peak_reset"] else " (high-water mark could not be reset: setup peak included)")
                  + (" (ru_maxrss inherited from the parent: VmHWM used)" if m["ru_maxrss_inherited"] else ""),
                  flush=True)

    t0 = time.perf_counter()
    base_unet, base_te = build_base_models()
    n_unet = sum(p.numel() for p in base_unet.parameters())
    n_te = sum(p.numel() for p in base_te.parameters())
    print(f"base models: UNet {n_unet / 1e6:.2f}M params, text encoder {n_te / 1e6:.2f}M params "
          f"(attention: {base_te.config._attn_implementation})")
    expected = expected_paths(base_unet, base_te)

    impls = {}
    for name in names:
        impls[name] = build_impl(name, copy.deepcopy(base_unet), copy.deepcopy(base_te), seed=1)
    del base_unet, base_te
    release_freed_memory()
    print(f"built {len(impls)} implementations in {time.perf_counter() - t0:.1f}s")

    print("\nadapted modules (unet + text encoder):")
    print(f"  expected from target names: {len(expected['unet'])} + {len(expected['text_encoder'])}")
    for impl in impls.values():
        c = impl.module_counts()
        print(f"  {impl.name:15s} {c['unet']} + {c['text_encoder']} = {c['unet'] + c['text_encoder']}, "
              f"{impl.n_trainable:,d} trainable params in {len(impl.params)} tensors")
    check_same_modules(list(impls.values()), expected)
    print("  all adapter implementations wrap exactly the expected module paths")

    check = None
    if "loha_diffusion" in impls and "peft_loha" in impls:
        t1 = time.perf_counter()
        check = check_same_computation(impls["loha_diffusion"], impls["peft_loha"], make_inputs(999))
        print(f"\nsetup check loha_diffusion vs PEFT LoHa ({check['tensors_copied']} random tensors copied, "
              f"{time.perf_counter() - t1:.1f}s): UNet output max |diff| {check['max_abs_diff_train']:.2e} (train "
              f"path), {check['max_abs_diff_no_grad']:.2e} (no_grad path), output max |y| "
              f"{check['output_abs_max']:.2f}; adapter gradients max rel. err {check['max_rel_grad_err']:.2e}; "
              f"adapters change the output by {100 * check['adapter_effect_rel']:.1f}% -> same computation")
    else:
        print("\nsetup check skipped (needs both loha_diffusion and peft_loha)")

    # Timing: warm-up, then rounds of one step each; the first implementation rotates per round.
    order = list(impls)
    times = {n: [] for n in order}
    cpu_times = {n: [] for n in order}  # process CPU time, all threads
    other_load = {n: [] for n in order}  # cores used by other processes during the step
    attempts = {n: [] for n in order}
    losses = {n: [] for n in order}
    warm = make_inputs(0)
    for name in order:
        losses[name].append(train_step(impls[name], warm))
    print(f"\ntiming {args.rounds} rounds x {len(order)} implementations; s/step (cores used by other "
          f"processes meanwhile); load average before: {os.getloadavg()[0]:.2f}", flush=True)
    for r in range(args.rounds):
        inputs = make_inputs(1 + r)
        for i in range(len(order)):
            name = order[(r + i) % len(order)]
            # Other processes on these cores slow a 2-thread step erratically (10x and more), so each
            # step waits for an idle machine and is re-run (at most --retries times) when another
            # process was busy during it. Every attempt is kept in the JSON; the last one counts.
            for attempt in range(args.retries + 1):
                if args.idle_wait > 0:
                    wait_for_idle(timeout=args.idle_wait)
                gc.collect()
                with OtherLoad() as load:
                    start, start_cpu = time.perf_counter(), time.process_time()
                    loss = train_step(impls[name], inputs)
                    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
                attempts[name].append({"round": r + 1, "attempt": attempt, "s": wall, "cpu_s": cpu,
                                       "other_cores": load.cores})
                if load.cores <= CONTENDED_CORES:
                    break
            times[name].append(wall)
            cpu_times[name].append(cpu)
            other_load[name].append(load.cores)
            losses[name].append(loss)
        print(f"  round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f}s ({other_load[n][-1]:.1f})" for n in order),
              flush=True)
    for name, values in losses.items():
        assert all(torch.isfinite(torch.tensor(values))), f"{name}: non-finite loss {values}"

    median = {n: statistics.median(times[n]) for n in order}
    ref_loha, ref_lora = median.get("peft_loha"), median.get("peft_lora")
    rows = []
    for name in order:
        impl = impls[name]
        c = impl.module_counts()
        rows.append({"name": name, "median_s": median[name], "times_s": times[name],
                     "median_cpu_s": statistics.median(cpu_times[name]), "cpu_times_s": cpu_times[name],
                     "other_load_cores": other_load[name], "median_other_load": statistics.median(other_load[name]),
                     "contended_steps": sum(c > CONTENDED_CORES for c in other_load[name]),
                     "attempts": attempts[name],
                     "ratio_peft_loha": ratio(median[name], ref_loha), "ratio_peft_lora": ratio(median[name], ref_lora),
                     "peak_step_mib": memory.get(name, {}).get("peak_step_mib"),
                     "trainable_params": impl.n_trainable, "adapted_modules": c["unet"] + c["text_encoder"],
                     "adapted_unet": c["unet"], "adapted_text_encoder": c["text_encoder"], "losses": losses[name]})

    layout = "SDXL (320, 640, 1280)" if family == "sdxl" else f"UNet channels {unet_channels}"
    side = sdxl_latent if family == "sdxl" else 32
    print(f"\nmedian of {args.rounds} rounds, {layout}, batch {BATCH}, {side}x{side} latents, 77 tokens, "
          f"{threads} threads, {precision_label()}, AdamW {optimizer_variant}; load average now "
          f"{os.getloadavg()[0]:.2f}")
    header = (f"{'implementation':15s} {'s/step':>8s} {'other':>5s} {'/PEFT LoHa':>10s} {'/PEFT LoRA':>10s} "
              f"{'peak MiB':>9s} {'trainable':>11s} {'modules':>8s}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['name']:15s} {row['median_s']:8.3f} {row['median_other_load']:5.1f} "
              f"{fmt(row['ratio_peft_loha'], '10.2f')} "
              f"{fmt(row['ratio_peft_lora'], '10.2f')} {fmt(row['peak_step_mib'], '9.0f')} "
              f"{row['trainable_params']:11,d} {row['adapted_modules']:8d}")

    print("(other = median CPU cores used by other processes during that implementation's timed steps)")
    contended = {n: sum(c > CONTENDED_CORES for c in v) for n, v in other_load.items()}
    retried = sum(len(v) - args.rounds for v in attempts.values())
    print(f"({retried} timed step(s) re-run because other processes were busy; contended steps kept: "
          f"{sum(contended.values())})")
    if any(2 * c >= args.rounds for c in contended.values()):
        print(f"note: for some implementation at least half the kept steps ran while other processes used over "
              f"{CONTENDED_CORES} cores; with {threads} threads per step that slows steps erratically, so the "
              "medians and ratios are unreliable - rerun on an idle machine (or with OMP_NUM_THREADS=1)")

    ours = median.get("loha_diffusion")
    targets = {} if ours is None else report_targets(ours, ref_loha, ref_lora, memory)

    if args.json:
        out = {"config": {"family": family, "rounds": args.rounds, "threads": threads, "batch": BATCH, "rank": RANK,
                          "alpha": ALPHA, "lr": LR, "unet_channels": unet_channels, "mixed_precision": mixed_precision,
                          "torch": torch.__version__,
                          "peft": peft.__version__},
               "setup_check": check, "results": rows, "memory": memory, "targets": targets}
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
