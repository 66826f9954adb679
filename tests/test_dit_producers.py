"""Flux / SD3 files as their producers write them, against the producers' own forward.

Oracles: LyCORIS' wrapper on the diffusers transformer (``create_lycoris`` + ``apply_to``, as
SimpleTuner trains; its forward, never its merge, which applies the LoHa/LoKr scale twice),
diffusers' own ``load_lora_weights`` of a kohya sd-scripts file, a PEFT-injected transformer saved
with ``FluxPipeline.save_lora_weights``; and for the other layouts (ComfyUI dotted paths,
OneTrainer / LyCORIS names, the text encoders' kohya prefixes) the formulas of tests/formulas.py.
"""
import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import loha_diffusion  # noqa: F401  (attaches the pipeline methods)
from dit_files import (  # noqa: F401  (one_thread: an autouse fixture)
    T5,
    assert_components,
    assert_weights,
    biggest_change,
    clip,
    clip_name,
    diffusers_path_file,
    forward,
    loaded,
    make_original_file,
    one_thread,
    original_modules,
    text_encoder_file,
)
from tiny_dit import run_tiny_dit_pipeline


def assert_same_output(ours, theirs, base):
    """fp32 tolerance: outputs are |y| < ~10 after a handful of blocks; both sides compute the same
    sums in other orders (LyCORIS adds its delta path to the base output, we run W + dW), which
    differ by a few fp32 ulps per op, ~1e-6 here. The adapter must move the output far more."""
    assert (theirs - base).abs().max() > 1e-3
    scale = max(1.0, float(theirs.abs().max()))
    torch.testing.assert_close(ours, theirs, atol=1e-5 * scale, rtol=1e-5)


# -- LyCORIS' wrapper (SimpleTuner) -----------------------------------------------------------------
# A preset as SimpleTuner's lycoris_config passes it to LycorisNetwork.apply_preset, broader than its
# default ("Attention", "FeedForward"; diffusers' Flux attention class is FluxAttention) so that every
# layer is reached: whole blocks (attention, feed-forward, modulations, the single blocks' proj_mlp /
# proj_out) and the embedders, the output projection and the final modulation.
LYCORIS_PRESET = {"target_module": ["FluxTransformerBlock", "FluxSingleTransformerBlock", "JointTransformerBlock",
                                    "PatchEmbed"],
                  "target_name": ["x_embedder", "context_embedder", "proj_out", "norm_out.linear",
                                  r"time_text_embed\..*linear_\d"]}
