"""Flux / SD3 files naming the original model trees (BFL's ``double_blocks``, SAI's ``joint_blocks``)
on the tiny pipelines: every algorithm against the formulas of tests/formulas.py in float64, the
stacked modules (qkv, linear1) cut into diffusers' layers by rows and the final modulations'
swapped halves put back, written out in tests/dit_files.py independently of loha_diffusion.
Also what must be refused (leaving the pipeline untouched) and what must stay low-rank.
"""
import copy

import pytest
import torch

import loha_diffusion  # noqa: F401  (attaches the pipeline methods)
from adapter_files import make_file_tensors, reference_delta
from dit_files import (  # noqa: F401  (one_thread: an autouse fixture)
    assert_weights,
    biggest_change,
    flux_modules,
    forward,
    loaded,
    make_original_file,
    one_thread,
    original_modules,
    random_tensors,
    sd3_modules,
    split,
    stacked_weight,
)
from formulas import dora_merged
from loha_diffusion.io import AdapterFileError
from loha_diffusion.layers import AdapterLayer

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "unet")


def aligned_blocks(name, out):
    """LoKr blocks that are whole rows of every layer a stacked module feeds: qkv 3 x 32 rows,
    linear1 7 x 32 (q, k, v 32 each, proj_mlp 128), the modulations 2 x 32 / 6 x 32 / 9 x 32."""
    return (out // 32, 32) if out % 32 == 0 else split(out)


def unaligned_blocks(name, out):
    """Blocks that cut through the layers: qkv 8 x 12 rows, linear1 8 x 28 rows, 64 = 4 x 16 for
    a swapped modulation (its rows come in two non-contiguous runs anyway)."""
    return {96: (8, 12), 224: (8, 28)}.get(out, (out // 16, 16) if out % 16 == 0 else split(out))


CASES = {  # algorithm of random_tensors, LoKr blocks
    "lora": ("lora", None),
    "loha": ("loha", None),
    "lokr_aligned": ("lokr", aligned_blocks),
    "lokr_aligned_lowrank_w2": ("lokr_lowrank", aligned_blocks),
    "lokr_aligned_w1_factorised": ("lokr_both", aligned_blocks),
    "lokr_unaligned": ("lokr", unaligned_blocks),
    "full": ("full", None),
    "dora": ("dora", None),
}


def merged_model(model, expected):
    """A copy of ``model`` with the expected weights (and biases) written in."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for path, (weight, bias) in expected.items():
            model.get_submodule(path).weight.copy_(weight)
            model.get_submodule(path).bias.copy_(bias)
    return model


def adapters_of(model, path):
    layer = model.get_submodule(path)
    assert isinstance(layer, AdapterLayer), path
    return list(layer.adapters.values())


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("case", list(CASES))
def test_original_tree_file_matches_formula(request, family, case):
    base = request.getfixturevalue(family)
    algo, blocks = CASES[case]
    state, expected = make_original_file(base, algo, lokr_rows=blocks)
    pipe = loaded(base, state)
    # unfused: the transformer's output is the reference's, whose weights are the expected ones
    # (through the cached W + dW, then per call: the thin path where the algorithm has one)
    reference = forward(merged_model(base.transformer, expected))
    assert (reference - forward(base.transformer)).abs().max() > 1e-3
    torch.testing.assert_close(forward(pipe.transformer), reference, atol=1e-5, rtol=1e-5)
    pipe.disable_loha_weight_cache()
    torch.testing.assert_close(forward(pipe.transformer), reference, atol=1e-5, rtol=1e-5)
    pipe.fuse_loha()
    assert biggest_change(base.transformer, expected) > 1e-2
    assert_weights(pipe.transformer, expected, base.transformer)
    if algo.startswith("lokr"):
        # aligned: rows of w1 (still a LoKr); unaligned: the whole module, rows taken from its delta
        first_q = "transformer_blocks.0.attn.to_q"
        (adapter,) = adapters_of(pipe.transformer, first_q)
        assert adapter.algorithm_name == "lokr"
        w1 = "lokr_w1_a" if algo == "lokr_both" else "lokr_w1"
        if blocks is aligned_blocks:
            assert adapter.source_rows is None and adapter.params[w1].shape[0] == 1
        else:
            assert adapter.source_rows is not None and adapter.params[w1].shape[0] == 8
    pipe.unfuse_loha()
    pipe.unload_loha_weights()
    for name, param in base.transformer.state_dict().items():
        assert torch.equal(pipe.transformer.state_dict()[name], param), name


def test_original_names_the_family_tables_cover(flux, sd3):
    """The independent tables name every Linear/Conv of the tiny transformers once (so the
    per-algorithm tests above reach every layer)."""
    for pipe in (flux, sd3):
        named = [p for _, parts, _ in original_modules(pipe) for p in parts]
        assert len(named) == len(set(named))
        named = set(named)
        layers = {p for p, m in pipe.transformer.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        assert named == layers, sorted(named ^ layers)


def test_sd3_last_context_modulation_swapped_and_others_not(sd3):
    """Only the last joint block's context modulation (and final_layer) has its halves swapped:
    the same tensors under block 0's name land in natural order."""
    block0 = [m for m in sd3_modules() if m[0] == "joint_blocks_0_context_block_adaLN_modulation_1"]
    last = [m for m in sd3_modules() if m[0] == "joint_blocks_2_context_block_adaLN_modulation_1"]
    assert block0[0][2] is False and last[0][2] is True
    for modules in (block0, last):
        state, expected = make_original_file(sd3, "lora", modules)
        pipe = loaded(sd3, state)
        pipe.fuse_loha()
        assert_weights(pipe.transformer, expected, sd3.transformer)
    # the swap is visible: the last block's delta is not its rows in file order
    (name, parts, _), = last
    up, down = state[f"lora_unet_{name}.lora_up.weight"], state[f"lora_unet_{name}.lora_down.weight"]
    delta = (up.double() @ down.double()) * 3.0 / 4
    got = (pipe.transformer.get_submodule(parts[0]).weight - sd3.transformer.get_submodule(parts[0]).weight).detach()
    got = got.double()
    torch.testing.assert_close(got, torch.cat([delta[32:], delta[:32]]), atol=1e-5, rtol=1e-5)
    assert (got - delta).abs().max() > 1e-2


def test_flux_final_layer_halves_swapped_and_alpha_applied(flux):
    """BFL's final_layer.adaLN_modulation.1 emits (shift, scale), diffusers' norm_out.linear
    (scale, shift): the file's row i is the layer's row (i + 32) mod 64. Its alpha counts
    (diffusers 0.42.1 pops final_layer alphas unused, so it is no oracle here)."""
    g = torch.Generator().manual_seed(7)
    up, down, alpha = torch.randn(64, 4, generator=g) * 0.3, torch.randn(4, 32, generator=g) * 0.3, 1.5
    name = "lora_unet_final_layer_adaLN_modulation_1"
    pipe = loaded(flux, {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down,
                         f"{name}.alpha": torch.tensor(alpha)})
    pipe.fuse_loha()
    delta = alpha / 4 * up.double() @ down.double()
    w = flux.transformer.get_submodule("norm_out.linear").weight.detach().double()
    expected = {"norm_out.linear": (w + torch.cat([delta[32:], delta[:32]]), None)}
    assert_weights(pipe.transformer, expected, flux.transformer)
    assert biggest_change(flux.transformer, expected) > 1e-2


def test_sd_scripts_split_qkv_form_loads_exactly(flux):
    """sd-scripts' ``split_qkv=True`` trains q, k, v with their own rank-r LoRA (forward: the
    concatenation of up_j(down_j(x)) * alpha/r) and saves them as one module: lora_down the three
    downs stacked (3r, in), lora_up block-diagonal (out, 3r), alpha * 3 (sd-scripts issue #2204),
    so that the usual alpha/rank gives the trained scale."""
    g = torch.Generator().manual_seed(3)
    r, alpha = 4, 2.0
    downs = [torch.randn(r, 32, generator=g) * 0.3 for _ in range(3)]
    ups = [torch.randn(32, r, generator=g) * 0.3 for _ in range(3)]
    up = torch.zeros(96, 3 * r)
    for j in range(3):
        up[32 * j: 32 * (j + 1), r * j: r * (j + 1)] = ups[j]
    name = "lora_unet_double_blocks_1_img_attn_qkv"
    state = {f"{name}.lora_down.weight": torch.cat(downs), f"{name}.lora_up.weight": up,
             f"{name}.alpha": torch.tensor(alpha * 3)}
    pipe = loaded(flux, state)
    pipe.fuse_loha()
    expected = {}
    for j, x in enumerate("qkv"):
        path = f"transformer_blocks.1.attn.to_{x}"
        w = flux.transformer.get_submodule(path).weight.double()
        expected[path] = (w.detach() + alpha / r * ups[j].double() @ downs[j].double(), None)
    assert_weights(pipe.transformer, expected, flux.transformer)
    assert biggest_change(flux.transformer, expected) > 1e-2


@pytest.mark.parametrize("family,name", [("flux", "final_layer_adaLN_modulation_1"),
                                         ("sd3", "joint_blocks_2_context_block_adaLN_modulation_1")])
@pytest.mark.parametrize("algo", ["lora", "lokr"])
def test_input_axis_dora_on_a_swapped_module_matches_formula(request, family, name, algo):
    """A per-input magnitude (LyCORIS <= 3.1) on a module whose rows are only reordered: column
    norms do not depend on row order, so it applies to the one layer as it is."""
    base = request.getfixturevalue(family)
    (module,) = [m for m in original_modules(base) if m[0] == name]
    state, _ = make_original_file(base, algo, [module])
    weight, _ = stacked_weight(base.transformer, module[1], module[2])
    tensors = {k.split(".", 1)[1]: v for k, v in state.items()}
    delta = reference_delta(tensors, weight)
    columns = (weight + delta).norm(dim=0, keepdim=True)
    dora_scale = (columns * (1 + 0.3 * torch.rand(columns.shape, generator=torch.Generator().manual_seed(4),
                                                  dtype=torch.float64))).float()
    state[f"lora_unet_{name}.dora_scale"] = dora_scale
    merged = dora_merged(weight, delta, dora_scale, 1.0, False, "lycoris")   # file row order
    h = merged.shape[0] // 2
    layer = base.transformer.get_submodule(module[1][0])
    expected = {module[1][0]: (torch.cat([merged[h:], merged[:h]]), layer.bias.detach().double())}
    pipe = loaded(base, state)
    pipe.fuse_loha()
    assert biggest_change(base.transformer, expected) > 1e-2
    assert_weights(pipe.transformer, expected, base.transformer)


# -- memory ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["lora", "loha"])
def test_low_rank_files_stay_low_rank_on_stacked_layers(flux, algo):
    """Each layer a stacked module feeds gets factors of its own rows: no adapter tensor as large
    as the layer's weight, no rows taken from a whole delta, nothing cached before a forward."""
    state, expected = make_original_file(flux, algo)
    pipe = loaded(flux, state)
    layers = [m for m in pipe.transformer.modules() if isinstance(m, AdapterLayer)]
    assert len(layers) == len(expected)
    for layer in layers:
        for adapter in layer.adapters.values():
            assert adapter.source_rows is None
            assert all(p.numel() < layer.weight.numel() for p in adapter.parameters())
        assert layer.weight_cache.params is None
    q = pipe.transformer.get_submodule("single_transformer_blocks.0.proj_mlp")
    up, down = ("lora_up.weight", "lora_down.weight") if algo == "lora" else ("hada_w1_a", "hada_w1_b")
    assert next(iter(q.adapters.values())).params[up].shape == (128, 4)   # rows 96..223 of linear1's
    # the factor every part keeps whole is each part's own tensor (one shared tensor cannot be saved)
    downs = [next(iter(pipe.transformer.get_submodule(f"transformer_blocks.0.attn.to_{x}").adapters.values()))
             .params[down] for x in "qkv"]
    assert len({t.data_ptr() for t in downs}) == 3 and torch.equal(downs[0], downs[1])


# -- refusals: nothing changes ---------------------------------------------------------------------
def snapshot(pipe):
    return {f"{c}.{k}": v.clone() for c in COMPONENTS if getattr(pipe, c, None) is not None
            for k, v in getattr(pipe, c).state_dict().items()}


def assert_refused(pipe, state, match):
    before = snapshot(pipe)
    with pytest.raises((AdapterFileError, ValueError), match=match):
        pipe.load_loha_weights(state)
    after = snapshot(pipe)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, AdapterLayer) for c in COMPONENTS if getattr(pipe, c, None) is not None
                   for m in getattr(pipe, c).modules())
    assert pipe.get_loha_adapters(flat=True) == []


def test_sdxl_file_into_flux_names_both_families(flux, sdxl):
    state, _ = make_file_tensors(sdxl, "lora", sdxl=True, unet_targets=("to_q", "to_k"), te_targets=("q_proj",))
    assert_refused(copy.deepcopy(flux), state, "looks like a sdxl adapter and the pipeline is flux")


def flux_file(seed=0):
    modules = [m for m in flux_modules() if m[0] in ("double_blocks_0_img_attn_qkv", "single_blocks_1_linear1",
                                                     "double_blocks_1_img_mlp_0")]
    g = torch.Generator().manual_seed(seed)
    shapes = {"double_blocks_0_img_attn_qkv": (96, 32), "single_blocks_1_linear1": (224, 32),
              "double_blocks_1_img_mlp_0": (128, 32)}
    return {f"lora_unet_{n}.{k}": v for n, _, _ in modules for k, v in random_tensors("lora", shapes[n], g).items()}


def test_flux_file_into_sd3_and_sdxl_is_refused(sd3, sdxl):
    assert_refused(copy.deepcopy(sd3), flux_file(), "looks like a flux adapter and the pipeline is sd3")
    assert_refused(copy.deepcopy(sdxl), flux_file(), "looks like a flux adapter and the pipeline is sdxl")


def test_sd3_and_onetrainer_flux_files_into_other_families_name_them(flux, sdxl):
    g = torch.Generator().manual_seed(0)
    sd3_file = {f"lora_unet_joint_blocks_0_x_block_attn_qkv.{k}": v
                for k, v in random_tensors("lora", (96, 32), g).items()}
    assert_refused(copy.deepcopy(flux), sd3_file, "looks like a sd3 adapter and the pipeline is flux")
    # OneTrainer Flux: diffusers paths (either DiT) and T5 as lora_te2_ (no SDXL CLIP-G path)
    onetrainer = {f"lora_transformer_transformer_blocks_0_attn_to_q.{k}": v
                  for k, v in random_tensors("lora", (32, 32), g).items()}
    onetrainer.update({f"lora_te2_encoder_block_0_layer_0_SelfAttention_q.{k}": v
                       for k, v in random_tensors("lora", (128, 128), g).items()})
    assert_refused(copy.deepcopy(sdxl), onetrainer, "looks like a flux adapter and the pipeline is sdxl")


def test_qkv_with_wrong_rows_is_refused(flux):
    state = flux_file()
    state["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = torch.randn(64, 4)
    assert_refused(copy.deepcopy(flux), state, r"double_blocks_0_img_attn_qkv.*96")


def test_input_axis_dora_on_qkv_is_refused(flux):
    state = flux_file()
    state["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"] = torch.rand(1, 32) + 0.5
    assert_refused(copy.deepcopy(flux), state, "input axis")


def test_dora_scale_of_neither_axis_on_qkv_is_refused_by_name(flux):
    state = flux_file()
    state["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"] = torch.rand(5, 1) + 0.5
    assert_refused(copy.deepcopy(flux), state, r"lora_unet_double_blocks_0_img_attn_qkv\.dora_scale: .*neither axis")


@pytest.mark.parametrize("tensors", [
    {"w_norm": torch.randn(96) * 0.1, "b_norm": torch.randn(96) * 0.1},       # norm
    {"weight": torch.randn(96) * 0.1, "on_input": torch.tensor(0)},             # IA3
])
def test_norm_and_ia3_on_a_stacked_name_are_refused(flux, tensors):
    state = flux_file()
    state.update({f"lora_unet_double_blocks_1_img_attn_qkv.{k}": v for k, v in tensors.items()})
    assert_refused(copy.deepcopy(flux), state, "double_blocks_1_img_attn_qkv")


def test_two_names_for_one_layer_are_refused(flux):
    """The original qkv and diffusers' to_q name the same layer: which one wins is not for us to guess."""
    state = flux_file()
    state.update({f"lycoris_transformer_blocks_0_attn_to_q.{k}": v
                  for k, v in random_tensors("lora", (32, 32), torch.Generator().manual_seed(1)).items()})
    assert_refused(copy.deepcopy(flux), state, "all name transformer.transformer_blocks.0.attn.to_q")


def test_comfyui_file_mixing_layouts_is_refused(flux):
    state = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight": torch.randn(4, 32),
             "diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight": torch.randn(96, 4),
             "lora_unet_double_blocks_1_img_mlp_0.lora_down.weight": torch.randn(4, 32),
             "lora_unet_double_blocks_1_img_mlp_0.lora_up.weight": torch.randn(128, 4)}
    assert_refused(copy.deepcopy(flux), state, "another layout")
