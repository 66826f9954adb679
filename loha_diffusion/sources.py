"""From what a caller names (a file, a folder, a hub repository id, a state dict) to an adapter
read in its own layout: Kohya/LyCORIS, diffusers' LoRA files (today's and pre-PEFT), PEFT folders,
ComfyUI/BFL dotted-path DiT files.

The one place that tells the layouts apart, for ``load_loha_weights``, ``convert`` and
``inspect`` alike; module paths are resolved against a model only afterwards.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .formats.comfyui import is_dotted_dit, read_dotted_dit
from .formats.diffusers import is_diffusers_lora, read_diffusers_lora
from .formats.kohya import KohyaFile
from .formats.peft import PeftFolder, is_peft_folder
from .io import AdapterFileError, load_state_dict
from .naming.peft import PEFT_PREFIX

ADAPTER_SUFFIXES = (".safetensors",)
PEFT_WEIGHTS = "adapter_model.safetensors"


def _find_adapter_file(folder: Path, weight_name: str | None) -> Path:
    if weight_name is not None:
        candidate = folder / weight_name
        if not candidate.is_file():
            raise AdapterFileError(f"{folder} has no file {weight_name!r}")
        return candidate
    files = sorted(p for p in folder.iterdir() if p.suffix in ADAPTER_SUFFIXES)
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "none"
        raise AdapterFileError(f"{folder}: expected a PEFT adapter folder (adapter_config.json, or unet/, "
                               "text_encoder/... subfolders holding one) or exactly one .safetensors adapter "
                               f"file, found {found}; pass weight_name= to pick one file")
    return files[0]


def locate(source, weight_name, hub_kwargs) -> Mapping | Path:
    """The state dict itself, or the adapter file that a file, folder or hub repository id names."""
    if isinstance(source, Mapping):
        return source
    path = Path(os.fspath(source))
    if weight_name is None and path.name == PEFT_WEIGHTS and (path.parent / "adapter_config.json").is_file():
        path = path.parent  # a PEFT adapter's weights: its folder, so that the config's alphas apply
    if path.is_dir():
        if weight_name is None and (is_peft_folder(path) or (path / "adapter_config.json").is_file()):
            return path
        path = _find_adapter_file(path, weight_name)
    elif not path.exists():
        if str(source).count("/") != 1 or str(source).startswith((".", "/")):
            raise AdapterFileError(f"{source}: no such file or folder (and not a hub repository id 'owner/name')")
        path = _from_hub(str(source), weight_name, hub_kwargs)
    return path


def _from_hub(repo: str, weight_name: str | None, hub_kwargs) -> Path:
    """The adapter file of a hub repository, or, for a PEFT adapter repository (an
    ``adapter_config.json`` at the top or in component subfolders), the local copy of its
    configs and weights, read as a PEFT folder so that its alphas and patterns apply."""
    from huggingface_hub import hf_hub_download, list_repo_files, snapshot_download

    if weight_name is None:
        files = list_repo_files(repo, **hub_kwargs)
        peft = [f for f in files if f.rpartition("/")[2] in ("adapter_config.json", PEFT_WEIGHTS)]
        if any(f.endswith("adapter_config.json") for f in peft):
            return Path(snapshot_download(repo, allow_patterns=peft, **hub_kwargs))
        weights = [f for f in files if f.endswith(ADAPTER_SUFFIXES)]
        if len(weights) != 1:
            raise AdapterFileError(f"hub repository {repo} holds {len(weights)} .safetensors files "
                                   f"({weights[:5]}); pass weight_name= to pick one")
        weight_name = weights[0]
    return Path(hf_hub_download(repo, weight_name, **hub_kwargs))


@dataclass
class AdapterSource:
    """An adapter as read: Kohya/LyCORIS ``tensors``, or a ``peft`` folder's (a diffusers LoRA file
    is read as one PEFT adapter per component)."""

    description: str
    layout: str
    metadata: dict
    tensors: dict[str, torch.Tensor] | None = None
    peft: PeftFolder | None = None

    def kohya_file(self, table=None, **options) -> KohyaFile:
        """The adapter under Kohya names: of ``table``'s modules (a ``KeyTable``) when given, else
        the Kohya prefixes on the paths as the source names them (enough for a report)."""
        if self.peft is None:
            tensors = self.tensors
        else:
            tensors = self.peft.kohya_style_tensors() if table is None else self.peft.kohya_tensors(table)
        return KohyaFile.from_tensors(tensors, self.metadata, self.description, **options)


def read_source(source: Path | Mapping, allow_pickle: bool = False) -> AdapterSource:
    """A Kohya/LyCORIS or diffusers LoRA file or state dict, or a PEFT pipeline folder."""
    if isinstance(source, Mapping):
        tensors, metadata, description = dict(source), {}, "the given state dict"
    elif is_peft_folder(source):
        return AdapterSource(str(source), "PEFT pipeline folder", {}, peft=PeftFolder.read(source))
    else:
        tensors, metadata = load_state_dict(source, allow_pickle=allow_pickle)
        description = str(source)
    if is_diffusers_lora(tensors):
        return AdapterSource(description, "diffusers LoRA", metadata,
                             peft=read_diffusers_lora(tensors, metadata, description))
    if tensors and all(key.startswith(PEFT_PREFIX) for key in tensors):
        raise AdapterFileError(f"{description}: PEFT adapter weights ({PEFT_PREFIX}...) without their "
                               "adapter_config.json, which holds the scale (lora_alpha / alpha) and the rank "
                               "patterns; pass the folder that holds both")
    if is_dotted_dit(tensors):
        return AdapterSource(description, "ComfyUI/BFL dotted paths", metadata,
                             tensors=read_dotted_dit(tensors, description))
    return AdapterSource(description, "Kohya/LyCORIS", metadata, tensors=tensors)


def read_for_table(located: Path | Mapping, table, component: str | None, allow_pickle: bool,
                   allow_unknown_keys: bool) -> KohyaFile:
    """What ``locate`` found, as a Kohya file of ``table``'s module names; a PEFT folder of one
    component goes to ``component`` or to the one component its module paths fit."""
    one_component = isinstance(located, Path) and located.is_dir() and not is_peft_folder(located)
    if component is not None and not one_component:
        raise ValueError(f"component={component!r} only applies to a PEFT adapter folder of one component "
                         "(adapter_config.json beside adapter_model.safetensors); the keys of "
                         f"{located if isinstance(located, Path) else 'the given state dict'} already name "
                         "their components: drop component=")
    if one_component:
        source = AdapterSource(str(located), "PEFT folder", {},
                               peft=PeftFolder.read_component(located, table, component))
    else:
        source = read_source(located, allow_pickle)
    return source.kohya_file(table, allow_unknown_keys=allow_unknown_keys)
