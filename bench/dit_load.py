"""Loading a whole-model Flux adapter at FLUX.1's real sizes: time and memory.

Writes kohya sd-scripts-style files (BFL names: every Linear of the 19 double and 38 single
blocks, incl. the stacked ``qkv`` and ``linear1``) for LoRA r16, LoHa r16 and LoKr factor 16
(whose Kronecker blocks do not line up with q/k/v: each layer keeps the module and takes rows),
in bf16. Then, each in a fresh subprocess, loads one onto the FLUX.1-dev architecture built
weightless (meta device: no 24 GB of weights needed), the way ``pipe.load_loha_weights`` does
(read, resolve, split, check, attach), and reports:

  seconds to load, the rise of peak RSS over the file's size, and the elements the adapters
  hold on the layers against the adapted layers' weights (a materialised delta would be 1.0x).

The target: peak RSS rise within ~2x the file (read + the split adapters' own copies), and no
layer holding a full-size tensor.

    python bench/dit_load.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import REPO_ROOT, configure_threads, release_freed_memory, reset_peak_rss, status_mib

INNER, MLP, DOUBLE, SINGLE = 3072, 12288, 19, 38


def _modules():
    """(kohya name, rows, columns) of every Linear in FLUX.1's blocks, BFL names."""
    for i in range(DOUBLE):
        for side in ("img", "txt"):
            block = f"lora_unet_double_blocks_{i}_{side}"
            yield f"{block}_attn_qkv", 3 * INNER, INNER
            yield f"{block}_attn_proj", INNER, INNER
            yield f"{block}_mlp_0", MLP, INNER
            yield f"{block}_mlp_2", INNER, MLP
            yield f"{block}_mod_lin", 6 * INNER, INNER
    for i in range(SINGLE):
        yield f"lora_unet_single_blocks_{i}_linear1", 3 * INNER + MLP, INNER
        yield f"lora_unet_single_blocks_{i}_linear2", INNER, INNER + MLP
        yield f"lora_unet_single_blocks_{i}_modulation_lin", 3 * INNER, INNER


def _tensors(algo: str, rows: int, cols: int, g) -> dict[str, torch.Tensor]:
    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.01).to(torch.bfloat16)

    r = 16
    if algo == "lora":
        return {"lora_down.weight": rnd(r, cols), "lora_up.weight": rnd(rows, r), "alpha": torch.tensor(8.0)}
    if algo == "loha":
        return {"hada_w1_a": rnd(rows, r), "hada_w1_b": rnd(r, cols), "hada_w2_a": rnd(rows, r),
                "hada_w2_b": rnd(r, cols), "alpha": torch.tensor(8.0)}
    from loha_diffusion.algorithms.lokr import factorization

    a, b = factorization(rows, 16)
    c, d = factorization(cols, 16)
    return {"lokr_w1": rnd(a, c), "lokr_w2_a": rnd(b, r), "lokr_w2_b": rnd(r, d), "alpha": torch.tensor(8.0)}


def write_file(algo: str, path: Path) -> None:
    from loha_diffusion.io import save_state_dict

    g = torch.Generator().manual_seed(0)
    state = {}
    for name, rows, cols in _modules():
        state.update({f"{name}.{k}": v for k, v in _tensors(algo, rows, cols, g).items()})
    save_state_dict(state, path, {"ss_base_model_version": "flux1"})


def measure(path: Path) -> dict:
    """In this process: load ``path`` onto the weightless FLUX.1 architecture."""
    from loha_diffusion.attach import attach, plan
    from loha_diffusion.key_table import KeyTable
    from loha_diffusion.layers import AdapterLayer
    from loha_diffusion.skeletons import skeleton_components
    from loha_diffusion.sources import read_source

    components = skeleton_components("flux")
    table = KeyTable(**components)
    release_freed_memory()
    reset_peak_rss()
    before = status_mib("VmRSS")
    start = time.perf_counter()
    adapter = read_source(path).kohya_file(table)
    attach(plan(adapter.modules, table, adapter.source, adapter.metadata), table, "bench")
    seconds = time.perf_counter() - start
    peak = status_mib("VmHWM") - before
    held = weights = rows_taken = 0
    largest = 0.0
    for layer in components["transformer"].modules():
        if isinstance(layer, AdapterLayer):
            adapter = layer.adapters["bench"]
            count = sum(p.numel() for p in adapter.params.values())
            held += count
            weights += layer.base_layer.weight.numel()
            largest = max(largest, max(p.numel() for p in adapter.params.values()) / layer.base_layer.weight.numel())
            rows_taken += adapter.source_rows is not None
    return {"seconds": seconds, "peak_rss_rise_mib": peak, "adapter_elements_over_weights": held / weights,
            "largest_tensor_over_its_weight": largest, "layers_taking_rows": rows_taken}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the subprocess
    args = parser.parse_args()
    configure_threads()
    if args.measure:
        print(json.dumps(measure(Path(args.measure))))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for algo in ("lora", "loha", "lokr"):
            path = Path(tmp) / f"flux_{algo}.safetensors"
            write_file(algo, path)
            out = subprocess.run([sys.executable, __file__, "--measure", str(path)], capture_output=True, text=True,
                                 check=True, cwd=REPO_ROOT)
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            figures["file_mib"] = path.stat().st_size / 2**20
            figures["peak_over_file"] = figures["peak_rss_rise_mib"] / figures["file_mib"]
            results[algo] = figures
            print(f"{algo:5} file {figures['file_mib']:7.1f} MiB  load {figures['seconds']:5.1f} s  "
                  f"peak RSS +{figures['peak_rss_rise_mib']:7.1f} MiB ({figures['peak_over_file']:.2f}x the file)  "
                  f"adapter elements {figures['adapter_elements_over_weights']:.4f}x the weights "
                  f"(largest tensor {figures['largest_tensor_over_its_weight']:.4f}x its layer's)  "
                  f"layers taking rows: {figures['layers_taking_rows']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
