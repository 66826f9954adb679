"""Writing a Flux / SD3 adapter under the original model's module names (BFL / SAI), as kohya
sd-scripts does: ``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_0_linear1``.

Those names stack several diffusers layers into one module (``naming.dit``), so the layers'
adapters are stacked back by output rows, exactly:

* the layers hold rows of one module (a file of this layout loaded earlier: shared down factors,
  or one LoKr whose rows each layer takes): that module again, tensors as they were;
* otherwise LoRA, LoHa and full adapters stack with their scales multiplied in: LoRA as
  ``down = [d_1; d_2; ...]``, ``up = blockdiag(s_1 u_1, s_2 u_2, ...)`` (rank r_1 + r_2 + ...,
  alpha = rank), LoHa likewise per half (each row block of (A1 B1) * (A2 B2) is its own layer's),
  full by concatenating ``diff``. A layer without the adapter contributes zero rows.

What does not stack exactly (separate LoKr adapters, mixed algorithms, DoRA on some layers only)
is refused with the module named: the diffusers-tree names (``lycoris_...``) take any adapter.
docs/formats.md 6.4 shows why these are exact.
"""
from __future__ import annotations

import torch

from ..naming.dit import ORIGINAL_MODULES, OriginalModule
from ..naming.keys import TRANSFORMER, UNET_PREFIX, flat
from .in_memory import AdapterModule, adapter_modules

# tensors a row split leaves shared (the same in every layer) and the ones it cuts by rows
_SHARED = {"lora": ("lora_down.weight",), "loha": ("hada_w1_b", "hada_w2_b"),
           "lokr": ("lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")}
_ROWS = {"lora": ("lora_up.weight",), "loha": ("hada_w1_a", "hada_w2_a"), "lokr": ("lokr_w1", "lokr_w1_a"),
         "full": ("diff", "diff_b")}


def original_tree_tensors(components: dict, adapter_name: str, family: str) -> dict[str, torch.Tensor]:
    """The transformer's modules of the adapter under ``lora_unet_`` + original names."""
    transformer = components[TRANSFORMER]
    adapted = {m.path: m for m in adapter_modules({TRANSFORMER: transformer}, adapter_name)}
    tensors, written = {}, set()
    for original in ORIGINAL_MODULES[family](transformer.config):
        if not original.written:
            continue
        parts = [adapted.get(path) for path in original.parts]
        if not any(parts):
            continue
        written.update(original.parts)
        sizes = [_out_features(transformer, path) for path in original.parts]
        name = UNET_PREFIX + flat(original.path)
        tensors.update({f"{name}.{k}": v for k, v in _stacked(name, original, parts, sizes).items()})
    unnamed = sorted(set(adapted) - written)
    if unnamed:
        raise ValueError(f"{len(unnamed)} adapted transformer layer(s) have no name in the original {family} "
                         f"model, e.g. {unnamed[:3]}; write the diffusers-tree names (naming='diffusers')")
    return tensors


def _out_features(transformer, path: str) -> int:
    layer = transformer.get_submodule(path)
    return getattr(layer, "base_layer", layer).weight.shape[0]


def _order(original: OriginalModule, blocks: list[torch.Tensor]) -> torch.Tensor:
    """Row blocks (one per part) in the original module's row order."""
    if original.swap_halves:
        (only,) = blocks
        half = only.shape[0] // 2
        return torch.cat([only[half:], only[:half]])
    return torch.cat(blocks)


def _stacked(name: str, original: OriginalModule, parts: list[AdapterModule | None], sizes: list[int]) -> dict:
    present = [p for p in parts if p is not None]
    adapters = [p.adapter for p in present]
    if not original.is_fused:
        return present[0].adapter.tensors_for_file(present[0].weight)
    algorithms = {a.algorithm.NAME for a in adapters}
    doras = [a.dora_scale is not None for a in adapters]
    refuse = None
    if len(algorithms) > 1:
        refuse = f"its layers hold different algorithms {sorted(algorithms)}"
    elif any(doras) and not (all(doras) and len(present) == len(parts)):
        refuse = "DoRA is on some of its layers only"
    if refuse is None:
        whole = _rows_of_one_module(original, present, parts)
        if whole is not None:
            return whole
    if refuse is None and algorithms <= {"lora", "loha", "full"} and all(map(_stackable, adapters)):
        return _block_diagonal(algorithms.pop(), original, parts, sizes)
    reason = refuse or f"{algorithms.pop()} adapters on its layers do not stack into one exactly"
    raise ValueError(f"{name} stacks {', '.join(original.parts)}: {reason}; write the diffusers-tree names "
                     "(naming='diffusers', LyCORIS' lycoris_ prefix) instead")


