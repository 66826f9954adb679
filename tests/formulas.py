"""Independent reference formulas (docs/formats.md section 2), written out plainly for the tests.

Nothing here imports loha_diffusion: these are the oracles the library is checked against.
"""
import torch


def tucker(core, w_a, w_b):
    """R[o, i, k...] = sum_ab core[a, b, k...] * w_a[a, o] * w_b[b, i]  (docs/formats.md 2.2)."""
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
    """scale * up @ [mid] @ down (docs/formats.md 2.1)."""
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


def lokr_delta(t: dict, shape, alpha=None):
    """scale * kron(w1, w2) (docs/formats.md 2.3), with torch.kron; scale 1 if both halves are full."""
    w1 = t["lokr_w1"].double() if "lokr_w1" in t else t["lokr_w1_a"].double() @ t["lokr_w1_b"].double()
    if "lokr_w2" in t:
        w2 = t["lokr_w2"].double()
    elif "lokr_t2" in t:
        w2 = tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"].flatten(1))
    else:
        w2 = t["lokr_w2_a"].double() @ t["lokr_w2_b"].double().flatten(1)
    w2 = w2.reshape(w2.shape[0], -1, *shape[2:]).contiguous()  # torch.kron needs contiguous factors
    for _ in shape[2:]:
        w1 = w1.unsqueeze(-1)
    r = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    scale = 1.0 if alpha is None or r is None else alpha / r
    return (torch.kron(w1, w2) * scale).reshape(shape)


def ia3_delta(weight, w, on_input: bool):
    """dW = W * w per output row (or per input column), so that W' = W * (1 + m*w) (docs/formats.md 2.5)."""
    w = w.double().flatten()
    weight = weight.double()
    if on_input:
        return torch.stack([weight[:, i] * w[i] for i in range(weight.shape[1])], dim=1)
    return torch.stack([weight[o] * w[o] for o in range(weight.shape[0])], dim=0)


def dora_merged(weight, scaled_delta, dora_scale, m, output_axis: bool, semantics: str):
    """W' of docs/formats.md 2.6, with plain loops over the axis; eps as LyCORIS (fp32 machine eps)."""
    weight, v = weight.double(), weight.double() + scaled_delta.double()
    eps = torch.finfo(torch.float32).eps
    mag = dora_scale.double().flatten()
    out = torch.empty_like(v)
    if output_axis:
        for o in range(v.shape[0]):
            s = mag[o] / (v[o].pow(2).sum().sqrt() + eps)
            out[o] = v[o] * (m * (s - 1) + 1) if semantics == "lycoris" else weight[o] + m * (v[o] * s - weight[o])
    else:
        for i in range(v.shape[1]):
            s = mag[i] / (v[:, i].pow(2).sum().sqrt() + eps)
            w, col = weight[:, i], v[:, i]
            out[:, i] = col * (m * (s - 1) + 1) if semantics == "lycoris" else w + m * (col * s - w)
    return out
