"""Load / fuse / unfuse / unload of a LoHa file, and unfused denoising-step overhead, side by side:
loha_diffusion vs PEFT (LoHa tuner) vs LyCORIS (kohya network), on a FULL-SIZE SD1.5 UNet and a
CLIP-L text encoder (12 layers), fp32, seeded random weights built from configs (no hub).

The adapter file: 344 LoHa modules, dim 16, alpha 8, kohya names, random factors (std 0.05),
written with safetensors directly (272 UNet modules: to_q/to_k/to_v/to_out.0/ff.net.0.proj/
ff.net.2/proj_in/proj_out/conv1/conv2/conv_shortcut/time_emb_proj; 72 CLIP modules:
q_proj/k_proj/v_proj/out_proj/fc1/fc2).

One base UNet + text encoder is built; the implementations are applied to it one after another,
each removed again (and the base weights restored bit-exactly from a saved copy) before the next.

How each implementation is driven:
  loha_diffusion  load_loha_weights(pipe, path) / fuse_loha / unfuse_loha / unload_loha_weights on a
                  types.SimpleNamespace(unet=..., text_encoder=...); right after the load, first
                  fuse_loha(exact_unfuse=False) / unfuse_loha, which add and subtract in place with no
                  backup (as PEFT does), then the default exact fuse / unfuse
  peft            load: safetensors.load_file + kohya name -> module path + LoHaConfig(r=16, alpha=8,
                  target_modules=<exact module paths>) + inject_adapter_in_model + set_peft_model_state_dict
                  per component (low_cpu_mem_usage=True, diffusers' default for LoRA loading);
                  fuse: module.merge() on every BaseTunerLayer (= diffusers' fuse_lora); unfuse:
                  module.unmerge() (= diffusers' unfuse_lora); unload: diffusers' recurse_remove_peft_layers
                  + del peft_config (= diffusers' unload_lora / _remove_text_encoder_monkey_patch)
  lycoris         load: lycoris.kohya.create_network_from_weights(1.0, path, None, te, unet) + apply_to
                  (with "TimestepEmbedding" dropped from UNET_TARGET_REPLACE_MODULE, see run_lycoris; its
                  text-encoder names miss under transformers 5, so it loads the 272 UNet modules only);
                  fuse: network.merge_to(...) (kohya signature; per-module merge_to, no backup, alpha/rank
                  applied twice for LoHa: timed only); unfuse: per-module onfly_merge then onfly_restore,
                  shown as n/a when it does not restore the weights (on CPU its backup aliases the weight);
                  unload: network.restore()

Unfused denoising step: UNet forward in eval mode under torch.no_grad, latents (2, 4, 32, 32)
(batch 2 = a CFG pair; 32x32 rather than SD1.5's 64x64 to keep CPU time reasonable),
encoder_hidden_states (2, 77, 768); one warm-up call (reported as "first call"), then --reps
timed calls, median. Each adapter-on call is preceded by one with the adapters switched off by the
implementation's own switch (disable_loha / enable_adapters(False) / per-module restore), and
the overhead is taken against those, so both sides run under the same machine load.

Every timing also records this process's CPU seconds and the CPU other processes used meanwhile
("other load", in cores): on a shared 2-core machine a busy neighbour slows 2-thread code far
more than its share, so compare figures taken at low other load. --rounds N repeats the
load/fuse/unfuse/unload cycles N times (rotating which implementation goes first) and reports
per-stage medians.

Memory: "peak extra" is the RSS high-water mark during a stage minus the RSS before it
(the kernel's mark is reset before each stage); "kept" is RSS after minus RSS before.

    python bench/load_fuse.py [--reps 5] [--rounds 1] [--skip peft,lycoris] [--json out.json]
    python bench/load_fuse.py --small   # smoke test at reduced UNet width (same 344 modules)
    python bench/load_fuse.py --small --latent-size 8   # the "medium" UNet at 8x8 latents
    python bench/load_fuse.py --per-layer   # only: microseconds per layer call, ours vs PEFT LoRA

--per-layer times single layers (Linear 320->320 and a 3x3 Conv2d 320->320, SD1.5's first level)
at 8x8 latents (batch 2: 64 tokens each), under torch.no_grad in eval mode: the base layer alone,
our AdapterLayer with the dim-16 LoHa (unfused, cached weight), PEFT's LoRA layer (r=16, unmerged,
what diffusers runs for a LoRA) and PEFT's LoHa layer. Calls of the four alternate within each
repetition, so that all see the same machine load; the figure is the median per-call time minus the
base layer's.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from _common import (  # noqa: E402
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    OtherLoad,
    build_clip_l_text_encoder,
    build_sd15_unet,
    configure_threads,
    current_rss_mib,
    release_freed_memory,
    reset_peak_rss,
    seeded,
    status_mib,
    wait_for_idle,
)

RANK = 16
ALPHA = 8.0
FACTOR_STD = 0.05
IMPLEMENTATIONS = ("loha_diffusion", "peft", "lycoris")
SD15_UNET = dict(block_out_channels=(320, 640, 1280, 1280), sample_size=64, layers_per_block=2,
                 cross_attention_dim=768, attention_head_dim=8)
LATENT_SHAPE = [2, 4, 32, 32]  # --latent-size sets the last two
CONTEXT_SHAPE = (2, 77, 768)
TIMESTEP = 500


# -- helpers -------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(msg, flush=True)


class Stage:
    """Times a block and records its peak extra RSS, kept RSS and other processes' CPU use."""

    def __init__(self, figures: dict, key: str, idle_wait: float):
        self.figures, self.key, self.idle_wait = figures, key, idle_wait

    def __enter__(self):
        release_freed_memory()
        if self.idle_wait > 0:
            wait_for_idle(timeout=self.idle_wait)
        self.peak_ok = reset_peak_rss()
        self.rss0 = current_rss_mib()
        self.load = OtherLoad().__enter__()
        self.cpu0 = own_cpu_seconds()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, *exc):
        seconds = time.perf_counter() - self.t0
        cpu = own_cpu_seconds() - self.cpu0
        self.load.__exit__(None, None, None)
        if exc_type is not None:
            return False
        peak = status_mib("VmHWM") - self.rss0 if self.peak_ok else float("nan")
        self.figures[self.key] = dict(seconds=seconds, cpu_seconds=cpu, peak_extra_mib=peak,
                                      kept_mib=current_rss_mib() - self.rss0, other_cores=self.load.cores)
        log(f"  {self.key:<34} {seconds:8.3f} s (cpu {cpu:7.3f} s)   peak extra {peak:8.0f} MiB   "
            f"kept {current_rss_mib() - self.rss0:8.0f} MiB   other load {self.load.cores:.2f} cores")
        return False


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def suffix_match(path: str, targets) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