def _stackable(adapter) -> bool:
    """A plain LoRA / LoHa / full adapter of its own layer: no DoRA, no Tucker core, not rows of
    a module it shares."""
    tucker = "lora_mid.weight" in adapter.params or "hada_t1" in adapter.params
    return adapter.dora_scale is None and adapter.source_rows is None and not tucker


def _rows_of_one_module(original: OriginalModule, present: list[AdapterModule], parts) -> dict | None:
    """The module the layers' adapters were split from, if they were (every layer present, the
    same alpha and shared tensors, the rows in order), else None."""
    if len(present) != len(parts):
        return None
    first = present[0].adapter
    same_alpha = all(torch.equal(a.adapter.alpha, first.alpha) if first.alpha is not None else a.adapter.alpha is None
                     for a in present)
    if not same_alpha or any(set(a.adapter.params) != set(first.params) for a in present):
        return None
    if first.source_rows is not None:  # each layer holds the whole module and takes its rows
        rows = _order(original, [a.adapter.source_rows for a in present])
        whole = all(a.adapter.source_rows is not None for a in present) and torch.equal(
            rows, torch.arange(first.source_out_features))
        same = whole and all(torch.equal(a.adapter.params[k], first.params[k]) for a in present for k in first.params)
        return _with_alpha({k: v.detach() for k, v in first.params.items()}, first) if same else None
    algorithm = first.algorithm.NAME
    shared = [k for k in _SHARED.get(algorithm, ()) if k in first.params]
    if any(not torch.equal(a.adapter.params[k], first.params[k]) for a in present for k in shared):
        return None
    tensors = {k: v.detach() for k, v in first.params.items()}
    for key in _ROWS[algorithm]:
        if key in first.params:
            tensors[key] = _order(original, [a.adapter.params[key].detach() for a in present])
    if first.dora_scale is not None:
        tensors["dora_scale"] = _order(original, [a.adapter.dora_scale.detach() for a in present])
    return _with_alpha(tensors, first)


def _with_alpha(tensors: dict, adapter) -> dict:
    if adapter.alpha is not None:
        tensors["alpha"] = adapter.alpha.detach()
    return tensors


def _block_diagonal(algorithm: str, original: OriginalModule, parts: list[AdapterModule | None],
                    sizes: list[int]) -> dict:
    """Separate adapters on the layers as one exact module, scales multiplied in (alpha = rank)."""
    present = [p for p in parts if p is not None]
    if algorithm == "full":
        diff = _order(original, [p.adapter.params["diff"].detach() * p.adapter.scale if p else
                                 torch.zeros(size, *present[0].adapter.params["diff"].shape[1:])
                                 for p, size in zip(parts, sizes)])
        tensors = {"diff": diff}
        if any("diff_b" in p.adapter.params for p in present):
            tensors["diff_b"] = _order(original, [p.adapter.params["diff_b"].detach() * p.adapter.scale
                                                  if p and "diff_b" in p.adapter.params else torch.zeros(size)
                                                  for p, size in zip(parts, sizes)])
        return tensors
    # LoRA: one "half" (up, down); LoHa: two, and the scale goes into the first only
    halves = [("lora_up.weight", "lora_down.weight")] if algorithm == "lora" else [("hada_w1_a", "hada_w1_b"),
                                                                                 ("hada_w2_a", "hada_w2_b")]
    ranks = [p.adapter.params[halves[0][1]].shape[0] if p else 0 for p in parts]
    total = sum(ranks)
    tensors = {}
    for h, (up_key, down_key) in enumerate(halves):
        blocks, offset = [], 0
        for p, size, rank in zip(parts, sizes, ranks):
            block = torch.zeros(size, total)
            if p is not None:
                up = p.adapter.params[up_key].detach().float().flatten(1)
                block[:, offset: offset + rank] = up * (p.adapter.scale if h == 0 else 1.0)
            blocks.append(block)
            offset += rank
        up_shape = present[0].adapter.params[up_key].shape[2:]
        tensors[up_key] = _order(original, blocks).reshape(-1, total, *up_shape)
        tensors[down_key] = torch.cat([p.adapter.params[down_key].detach().float() for p in present])
    tensors["alpha"] = torch.tensor(float(total))
    return tensors