LYCORIS_CASES = {
    "lora": dict(algo="lora"),
    "loha": dict(algo="loha"),
    "lokr_factor_4": dict(algo="lokr", factor=4),
    "lokr_decompose_both": dict(algo="lokr", decompose_both=True, factor=16, unbalanced_factorization=True,
                                linear_dim=2),
    # full-dimension LoKr (SimpleTuner's recommended LoKr): both halves full, scale 1, alpha = dim,
    # which is inf in an fp16 file
    "lokr_full_dimension_fp16": dict(algo="lokr", full_matrix=True, linear_dim=100000, dtype=torch.float16),
    "full": dict(algo="full"),
}
# tensors each case must produce (so that the case is what its name says)
LYCORIS_TENSORS = {"lora": {"lora_down.weight", "lora_up.weight", "alpha"},
                   "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
                   "lokr_factor_4": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"},
                   "lokr_decompose_both": {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha"},
                   "lokr_full_dimension_fp16": {"lokr_w1", "lokr_w2", "alpha"},
                   "full": {"diff", "diff_b"}}


@pytest.fixture
def lycoris_preset(monkeypatch):
    from lycoris import LycorisNetwork

    for attribute in ("TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "ENABLE_CONV", "MODULE_ALGO_MAP",
                      "NAME_ALGO_MAP", "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME"):
        monkeypatch.setattr(LycorisNetwork, attribute, getattr(LycorisNetwork, attribute))  # restored after
    LycorisNetwork.apply_preset(LYCORIS_PRESET)


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("case", list(LYCORIS_CASES))
def test_lycoris_wrapper_file_matches_lycoris_forward(request, lycoris_preset, tmp_path, family, case):
    from lycoris import create_lycoris

    pipe = request.getfixturevalue(family)
    options = dict(LYCORIS_CASES[case])
    dtype = options.pop("dtype", torch.float32)
    producer = copy.deepcopy(pipe.transformer)
    base = forward(producer, family)
    network = create_lycoris(producer, 1.0, linear_dim=options.pop("linear_dim", 4), linear_alpha=2, **options)
    network.apply_to()
    # LyCORIS starts at a zero delta: every tensor random, values the file's dtype holds exactly
    g = torch.Generator().manual_seed(1)
    state = network.state_dict()
    layers = [m for m in pipe.transformer.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len({k.split(".")[0] for k in state}) == len(layers)       # the preset reaches every layer
    assert LYCORIS_TENSORS[case] <= {k.split(".", 1)[1] for k in state}
    randomised = {k: v if k.endswith("alpha") else (torch.randn(v.shape, generator=g) * 0.2).to(dtype).float()
                  for k, v in state.items()}
    network.load_state_dict(randomised)
    expected = forward(producer, family)
    path = tmp_path / "lycoris.safetensors"
    network.save_weights(str(path), dtype, {"lycoris_config": json.dumps(LYCORIS_CASES[case], default=str)})
    if case == "lokr_full_dimension_fp16":
        from safetensors.torch import load_file

        assert torch.isinf(load_file(str(path))["lycoris_proj_out.alpha"])

    ours = loaded(pipe, path)
    assert_same_output(forward(ours.transformer, family), expected, base)


# -- diffusers' kohya Flux reader ---------------------------------------------------------------
def kohya_flux_lora(flux, seed=0):
    """An sd-scripts Flux LoRA (networks/lora_flux.py names): double and single blocks with
    alphas != rank, block 1's img qkv in the ``split_qkv`` form, and CLIP-L q/out projections.

    Left out, as diffusers 0.42.1 cannot read them on a tiny Flux: ``single_blocks_*_linear1``
    (its converter hard-codes Flux.1's 3072/12288 row split), ``img_in``, ``txt_in``, ``time_in``,
    ``vector_in``, ``guidance_in`` (converted without the ``transformer.`` prefix, then silently
    dropped) and ``final_layer`` (alphas popped unused). test_dit_loading checks them against the
    formulas."""
    g = torch.Generator().manual_seed(seed)
    tr, state = flux.transformer, {}
    skipped = ("linear1", "img_in", "txt_in", "time_in", "vector_in", "guidance_in", "final_layer")
    for j, (name, parts, _) in enumerate(original_modules(flux)):
        if any(s in name for s in skipped):
            continue
        out = sum(tr.get_submodule(p).weight.shape[0] for p in parts)
        in_features, r = tr.get_submodule(parts[0]).weight.shape[1], 4
        key = f"lora_unet_{name}"
        if name == "double_blocks_1_img_attn_qkv":  # sd-scripts split_qkv: block-diagonal up, rank 3r
            up = torch.zeros(out, 3 * r)
            for i in range(3):
                up[32 * i: 32 * (i + 1), r * i: r * (i + 1)] = torch.randn(32, r, generator=g) * 0.3
            state.update({f"{key}.lora_down.weight": torch.randn(3 * r, 32, generator=g) * 0.3,
                          f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(6.0)})
            continue
        state.update({f"{key}.lora_down.weight": torch.randn(r, in_features, generator=g) * 0.3,
                      f"{key}.lora_up.weight": torch.randn(out, r, generator=g) * 0.3,
                      f"{key}.alpha": torch.tensor(float(1 + j % 5))})
    for proj, r in (("q_proj", 4), ("out_proj", 2)):   # diffusers needs an out_proj to tell the layout
        key = f"lora_te1_text_model_encoder_layers_0_self_attn_{proj}"
        state.update({f"{key}.lora_down.weight": torch.randn(r, 32, generator=g) * 0.5,
                      f"{key}.lora_up.weight": torch.randn(32, r, generator=g) * 0.5,
                      f"{key}.alpha": torch.tensor(3.0)})
    return state


def test_kohya_flux_lora_matches_diffusers(flux):
    state = kohya_flux_lora(flux)
    theirs = copy.deepcopy(flux)
    theirs.load_lora_weights({k: v.clone() for k, v in state.items()})
    from peft.tuners.tuners_utils import BaseTunerLayer

    peft_layers = [m for c in (theirs.transformer, theirs.text_encoder) for m in c.modules()
                   if isinstance(m, BaseTunerLayer)]
    assert len(peft_layers) == 2 * 14 + 2 * 2 + 2        # diffusers took every module of the file
    ours = loaded(flux, state)
    expected, base = run_tiny_dit_pipeline(theirs), run_tiny_dit_pipeline(flux)
    assert np.abs(expected - base).max() > 1e-2
    # images in [0, 1] through 2 steps and the VAE; the two differ by fp32 rounding (~1e-6)
    np.testing.assert_allclose(run_tiny_dit_pipeline(ours), expected, atol=1e-4, rtol=0)


# -- diffusers' own LoRA files (transformer.<path>.lora_A.weight) -----------------------------------
@pytest.mark.parametrize("with_metadata", [True, False])
def test_diffusers_lora_file_matches_writer(flux, tmp_path, with_metadata):
    """What diffusers' Flux training scripts write: PEFT LoRA on the transformer, saved with
    ``FluxPipeline.save_lora_weights`` (with ``lora_adapter_metadata`` alphas, or without them:
    scale 1, so the writer is made with alpha = r there)."""
    from diffusers import FluxPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "proj_mlp", "proj_out", "ff.net.2",
               "norm1.linear", "x_embedder"]
    patterns = {"alpha_pattern": {"proj_mlp": 3}, "rank_pattern": {"ff.net.2": 2}} if with_metadata else {}
    config = LoraConfig(r=4, lora_alpha=8 if with_metadata else 4, init_lora_weights=False, target_modules=targets,
                        **patterns)
    writer = copy.deepcopy(flux.transformer)
    base = forward(writer, "flux")
    torch.manual_seed(0)
    inject_adapter_in_model(config, writer)
    expected = forward(writer, "flux")
    metadata = {"transformer_lora_adapter_metadata": config.to_dict()} if with_metadata else {}
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(writer), **metadata)
    ours = loaded(flux, tmp_path / "pytorch_lora_weights.safetensors")
    assert_same_output(forward(ours.transformer, "flux"), expected, base)