def build_models(small: bool = False):
    # --small: the same block layout (same 272 targets) at channels (64, 128, 256, 256), a smoke test
    config = dict(SD15_UNET, block_out_channels=(64, 128, 256, 256)) if small else SD15_UNET
    unet = build_sd15_unet(seed=0, **config)
    text_encoder = build_clip_l_text_encoder(seed=1, num_hidden_layers=12)
    unet.eval()
    text_encoder.eval()
    return unet, text_encoder


def target_paths(unet, text_encoder) -> dict[str, list[str]]:
    paths = {"unet": [n for n, _ in unet.named_modules() if n and suffix_match(n, UNET_TARGETS)],
             "text_encoder": [n for n, _ in text_encoder.named_modules()
                              if n and suffix_match(n, TEXT_ENCODER_TARGETS)]}
    assert len(paths["unet"]) == 272 and len(paths["text_encoder"]) == 72, {k: len(v) for k, v in paths.items()}
    return paths


def kohya_name(component: str, path: str) -> str:
    if component == "unet":
        return "lora_unet_" + path.replace(".", "_")
    # transformers 5 has no ``text_model`` level in CLIPTextModel; community files always name it
    path = path if path.startswith("text_model.") else "text_model." + path
    return "lora_te_" + path.replace(".", "_")


def write_loha_file(path: Path, models: dict, paths: dict[str, list[str]], seed: int = 1234):
    """The 344-module dim-16 LoHa file; returns {kohya name: (component, module path)}."""
    names, tensors = {}, {}
    gen = torch.Generator().manual_seed(seed)
    for component, module_paths in paths.items():
        modules = dict(models[component].named_modules())
        for mpath in module_paths:
            weight = modules[mpath].weight
            out_dim, flat_in = weight.shape[0], math.prod(weight.shape[1:])
            name = kohya_name(component, mpath)
            names[name] = (component, mpath)
            for half in (1, 2):
                tensors[f"{name}.hada_w{half}_a"] = torch.randn(out_dim, RANK, generator=gen) * FACTOR_STD
                tensors[f"{name}.hada_w{half}_b"] = torch.randn(RANK, flat_in, generator=gen) * FACTOR_STD
            tensors[f"{name}.alpha"] = torch.tensor(ALPHA)
    assert len(names) == 344, len(names)
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya", "ss_network_dim": str(RANK),
                                             "ss_network_alpha": str(ALPHA),
                                             "ss_network_args": json.dumps({"algo": "loha"})})
    return names


class Snapshot:
    """The base models' parameters and module objects, for exactness and identity checks."""

    def __init__(self, models: dict):
        self.params = {c: dict(m.named_parameters()) for c, m in models.items()}
        self.copies = {c: {n: p.detach().clone() for n, p in ps.items()} for c, ps in self.params.items()}
        self.modules = {c: dict(m.named_modules()) for c, m in models.items()}
        self.models = models

    def mib(self) -> float:
        return sum(t.numel() * t.element_size() for c in self.copies.values() for t in c.values()) / 2**20

    def compare(self) -> dict:
        """Bit-exact check of every original parameter object vs its saved copy."""
        n_tensors = n_equal = 0
        max_drift = 0.0
        for component, params in self.params.items():
            for name, param in params.items():
                saved = self.copies[component][name]
                n_tensors += 1
                if torch.equal(param.detach(), saved):
                    n_equal += 1
                else:
                    max_drift = max(max_drift, (param.detach().double() - saved.double()).abs().max().item())
        return dict(bit_exact=n_equal == n_tensors, tensors=n_tensors, equal=n_equal, max_abs_drift=max_drift)

    def same_modules(self) -> bool:
        """The live module tree holds exactly the original module objects (same paths)."""
        for component, model in self.models.items():
            live = dict(model.named_modules())
            original = self.modules[component]
            if live.keys() != original.keys() or any(live[k] is not original[k] for k in live):
                return False
            live_params = dict(model.named_parameters())
            if live_params.keys() != self.params[component].keys() or any(
                    live_params[k] is not self.params[component][k] for k in live_params):
                return False
        return True

    @torch.no_grad()
    def restore(self) -> None:
        for component, params in self.params.items():
            for name, param in params.items():
                param.copy_(self.copies[component][name])


