"""Adapter files for the tiny Flux / SD3 pipelines, and what they should do, built independently
of loha_diffusion.

The original-tree tables below are written out from the model sources (BFL's ``flux/model.py``,
SAI's MMDiT in ``sd3_impls.py``) and diffusers' single-file converters
(``convert_flux_transformer_checkpoint_to_diffusers``, ``convert_sd3_transformer_checkpoint_to_diffusers``),
not read from ``loha_diffusion.naming.dit``. Expected weights are W + strength * formula delta
in float64 (tests/formulas.py), with a stacked module's delta cut into its layers' rows here.
"""
import copy

import pytest
import torch

from adapter_files import reference_delta
from formulas import dora_merged

# (kohya name without "lora_unet_", diffusers paths whose output rows it stacks in order, swap)
# swap: the module emits (shift, scale) where diffusers' module emits (scale, shift).


def flux_modules(num_layers=2, num_single_layers=2):
    table = [("img_in", ["x_embedder"], False), ("txt_in", ["context_embedder"], False),
             ("final_layer_linear", ["proj_out"], False),
             ("final_layer_adaLN_modulation_1", ["norm_out.linear"], True)]
    for bfl, ours in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                      ("guidance_in", "guidance_embedder")):
        table += [(f"{bfl}_in_layer", [f"time_text_embed.{ours}.linear_1"], False),
                  (f"{bfl}_out_layer", [f"time_text_embed.{ours}.linear_2"], False)]
    for i in range(num_layers):
        b, d = f"double_blocks_{i}", f"transformer_blocks.{i}"
        table += [(f"{b}_img_attn_qkv", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], False),
                  (f"{b}_txt_attn_qkv", [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"],
                   False)]
        for bfl, ours in (("img_attn_proj", "attn.to_out.0"), ("img_mlp_0", "ff.net.0.proj"),
                          ("img_mlp_2", "ff.net.2"), ("img_mod_lin", "norm1.linear"),
                          ("txt_attn_proj", "attn.to_add_out"), ("txt_mlp_0", "ff_context.net.0.proj"),
                          ("txt_mlp_2", "ff_context.net.2"), ("txt_mod_lin", "norm1_context.linear")):
            table.append((f"{b}_{bfl}", [f"{d}.{ours}"], False))
    for i in range(num_single_layers):
        b, d = f"single_blocks_{i}", f"single_transformer_blocks.{i}"
        table += [(f"{b}_linear1", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"], False),
                  (f"{b}_linear2", [f"{d}.proj_out"], False), (f"{b}_modulation_lin", [f"{d}.norm.linear"], False)]
    return table


def sd3_modules(num_layers=3, dual_attention_layers=(0,)):
    table = [("x_embedder_proj", ["pos_embed.proj"], False), ("context_embedder", ["context_embedder"], False),
             ("t_embedder_mlp_0", ["time_text_embed.timestep_embedder.linear_1"], False),
             ("t_embedder_mlp_2", ["time_text_embed.timestep_embedder.linear_2"], False),
             ("y_embedder_mlp_0", ["time_text_embed.text_embedder.linear_1"], False),
             ("y_embedder_mlp_2", ["time_text_embed.text_embedder.linear_2"], False),
             ("final_layer_linear", ["proj_out"], False),
             ("final_layer_adaLN_modulation_1", ["norm_out.linear"], True)]
    for i in range(num_layers):
        b, d = f"joint_blocks_{i}", f"transformer_blocks.{i}"
        last = i == num_layers - 1
        table += [(f"{b}_x_block_attn_qkv", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"], False),
                  (f"{b}_x_block_attn_proj", [f"{d}.attn.to_out.0"], False),
                  (f"{b}_x_block_mlp_fc1", [f"{d}.ff.net.0.proj"], False),
                  (f"{b}_x_block_mlp_fc2", [f"{d}.ff.net.2"], False),
                  (f"{b}_x_block_adaLN_modulation_1", [f"{d}.norm1.linear"], False),
                  (f"{b}_context_block_attn_qkv",
                   [f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"], False),
                  # the last block's context side only modulates its attention input: (shift, scale)
                  (f"{b}_context_block_adaLN_modulation_1", [f"{d}.norm1_context.linear"], last)]
        if i in dual_attention_layers:
            table += [(f"{b}_x_block_attn2_qkv", [f"{d}.attn2.to_q", f"{d}.attn2.to_k", f"{d}.attn2.to_v"], False),
                      (f"{b}_x_block_attn2_proj", [f"{d}.attn2.to_out.0"], False)]
        if not last:
            table += [(f"{b}_context_block_attn_proj", [f"{d}.attn.to_add_out"], False),
                      (f"{b}_context_block_mlp_fc1", [f"{d}.ff_context.net.0.proj"], False),
                      (f"{b}_context_block_mlp_fc2", [f"{d}.ff_context.net.2"], False)]
    return table


def original_modules(pipe):
    """The table for this pipeline's transformer (its config only says how many blocks)."""
    config = pipe.transformer.config
    if hasattr(config, "num_single_layers") and config.num_single_layers is not None:
        return flux_modules(config.num_layers, config.num_single_layers)
    return sd3_modules(config.num_layers, tuple(config.dual_attention_layers or ()))


# -- tensors -----------------------------------------------------------------------------------
def split(n):
    """(a, b), a * b = n, a the largest divisor of n not above sqrt(n)."""
    a = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)
    return a, n // a


def random_tensors(algo, shape, g, rank=4, lokr_rows=None, std=0.3):
    """Random community tensors for ``algo`` on a (stacked) weight of ``shape``; alpha != rank.

    ``lokr_rows``: (a, b) with a * b = out, w1 rows a and w2 rows b (the Kronecker blocks are
    b rows high); default ``split(out)``.
    """
    out_dim, in_dim, kernel = shape[0], shape[1], tuple(shape[2:])
    flat_in = in_dim * (kernel[0] * kernel[1] if kernel else 1)

    def rnd(*size, s=std):
        return torch.randn(*size, generator=g) * s

    if algo in ("lora", "dora"):
        t = {"lora_down.weight": rnd(rank, in_dim, *kernel), "lora_up.weight": rnd(out_dim, rank, *(1,) * len(kernel)),
             "alpha": torch.tensor(3.0)}
        return t
    if algo == "loha":
        return {"hada_w1_a": rnd(out_dim, rank, s=0.5), "hada_w1_b": rnd(rank, flat_in, s=0.5),
                "hada_w2_a": rnd(out_dim, rank, s=0.5), "hada_w2_b": rnd(rank, flat_in, s=0.5),
                "alpha": torch.tensor(3.0)}
    if algo in ("lokr", "lokr_lowrank", "lokr_both"):
        a, b = lokr_rows or split(out_dim)
        c, d = split(in_dim)
        t = {"lokr_w1_a": rnd(a, 2), "lokr_w1_b": rnd(2, c)} if algo == "lokr_both" else {"lokr_w1": rnd(a, c)}
        if algo in ("lokr", "lokr_both"):  # w2 full; with w1 full too, scale 1 whatever alpha says
            t["lokr_w2"] = rnd(b, d, *kernel)
        else:
            t.update({"lokr_w2_a": rnd(b, 2), "lokr_w2_b": rnd(2, d * (kernel[0] * kernel[1] if kernel else 1))})
        return {**t, "alpha": torch.tensor(3.0)}
    if algo == "full":
        return {"diff": rnd(*shape, s=0.05), "diff_b": rnd(out_dim, s=0.05)}
    raise ValueError(algo)


def stacked_weight(transformer, parts, swap):
    """The original module's weight (and bias): the parts' rows stacked, halves swapped back."""
    layers = [transformer.get_submodule(p) for p in parts]
    weight = torch.cat([layer.weight.detach().double() for layer in layers])
    bias = torch.cat([layer.bias.detach().double() for layer in layers])
    if swap:
        h = weight.shape[0] // 2
        weight, bias = torch.cat([weight[h:], weight[:h]]), torch.cat([bias[h:], bias[:h]])
    return weight, bias


def part_rows(transformer, parts, swap):
    """The rows of the stacked delta each part takes (in the part's own order)."""
    sizes = [transformer.get_submodule(p).weight.shape[0] for p in parts]
    if swap:
        h = sizes[0] // 2
        return [torch.cat([torch.arange(h, 2 * h), torch.arange(h)])]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [torch.arange(s, s + n) for s, n in zip(starts, sizes)]


def dora_scale_for(weight, delta, g):
    """A per-output magnitude some way off the norms of W + delta (so DoRA visibly acts)."""
    norms = (weight + delta).flatten(1).norm(dim=1, keepdim=True)
    return (norms * (1 + 0.3 * torch.rand(norms.shape, generator=g, dtype=torch.float64))).float()


def make_original_file(pipe, algo, modules=None, seed=0, lokr_rows=None, alpha=True):
    """{kohya key: tensor} naming the original tree, and {diffusers path: (weight, bias)} expected
    after loading at strength 1 (float64). ``lokr_rows(name, out) -> (a, b)`` picks LoKr blocks;
    ``alpha=False``: no alpha tensors (scale 1)."""
    g = torch.Generator().manual_seed(seed)
    tr = pipe.transformer
    state, expected = {}, {}
    for name, parts, swap in modules if modules is not None else original_modules(pipe):
        weight, bias = stacked_weight(tr, parts, swap)
        rows = None if lokr_rows is None else lokr_rows(name, weight.shape[0])
        tensors = random_tensors(algo, tuple(weight.shape), g, lokr_rows=rows)
        if not alpha:
            tensors.pop("alpha", None)
        delta = reference_delta({k: v for k, v in tensors.items() if k != "diff_b"}, weight)
        if algo == "dora":
            tensors["dora_scale"] = dora_scale_for(weight, delta, g)
            new_weight = dora_merged(weight, delta, tensors["dora_scale"], 1.0, True, "lycoris")
        else:
            new_weight = weight + delta
        new_bias = bias + tensors["diff_b"].double() if "diff_b" in tensors else bias
        for path, r in zip(parts, part_rows(tr, parts, swap)):
            expected[path] = (new_weight[r], new_bias[r])
        state.update({f"lora_unet_{name}.{k}": v for k, v in tensors.items()})
    return state, expected


def diffusers_path_file(pipe, algo, prefix, paths, seed=0, component="transformer"):
    """Modules named ``prefix + diffusers path with '_'`` (lycoris_, lora_transformer_, lora_te3_...)."""
    g = torch.Generator().manual_seed(seed)
    model = getattr(pipe, component)
    state, expected = {}, {}
    for path in paths:
        layer = model.get_submodule(path)
        weight = layer.weight.detach().double()
        tensors = random_tensors(algo, tuple(weight.shape), g)
        if layer.bias is None:
            tensors.pop("diff_b", None)  # T5 has no biases
        delta = reference_delta({k: v for k, v in tensors.items() if k != "diff_b"}, weight)
        bias = None if layer.bias is None else layer.bias.detach().double()
        if "diff_b" in tensors:
            bias = bias + tensors["diff_b"].double()
        expected[path] = (weight + delta, bias)
        state.update({f"{prefix}{path.replace('.', '_')}.{k}": v for k, v in tensors.items()})
    return state, expected


# -- text encoders -----------------------------------------------------------------------------
T5 = "encoder.block.0.layer.0.SelfAttention.q"


def clip(model, path):
    """The path as this transformers version nests CLIP (5.x: no ``text_model.`` level)."""
    return path if hasattr(model, "encoder") else "text_model." + path


def text_encoder_file(pipe, encoders, algo="lora", seed=0):
    """{kohya key: tensor} and {component: {path: expected}} for one module per encoder;
    ``encoders`` lists (component, kohya name, module path)."""
    state, expected = {}, {}
    for i, (component, name, path) in enumerate(encoders):
        prefix = name[: len(name) - len(path.replace(".", "_"))]
        part, want = diffusers_path_file(pipe, algo, prefix, [path], seed=seed + i, component=component)
        assert {k.split(".")[0] for k in part} == {name}, (name, list(part))
        state.update(part)
        expected.setdefault(component, {}).update(want)
    return state, expected


def clip_name(prefix, path):
    """kohya's name of a CLIP module: always with ``text_model_``."""
    return prefix + ("text_model." + path.removeprefix("text_model.")).replace(".", "_")


def assert_components(base, pipe, expected):
    """``assert_weights`` per component of {component: {path: expected}}; each must change."""
    for component, want in expected.items():
        assert biggest_change(getattr(base, component), want) > 1e-2
        assert_weights(getattr(pipe, component), want, getattr(base, component))


# -- running -----------------------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two OpenMP
    threads wait on each other: a tiny pipeline run takes ~2 s instead of ~0.02 s. Restored after
    the module. (Used by the test modules that import it.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- transformer forward on fixed inputs ------------------------------------------------------
def flux_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(1, 6, 128, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.7]),
                img_ids=torch.randint(0, 4, (16, 3), generator=g).float(), txt_ids=torch.zeros(6, 3),
                guidance=torch.tensor([3.5]), return_dict=False)


def sd3_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 6, 128, generator=g),
                pooled_projections=torch.randn(1, 96, generator=g), timestep=torch.tensor([700.0]), return_dict=False)


