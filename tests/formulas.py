"""Independent reference formulas (formats.md section 2), written out plainly for the tests.

Nothing here imports loha_diffusion: these are the oracles the library is checked against.
"""
import torch


def tucker(core, w_a, w_b):
    """R[o, i, k...] = sum_ab core[a, b, k...] * w_a[a, o] * w_b[b, i]  (formats.md 2.2)."""
    return torch.einsum("ab...,ao,bi->oi...", core.double(), w_a.double(), w_b.double())


def loha_delta(t: dict, shape, alpha=None):
    """scale * (w1a @ w1b) * (w2a @ w2b) with scale = alpha / r (alpha missing => 1)."""
    r = t["hada_w1_b"].shape[0]
    scale = 1.0 if alpha is None else alpha / r
    if "hada_t1" in t:
        p1 = tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        p2 = tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        return (p1 * p2 * scale).reshape(shape)
    p1 = t["hada_w1_a"].double() @ t["hada_w1_b"].double()
    p2 = t["hada_w2_a"].double() @ t["hada_w2_b"].double()
    return (p1 * p2 * scale).reshape(shape)


def lora_delta(t: dict, shape, alpha=None):
    """scale * up @ [mid] @ down (formats.md 2.1)."""
    down = t["lora_down.weight"].double()
    up = t["lora_up.weight"].double().flatten(1)
    r = down.shape[0]
    scale = 1.0 if alpha is None else alpha / r
    if "lora_mid.weight" in t:
        mid = t["lora_mid.weight"].double()
        return (torch.einsum("oa,ab...,bi->oi...", up, mid, down.flatten(1)) * scale).reshape(shape)
    return (up @ down.flatten(1) * scale).reshape(shape)


def apply_layer(layer, x, weight):
    """The layer's own op with a replacement weight (the reference forward)."""
    if isinstance(layer, torch.nn.Linear):
        return torch.nn.functional.linear(x, weight, layer.bias)
    return layer._conv_forward(x, weight, layer.bias)