def test_peft_style_file_naming_the_original_tree(flux):
    """``transformer.<original path>.lora_A.weight`` / ``lora_B.weight`` (PEFT tensor names, no alpha:
    scale 1) for stacked, swapped and plain original modules alike."""
    names = ("double_blocks_0_img_attn_qkv", "final_layer_adaLN_modulation_1", "double_blocks_0_img_mlp_0", "img_in")
    modules = [m for m in original_modules(flux) if m[0] in names]
    state, expected = make_original_file(flux, "lora", modules, alpha=False)
    dotted_paths = {"double_blocks_0_img_attn_qkv": "double_blocks.0.img_attn.qkv", "img_in": "img_in",
                    "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1",
                    "double_blocks_0_img_mlp_0": "double_blocks.0.img_mlp.0"}
    peft = {}
    for key, value in state.items():
        name, tensor = key.removeprefix("lora_unet_").split(".", 1)
        side = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}[tensor]
        peft[f"transformer.{dotted_paths[name]}.{side}"] = value
    pipe = loaded(flux, peft)
    pipe.fuse_loha()
    assert_components(flux, pipe, {"transformer": expected})


# -- other transformer layouts, against the formulas -----------------------------------------------
FLUX_PATHS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_v_proj", "transformer_blocks.0.ff.net.2",
              "single_transformer_blocks.1.proj_mlp", "single_transformer_blocks.0.proj_out", "norm_out.linear",
              "time_text_embed.guidance_embedder.linear_1", "x_embedder"]


@pytest.mark.parametrize("prefix", ["lycoris_", "lora_transformer_", "lora_unet_"])
@pytest.mark.parametrize("algo", ["lora", "loha", "lokr_lowrank"])
def test_diffusers_tree_names_match_formula(flux, prefix, algo):
    """LyCORIS' wrapper / SimpleTuner (``lycoris_``), OneTrainer (``lora_transformer_``) and
    kohya-style (``lora_unet_``) names of diffusers' own module paths: no stacking, no swap."""
    state, expected = diffusers_path_file(flux, algo, prefix, FLUX_PATHS)
    pipe = loaded(flux, state)
    pipe.fuse_loha()
    assert biggest_change(flux.transformer, expected) > 1e-2
    assert_weights(pipe.transformer, expected, flux.transformer)


def test_sd3_diffusers_tree_names_match_formula(sd3):
    paths = ["transformer_blocks.0.attn2.to_k", "transformer_blocks.2.norm1_context.linear", "pos_embed.proj",
             "transformer_blocks.1.attn.add_q_proj"]
    state, expected = diffusers_path_file(sd3, "loha", "lycoris_", paths)
    pipe = loaded(sd3, state)
    pipe.fuse_loha()
    assert_weights(pipe.transformer, expected, sd3.transformer)


T5_FF = "encoder.block.1.layer.1.DenseReluDense.wi_0"


