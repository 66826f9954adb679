"""LoHaConfig / LoHaModel: PEFT-compatible surface, patterns, freezing, errors."""
import numpy as np
import pytest
import torch
from peft import LoHaConfig as PeftLoHaConfig
from peft import inject_adapter_in_model
from peft.utils.other import get_pattern_key
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from loha_diffusion import AdapterLayer, LoHaConfig, LoHaModel, LoRAConfig

TE_TARGETS = ["k_proj", "q_proj", "v_proj", "out_proj", "fc1", "fc2"]


def tiny_text_encoder():
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16)
    return CLIPTextModel(cfg).eval()


def test_same_outputs_as_peft_loha_on_a_text_encoder():
    ours = LoHaModel(tiny_text_encoder(), LoHaConfig(r=4, alpha=8, target_modules=TE_TARGETS, init_weights=False))
    theirs = tiny_text_encoder()
    inject_adapter_in_model(PeftLoHaConfig(r=4, alpha=8, target_modules=TE_TARGETS), theirs)
    paths = [p for p, m in ours.model.named_modules() if isinstance(m, AdapterLayer)]
    assert len(paths) == 12
    with torch.no_grad():
        for path in paths:
            peft_layer = theirs.get_submodule(path)
            for name, tensor in ours.model.get_submodule(path).adapters["default"].params.items():
                getattr(peft_layer, name)["default"].copy_(tensor)
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).last_hidden_state, theirs(ids).last_hidden_state, rtol=1e-4, atol=1e-5)
        with ours.disable_adapter():
            plain = ours(ids).last_hidden_state
        torch.testing.assert_close(plain, tiny_text_encoder()(ids).last_hidden_state)


def test_wrapper_behaves_like_the_model():
    encoder = tiny_text_encoder()
    wrapped = LoHaModel(encoder, LoHaConfig(r=2, lora_alpha=32, target_modules=TE_TARGETS))
    assert wrapped.config is encoder.config
    assert wrapped.dtype == torch.float32 and wrapped.device.type == "cpu"
    assert wrapped.get_submodule("model.encoder") is encoder.encoder
    assert wrapped.peft_config["default"].alpha == 32


def test_only_adapter_tensors_train():
    wrapped = LoHaModel(tiny_text_encoder(), LoHaConfig(r=2, target_modules=TE_TARGETS))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default." in n for n in trainable)
    trainable_count, total = wrapped.get_nb_trainable_parameters()
    # 12 Linear layers, each (out*r + r*in) * 2 factors with r = 2; hidden 32, fc1 32->64, fc2 64->32
    per_layer = {"q": 2 * 2 * (32 + 32), "fc": 2 * 2 * (64 + 32)}
    assert trainable_count == 2 * (4 * per_layer["q"] + 2 * per_layer["fc"])
    out = wrapped(torch.randint(0, 100, (1, 16))).last_hidden_state
    out.pow(2).mean().backward()
    assert all(p.grad is None for n, p in wrapped.named_parameters() if not p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in wrapped.named_parameters() if p.requires_grad)


def test_rank_and_alpha_patterns_follow_peft():
    rank_pattern = {"layers.0.self_attn.q_proj": 3, "fc1": 5, r"layers\.1\..*_proj": 6}
    alpha_pattern = {"fc2": 1.0, "q_proj": 7.0}
    wrapped = LoHaModel(tiny_text_encoder(), LoHaConfig(r=2, alpha=4, target_modules=TE_TARGETS,
                                                       rank_pattern=rank_pattern, alpha_pattern=alpha_pattern))
    checked = 0
    for path, layer in wrapped.model.named_modules():
        if isinstance(layer, AdapterLayer):
            r_key = get_pattern_key(rank_pattern.keys(), path)       # PEFT's own rule as the oracle
            a_key = get_pattern_key(alpha_pattern.keys(), path)
            adapter = layer.adapters["default"]
            assert adapter.rank == rank_pattern.get(r_key, 2), path
            assert float(adapter.alpha) == alpha_pattern.get(a_key, 4), path
            checked += 1
    assert checked == 12


def test_regex_targets_and_exclusions():
    wrapped = LoHaModel(tiny_text_encoder(), LoHaConfig(target_modules=r".*layers\.\d+\.self_attn\.(q|v)_proj",
                                                       exclude_modules=["layers.1.self_attn.v_proj"]))
    paths = sorted(p for p, m in wrapped.model.named_modules() if isinstance(m, AdapterLayer))
    assert [p.split("layers.")[1] for p in paths] == ["0.self_attn.q_proj", "0.self_attn.v_proj", "1.self_attn.q_proj"]