def unet_inputs(seed: int = 7):
    with seeded(seed):
        latents = torch.randn(*LATENT_SHAPE)
        context = torch.randn(*CONTEXT_SHAPE)
    timesteps = torch.full((LATENT_SHAPE[0],), TIMESTEP, dtype=torch.long)
    return latents, timesteps, context


def time_denoise(unet, inputs, reps: int, idle_wait: float, toggle=None) -> tuple[dict, torch.Tensor]:
    """Median UNet forward after one warm-up call.

    With ``toggle = (disable, enable)`` every repetition times a forward with the adapters
    switched off (the implementation's own switch) right before one with them on, so the
    overhead is taken against a no-adapter run under the same machine load.
    """
    latents, timesteps, context = inputs
    unet.eval()
    release_freed_memory()
    rss0 = current_rss_mib()
    peak_ok = reset_peak_rss()

    def forward():
        if idle_wait > 0:
            wait_for_idle(timeout=idle_wait)
        with OtherLoad() as load:
            c0, t0 = own_cpu_seconds(), time.perf_counter()
            out = unet(latents, timesteps, encoder_hidden_states=context).sample
            seconds, cpu = time.perf_counter() - t0, own_cpu_seconds() - c0
        return out, seconds, cpu, load.cores

    times, cpus, loads, off_times, off_cpus = [], [], [], [], []
    with torch.no_grad():
        t0 = time.perf_counter()
        out = unet(latents, timesteps, encoder_hidden_states=context).sample
        first = time.perf_counter() - t0
        for _ in range(reps):
            if toggle is not None:
                toggle[0]()
                _, seconds, cpu, cores = forward()
                off_times.append(seconds)
                off_cpus.append(cpu)
                loads.append(cores)
                toggle[1]()
            out, seconds, cpu, cores = forward()
            times.append(seconds)
            cpus.append(cpu)
            loads.append(cores)
    peak = status_mib("VmHWM") - rss0 if peak_ok else float("nan")
    figures = dict(median=statistics.median(times), cpu_median=statistics.median(cpus), first_call=first,
                   times=times, max_other_cores=max(loads), peak_extra_mib=peak)
    line = (f"  {'unet forward':<34} median {figures['median']:.3f} s (cpu {figures['cpu_median']:.3f} s; first call "
            f"{first:.3f} s; {', '.join(f'{t:.3f}' for t in times)})")
    if toggle is not None:
        figures.update(off_median=statistics.median(off_times), off_cpu_median=statistics.median(off_cpus),
                       off_times=off_times)
        line += (f"\n  {'  same, adapters switched off':<34} median {figures['off_median']:.3f} s "
                 f"(cpu {figures['off_cpu_median']:.3f} s; {', '.join(f'{t:.3f}' for t in off_times)})")
    log(line + f"\n  {'':<34} peak extra {peak:.0f} MiB, max other load {max(loads):.2f} cores")
    return figures, out


# -- loha_diffusion ------------------------------------------------------------------------------
def run_read_resolve(path, pipe, figures, idle_wait):
    from loha_diffusion.attach import plan
    from loha_diffusion.io import load_state_dict
    from loha_diffusion.key_table import KeyTable
    from loha_diffusion.state_dict import group_modules

    with Stage(figures, "read+resolve", idle_wait):
        tensors, metadata = load_state_dict(path)
        modules, _ = group_modules(tensors, str(path))
        table = KeyTable(unet=pipe.unet, text_encoder=pipe.text_encoder)
        placements = plan(modules, table, str(path), metadata)
    assert len(placements) == 344, len(placements)
    del tensors, modules, table, placements


def run_loha_diffusion(path, pipe, snapshot, inputs, args, result, denoise=True):
    import loha_diffusion
    from loha_diffusion.layers import AdapterLayer

    st = result["stages"]
    with Stage(st, "load", args.idle_wait):
        loha_diffusion.load_loha_weights(pipe, path)
    n_layers = sum(isinstance(m, AdapterLayer) for model in (pipe.unet, pipe.text_encoder) for m in model.modules())
    result["modules_loaded"] = n_layers
    log(f"  {n_layers} adapter layers")
    # fuse_loha(exact_unfuse=False) first, right after the load as a user would: in place, no
    # backup (as PEFT merges); its unfuse subtracts again. Its time varies with the host's state,
    # not with the work done (fast and slow runs had the same page-fault count: docs/performance.md).
    with Stage(st, "fuse in place", args.idle_wait):
        loha_diffusion.fuse_loha(pipe, exact_unfuse=False)
    with Stage(st, "unfuse in place", args.idle_wait):
        loha_diffusion.unfuse_loha(pipe)
    result["in_place_unfuse_check"] = snapshot.compare()
    log(f"  after in-place unfuse: {result['in_place_unfuse_check']}")
    snapshot.restore()  # the exact original weights again for the rest of the run
    with Stage(st, "fuse", args.idle_wait):
        loha_diffusion.fuse_loha(pipe)
    if args.check_outputs and denoise:
        with torch.no_grad():
            result["_fused_out"] = pipe.unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    with Stage(st, "unfuse", args.idle_wait):
        loha_diffusion.unfuse_loha(pipe)
    result["unfuse_check"] = snapshot.compare()
    log(f"  after unfuse: {result['unfuse_check']}")
    out = None
    if denoise:
        result["denoise"], out = time_denoise(pipe.unet, inputs, args.reps, args.idle_wait,
                                              toggle=(lambda: loha_diffusion.disable_loha(pipe),
                                                      lambda: loha_diffusion.enable_loha(pipe)))
    with Stage(st, "unload", args.idle_wait):
        loha_diffusion.unload_loha_weights(pipe)
    result["unload_check"] = dict(snapshot.compare(), original_modules=snapshot.same_modules())
    log(f"  after unload: {result['unload_check']}")
    return out


