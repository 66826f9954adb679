"""LoHaModel.save_pretrained / from_pretrained / load_adapter against peft itself, both directions."""
import json

import pytest
import torch
from peft import LoHaConfig as PeftLoHaConfig
from peft import LoKrConfig as PeftLoKrConfig
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from loha_diffusion import AdapterLayer, LoHaConfig, LoHaModel, LoKrConfig, LoRAConfig
from loha_diffusion.io import AdapterFileError
from tiny_models import tiny_sd15_unet

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in"]
TE_TARGETS = ["k_proj", "q_proj", "v_proj", "out_proj", "fc1", "fc2"]
# rank_pattern / alpha_pattern with a plain name, a regex and an exact path
UNET_RANKS = {"conv1": 2, r"up_blocks\.1\..*to_q": 6, "down_blocks.0.resnets.0.conv2": 3}
UNET_ALPHAS = {"conv2": 3.0, "to_k": 1.0}


def tiny_text_encoder(layers: int = 3):
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1)
    return CLIPTextModel(cfg).eval()


def unet_output(model):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 5, 32, generator=generator)
    with torch.no_grad():
        return model(sample, torch.tensor(10), context).sample


def text_output(model):
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).last_hidden_state


def assert_same(ours, theirs):
    assert ours.abs().max() > 0
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def adapted_paths(model):
    return sorted(p for p, m in model.named_modules() if isinstance(m, AdapterLayer))


def peft_adapted_paths(peft_model, prefix="base_model.model."):
    from peft.tuners.tuners_utils import BaseTunerLayer
    return sorted(p.removeprefix(prefix) for p, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer))


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, before):
    state, types = before
    assert [type(m) for m in model.modules()] == types
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


# -- ours -> PEFT ---------------------------------------------------------------------------------
UNET_CONFIGS = {
    "loha": lambda: LoHaConfig(r=4, alpha=8, target_modules=UNET_TARGETS, rank_pattern=UNET_RANKS,
                               alpha_pattern=UNET_ALPHAS, init_weights=False),
    "loha_tucker": lambda: LoHaConfig(r=4, alpha=8, target_modules=UNET_TARGETS, rank_pattern=UNET_RANKS,
                                      alpha_pattern=UNET_ALPHAS, use_effective_conv2d=True, init_weights=False),
    "lora": lambda: LoRAConfig(r=4, alpha=8, target_modules=UNET_TARGETS, rank_pattern=UNET_RANKS,
                               alpha_pattern=UNET_ALPHAS, init_weights=False),
    # r=2 factorises w2 on the wide layers, keeps it full (scale 1 in the community rule) on the narrow ones
    "lokr": lambda: LoKrConfig(r=2, alpha=3, target_modules=UNET_TARGETS, rank_pattern={"conv1": 1},
                               init_weights=False),
}
PEFT_TYPES = {"loha": "LOHA", "loha_tucker": "LOHA", "lora": "LORA", "lokr": "LOKR"}


@pytest.mark.parametrize("kind", UNET_CONFIGS)
def test_saved_unet_adapter_loads_in_peft_with_the_same_outputs(tmp_path, kind):
    ours = LoHaModel(tiny_sd15_unet(), UNET_CONFIGS[kind]())
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == PEFT_TYPES[kind]
    if kind != "lora":
        assert config["use_effective_conv2d"] is (kind == "loha_tucker")
    theirs = PeftModel.from_pretrained(tiny_sd15_unet(), tmp_path)
    assert peft_adapted_paths(theirs) == adapted_paths(ours.model)
    expected = unet_output(ours)
    assert (expected - unet_output(tiny_sd15_unet())).abs().max() > 1e-3  # the adapter does something
    assert_same(unet_output(theirs), expected)


def test_the_callers_config_fields_are_kept(tmp_path):
    ours = LoHaModel(tiny_sd15_unet(), UNET_CONFIGS["loha_tucker"]())
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["alpha"]) == (4, 8)
    assert config["rank_pattern"] == UNET_RANKS and config["alpha_pattern"] == UNET_ALPHAS
    assert sorted(config["target_modules"]) == sorted(UNET_TARGETS)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.down_blocks.0.resnets.0.conv1.hada_t1" in tensors  # Tucker form kept
    assert not any(".default." in k for k in tensors)  # PEFT's saved names carry no adapter name