INPUTS = {"flux": flux_inputs, "sd3": sd3_inputs}


def forward(transformer, family=None):
    """The transformer's output on fixed inputs (``family`` "flux" / "sd3", else from its config)."""
    family = family or ("flux" if getattr(transformer.config, "num_single_layers", None) else "sd3")
    with torch.no_grad():
        return transformer(**INPUTS[family]())[0]


# -- loading and checking ----------------------------------------------------------------------
def loaded(pipe, source, **kwargs):
    """A deep copy of ``pipe`` with ``source`` loaded."""
    pipe = copy.deepcopy(pipe)
    pipe.load_loha_weights(source, **kwargs)
    return pipe


def assert_weights(model, expected, base_model=None, atol=1e-5):
    """Each expected (weight, bias) matches ``model``'s in fp32 tolerance; every other parameter
    of ``model`` is bit-identical to ``base_model``'s. 1e-5: the fp32 delta and the add round at
    ~1e-7 relative on values below ~10, for rank <= 16 sums."""
    for path, (weight, bias) in expected.items():
        layer = model.get_submodule(path)
        torch.testing.assert_close(layer.weight.detach().double(), weight, atol=atol, rtol=1e-5, msg=path)
        if bias is not None:
            torch.testing.assert_close(layer.bias.detach().double(), bias, atol=atol, rtol=1e-5, msg=path)
    if base_model is not None:
        changed = set()
        for path, module in base_model.named_modules():
            if path in expected or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm)):
                continue
            live = model.get_submodule(path)
            for attr in ("weight", "bias"):
                theirs = getattr(module, attr, None)
                if theirs is not None and not torch.equal(getattr(live, attr), theirs):
                    changed.add(path)
        assert not changed, f"layers changed that the file does not name: {sorted(changed)}"


def biggest_change(model, expected):
    """max |expected - W| over the expected layers: a test must not pass on a no-op."""
    return max(float((w - model.get_submodule(p).weight.detach().double()).abs().max())
               for p, (w, _) in expected.items())