# -- per-layer overhead --------------------------------------------------------------------------
def per_layer_overhead(reps: int, calls: int = 400) -> dict:
    """Median microseconds per call of the base layer and of three adapter layers around a copy."""
    import copy

    from peft import LoHaConfig, LoraConfig, inject_adapter_in_model

    from loha_diffusion.layers import AdapterLayer, AdapterWeights

    figures = {}
    cases = {"linear": (torch.nn.Linear(320, 320), torch.randn(2, 64, 320)),
             "conv3x3": (torch.nn.Conv2d(320, 320, 3, padding=1), torch.randn(2, 320, 8, 8))}
    for kind, (base, x) in cases.items():
        flat_in = math.prod(base.weight.shape[1:])
        gen = torch.Generator().manual_seed(0)
        tensors = {f"hada_w{h}_{s}": torch.randn(*shape, generator=gen) * FACTOR_STD
                   for h in (1, 2) for s, shape in (("a", (320, RANK)), ("b", (RANK, flat_in)))}
        ours = AdapterLayer(copy.deepcopy(base))
        ours.add_adapter("a", AdapterWeights("loha", tensors, ALPHA))
        layers = {"base": base, "loha_diffusion": ours}
        for name, config in (("peft_lora", LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["layer"])),
                             ("peft_loha", LoHaConfig(r=RANK, alpha=ALPHA, target_modules=["layer"]))):
            holder = torch.nn.Module()
            holder.layer = copy.deepcopy(base)
            layers[name] = inject_adapter_in_model(config, holder).layer
        if isinstance(base, torch.nn.Linear):  # PEFT starts LoRA up at zero: make it a real adapter
            torch.nn.init.normal_(layers["peft_lora"].lora_B["default"].weight, std=FACTOR_STD)
        times: dict[str, list[float]] = {name: [] for name in layers}
        with torch.no_grad():
            for layer in layers.values():
                layer.eval()
                for _ in range(20):
                    layer(x)
            for _ in range(reps):
                for name, layer in layers.items():
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        layer(x)
                    times[name].append((time.perf_counter() - t0) / calls * 1e6)
        medians = {name: statistics.median(t) for name, t in times.items()}
        figures[kind] = dict(us_per_call=medians,
                             overhead_us={n: medians[n] - medians["base"] for n in medians if n != "base"})
        log(f"  {kind:<8} base {medians['base']:.1f} us/call; overhead: " + ", ".join(
            f"{n} {v:+.1f} us" for n, v in figures[kind]["overhead_us"].items()))
    return figures


