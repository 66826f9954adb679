"""Conversions: Kohya/LyCORIS <-> PEFT folders, -> diffusers LoRA files, LoHa -> exact LoRA.

Every conversion goes through the one in-memory form: the source is loaded onto weightless
components (``skeletons.py``, or a diffusers folder's configs), then written out by its
format's module (``formats/``). Module paths therefore come from a live module tree, never
from string rules. A module the target format cannot express exactly is refused unless the
caller asks for an approximation (``approximate_rank``: truncated SVD of the module's delta).
"""
from __future__ import annotations

from pathlib import Path

from .attach import attach, plan
from .family import detect_family, family_of_components
from .formats.diffusers import write_diffusers_lora
from .formats.in_memory import as_lora
from .formats.kohya import save_kohya, training_fields
from .formats.peft import write_peft_folder
from .io import AdapterFileError
from .key_table import KeyTable
from .naming.keys import SD1_OR_SD2
from .skeletons import components_from_folder, skeleton_components
from .sources import read_source

ADAPTER = "converted"
TARGETS = ("kohya", "peft", "diffusers")


# SD3 files do not say which SD3 they were trained on; the first published variant whose layers
# fit every module of the file is taken
_SD3_VARIANTS = ("sd3", "sd3.5-medium", "sd3.5-large")


def load_onto_skeleton(source, base_model=None, family: str | None = None, allow_pickle: bool = False,
                       allow_unknown_keys: bool = False, progress: bool = False) -> tuple[dict, str, dict]:
    """(components holding the adapter ``converted``, family, source metadata)."""
    source = Path(source)
    read = read_source(source, allow_pickle=allow_pickle)
    kohya = None if read.peft else read.kohya_file(allow_unknown_keys=allow_unknown_keys)
    if family is None and base_model is None:
        family = read.peft.family() if read.peft else detect_family(kohya.metadata, kohya.tensors, kohya.modules)
        if family == SD1_OR_SD2:  # the names alone cannot pick one of the two skeletons
            family = None
    if base_model is not None:
        candidates = {str(base_model): lambda: components_from_folder(base_model)}
    elif family is None:
        raise AdapterFileError(f"{source}: cannot tell which model family it is for; pass the base model folder "
                               "(--base-model) or the family (--family sd1|sd2|sdxl|flux|sd3|...)")
    else:
        variants = _SD3_VARIANTS if family == "sd3" else (family,)
        candidates = {variant: lambda variant=variant: skeleton_components(variant) for variant in variants}
    errors = []
    for build in candidates.values():
        components = build()
        table = KeyTable(**components)
        try:
            adapter = read.kohya_file(table, allow_unknown_keys=allow_unknown_keys) if read.peft else kohya
            placements = plan(adapter.modules, table, adapter.source, adapter.metadata, progress=progress)
            break
        except AdapterFileError as error:
            errors.append(error)
    else:
        if len(errors) == 1:
            raise errors[0]
        raise AdapterFileError(f"{errors[0]}\nNo published {family} model fits it (tried {', '.join(candidates)}); "
                               "pass the base model folder (--base-model)") from errors[0]
    attach(placements, table, ADAPTER)
    return components, family_of_components(components), adapter.metadata


def convert(source, destination, to: str, base_model=None, family: str | None = None, as_lora_exact: bool = False,
            approximate_rank: int | None = None, save_dtype=None, allow_pickle: bool = False,
            progress: bool = False, naming: str = "diffusers") -> Path:
    """Convert ``source`` (Kohya/LyCORIS file, diffusers LoRA file, ComfyUI/BFL dotted file or PEFT
    folder) to ``to``: kohya, peft or diffusers. ``naming`` picks how a kohya file names a Flux /
    SD3 transformer: "diffusers" (``lycoris_`` + diffusers paths) or "original" (BFL / SAI names)."""
    if to not in TARGETS:
        raise ValueError(f"to must be 'kohya', 'peft' or 'diffusers', got {to!r}")
    components, family, metadata = load_onto_skeleton(source, base_model, family, allow_pickle, progress=progress)
    if to == "diffusers":
        return write_diffusers_lora(components, ADAPTER, destination, approximate_rank)
    if as_lora_exact or (to == "peft" and approximate_rank is not None):
        as_lora(components, ADAPTER, approximate_rank)
    if to == "peft":
        return write_peft_folder(components, ADAPTER, destination)
    return save_kohya(components, ADAPTER, destination, save_dtype=save_dtype, family=family,
                      metadata=training_fields(metadata), naming=naming)