# -- PEFT -> ours ---------------------------------------------------------------------------------
PEFT_UNET_CONFIGS = {
    "loha": lambda: PeftLoHaConfig(r=4, alpha=8, target_modules=UNET_TARGETS, rank_pattern=UNET_RANKS,
                                   alpha_pattern=UNET_ALPHAS, init_weights=False),
    "loha_tucker": lambda: PeftLoHaConfig(r=4, alpha=8, target_modules=UNET_TARGETS, rank_pattern=UNET_RANKS,
                                          alpha_pattern=UNET_ALPHAS, use_effective_conv2d=True, init_weights=False),
    "lora": lambda: PeftLoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, rank_pattern=UNET_RANKS,
                                   alpha_pattern=UNET_ALPHAS, init_lora_weights=False),
    "lora_rslora": lambda: PeftLoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, use_rslora=True,
                                          init_lora_weights=False),
    # decompose_factor=8 gives PEFT's own (unsorted) split, which LyCORIS would order differently
    "lokr": lambda: PeftLoKrConfig(r=2, alpha=3, target_modules=UNET_TARGETS, rank_pattern={"conv1": 1},
                                   decompose_factor=8, init_weights=False),
}


def randomise(peft_model, std=0.1):
    """Every adapter tensor random and non-zero, of a size that changes the outputs clearly
    without making the network chaotic (then fp32 rounding alone would separate two exact
    implementations)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


@pytest.mark.parametrize("kind", PEFT_UNET_CONFIGS)
def test_peft_saved_unet_adapter_loads_with_the_same_outputs(tmp_path, kind):
    theirs = get_peft_model(tiny_sd15_unet(), PEFT_UNET_CONFIGS[kind]())
    randomise(theirs)
    theirs.save_pretrained(tmp_path)
    ours = LoHaModel.from_pretrained(tiny_sd15_unet(), tmp_path)
    assert adapted_paths(ours.model) == peft_adapted_paths(theirs)
    assert not any(p.requires_grad for p in ours.parameters()) and not ours.training
    expected = unet_output(theirs)
    assert (expected - unet_output(tiny_sd15_unet())).abs().max() > 1e-3  # the adapter does something
    assert_same(unet_output(ours), expected)
    # and back: what we save from it PEFT loads to the same outputs
    ours.save_pretrained(tmp_path / "again")
    assert_same(unet_output(PeftModel.from_pretrained(tiny_sd15_unet(), tmp_path / "again")), expected)


def test_is_trainable_keeps_adapter_tensors_trainable(tmp_path):
    LoHaModel(tiny_text_encoder(), LoHaConfig(r=2, target_modules=["q_proj"], init_weights=False)).save_pretrained(
        tmp_path)
    trainable = LoHaModel.from_pretrained(tiny_text_encoder(), tmp_path, is_trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert len(names) == 3 * 4 and all(".adapters.default." in n for n in names)


# -- layers_to_transform / layers_pattern / modules_to_save -----------------------------------------
SELECTION = dict(target_modules=["q_proj", "fc1"], layers_to_transform=[0, 2], layers_pattern="layers",
                 modules_to_save=["token_embedding", "final_layer_norm"])


def test_layer_selection_and_modules_to_save_match_peft(tmp_path):
    ours = LoHaModel(tiny_text_encoder(), LoHaConfig(r=4, alpha=8, init_weights=False, **SELECTION))
    theirs = get_peft_model(tiny_text_encoder(), PeftLoHaConfig(r=4, alpha=8, init_weights=False, **SELECTION))
    assert adapted_paths(ours.model) == peft_adapted_paths(theirs)
    assert [p.split("layers.")[1] for p in adapted_paths(ours.model)] == [
        "0.mlp.fc1", "0.self_attn.q_proj", "2.mlp.fc1", "2.self_attn.q_proj"]
    # the same trainable names as PEFT's live model: copies of the saved modules train, originals do not
    ours_trainable = sorted(n.removeprefix("model.").replace(".adapters.default.", ".").replace(".default.", ".")
                            for n, p in ours.named_parameters() if p.requires_grad and ".adapters." not in n)
    theirs_trainable = sorted(n.removeprefix("base_model.model.").replace(".default.", ".")
                              for n, p in theirs.named_parameters() if p.requires_grad and "hada_" not in n)
    assert ours_trainable == theirs_trainable == [
        "embeddings.token_embedding.modules_to_save.weight", "final_layer_norm.modules_to_save.bias",
        "final_layer_norm.modules_to_save.weight"]
    with torch.no_grad():  # train the copies a little
        ours.model.embeddings.token_embedding.modules_to_save["default"].weight.mul_(1.5)
        ours.model.final_layer_norm.modules_to_save["default"].bias.add_(0.25)
    ours.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {"base_model.model.embeddings.token_embedding.weight", "base_model.model.final_layer_norm.bias",
            "base_model.model.final_layer_norm.weight"} < saved.keys()
    loaded_by_peft = PeftModel.from_pretrained(tiny_text_encoder(), tmp_path)
    assert_same(text_output(ours), text_output(loaded_by_peft))
    assert_same(text_output(LoHaModel.from_pretrained(tiny_text_encoder(), tmp_path)), text_output(ours))
    with ours.disable_adapter():  # the original modules, not the copies
        torch.testing.assert_close(text_output(ours), text_output(tiny_text_encoder()))


def test_peft_modules_to_save_load_into_our_copies(tmp_path):
    theirs = get_peft_model(tiny_text_encoder(), PeftLoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                                 **SELECTION))
    with torch.no_grad():
        theirs.base_model.model.final_layer_norm.modules_to_save["default"].weight.mul_(2.0)
    theirs.save_pretrained(tmp_path)
    ours = LoHaModel.from_pretrained(tiny_text_encoder(), tmp_path)
    assert_same(text_output(ours), text_output(theirs))
    base = ours.merge_and_unload()  # PEFT's rule: the active copy takes the module's place
    assert isinstance(base.final_layer_norm, torch.nn.LayerNorm)
    assert_same(text_output(base), text_output(theirs))


def test_modules_to_save_copies_per_adapter(tmp_path):
    encoder = tiny_text_encoder()
    original = encoder.final_layer_norm
    ours = LoHaModel(encoder, LoHaConfig(r=2, target_modules=["q_proj"], modules_to_save=["final_layer_norm"]), "a")
    ours.add_adapter("b", LoHaConfig(r=2, target_modules=["k_proj"], modules_to_save=["final_layer_norm"]))
    wrapper = ours.model.final_layer_norm
    assert wrapper.original_module is original and set(wrapper.modules_to_save) == {"a", "b"}
    with pytest.raises(ValueError, match="only one of them can be active"):
        ours.set_adapter(["a", "b"])
    assert ours.active_adapters == ["a"] and wrapper.active_adapter == "a"
    ours.set_adapter("b")
    assert wrapper.active_adapter == "b"
    ours.delete_adapter("b")
    ours.delete_adapter("a")
    assert encoder.final_layer_norm is original


def test_layer_selection_rules_follow_peft():
    from peft.tuners.tuners_utils import check_target_module_exists

    paths = [p for p, _ in tiny_text_encoder().named_modules() if p]
    configs = [dict(target_modules=["q_proj", "fc2"], layers_to_transform=1),
               dict(target_modules=["q_proj", "encoder.layers.0.mlp.fc1"], layers_to_transform=[2]),
               dict(target_modules=["q_proj", "fc1"], layers_to_transform=[0, 1], layers_pattern=["blocks", "layers"]),
               dict(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern="blocks"),
               dict(target_modules=["q_proj", "fc1"], exclude_modules=["fc1"], modules_to_save=["layers.1"])]
    for fields in configs:
        ours, theirs = LoHaConfig(**fields), PeftLoHaConfig(**fields)
        expected = [p for p in paths if check_target_module_exists(theirs, p) is True]
        assert [p for p in paths if ours.matches(p)] == expected, fields


def test_modules_to_save_that_name_nothing():
    encoder = tiny_text_encoder()
    before = snapshot(encoder)
    with pytest.raises(ValueError, match=r"modules_to_save \['token_embeddings'\] name no module"):
        LoHaModel(encoder, LoHaConfig(target_modules=["q_proj"], modules_to_save=["token_embeddings"]))
    assert_unchanged(encoder, before)
    assert all(p.requires_grad for p in encoder.parameters())  # not left frozen either


@pytest.mark.parametrize("fields, message", [
    (dict(target_modules=["q_proj"], layers_pattern="layers"), "needs layers_to_transform"),
    (dict(target_modules=r".*q_proj", layers_to_transform=[0]), "regex"),
    (dict(target_modules=["q_proj"], layers_to_transform=[-1]), "layer index"),
])
def test_bad_layer_selection(fields, message):
    with pytest.raises(ValueError, match=message):
        LoHaConfig(**fields)


# -- several adapters, pickles ------------------------------------------------------------------------
def test_non_default_adapters_go_to_subfolders(tmp_path):
    ours = LoHaModel(tiny_text_encoder(), LoHaConfig(r=2, target_modules=["q_proj"], init_weights=False))
    ours.add_adapter("style", LoHaConfig(r=3, alpha=2, target_modules=["fc2"], init_weights=False))
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "style" / "adapter_config.json").is_file()
    ours.set_adapter("style")
    theirs = PeftModel.from_pretrained(tiny_text_encoder(), tmp_path)
    theirs.load_adapter(tmp_path / "style", "style")
    theirs.set_adapter("style")
    assert_same(text_output(ours), text_output(theirs))

    loaded = LoHaModel.from_pretrained(tiny_text_encoder(), tmp_path)
    loaded.load_adapter(tmp_path / "style", "style")
    assert loaded.active_adapters == ["default"]  # load_adapter does not activate, as in PEFT
    loaded.set_adapter("style")
    assert_same(text_output(loaded), text_output(ours))
    ours.save_pretrained(tmp_path / "only", selected_adapters=["style"])
    assert [p.name for p in (tmp_path / "only").iterdir()] == ["style"]


def test_safe_serialization_false_writes_peft_pickle_that_needs_opting_in(tmp_path):
    ours = LoHaModel(tiny_text_encoder(), LoHaConfig(r=2, target_modules=["q_proj"], init_weights=False))
    with pytest.warns(UserWarning, match="allow_pickle=True"):
        ours.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    assert_same(text_output(PeftModel.from_pretrained(tiny_text_encoder(), tmp_path)), text_output(ours))
    encoder = tiny_text_encoder()
    before = snapshot(encoder)
    with pytest.raises(AdapterFileError, match="allow_pickle=True"):
        LoHaModel.from_pretrained(encoder, tmp_path)
    assert_unchanged(encoder, before)
    assert_same(text_output(LoHaModel.from_pretrained(encoder, tmp_path, allow_pickle=True)), text_output(ours))


# -- errors leave the model as it was ------------------------------------------------------------------
def test_not_an_adapter_folder(tmp_path):
    LoHaModel(tiny_text_encoder(), LoHaConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path, selected_adapters=["default"])
    (tmp_path / "default").mkdir()
    for path in (tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"):
        path.rename(tmp_path / "default" / path.name)
    with pytest.raises(AdapterFileError, match=r"not a PEFT adapter folder.*\['default'\]"):
        LoHaModel.from_pretrained(tiny_text_encoder(), tmp_path)


def test_unsupported_peft_type_is_refused(tmp_path):
    from peft import IA3Config

    get_peft_model(tiny_text_encoder(), IA3Config(target_modules=["k_proj", "fc2"],
                                                  feedforward_modules=["fc2"])).save_pretrained(tmp_path)
    encoder = tiny_text_encoder()
    before = snapshot(encoder)
    with pytest.raises(AdapterFileError, match="'IA3' is not LoRA, LoHa or LoKr"):
        LoHaModel.from_pretrained(encoder, tmp_path)
    assert_unchanged(encoder, before)


def test_tensors_that_do_not_fit_change_nothing(tmp_path):
    LoHaModel(tiny_text_encoder(), LoHaConfig(r=2, target_modules=["q_proj"], modules_to_save=["final_layer_norm"])
              ).save_pretrained(tmp_path)
    # the same module names, 16 wide instead of 32
    narrower = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                            num_attention_heads=4, max_position_embeddings=16))
    before = snapshot(narrower)
    with pytest.raises(AdapterFileError, match=r"(?s)nothing was changed.*final_layer_norm.*wrong shapes.*q_proj"):
        LoHaModel.from_pretrained(narrower, tmp_path)
    assert_unchanged(narrower, before)

    wrapped = LoHaModel(tiny_text_encoder(), LoHaConfig(r=2, target_modules=["k_proj"]))
    before = snapshot(wrapped)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.encoder.layers.9.self_attn.q_proj.hada_w1_a"] = torch.zeros(32, 2)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match=r"tensors for \['encoder\.layers\.9\.self_attn\.q_proj'\]"):
        wrapped.load_adapter(tmp_path, "other")
    assert_unchanged(wrapped, before)
    assert list(wrapped.peft_config) == ["default"]


def test_wrapper_methods_are_never_the_wrapped_models():
    unet = tiny_sd15_unet()  # a diffusers model: it has save_pretrained, from_pretrained, active_adapters...
    assert all(hasattr(unet, name) for name in ("save_pretrained", "from_pretrained", "active_adapters"))
    wrapped = LoHaModel(unet, LoHaConfig(r=2, target_modules=["to_q"]))
    for name in ("save_pretrained", "load_adapter", "get_base_model"):
        assert getattr(wrapped, name).__func__ is getattr(LoHaModel, name), name
    assert wrapped.from_pretrained.__func__ is LoHaModel.from_pretrained.__func__
    assert wrapped.active_adapters == ["default"] and wrapped.active_adapter == "default"
    assert set(wrapped.peft_config) == {"default"} and wrapped.get_base_model() is unet
