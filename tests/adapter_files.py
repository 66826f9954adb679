"""Build community adapter files for the tiny pipelines, independently of loha_diffusion.

Names are made the way docs/formats.md 1.1 describes the producers making them:
``prefix + module path with '.' replaced by '_'``; SDXL UNet names come from LyCORIS'
own diffusers->SGM converter. The reference "merged" pipelines apply the formulas of
tests/formulas.py directly to the weights.
"""
import copy

import torch
from torch import nn

from formulas import ia3_delta, loha_delta, lokr_delta, lora_delta

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                "conv1", "conv2", "conv_shortcut", "time_emb_proj")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def targets(model, names):
    for path, module in model.named_modules():
        if any(path == n or path.endswith("." + n) for n in names) and isinstance(module, (nn.Linear, nn.Conv2d)):
            yield path, module


def kohya_te_name(prefix, path):
    return prefix + ("text_model." + path if not path.startswith("text_model.") else path).replace(".", "_")


def sgm_unet_name(path):
    from lycoris.utils import convert_diffusers_name_to_compvis

    return convert_diffusers_name_to_compvis("lora_unet_" + path.replace(".", "_"))  # SDXL rule


def random_module(algo, weight, rank=4, generator=None):
    """Random community tensors for ``algo`` on a weight of this shape (plain layouts)."""
    g = generator or torch.Generator().manual_seed(0)
    out_dim, in_dim, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
    flat_in = in_dim * (kernel[0] * kernel[1] if kernel else 1)

    def rnd(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    if algo == "loha":
        return {"hada_w1_a": rnd(out_dim, rank, std=0.3), "hada_w1_b": rnd(rank, flat_in, std=0.3),
                "hada_w2_a": rnd(out_dim, rank, std=0.3), "hada_w2_b": rnd(rank, flat_in, std=0.3),
                "alpha": torch.tensor(float(rank) / 2)}
    if algo == "lora":
        down = rnd(rank, in_dim, *kernel) if kernel else rnd(rank, in_dim)
        up = rnd(out_dim, rank, *(1,) * len(kernel))
        return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(rank))}
    if algo == "lokr":
        from loha_diffusion.algorithms.lokr import factorization  # shapes only
        a, b = factorization(out_dim, -1)
        c, d = factorization(in_dim, -1)
        w2 = rnd(b, d, *kernel)
        return {"lokr_w1": rnd(a, c), "lokr_w2": w2, "alpha": torch.tensor(2.0)}
    if algo.startswith("lokr_"):  # factorised layouts, rank 2: w2 only, both halves, Tucker w2 on 3x3 convs
        from peft.tuners.lokr.layer import factorization  # shapes only (PEFT's copy of LyCORIS' split)
        a, b = factorization(out_dim, -1)
        c, d = factorization(in_dim, -1)
        r = 2
        tensors = {"lokr_w1_a": rnd(a, r), "lokr_w1_b": rnd(r, c)} if algo == "lokr_both" else {"lokr_w1": rnd(a, c)}
        if algo == "lokr_tucker" and kernel and kernel != (1, 1):
            tensors.update({"lokr_w2_a": rnd(r, b), "lokr_w2_b": rnd(r, d), "lokr_t2": rnd(r, r, *kernel)})
        else:
            tensors.update({"lokr_w2_a": rnd(b, r), "lokr_w2_b": rnd(r, d * (kernel[0] * kernel[1] if kernel else 1))})
        return {**tensors, "alpha": torch.tensor(3.0)}
    if algo == "full":
        return {"diff": rnd(*weight.shape, std=0.01)}
    raise ValueError(algo)


def reference_delta(tensors, weight):
    """The formula for whichever algorithm ``tensors`` hold."""
    alpha = float(tensors["alpha"]) if "alpha" in tensors else None
    body = {k: v for k, v in tensors.items() if k != "alpha"}
    if "hada_w1_a" in body:
        return loha_delta(body, weight.shape, alpha)
    if "lora_down.weight" in body:
        return lora_delta(body, weight.shape, alpha)
    if "lokr_w1" in body or "lokr_w1_a" in body:
        return lokr_delta(body, weight.shape, alpha)
    if "diff" in body:
        return body["diff"].double()
    if "on_input" in body:
        return ia3_delta(weight.double(), body["weight"].double(), bool(body["on_input"]))
    raise ValueError(sorted(body))


def make_file_tensors(pipe, algo="loha", sdxl=False, unet_targets=UNET_TARGETS, te_targets=TE_TARGETS, seed=0):
    """{kohya key: tensor} and {(component, path): module tensors} for the pipeline."""
    g = torch.Generator().manual_seed(seed)
    state, by_module = {}, {}
    algos = algo if isinstance(algo, (list, tuple)) else [algo]
    i = 0
    for path, module in targets(pipe.unet, unet_targets):
        name = sgm_unet_name(path) if sdxl else "lora_unet_" + path.replace(".", "_")
        tensors = random_module(algos[i % len(algos)], module.weight, generator=g)
        i += 1
        by_module[("unet", path)] = tensors
        state.update({f"{name}.{k}": v for k, v in tensors.items()})
    encoders = [("text_encoder", "lora_te1_" if sdxl else "lora_te_")]
    if sdxl:
        encoders.append(("text_encoder_2", "lora_te2_"))
    for component, prefix in encoders:
        for path, module in targets(getattr(pipe, component), te_targets):
            tensors = random_module(algos[i % len(algos)], module.weight, generator=g)
            i += 1
            by_module[(component, path)] = tensors
            state.update({f"{kohya_te_name(prefix, path)}.{k}": v for k, v in tensors.items()})
    return state, by_module


def merged_reference(pipe, by_module, unet_strength=1.0, te_strength=1.0):
    """A deep copy of ``pipe`` with W += strength * formula delta, in float64 then cast."""
    ref = copy.deepcopy(pipe)
    with torch.no_grad():
        for (component, path), tensors in by_module.items():
            module = getattr(ref, component).get_submodule(path)
            strength = unet_strength if component == "unet" else te_strength
            delta = reference_delta(tensors, module.weight)
            module.weight.copy_((module.weight.double() + strength * delta).to(module.weight.dtype))
    return ref
