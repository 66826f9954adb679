"""Kohya / LyCORIS module names as strings, docs/formats.md 1.1-1.5.

A name is ``<prefix><module path with "." -> "_">``; ``_`` also occurs inside module names,
so names are never inverted by string replacement: ``loha_diffusion.key_table`` registers,
for every live module, each spelling :func:`spellings` gives, and looks names up there.

* UNet: ``lora_unet_`` + diffusers path, ``lora_unet_`` + SGM path (``sgm.py``, from the
  UNet config), ``lycoris_`` + diffusers path;
* text encoders: ``lora_te_`` / ``lora_te1_`` (first encoder; both spellings on SD1 and SDXL),
  ``lora_te2_`` (second; also ``lora_te_`` when it is the only one, as on the SDXL refiner),
  each with and without ``text_model_`` whatever the installed transformers calls the tree.

Writing (:func:`kohya_name`) follows the community: SD1/SD2 UNet in diffusers names, SDXL
UNet in SGM names, text encoders always with ``text_model_``.
"""
from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Iterator

from .dit import TEXT_PREFIXES
from .keys import (
    COMPONENTS,
    DIT_FAMILIES,
    LYCORIS_PREFIX,
    PREFIX_OWNERS,
    SD1_OR_SD2,
    TE1_PREFIX,
    TE2_PREFIX,
    TE_PREFIX,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    TRANSFORMER,
    TRANSFORMER_PREFIX,
    UNET,
    UNET_PREFIX,
    flat,
    text_model_path,
)
from .sgm import SgmPaths

WRITE_FAMILIES = ("sd1", "sd2", SD1_OR_SD2, "sdxl", *DIT_FAMILIES)


def read_prefixes(component: str, components: Collection[str], family: str | None = None) -> tuple[str, ...]:
    """The prefixes that name ``component`` in a pipeline of ``family`` holding ``components``."""
    if family in DIT_FAMILIES:
        if component == TRANSFORMER:
            return UNET_PREFIX, LYCORIS_PREFIX, TRANSFORMER_PREFIX
        return TEXT_PREFIXES[family].get(component, ())
    if component == UNET:
        return UNET_PREFIX, LYCORIS_PREFIX
    if component == TEXT_ENCODER:
        return TE_PREFIX, TE1_PREFIX
    if component == TEXT_ENCODER_2:
        # a lone second encoder (SDXL refiner) also answers to the single-encoder prefix
        return (TE2_PREFIX,) if TEXT_ENCODER in components else (TE2_PREFIX, TE_PREFIX)
    raise ValueError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")


def spellings(component: str, path: str, components: Collection[str], sgm: SgmPaths | None,
              family: str | None = None) -> Iterator[str]:
    """Every name a file may use for the module at ``path`` of ``component`` (in diffusers' tree;
    the original names of DiT modules are ``naming.dit``'s)."""
    if component == TRANSFORMER:
        yield from (prefix + flat(path) for prefix in read_prefixes(component, components, family))
        return
    if component == UNET:
        yield UNET_PREFIX + flat(path)
        yield LYCORIS_PREFIX + flat(path)
        sgm_path = sgm.to_sgm(path) if sgm is not None else None
        if sgm_path is not None:
            yield UNET_PREFIX + flat(sgm_path)
        return
    with_text_model = text_model_path(path)
    for prefix in read_prefixes(component, components, family):
        yield prefix + flat(with_text_model)
        yield prefix + flat(with_text_model.removeprefix("text_model."))


def unmatched_reason(name: str, components: Collection[str], family: str | None = None) -> str:
    """A short reason why no module of ``components`` answers to ``name``, for error messages."""
    answering = {p: c for c in components for p in read_prefixes(c, components, family)}
    for prefix, owner in PREFIX_OWNERS.items():
        if name.startswith(prefix):
            component = answering.get(prefix)
            if component is None:
                return f"prefix {prefix!r} names the {owner}, which this pipeline does not have"
            return f"no module of the {component} is called {name[len(prefix):]!r}"
    return f"unknown prefix (expected one of {', '.join(PREFIX_OWNERS)})"


def _write_prefix(component: str, family: str) -> str:
    if family in DIT_FAMILIES:
        # diffusers' tree under LyCORIS' prefix (SimpleTuner's files; ComfyUI reads them): one
        # name per module, exact for every algorithm, where the original tree stacks modules
        if component == TRANSFORMER:
            return LYCORIS_PREFIX
        prefixes = TEXT_PREFIXES[family].get(component)
        if prefixes:
            return prefixes[0]
    if component == UNET:
        return UNET_PREFIX
    if family == "sdxl" and component in (TEXT_ENCODER, TEXT_ENCODER_2):
        return TE1_PREFIX if component == TEXT_ENCODER else TE2_PREFIX
    if component == TEXT_ENCODER:
        return TE_PREFIX
    raise ValueError(f"no kohya prefix for component {component!r} of a {family} model; "
                     f"components are {', '.join(COMPONENTS)} (text_encoder_2 only on SDXL)")


def kohya_name(component: str, module_path: str, family: str, unet_config=None, *, sgm: SgmPaths | None = None) -> str:
    """The kohya module name to write for ``module_path`` of ``component``.

    ``family`` is "sd1", "sd2" (or "sd1/sd2") or "sdxl"; SDXL UNet names need ``unet_config``,
    or its ``sgm`` paths built once by a caller that names many modules. ``module_path`` is
    the live (logical) path; text encoder names get ``text_model_`` always.
    """
    if family not in WRITE_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(WRITE_FAMILIES)}")
    prefix = _write_prefix(component, family)
    if component == TRANSFORMER:
        return prefix + flat(module_path)
    if component != UNET:
        return prefix + flat(text_model_path(module_path))
    if family != "sdxl":
        return prefix + flat(module_path)
    if sgm is None and unet_config is not None:
        sgm = SgmPaths(unet_config)
    if sgm is None:
        raise ValueError("writing SDXL UNet names needs the UNet config (SGM block indices come from it)")
    sgm_path = sgm.to_sgm(module_path)
    if sgm_path is None:
        raise ValueError(f"UNet module {module_path!r} has no SGM (original SDXL) name; kohya SDXL files "
                         "name every UNet module in SGM form")
    return prefix + flat(sgm_path)


# -- which UNet naming a file uses ----------------------------------------------------------

_SGM_UNET = re.compile(r"(input_blocks|middle_block|output_blocks)_\d|(time_embed|out)_\d|label_emb(_|$)")
_DIFFUSERS_UNET = re.compile(r"(down_blocks|mid_block|up_blocks)_|(conv_in|conv_out|conv_norm_out)$"
                             r"|(time_embedding|add_embedding|class_embedding)(_|$)")


def unet_body(name: str) -> str | None:
    """A UNet module name without its prefix; None for other names."""
    for prefix in (UNET_PREFIX, LYCORIS_PREFIX):
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


def detect_unet_naming(names: Iterable[str]) -> str | None:
    """"diffusers", "sgm" or "mixed" for the UNet names among ``names``; None if there are none.

    ``lycoris_`` names are diffusers paths by construction.
    """
    kinds = set()
    for name in names:
        body = unet_body(name)
        if body is None:
            continue
        if name.startswith(LYCORIS_PREFIX) or _DIFFUSERS_UNET.match(body):
            kinds.add("diffusers")
        elif _SGM_UNET.match(body):
            kinds.add("sgm")
    if len(kinds) > 1:
        return "mixed"
    return kinds.pop() if kinds else None
