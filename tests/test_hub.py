"""Loading from where users point: a hub repository id (huggingface_hub's calls served from a
local folder, the tests run offline), a PEFT adapter repository or a single-file one, and a PEFT
folder's weights file."""
import copy
import shutil

import huggingface_hub
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

import loha_diffusion  # noqa: F401  (adds the pipeline methods)
from adapter_files import random_module, reference_delta
from loha_diffusion.io import AdapterFileError


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake hub: ``repos[repo_id]`` is a local folder; downloads copy from it."""
    repos, calls = {}, []

    def list_repo_files(repo_id, **_):
        root = repos[repo_id]
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def hf_hub_download(repo_id, filename, **_):
        calls.append(("file", repo_id, filename))
        target = tmp_path / "cache" / repo_id / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(repos[repo_id] / filename, target)
        return str(target)

    def snapshot_download(repo_id, allow_patterns=None, **_):
        calls.append(("snapshot", repo_id, tuple(allow_patterns)))
        target = tmp_path / "snapshots" / repo_id
        for name in allow_patterns:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(repos[repo_id] / name, target / name)
        return str(target)

    for name, fn in (("list_repo_files", list_repo_files), ("hf_hub_download", hf_hub_download),
                     ("snapshot_download", snapshot_download)):
        monkeypatch.setattr(huggingface_hub, name, fn)
    return repos, calls


def test_a_peft_adapter_repository_loads_with_its_config(sd3, tmp_path, hub):
    """An SD3 transformer LoRA published as a PEFT adapter (adapter_config.json with lora_alpha
    != r, beside adapter_model.safetensors and a README): its scale comes from the config, as
    PEFT applies it."""
    repos, calls = hub
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["to_q", "add_k_proj"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(sd3.transformer), config)
    repo = tmp_path / "repo"
    peft_model.save_pretrained(repo)  # adapter_config.json + adapter_model.safetensors, as PEFT writes them
    (repo / "README.md").write_text("a flash LoRA")
    repos["someone/flash-sd3"] = repo

    pipe = copy.deepcopy(sd3)
    assert pipe.load_loha_weights("someone/flash-sd3") == "flash-sd3"
    assert calls == [("snapshot", "someone/flash-sd3", ("adapter_config.json", "adapter_model.safetensors"))]
    pipe.fuse_loha()
    with torch.no_grad():
        peft_model.merge_adapter()
    theirs = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v
              for k, v in peft_model.state_dict().items() if "lora_" not in k}
    ours = {k.replace(".base_layer", ""): v for k, v in pipe.transformer.state_dict().items()}
    changed = [k for k in theirs if not torch.equal(theirs[k], sd3.transformer.state_dict()[k])]
    assert changed and all("to_q" in k or "add_k_proj" in k for k in changed)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)


def test_a_single_file_repository_and_weight_name(sd15, tmp_path, hub):
    repos, calls = hub
    target = sd15.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    tensors = random_module("loha", target.weight, generator=torch.Generator().manual_seed(0))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    repo = tmp_path / "repo"
    repo.mkdir()
    save_file({f"{name}.{k}": v for k, v in tensors.items()}, repo / "style.safetensors")
    repos["someone/style"] = repo

    pipe = copy.deepcopy(sd15)
    pipe.load_loha_weights("someone/style")
    assert calls == [("file", "someone/style", "style.safetensors")]
    pipe.fuse_loha()
    fused = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.base_layer.weight
    torch.testing.assert_close(fused.double(), target.weight.double() + reference_delta(tensors, target.weight),
                               rtol=0, atol=1e-5)

    shutil.copy(repo / "style.safetensors", repo / "style_v2.safetensors")
    with pytest.raises(AdapterFileError, match="holds 2 .safetensors files"):
        copy.deepcopy(sd15).load_loha_weights("someone/style")
    copy.deepcopy(sd15).load_loha_weights("someone/style", weight_name="style_v2.safetensors")
    assert calls[-1] == ("file", "someone/style", "style_v2.safetensors")


def test_a_peft_weights_file_is_read_with_its_config(sd3, tmp_path):
    """Pointing at a PEFT folder's adapter_model.safetensors reads the folder (the config holds
    the scale); the same weights alone are refused, not applied at a guessed scale."""
    config = LoraConfig(r=4, lora_alpha=2, target_modules=["to_q"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(sd3.transformer), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    pipe = copy.deepcopy(sd3)
    pipe.load_loha_weights(tmp_path / "adapter" / "adapter_model.safetensors")
    pipe.fuse_loha()
    with torch.no_grad():
        peft_model.merge_adapter()
    key = "transformer_blocks.1.attn.to_q"
    torch.testing.assert_close(pipe.transformer.get_submodule(key).base_layer.weight,
                               peft_model.base_model.model.get_submodule(key).base_layer.weight, rtol=1e-5, atol=1e-6)

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tmp_path / "adapter" / "adapter_model.safetensors", alone / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match="without their adapter_config.json"):
        copy.deepcopy(sd3).load_loha_weights(alone / "adapter_model.safetensors")
