"""Recognise adapter algorithms that loha_diffusion does not apply (docs/formats.md 2.7, 2.9, 2.10 and 5, item 15).

A loader that finds these tensors should refuse the file with the algorithm's name rather than
skip them as unknown keys: silently dropping part of an adapter changes the image.
"""
from __future__ import annotations

from collections.abc import Mapping

# (tensor names, algorithm) in the order they are tested; names are exact tensor names.
_SIGNATURES = (
    (("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"), "GLoRA"),
    (("q_layer.weight", "p_layer.weight", "lambda_layer"), "T-LoRA"),
    (("oft_diag",), "OFT (old LyCORIS oft_diag)"),
    (("oft_blocks", "rescale"), "OFT/BOFT"),
    (("bias_indices", "bias_values", "bias_size"), "sparse bias residual (extract_locon use_bias)"),
    (("lokr_t1",), "LoKr with a Tucker w1 (lokr_t1)"),
)


def unsupported_algorithm(names) -> str | None:
    """A short name ("GLoRA", "OFT", "BOFT", ...) if a module's tensors belong to an unsupported
    algorithm, else None. ``names`` is a set of tensor names or a {name: tensor} mapping; with
    tensors, OFT and BOFT are told apart by the rank of ``oft_blocks`` (3-D vs 4-D).
    """
    for signature, algorithm in _SIGNATURES:
        if any(name in names for name in signature):
            if algorithm == "OFT/BOFT" and isinstance(names, Mapping) and "oft_blocks" in names:
                return "BOFT" if names["oft_blocks"].dim() == 4 else "OFT"
            return algorithm
    return None