def test_flux_text_encoder_prefixes(flux):
    """Flux: ``lora_te1_`` CLIP-L (text_encoder), ``lora_te3_`` T5 (text_encoder_2; kohya keeps
    SD3's numbering), CLIP names with ``text_model_``."""
    q = clip(flux.text_encoder, "encoder.layers.0.self_attn.q_proj")
    state, expected = text_encoder_file(flux, [
        ("text_encoder", clip_name("lora_te1_", q), q),
        ("text_encoder_2", "lora_te3_" + T5.replace(".", "_"), T5),
        ("text_encoder_2", "lora_te3_" + T5_FF.replace(".", "_"), T5_FF)], algo="loha")
    pipe = loaded(flux, state)
    pipe.fuse_loha()
    assert_components(flux, pipe, expected)
    assert set(pipe.get_loha_adapters()) == {"text_encoder", "text_encoder_2"}


def test_sd3_text_encoder_prefixes(sd3):
    """SD3: ``lora_te1_`` CLIP-L, ``lora_te2_`` CLIP-G (text_encoder_2), ``lora_te3_`` T5 (text_encoder_3)."""
    q = clip(sd3.text_encoder, "encoder.layers.0.self_attn.q_proj")
    fc1 = clip(sd3.text_encoder_2, "encoder.layers.1.mlp.fc1")
    state, expected = text_encoder_file(sd3, [
        ("text_encoder", clip_name("lora_te1_", q), q), ("text_encoder_2", clip_name("lora_te2_", fc1), fc1),
        ("text_encoder_3", "lora_te3_" + T5.replace(".", "_"), T5)])
    pipe = loaded(sd3, state)
    pipe.fuse_loha()
    assert_components(sd3, pipe, expected)
    assert set(pipe.get_loha_adapters()) == {"text_encoder", "text_encoder_2", "text_encoder_3"}


def test_onetrainer_flux_file_with_t5_as_te2(flux):
    """OneTrainer's Flux files: ``lora_transformer_`` + diffusers paths, CLIP-L ``lora_te1_`` and
    T5 as ``lora_te2_`` (ComfyUI maps ``lora_te2_`` and ``lora_te3_`` to Flux's T5, comfy/lora.py)."""
    q = clip(flux.text_encoder, "encoder.layers.0.self_attn.q_proj")
    state, expected = diffusers_path_file(flux, "lora", "lora_transformer_", FLUX_PATHS[:3])
    te_state, te_expected = text_encoder_file(flux, [("text_encoder", clip_name("lora_te1_", q), q),
                                                     ("text_encoder_2", "lora_te2_" + T5.replace(".", "_"), T5)])
    pipe = loaded(flux, {**state, **te_state})
    pipe.fuse_loha()
    assert_components(flux, pipe, {"transformer": expected, **te_expected})


# -- ComfyUI / BFL dotted paths ----------------------------------------------------------------------
def dotted(state, transformer_prefix="diffusion_model.", peft_names=False):
    """The kohya file in ComfyUI's layout: original dotted module paths and kohya tensor names (or
    lora_A / lora_B), under ``diffusion_model.`` / ``transformer.`` and ``text_encoders.<clip>.transformer.``."""
    encoders = {"lora_te1_": "text_encoders.clip_l.transformer.", "lora_te2_": "text_encoders.clip_g.transformer.",
                "lora_te3_": "text_encoders.t5xxl.transformer."}
    out = {}
    for key, value in state.items():
        name, tensor = key.split(".", 1)
        if peft_names:
            tensor = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(tensor, tensor)
        if name.startswith("lora_unet_"):
            out[transformer_prefix + ORIGINAL_DOTTED[name.removeprefix("lora_unet_")] + "." + tensor] = value
        else:
            prefix = name[:9]
            out[encoders[prefix] + TE_DOTTED[name[9:]] + "." + tensor] = value
    return out


ORIGINAL_DOTTED = {"double_blocks_0_img_attn_qkv": "double_blocks.0.img_attn.qkv",
                   "double_blocks_1_txt_attn_qkv": "double_blocks.1.txt_attn.qkv",
                   "single_blocks_0_linear1": "single_blocks.0.linear1",
                   "double_blocks_0_img_mlp_2": "double_blocks.0.img_mlp.2",
                   "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1",
                   "joint_blocks_0_x_block_attn2_qkv": "joint_blocks.0.x_block.attn2.qkv",
                   "joint_blocks_2_context_block_adaLN_modulation_1": "joint_blocks.2.context_block.adaLN_modulation.1",
                   "x_embedder_proj": "x_embedder.proj"}
TE_DOTTED = {"text_model_encoder_layers_0_self_attn_q_proj": "text_model.encoder.layers.0.self_attn.q_proj",
             "text_model_encoder_layers_1_mlp_fc1": "text_model.encoder.layers.1.mlp.fc1",
             T5.replace(".", "_"): T5}


