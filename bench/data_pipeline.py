"""The trainer's data pipeline at dataset scale: peak memory and throughput.

Generates ``--images`` (2,000) JPEG photos of 512x768 into a temporary folder, then, each in a
fresh subprocess so that peak memory is its own:

  lazy   what the trainer does: check every file up front (open, read the header and size),
         then decode each image when its batch is made, through aspect-ratio buckets at
         resolution 512 (``--enable_bucket``), a DataLoader with batch 4, one epoch
  eager  the previous trainer's way, for comparison: decode every image to RGB up front and
         keep it, then the same epoch from memory

Reported: seconds to check / decode up front, seconds for the epoch, and the rise of peak RSS
(VmHWM after the run minus RSS after imports). The target: the lazy pipeline raises peak RSS
by no more than a few hundred MB, whatever the number of images.

    python bench/data_pipeline.py [--images 2000] [--json out.json] [--skip-eager]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from _common import configure_threads, current_rss_mib, release_freed_memory, status_mib  # noqa: E402

WIDTH, HEIGHT, RESOLUTION, BATCH = 512, 768, 512, 4


def generate_images(folder: Path, count: int) -> None:
    """Smooth gradients plus noise (JPEG sizes of real photos, ~50-100 KB), one caption each."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH].astype(np.float32)
    for i in range(count):
        phase = rng.uniform(0, 6.28, 3)
        base = np.stack([np.sin(xx / (40 + 7 * c) + yy / 90 + phase[c]) for c in range(3)], axis=-1)
        pixels = (base * 90 + 128 + rng.normal(0, 12, (HEIGHT, WIDTH, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
        (folder / f"{i:05d}.txt").write_text(f"photo number {i}")


def run_mode(mode: str, folder: Path) -> dict:
    from loha_diffusion.training.buckets import BucketBatchSampler, BucketPlan
    from loha_diffusion.training.data import DreamBoothDataset, collate
    from loha_diffusion.training.images import in_memory_records, scan_folder

    threads = configure_threads()
    release_freed_memory()
    start_rss = current_rss_mib()
    t0 = time.perf_counter()
    records = scan_folder(folder, None, "instance")
    if mode == "eager":
        records = in_memory_records([(r.load(), r.caption) for r in records])
    prepared_s = time.perf_counter() - t0
    after_prepare = current_rss_mib()
    plan = BucketPlan(RESOLUTION, enable=True)
    dataset = DreamBoothDataset(records, None, plan, center_crop=False, random_flip=True)
    sampler = BucketBatchSampler(dataset.bucket_of_index(), BATCH, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    t1 = time.perf_counter()
    samples, shapes = 0, set()
    for batch in loader:
        samples += batch["pixels"].shape[0]
        shapes.add(tuple(batch["pixels"].shape[2:]))
    epoch_s = time.perf_counter() - t1
    peak = status_mib("VmHWM")
    return {"mode": mode, "images": len(records), "samples": samples, "buckets": sorted(shapes), "threads": threads,
            "prepare_s": prepared_s, "epoch_s": epoch_s, "images_per_s": samples / epoch_s,
            "rss_start_mib": start_rss, "rss_after_prepare_mib": after_prepare, "peak_rss_mib": peak,
            "peak_rise_mib": peak - start_rss}


def in_subprocess(mode: str, folder: Path) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--run-mode", mode, "--folder", str(folder)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT_JSON "):
            return json.loads(line[len("RESULT_JSON "):])
    raise RuntimeError(f"{mode} run failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--json", default=None, help="write the figures to this path")
    parser.add_argument("--skip-eager", action="store_true", help="measure only the trainer's (lazy) pipeline")
    parser.add_argument("--keep", default=None, metavar="DIR", help="generate into DIR and keep it")
    parser.add_argument("--run-mode", choices=["lazy", "eager"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_mode:
        print("RESULT_JSON " + json.dumps(run_mode(args.run_mode, Path(args.folder))), flush=True)
        return 0
    if args.images < 1:
        parser.error("--images must be at least 1")

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="loha-data-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        if len(list(folder.glob("*.jpg"))) != args.images:
            generate_images(folder, args.images)
        size_mb = sum(p.stat().st_size for p in folder.glob("*.jpg")) / 2**20
        print(f"{args.images} JPEG images of {WIDTH}x{HEIGHT} ({size_mb:.0f} MiB on disk, decoded "
              f"{args.images * WIDTH * HEIGHT * 3 / 2**20:.0f} MiB) in {folder} ({time.perf_counter() - t0:.0f}s)")
        results = [in_subprocess(mode, folder) for mode in (["lazy"] if args.skip_eager else ["lazy", "eager"])]
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)

    print(f"\none epoch, buckets at resolution {RESOLUTION}, batch {BATCH}, random crop + flip, "
          f"{results[0]['threads']} threads")
    header = f"{'pipeline':8s} {'up front s':>10s} {'epoch s':>8s} {'img/s':>7s} {'RSS after up front':>19s} " \
             f"{'peak RSS rise':>14s}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['mode']:8s} {r['prepare_s']:10.1f} {r['epoch_s']:8.1f} {r['images_per_s']:7.1f} "
              f"{r['rss_after_prepare_mib'] - r['rss_start_mib']:15.0f} MiB {r['peak_rise_mib']:10.0f} MiB")
    lazy = results[0]
    print(f"buckets used (width x height): {', '.join(f'{w}x{h}' for h, w in lazy['buckets'])}")
    verdict = "met" if lazy["peak_rise_mib"] <= 300 else "MISSED"
    print(f"lazy pipeline peak RSS rise = {lazy['peak_rise_mib']:.0f} MiB (target <= 300 MiB) {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps({"images": args.images, "size": [WIDTH, HEIGHT], "results": results},
                                              indent=2))
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
