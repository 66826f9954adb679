"""``loha-diffusion inspect FILE`` and ``loha-diffusion convert SRC DST --to kohya|peft|diffusers``.

Exit status 2 with one clear message on bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from .convert import convert
from .family import detect_family
from .io import AdapterFileError
from .naming.dit import detect_dit_naming
from .naming.keys import DIT_FAMILIES, LYCORIS_PREFIX, PREFIX_OWNERS, TRANSFORMER_PREFIX, UNET_PREFIX
from .naming.kohya import detect_unet_naming
from .sources import read_source


def inspect_file(path, allow_pickle: bool = False) -> dict:
    """What a file holds: layout, family, algorithms, per-prefix module counts, ranks, alphas, metadata.
    Every key is kept (unknown ones listed) and non-finite values are reported, not refused."""
    source = read_source(Path(path), allow_pickle)
    layout = source.layout
    adapter = source.kohya_file(allow_unknown_keys=True, allow_non_finite=True)
    tensors, metadata, modules = adapter.tensors, adapter.metadata, adapter.modules
    names = list(modules)
    tags = Counter(m.algorithm.NAME + ("+dora" if m.dora_scale is not None else "") for m in modules.values())
    prefixes = Counter(next((p for p in PREFIX_OWNERS if n.startswith(p)), n.split("_", 1)[0] + "_") for n in names)
    family = detect_family(metadata, tensors, names)
    return {
        "file": str(path),
        "layout": layout,
        "family": family,
        "denoiser_naming": _denoiser_naming(family, names),
        "modules": len(modules),
        "modules_by_prefix": dict(prefixes),
        "algorithms": dict(tags),
        "ranks": dict(sorted(Counter(m.rank for m in modules.values() if m.rank is not None).items())),
        "alphas": dict(sorted(Counter(m.alpha for m in modules.values() if m.alpha is not None).items())),
        "modules_without_alpha": sum(1 for m in modules.values() if m.alpha is None and m.rank is not None),
        "dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())),
        "unknown_keys": adapter.unknown_keys,
        "metadata": metadata,
    }


def _denoiser_naming(family: str | None, names: list[str]) -> str | None:
    """How the file names the UNet ("diffusers", "sgm") or the DiT transformer ("original": BFL /
    SAI names as kohya and ComfyUI write; "diffusers": diffusers' tree as LyCORIS / SimpleTuner,
    OneTrainer and PEFT write), or "mixed"."""
    if family not in DIT_FAMILIES:
        return detect_unet_naming(names)
    prefixes = (UNET_PREFIX, LYCORIS_PREFIX, TRANSFORMER_PREFIX)
    return detect_dit_naming(name[len(p):] for name in names for p in prefixes if name.startswith(p))


def _print_report(report: dict) -> None:
    for key in ("file", "layout", "family", "denoiser_naming", "modules", "modules_by_prefix", "algorithms", "ranks",
                "alphas", "modules_without_alpha", "dtypes"):
        print(f"{key:22} {report[key]}")
    unknown = report["unknown_keys"]
    print(f"{'unknown_keys':22} {len(unknown)}" + (f"  e.g. {unknown[:5]}" if unknown else ""))
    print("metadata:")
    for key, value in sorted(report["metadata"].items()):
        shown = value if len(value) <= 100 else value[:97] + "..."
        print(f"  {key}: {shown}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="loha-diffusion", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_inspect = sub.add_parser("inspect", help="describe an adapter file")
    p_inspect.add_argument("file")
    p_inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    p_inspect.add_argument("--allow-pickle", action="store_true", help="read a pickled .ckpt/.pt (trusted files only)")
    p_convert = sub.add_parser("convert", help="convert between Kohya/LyCORIS, PEFT and diffusers formats")
    p_convert.add_argument("source", help="a Kohya/LyCORIS or diffusers LoRA .safetensors file, or a PEFT folder")
    p_convert.add_argument("destination", help="a .safetensors file (kohya, diffusers) or a folder (peft)")
    p_convert.add_argument("--to", required=True, choices=["kohya", "peft", "diffusers"])
    p_convert.add_argument("--base-model", help="diffusers model folder whose configs give the module tree "
                                                 "(default: the published SD1/SD2/SDXL architecture)")
    p_convert.add_argument("--family", choices=["sd1", "sd2", "sdxl", "flux", "sd3", "sd3.5-medium", "sd3.5-large"],
                           help="base model when it cannot be detected (default: detected; for SD3 files the first "
                                "of sd3, sd3.5-medium, sd3.5-large whose layers fit)")
    p_convert.add_argument("--as-lora", action="store_true",
                           help="kohya output: turn LoHa modules into exactly equivalent LoRA (rank r^2)")
    p_convert.add_argument("--approximate-rank", type=int,
                           help="allow a rank-N SVD approximation where the target cannot be exact")
    p_convert.add_argument("--naming", choices=["diffusers", "original"], default="diffusers",
                           help="kohya output of a Flux / SD3 file: the transformer under diffusers' module names "
                                "with LyCORIS' prefix (lycoris_..., SimpleTuner's layout) or under the original "
                                "BFL / SAI names as kohya sd-scripts writes them (lora_unet_double_blocks_...)")
    p_convert.add_argument("--save-precision", choices=["fp32", "fp16", "bf16"])
    p_convert.add_argument("--allow-pickle", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            report = inspect_file(args.file, args.allow_pickle)
            print(json.dumps(report, indent=2, default=str)) if args.json else _print_report(report)
        else:
            out = convert(args.source, args.destination, args.to, base_model=args.base_model, family=args.family,
                          as_lora_exact=args.as_lora, approximate_rank=args.approximate_rank,
                          save_dtype=args.save_precision, allow_pickle=args.allow_pickle,
                          progress=sys.stderr.isatty(), naming=args.naming)
            print(f"wrote {out}")
    except (AdapterFileError, OSError, ValueError) as exc:
        # one line, whatever the message's layout: scripts grep it, people read it
        print("loha-diffusion: error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