def dotted_case(pipe, family, algo="lora"):
    names = [n for n in ORIGINAL_DOTTED if (n.startswith(("joint", "x_emb")) == (family == "sd3"))
             or n.startswith("final_layer")]
    modules = [m for m in original_modules(pipe) if m[0] in names]
    assert len(modules) == len(names)
    state, expected = make_original_file(pipe, algo, modules)
    q = clip(pipe.text_encoder, "encoder.layers.0.self_attn.q_proj")
    fc1 = clip(pipe.text_encoder, "encoder.layers.1.mlp.fc1")
    encoders = [("text_encoder", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", q)]
    if family == "sd3":
        encoders += [("text_encoder_2", "lora_te2_text_model_encoder_layers_1_mlp_fc1", fc1),
                     ("text_encoder_3", "lora_te3_" + T5.replace(".", "_"), T5)]
    else:
        encoders += [("text_encoder_2", "lora_te3_" + T5.replace(".", "_"), T5)]
    te_state, te_expected = text_encoder_file(pipe, encoders, algo, seed=5)
    return {**state, **te_state}, {"transformer": expected, **te_expected}


@pytest.mark.parametrize("family,transformer_prefix,peft_names", [
    ("flux", "diffusion_model.", False), ("flux", "transformer.", False), ("flux", "diffusion_model.", True),
    ("sd3", "diffusion_model.", False)])
def test_comfyui_dotted_files_match_formula(request, family, transformer_prefix, peft_names):
    base = request.getfixturevalue(family)
    state, expected = dotted_case(base, family)
    file = dotted(state, transformer_prefix, peft_names)
    assert all(k.startswith((transformer_prefix, "text_encoders.")) for k in file)
    pipe = loaded(base, file)
    pipe.fuse_loha()
    assert_components(base, pipe, expected)


def test_comfyui_dotted_file_from_disk_with_loha(flux, tmp_path):
    state, expected = dotted_case(flux, "flux", "loha")
    path = tmp_path / "comfy.safetensors"
    save_file(dotted(state), str(path))
    pipe = loaded(flux, path)
    pipe.fuse_loha()
    assert_components(flux, pipe, expected)


# -- XLabs-AI's Flux LoRA layout -----------------------------------------------------------------
def test_xlabs_flux_lora_matches_diffusers(flux):
    """XLabs' processor names (qkv_lora1/2, proj_lora1/2, single blocks' qkv_lora over linear1's
    q, k, v rows and proj_lora), down/up tensors, no alphas; some keys with ``diffusion_model.``:
    our fused weights are what diffusers' own XLabs converter merges."""
    g = torch.Generator().manual_seed(7)
    width, state = 32, {}

    def pair(path, rows, cols):
        state[f"{path}.down.weight"] = torch.randn(4, cols, generator=g) * 0.3
        state[f"{path}.up.weight"] = torch.randn(rows, 4, generator=g) * 0.3

    for i in range(2):
        for side in ("1", "2"):
            pair(f"double_blocks.{i}.processor.qkv_lora{side}", 3 * width, width)
            pair(f"double_blocks.{i}.processor.proj_lora{side}", width, width)
    pair("diffusion_model.single_blocks.0.processor.qkv_lora", 3 * width, width)
    pair("single_blocks.1.processor.proj_lora", width, width + 128)

    theirs = copy.deepcopy(flux)
    theirs.load_lora_weights(dict(state))
    theirs.fuse_lora()
    theirs.unload_lora_weights()
    ours = loaded(flux, dict(state))
    ours.fuse_loha()
    expected = {k: v for k, v in theirs.transformer.state_dict().items()}
    got = {k.replace(".base_layer", ""): v for k, v in ours.transformer.state_dict().items() if ".adapters." not in k}
    assert expected.keys() == got.keys()
    changed = [k for k in expected if not torch.equal(expected[k], flux.transformer.state_dict()[k])]
    assert len(changed) == 2 * 8 + 3 + 1  # q/k/v/out, add_q/k/v/add_out per double block; q/k/v; proj_out
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    # and the formula for one row block: single block 0's to_k takes rows D..2D of qkv_lora's up
    name = "diffusion_model.single_blocks.0.processor.qkv_lora"
    delta = state[f"{name}.up.weight"][width:2 * width].double() @ state[f"{name}.down.weight"].double()
    key = "single_transformer_blocks.0.attn.to_k.weight"
    torch.testing.assert_close(got[key].double(), flux.transformer.state_dict()[key].double() + delta,
                               rtol=0, atol=1e-6)
