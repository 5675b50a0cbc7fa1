"""Benchmark: does reading the synthetic cache keep up with reading VOC?

One run, side by side on the same 512x512 images: samples/s of ``SyntheticDataset`` (PNG images,
and JPEG images) vs ``VOCSegmentation`` reading the same samples exported as a VOC folder, each
with the VOC training transforms (random resize 0.5-2, crop 512, flip, photometric distortion),
through a DataLoader with ``num_workers`` 0 and 2. Target: synthetic within 10% of VOC.

    python experiments/bench_data.py                 # 48 images, 5 passes per setting
    python experiments/bench_data.py --images 200 --workers 0 2 4
    python experiments/bench_data.py --write-results    # update the shipped experiments/results/bench_data.md

Writes ``bench_data.md`` into ``outputs/experiments/bench_data/<time>/`` (printed), or with
``--write-results`` into experiments/results/ (``--out``: another path); the table names its command.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from dsdiff.data.classes import VOC_CLASSES
from dsdiff.data.datamodule import pad_collate
from dsdiff.synthetic.dataset import SyntheticDataset
from dsdiff.synthetic.export import export_voc
from dsdiff.synthetic.spec import sample_id
from dsdiff.synthetic.store import SyntheticStore
from dsdiff.data.transforms import TrainTransform
from dsdiff.data.voc import VOCSegmentation
from dsdiff.utils.io import write_text_atomic

from _results import add_write_results, run_folder  # experiments/_results.py

RESULTS = "bench_data.md"  # in the run's folder


def photo_like(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth image with a few blobs (compresses like a photo, unlike noise) and its label map."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.stack([128 + 60 * np.sin(6 * xx * rng.uniform(0.5, 2) + c) * np.cos(4 * yy + c) for c in range(3)], -1)
    label = np.zeros((size, size), np.uint8)
    for _ in range(3):
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.25)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        cls = int(rng.integers(1, len(VOC_CLASSES)))
        label[blob] = cls
        image[blob] = rng.uniform(30, 220, 3) + rng.normal(0, 8, (blob.sum(), 3))
    edge = (np.abs(np.diff(label.astype(int), axis=0, prepend=0)) > 0)
    label[edge] = 255
    return image.clip(0, 255).astype(np.uint8), label


def build(root: Path, n: int, size: int, image_format: str) -> Path:
    store = SyntheticStore(root)
    store.prepare({"class_names": list(VOC_CLASSES), "bench": True})
    rng = np.random.default_rng(0)
    for i in range(n):
        image, label = photo_like(rng, size)
        store.write_sample(sample_id(i), image, label, {"seed": i}, image_format=image_format)
    store.compact()
    return root


def rates(datasets: dict, workers: int, batch: int, passes: int) -> dict[str, float]:
    """Median samples/s per dataset over ``passes`` full passes, the readers taking turns pass by
    pass so that load from other processes hits them alike (workers get one warm-up pass)."""
    loaders = {name: DataLoader(d, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=pad_collate,
                                persistent_workers=workers > 0) for name, d in datasets.items()}
    timings: dict[str, list[float]] = {name: [] for name in loaders}
    for p in range(passes + (1 if workers else 0)):
        for name, loader in loaders.items():
            t0 = time.perf_counter()
            n = sum(len(b["name"]) for b in loader)
            if not (workers and p == 0):
                timings[name].append(n / (time.perf_counter() - t0))
    return {name: statistics.median(t) for name, t in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None, help=f"the results file (default: {RESULTS} in the run's folder)")
    add_write_results(parser)
    args = parser.parse_args()
    out = args.out or run_folder("bench_data", args.write_results) / RESULTS
    torch.manual_seed(0)
    transform = TrainTransform(crop_size=512)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        png = build(Path(tmp) / "png", args.images, args.size, "png")
        jpg = build(Path(tmp) / "jpg", args.images, args.size, "jpg")
        voc = export_voc(png, Path(tmp) / "voc")  # the same samples, VOC layout (JPEG images)
        readers = {
            "VOCSegmentation (export)": VOCSegmentation(voc, split="train", transform=transform),
            "SyntheticDataset, jpg": SyntheticDataset(jpg, transform=transform),
            "SyntheticDataset, png": SyntheticDataset(png, transform=transform),
        }
        for workers in args.workers:
            torch.set_num_threads(1 if workers else max(1, os.cpu_count() or 1))
            measured = rates(readers, workers, args.batch, args.passes)
            base = measured["VOCSegmentation (export)"]
            for name, r in measured.items():
                rows.append((workers, name, r, r / base))
                print(f"workers={workers}  {name:28s} {r:7.1f} samples/s  ratio to VOC {r / base:.3f}", flush=True)
    lines = [
        "# Synthetic reader vs VOC reader",
        "",
        f"`python experiments/bench_data.py --images {args.images} --passes {args.passes}"
        f"{' --write-results' if args.write_results else ''}` "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}).",
        f"{args.images} images of {args.size}x{args.size}, VOC training transforms with crop 512, batch {args.batch}; "
        "median samples/s over full passes, readers taking turns pass by pass in one run. Target: synthetic >= 0.9x VOC.",
        "",
        "| num_workers | reader | samples/s | ratio to VOC |",
        "| --- | --- | ---: | ---: |",
        *[f"| {w} | {name} | {r:.1f} | {ratio:.3f} |" for w, name, r, ratio in rows],
        "",
    ]
    write_text_atomic(out, "\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