# -- PEFT ----------------------------------------------------------------------------------------
def peft_unload(model) -> None:
    """What diffusers' unload_lora / _remove_text_encoder_monkey_patch do."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(model)
    if hasattr(model, "peft_config"):
        del model.peft_config
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = None


def run_peft(path, pipe, names, paths, snapshot, inputs, args, result, denoise=True):
    from peft import LoHaConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.tuners_utils import BaseTunerLayer

    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    st = result["stages"]
    low_mem = not args.peft_full_init
    result["low_cpu_mem_usage"] = low_mem
    with Stage(st, "load", args.idle_wait):
        tensors = load_file(str(path))
        per_component: dict[str, dict[str, torch.Tensor]] = {c: {} for c in models}
        for key, tensor in tensors.items():
            name, _, tensor_name = key.partition(".")
            if tensor_name == "alpha":  # PEFT keeps alpha in the config (alpha=8 for every module)
                continue
            component, module_path = names[name]
            per_component[component][f"{module_path}.{tensor_name}"] = tensor
        for component, model in models.items():
            config = LoHaConfig(r=RANK, alpha=ALPHA, target_modules=list(paths[component]))
            inject_adapter_in_model(config, model, adapter_name="default", low_cpu_mem_usage=low_mem)
            outcome = set_peft_model_state_dict(model, per_component[component], adapter_name="default",
                                                low_cpu_mem_usage=low_mem)
            bad = [k for k in outcome.missing_keys if "hada_" in k] + list(outcome.unexpected_keys)
            assert not bad, f"PEFT {component}: adapter keys not loaded: {bad[:5]}"
        del tensors, per_component
    layers = [m for model in models.values() for m in model.modules() if isinstance(m, BaseTunerLayer)]
    result["modules_loaded"] = len(layers)
    log(f"  {len(layers)} PEFT LoHa layers")
    with Stage(st, "fuse", args.idle_wait):
        for model in models.values():
            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    module.merge()
    with Stage(st, "unfuse", args.idle_wait):
        for model in models.values():
            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    module.unmerge()
    result["unfuse_check"] = snapshot.compare()
    log(f"  after unmerge: {result['unfuse_check']}")
    def peft_switch(enabled):
        for module in pipe.unet.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(enabled)  # what diffusers' disable_lora / enable_lora call

    out = None
    if denoise:
        result["denoise"], out = time_denoise(pipe.unet, inputs, args.reps, args.idle_wait,
                                              toggle=(lambda: peft_switch(False), lambda: peft_switch(True)))
    with Stage(st, "unload", args.idle_wait):
        for model in models.values():
            peft_unload(model)
    result["unload_check"] = dict(snapshot.compare(), original_modules=snapshot.same_modules())
    log(f"  after unload: {result['unload_check']}")
    del layers
    return out


# -- LyCORIS -------------------------------------------------------------------------------------
def run_lycoris(path, pipe, snapshot, inputs, args, result, denoise=True):
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    for name in ("lycoris", "LyCORIS-kohya", "LyCORIS"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # lycoris 4.1.3 asserts "duplicated lora name: lora_unet_time_embedding_linear_1" on a diffusers
    # UNet: TimestepEmbedding (added to the target classes for Anima) and the target name
    # "time_embedding.linear_1" both select that layer when create_network_from_weights builds its
    # default LycorisNetworkKohya(text_encoder, unet). Dropping the class keeps the name target.
    LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE = [
        m for m in LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE if m != "TimestepEmbedding"]
    unet, text_encoder = pipe.unet, pipe.text_encoder
    st = result["stages"]
    with Stage(st, "load", args.idle_wait):
        network, weights_sd = create_network_from_weights(1.0, str(path), None, text_encoder, unet)
        network.apply_to(text_encoder, unet, apply_text_encoder=True, apply_unet=True)
    n_unet, n_te = len(network.unet_loras), len(network.text_encoder_loras)
    result["modules_loaded"] = n_unet + n_te
    result["modules_loaded_detail"] = dict(unet=n_unet, text_encoder=n_te)
    log(f"  LyCORIS loaded {n_unet + n_te}/344 modules (UNet {n_unet}/272, text encoder {n_te}/72"
        + ("; its TE names lack transformers 5's missing text_model level" if n_te == 0 else "") + ")")

    def lycoris_switch(on):  # per-module restore / apply_to swap the layers' forward back and forth
        for lora in network.loras:
            if on:
                lora.apply_to()
            else:
                lora.restore()

    out = None
    if denoise:
        result["denoise"], out = time_denoise(unet, inputs, args.reps, args.idle_wait,
                                              toggle=(lambda: lycoris_switch(False), lambda: lycoris_switch(True)))
    with Stage(st, "fuse", args.idle_wait):
        network.merge_to(text_encoder, unet, weights_sd, None, "cpu")
    result["fuse_note"] = "merge_to keeps no backup (and applies alpha/rank twice for LoHa): timed only"
    snapshot.restore()  # merge_to cannot be undone: put the base weights back (untimed)
    with Stage(st, "fuse (onfly_merge)", args.idle_wait):
        for lora in network.loras:
            lora.onfly_merge(1.0)
    with Stage(st, "unfuse (onfly_restore)", args.idle_wait):
        for lora in network.loras:
            lora.onfly_restore()
    result["unfuse_check"] = snapshot.compare()
    log(f"  after onfly_restore: {result['unfuse_check']}")
    adapted = [lora.org_module[0] for lora in network.loras]
    with Stage(st, "unload", args.idle_wait):
        network.restore()
    forwards_restored = all(getattr(m.forward, "__func__", None) is type(m).forward for m in adapted)
    result["unload_check"] = dict(snapshot.compare(), original_modules=snapshot.same_modules(),
                                  forwards_restored=forwards_restored)
    log(f"  after restore: {result['unload_check']}")
    return out


def combine_rounds(results: list[dict]) -> dict:
    """Round 1's result with each stage's seconds replaced by the median over rounds and the
    exactness checks failing if any round failed them."""
    combined = dict(results[0])
    errors = [r["error"] for r in results if r.get("error")]
    if errors:
        combined["error"] = errors[0]
        return combined
    if len(results) == 1:
        return combined
    stages = {}
    for stage in results[0]["stages"]:
        entries = [r["stages"][stage] for r in results if stage in r["stages"]]
        stages[stage] = dict(entries[0], seconds=statistics.median(e["seconds"] for e in entries),
                             cpu_seconds=statistics.median(e["cpu_seconds"] for e in entries),
                             peak_extra_mib=max(e["peak_extra_mib"] for e in entries),
                             other_cores=max(e["other_cores"] for e in entries),
                             rounds_seconds=[e["seconds"] for e in entries])
    combined["stages"] = stages
    for check in ("unfuse_check", "unload_check"):
        failing = [r[check] for r in results if check in r and not all(
            v for k, v in r[check].items() if isinstance(v, bool))]
        if failing:
            combined[check] = failing[0]
    combined["rounds"] = len(results)
    return combined


# -- report --------------------------------------------------------------------------------------
def fmt(x, digits=3):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def ratio(a, b):
    if a is None or b is None or b == 0 or (isinstance(a, float) and math.isnan(a)):
        return None
    return a / b


def report(fig: dict) -> None:
    impls = fig["implementations"]
    ours, peft, lyco = (impls.get(n) for n in IMPLEMENTATIONS)

    def sec(impl, stage):
        if impl is None or impl.get("error"):
            return None
        if impl is lyco and stage == "unfuse (onfly_restore)" and not impl["unfuse_check"]["bit_exact"]:
            return None  # it did not restore the weights: no unfuse to compare with
        entry = impl["stages"].get(stage)
        return None if entry is None else entry["seconds"]

    def mem(impl, stage):
        if impl is None or impl.get("error"):
            return None
        entry = impl["stages"].get(stage)
        return None if entry is None else entry["peak_extra_mib"]

    def lf(impl, in_place=False):
        # PEFT and LyCORIS have one fuse, in place already
        a, b = sec(impl, "load"), sec(impl, "fuse in place" if in_place and impl is ours else "fuse")
        return None if a is None or b is None else a + b

    # PEFT and LyCORIS always fuse in place (no backup): their columns repeat fuse/unfuse there
    rows = [("load", "load", "load", "load"), ("fuse", "fuse", "fuse", "fuse"),
            ("load+fuse", None, None, None), ("unfuse", "unfuse", "unfuse", "unfuse (onfly_restore)"),
            ("fuse, in place", "fuse in place", "fuse", "fuse"), ("load+fuse, in place", None, None, None),
            ("unfuse, in place", "unfuse in place", "unfuse", "unfuse (onfly_restore)"),
            ("unload", "unload", "unload", "unload")]
    print()
    print("=" * 108)
    print(f"{fig['unet_description']} + CLIP-L text encoder (12 layers, {fig['te_params_m']:.1f}M params), fp32, CPU, "
          f"{fig['threads']} threads")
    print(f"adapter: 344 LoHa modules (272 UNet + 72 TE), dim {RANK}, alpha {ALPHA:g}, "
          f"{fig['adapter_file_mib']:.1f} MiB safetensors")
    print(f"read+resolve (load_state_dict + group_modules + KeyTable + plan, no model change): "
          f"{fmt(fig['read_resolve']['seconds'])} s, peak extra {fig['read_resolve']['peak_extra_mib']:.0f} MiB")
    print("-" * 108)
    if fig["rounds"] > 1:
        print(f"stage seconds: median of {fig['rounds']} rounds (wall clock)")
    print(f"{'seconds':<20}{'ours':>8}{'PEFT':>12}{'LyCORIS':>12}{'ours/PEFT':>12}{'ours/LyCORIS':>14}"
          f"{'peak extra MiB (ours/PEFT/LyCORIS)':>36}")
    for label, s_ours, s_peft, s_lyco in rows:
        if label.startswith("load+fuse"):
            in_place = label.endswith("in place")
            a, b, c = lf(ours, in_place), lf(peft, in_place), lf(lyco, in_place)
            m = ("", "", "")
        else:
            a, b, c = sec(ours, s_ours), sec(peft, s_peft), sec(lyco, s_lyco)
            m = tuple(fmt(x, 0) for x in (mem(ours, s_ours), mem(peft, s_peft), mem(lyco, s_lyco)))
        print(f"{label:<20}{fmt(a):>8}{fmt(b):>12}{fmt(c):>12}{fmt(ratio(a, b)):>12}{fmt(ratio(a, c)):>14}"
              f"{' / '.join(m) if m[0] else '':>36}")
    if lyco and not lyco.get("error"):
        check = lyco["unfuse_check"]
        print("  LyCORIS fuse = network.merge_to: keeps no backup and applies alpha/rank twice for LoHa (timed only).")
        print(f"  LyCORIS unfuse = onfly_restore after onfly_merge ({fmt(sec(lyco, 'fuse (onfly_merge)'))} s) "
              f"{lyco['stages']['unfuse (onfly_restore)']['seconds']:.3f} s: "
              + ("bit-exact" if check["bit_exact"] else
                 f"NOT restored (max abs drift {check['max_abs_drift']:.3g}; {check['tensors'] - check['equal']} "
                 "tensors differ): on CPU onfly_merge's backup `org_weight.data.cpu()` is the weight itself, "
                 "which it then overwrites -> shown as n/a"))
    print("-" * 108)
    nd = fig["denoise_no_adapter"]
    base = nd["median"]
    print(f"unfused denoising step: UNet forward, eval, no_grad, latents {LATENT_SHAPE} (32x32 to keep CPU time "
          f"reasonable), context {CONTEXT_SHAPE}; median of {fig['reps']} after 1 warm-up call.")
    print("  overhead = adapter-on median / median of the adapters-off forwards timed alternately with them "
          "(same load); 'vs base' uses the no-adapter run before any adapter was loaded")
    print(f"  {'no adapter (base)':<26}{base:8.3f} s  (cpu {nd['cpu_median']:.3f} s; first call "
          f"{nd['first_call']:.3f} s, max other load {nd['max_other_cores']:.2f} cores)")
    overhead = {}
    for name, label in (("loha_diffusion", "loha_diffusion unfused"), ("peft", "PEFT unmerged"),
                        ("lycoris", "LyCORIS unmerged")):
        impl = impls.get(name)
        if impl is None or impl.get("error") or "denoise" not in impl:
            overhead[name] = None
            continue
        d = impl["denoise"]
        off = d.get("off_median", base)
        overhead[name] = 100.0 * (d["median"] - off) / off
        extra = ""
        if name == "lycoris":
            det = impl.get("modules_loaded_detail", {})
            extra = f" [{det.get('unet', '?')} UNet modules]"
        print(f"  {label:<26}{d['median']:8.3f} s  (cpu {d['cpu_median']:.3f} s) vs off {off:.3f} s (cpu "
              f"{d.get('off_cpu_median', float('nan')):.3f} s): overhead {overhead[name]:+6.1f} %, vs base "
              f"{100.0 * (d['median'] - base) / base:+6.1f} %; first call {d['first_call']:.3f} s, peak extra "
              f"{d['peak_extra_mib']:.0f} MiB, max other load {d['max_other_cores']:.2f}{extra}")
    if fig.get("output_checks"):
        print(f"  output checks (max abs diff of UNet outputs): {fig['output_checks']}")
    print("-" * 108)
    for name in IMPLEMENTATIONS:
        impl = impls.get(name)
        if impl is None:
            continue
        if impl.get("error"):
            print(f"  {name}: FAILED: {impl['error']}")
            continue
        print(f"  {name}: modules loaded {impl.get('modules_loaded')}; after unfuse {impl.get('unfuse_check')}; "
              f"after unload {impl.get('unload_check')}")
    print("=" * 108)
    targets = {}
    r = ratio(lf(ours), lf(peft))
    targets["load_fuse_ratio_peft"] = r
    print(f"load+fuse loha_diffusion / PEFT = {fmt(r, 2)} (target <= 0.5)"
          + ("" if r is None else ("  MET" if r <= 0.5 else "  MISSED")) + "   [keeps the original weights]")
    r_in_place = ratio(lf(ours, in_place=True), lf(peft))
    targets["load_fuse_in_place_ratio_peft"] = r_in_place
    drift = None if ours is None or ours.get("error") else ours["in_place_unfuse_check"]["max_abs_drift"]
    print(f"load+fuse in place (exact_unfuse=False) loha_diffusion / PEFT = {fmt(r_in_place, 2)} (target <= 0.5)"
          + ("" if r_in_place is None else ("  MET" if r_in_place <= 0.5 else "  MISSED"))
          + ("" if drift is None else f"   [its unfuse: max abs drift {drift:.3g}, like PEFT's]"))
    r2 = ratio(sec(ours, "unfuse"), sec(peft, "unfuse"))
    exact = None if ours is None or ours.get("error") else ours["unfuse_check"]["bit_exact"]
    targets["unfuse_ratio_peft"], targets["unfuse_bit_exact"] = r2, exact
    peft_drift = None if peft is None or peft.get("error") else peft["unfuse_check"]["max_abs_drift"]
    print(f"unfuse loha_diffusion / PEFT unmerge = {fmt(r2, 2)} (target <= 0.2), bit-exact: {exact}"
          + ("" if r2 is None else ("  MET" if r2 <= 0.2 and exact else "  MISSED"))
          + ("" if peft_drift is None else f"   [PEFT unmerge max abs drift {peft_drift:.3g}]"))
    o = overhead.get("loha_diffusion")
    targets["unfused_overhead_pct"] = o
    # the inference issue's target: at most 5% on the medium UNet (--small) at tiny latents
    print(f"unfused inference overhead loha_diffusion = {fmt(o, 2)}% (target <= 5%); "
          f"PEFT {fmt(overhead.get('peft'), 1)}%, LyCORIS {fmt(overhead.get('lycoris'), 1)}%"
          + ("" if o is None else ("  MET" if o <= 5 else "  MISSED")))
    fig["targets"] = targets
    fig["overhead_pct"] = overhead


# -- main ----------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="timed UNet forwards per configuration (after 1 warm-up)")
    parser.add_argument("--skip", default="",
                        help=f"comma-separated implementations to skip: {','.join(IMPLEMENTATIONS)}")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat load/fuse/unfuse/unload of every implementation this many times (the first "
                             "implementation rotates) and report per-stage medians; the denoising step is timed in "
                             "round 1 only")
    parser.add_argument("--json", default=None, help="write the figures to this path")
    parser.add_argument("--idle-wait", type=float, default=20.0,
                        help="before each timed block, wait up to this many seconds for other processes to go idle")
    parser.add_argument("--no-check-outputs", dest="check_outputs", action="store_false",
                        help="skip comparing UNet outputs across implementations")
    parser.add_argument("--peft-full-init", action="store_true",
                        help="PEFT: initialise adapter tensors before loading (low_cpu_mem_usage=False)")
    parser.add_argument("--per-layer", action="store_true",
                        help="only time single layer calls (ours vs PEFT LoRA / LoHa unfused) and exit")
    parser.add_argument("--latent-size", type=int, default=32,
                        help="latent height and width of the timed UNet forwards (32; SD1.5 at 512 px is 64)")
    parser.add_argument("--small", action="store_true",
                        help="smoke test: UNet channels (64, 128, 256, 256) instead of SD1.5's (320, 640, 1280, 1280)")
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - set(IMPLEMENTATIONS)
    if unknown:
        parser.error(f"unknown implementation(s) {sorted(unknown)}; choose from {', '.join(IMPLEMENTATIONS)}")
    warnings.filterwarnings("ignore")
    threads = configure_threads()
    if args.per_layer:
        log(f"per-layer overhead at 8x8 latents, {threads} threads, median of {args.reps} x 400 calls:")
        figures = per_layer_overhead(max(args.reps, 5))
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
        return 0
    LATENT_SHAPE[2:] = [args.latent_size, args.latent_size]

    import diffusers  # noqa: F401
    import peft
    import transformers

    import loha_diffusion

    try:
        import lycoris
        lycoris_version = getattr(lycoris, "__version__", None)
        if lycoris_version is None:
            from importlib.metadata import version
            lycoris_version = version("lycoris-lora")
    except ImportError:
        lycoris_version = None
    fig: dict = dict(threads=threads, reps=args.reps, rounds=args.rounds, torch=torch.__version__,
                     diffusers=diffusers.__version__,
                     transformers=transformers.__version__, peft=peft.__version__, lycoris=lycoris_version,
                     loha_diffusion=loha_diffusion.__version__, latents=LATENT_SHAPE, context=CONTEXT_SHAPE)
    log(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, lycoris {lycoris_version}, {threads} threads")

    t0 = time.perf_counter()
    unet, text_encoder = build_models(args.small)
    log(f"built full-size SD1.5 UNet + CLIP-L TE in {time.perf_counter() - t0:.1f} s; RSS {current_rss_mib():.0f} MiB")
    pipe = types.SimpleNamespace(unet=unet, text_encoder=text_encoder)
    n_unet = sum(p.numel() for p in unet.parameters()) / 1e6
    fig["unet_description"] = (f"{'SMALL (--small) ' if args.small else 'Full-size '}SD1.5 UNet "
                               f"{tuple(unet.config.block_out_channels)} ({n_unet:.1f}M params)")
    fig["te_params_m"] = sum(p.numel() for p in text_encoder.parameters()) / 1e6
    models = {"unet": unet, "text_encoder": text_encoder}
    paths = target_paths(unet, text_encoder)
    snapshot = Snapshot(models)
    log(f"saved a copy of the base weights ({snapshot.mib():.0f} MiB); RSS {current_rss_mib():.0f} MiB")
    inputs = unet_inputs()

    with tempfile.TemporaryDirectory(prefix="load_fuse_") as tmp:
        path = Path(tmp) / "loha_344_dim16.safetensors"
        names = write_loha_file(path, models, paths)
        fig["adapter_file_mib"] = os.path.getsize(path) / 2**20
        log(f"wrote {path.name}: 344 modules, {fig['adapter_file_mib']:.1f} MiB")

        log("no adapter:")
        fig["denoise_no_adapter"], base_out = time_denoise(unet, inputs, args.reps, args.idle_wait)

        log("read + resolve (loha_diffusion):")
        rr: dict = {}
        run_read_resolve(path, pipe, rr, args.idle_wait)
        fig["read_resolve"] = rr["read+resolve"]

        fig["implementations"] = {}
        outputs = {}
        runners = {
            "loha_diffusion": lambda res, d: run_loha_diffusion(path, pipe, snapshot, inputs, args, res, d),
            "peft": lambda res, d: run_peft(path, pipe, names, paths, snapshot, inputs, args, res, d),
            "lycoris": lambda res, d: run_lycoris(path, pipe, snapshot, inputs, args, res, d),
        }
        order = [n for n in IMPLEMENTATIONS if n not in skip]
        per_round: dict[str, list[dict]] = {n: [] for n in order}
        for round_index in range(args.rounds):
            shift = round_index % max(len(order), 1)
            for name in order[shift:] + order[:shift]:  # the starting implementation rotates each round
                log(f"{name}" + (f" (round {round_index + 1}/{args.rounds})" if args.rounds > 1 else "") + ":")
                res: dict = {"stages": {}}
                per_round[name].append(res)
                rss_before = current_rss_mib()
                try:
                    out = runners[name](res, round_index == 0)  # the denoising step is timed in round 1 only
                    if round_index == 0:
                        outputs[name] = out
                except Exception as exc:  # report and go on with the next implementation
                    import traceback
                    traceback.print_exc()
                    res["error"] = f"{type(exc).__name__}: {exc}"
                # the next implementation starts from the original weights and modules
                snapshot.restore()
                release_freed_memory()
                res["rss_growth_mib"] = current_rss_mib() - rss_before
                log(f"  RSS after removal vs before load: {res['rss_growth_mib']:+.0f} MiB")
        for name, results in per_round.items():
            fig["implementations"][name] = combine_rounds(results)

    if args.check_outputs:
        checks = {}
        ref = outputs.get("loha_diffusion")
        fused = fig["implementations"].get("loha_diffusion", {}).pop("_fused_out", None)
        if ref is not None:
            checks["ours unfused vs no adapter"] = (ref - base_out).abs().max().item()
            if fused is not None:
                checks["ours fused vs ours unfused"] = (fused - ref).abs().max().item()
            for name in ("peft", "lycoris"):
                if name in outputs:
                    checks[f"{name} unmerged vs ours unfused"] = (outputs[name] - ref).abs().max().item()
        fig["output_checks"] = {k: float(f"{v:.3g}") for k, v in checks.items()}
    else:
        fig["implementations"].get("loha_diffusion", {}).pop("_fused_out", None)

    report(fig)
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=2, default=str))
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