def test_several_adapters_set_delete_merge_unload():
    encoder = tiny_text_encoder()
    original = {k: v.clone() for k, v in encoder.state_dict().items()}
    wrapped = LoHaModel(encoder, LoHaConfig(r=2, target_modules=TE_TARGETS, init_weights=False), "a")
    wrapped.add_adapter("b", LoRAConfig(r=3, target_modules=["fc1"], init_weights=False))
    ids = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        only_a = wrapped(ids).last_hidden_state
        wrapped.set_adapter(["a", "b"])
        both = wrapped(ids).last_hidden_state
        assert not torch.allclose(only_a, both)
        wrapped.merge_adapter()
        torch.testing.assert_close(wrapped(ids).last_hidden_state, both, rtol=1e-4, atol=1e-5)
        wrapped.unmerge_adapter()
        wrapped.delete_adapter("b")
        assert wrapped.active_adapters == ["a"]
        torch.testing.assert_close(wrapped(ids).last_hidden_state, only_a)
    unloaded = wrapped.unload()
    assert unloaded is encoder and not any(isinstance(m, AdapterLayer) for m in encoder.modules())
    assert all(torch.equal(v, original[k]) for k, v in encoder.state_dict().items())


def test_merge_and_unload_keeps_the_delta():
    encoder = tiny_text_encoder()
    wrapped = LoHaModel(encoder, LoHaConfig(r=2, target_modules=["fc2"], init_weights=False))
    ids = torch.randint(0, 100, (1, 16))
    with torch.no_grad():
        adapted = wrapped(ids).last_hidden_state
        merged = wrapped.merge_and_unload()
        assert isinstance(merged.encoder.layers[0].mlp.fc2, nn.Linear)
        torch.testing.assert_close(merged(ids).last_hidden_state, adapted, rtol=1e-4, atol=1e-5)


def test_low_cpu_mem_usage_keeps_tensors_on_meta_until_loaded():
    source = LoHaModel(tiny_text_encoder(), LoHaConfig(r=2, target_modules=["q_proj"], init_weights=False))
    state = {k.replace("model.", "base_model.model.", 1).replace(".adapters.default", ""): v
             for k, v in source.state_dict().items() if ".adapters.default." in k}
    lazy = LoHaModel(tiny_text_encoder(), LoHaConfig(r=2, target_modules=["q_proj"]), low_cpu_mem_usage=True)
    assert all(p.is_meta for n, p in lazy.named_parameters() if ".adapters." in n)
    ids = torch.randint(0, 100, (1, 16))
    with pytest.raises(RuntimeError, match="meta device"):
        lazy(ids)
    lazy.load_adapter_weights(state)
    with torch.no_grad():
        torch.testing.assert_close(lazy(ids).last_hidden_state, source(ids).last_hidden_state)
    assert all(p.requires_grad for n, p in lazy.named_parameters() if ".adapters." in n)


def test_bad_state_dict_loads_nothing():
    wrapped = LoHaModel(tiny_text_encoder(), LoHaConfig(r=2, target_modules=["q_proj"]))
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    good = {k.replace(".adapters.default", ""): torch.ones_like(v)
            for k, v in before.items() if ".adapters.default." in k}
    bad = dict(good)
    bad[next(iter(bad))] = torch.ones(3, 3)
    with pytest.raises(ValueError, match="wrong shapes"):
        wrapped.load_adapter_weights({k.removeprefix("model."): v for k, v in bad.items()})
    assert all(torch.equal(v, before[k]) for k, v in wrapped.state_dict().items())


# -- clear errors -------------------------------------------------------------------------------
def test_target_matching_nothing_lists_available_names():
    with pytest.raises(ValueError, match=r"matched no module.*q_proj"):
        LoHaModel(tiny_text_encoder(), LoHaConfig(target_modules=["to_q"]))


def test_unsupported_layer_type_is_named():
    with pytest.raises(TypeError, match=r"token_embedding.*Embedding"):
        LoHaModel(tiny_text_encoder(), LoHaConfig(target_modules=["token_embedding"]))


@pytest.mark.parametrize("bad", [0, -4, 2.5])
def test_rank_must_be_positive_integer(bad):
    with pytest.raises(ValueError, match="positive integer"):
        LoHaConfig(r=bad, target_modules=["q_proj"])


def test_unknown_adapter_name():
    wrapped = LoHaModel(tiny_text_encoder(), LoHaConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"unknown adapter name.*'nope'.*\['default'\]"):
        wrapped.set_adapter("nope")


def test_conflicting_alpha_aliases():
    with pytest.raises(ValueError, match="same setting"):
        LoHaConfig(alpha=4, lora_alpha=8, target_modules=["q_proj"])


def test_seed_snippet_runs_on_a_stable_diffusion_pipeline(tmp_path):
    """The PEFT docs' example, unchanged but for the import, on a tiny SD1.5-layout pipeline."""
    from tiny_models import run_tiny_pipeline, tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline(tmp_path)
    before = run_tiny_pipeline(pipe, "a photo of sks dog")
    config_te = LoHaConfig(r=8, lora_alpha=32, target_modules=TE_TARGETS, rank_dropout=0.0, module_dropout=0.0)
    pipe.text_encoder = LoHaModel(pipe.text_encoder, config_te, "default")
    image = run_tiny_pipeline(pipe, "a photo of sks dog")
    assert image.shape == before.shape and np.isfinite(image).all()
    np.testing.assert_array_equal(image, before)  # fresh adapter: delta exactly zero

    config_unet = LoHaConfig(r=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
                             init_weights=False)
    pipe.unet = LoHaModel(pipe.unet, config_unet, "default")
    changed = run_tiny_pipeline(pipe, "a photo of sks dog")
    assert np.isfinite(changed).all() and np.abs(changed - before).max() > 1e-3
