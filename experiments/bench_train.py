"""Benchmark: the Lightning segmenter's training step vs a bare PyTorch loop, and the data pipeline.

One run measures, side by side on the same network, batches and optimizer (AdamW with the
backbone/head parameter groups and the poly schedule of conf/model):
1. steps/s of a bare PyTorch loop (forward_train, uncertainty-aware CE + 0.4 x aux, backward,
   step, schedule) vs ``dsdiff.models.system.Segmenter`` under ``lightning.Trainer`` (no
   callbacks, as the bare loop), and vs the Trainer with the training run's callbacks (EMA of
   the weights, lr monitor) and CSV logger. Both read the same pre-made batches, so the data
   pipeline is out of this comparison. Target: Lightning >= 0.95 of the bare loop's steps/s.
2. the data pipeline alone (dataset + transform + collate through ``SegDataModule``'s loader at
   the preset's default worker count): batches/s against the bare step's rate. Target: the
   loader feeds batches faster than the step consumes them.
3. on CUDA also precision bf16-mixed and a channels-last network, each a switch over fp32.

Presets: ``shapes`` is the demo's segmenter (DeepLabV3+ ResNet-18 from scratch, 32 px crops,
batch 32, 0 workers, shapes-world images); ``voc`` is the paper's (DeepLabV3 ResNet-101, output
stride 8, 512 px crops, batch 8, 4 workers) on a VOC-format folder of random 512 px JPEGs
written to a temporary folder (VOC itself is not needed: step time does not depend on content).

    python experiments/bench_train.py                                    # CPU, shapes preset
    python experiments/bench_train.py --device cuda --preset voc shapes --precision 32-true bf16-mixed --channels-last
    python experiments/bench_train.py --write-results                    # update the shipped experiments/results/

Writes its section of ``bench_train.md`` into ``outputs/experiments/bench_train/<time>/`` (printed), or
with ``--write-results`` of experiments/results/bench_train.md (``--out``: another path); the section
names the command that made it.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from dsdiff.data.classes import SHAPES_CLASSES, VOC_CLASSES
from dsdiff.data.datamodule import SegDataModule
from dsdiff.data.transforms import TrainTransform
from dsdiff.models.net import SegmentationNet
from dsdiff.models.system import Segmenter, uncertainty_aware_ce
from dsdiff.utils.io import write_json_atomic

from _results import add_write_results, run_folder, write_section  # experiments/_results.py

RESULTS = "bench_train.md"  # in the run's folder

PRESETS = {
    "shapes": dict(classes=SHAPES_CLASSES, arch="deeplabv3plus", encoder="resnet18", output_stride=8,
                   decoder_channels=64, aux_channels=32, crop=32, scale_range=(0.75, 1.5), photometric=False,
                   batch=32, workers=0, lr=1e-3, backbone_lr_mult=1.0),
    "voc": dict(classes=VOC_CLASSES, arch="deeplabv3", encoder="resnet101", output_stride=8,
                decoder_channels=256, aux_channels=256, crop=512, scale_range=(0.5, 2.0), photometric=True,
                batch=8, workers=4, lr=1e-4, backbone_lr_mult=0.1),
}
AUX_WEIGHT = 0.4


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_net(p: dict, device: torch.device, channels_last: bool) -> SegmentationNet:
    torch.manual_seed(0)
    net = SegmentationNet(len(p["classes"]), arch=p["arch"], encoder_name=p["encoder"], encoder_weights=None,
                          output_stride=p["output_stride"], decoder_channels=p["decoder_channels"],
                          aux_channels=p["aux_channels"]).to(device)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def datamodule(p: dict, name: str, root: Path, workers: int | None = None) -> SegDataModule:
    """The preset's train split through SegDataModule, as ``dsdiff.train`` builds it."""
    if name == "shapes":
        from dsdiff.data.shapes import ShapesDataset

        train = partial(ShapesDataset, split="train", size=2000, image_size=32, seed=0)
    else:
        from dsdiff.data.voc import VOCSegmentation

        if not (root / "JPEGImages").is_dir():
            write_random_voc(root, n=48, size=512)
        train = partial(VOCSegmentation, root=root, split="train")
    dm = SegDataModule(len(p["classes"]), train=train, tune=None, test=None, batch_size=p["batch"],
                       train_transform=TrainTransform(p["crop"], p["scale_range"], True, p["photometric"]),
                       num_workers=p["workers"] if workers is None else workers, pin_memory=True)
    dm.setup("fit")
    return dm


def write_random_voc(root: Path, n: int, size: int) -> None:
    """A VOC-layout train split of random-noise JPEGs with a few random class boxes per mask."""
    import numpy as np
    from PIL import Image

    from dsdiff.data.classes import flat_palette

    rng = np.random.default_rng(0)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    names = [f"2007_{i:06d}" for i in range(n)]
    for name in names:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg", quality=90)
        mask = np.zeros((size, size), dtype=np.uint8)
        for _ in range(3):
            top, left = rng.integers(0, size // 2, 2)
            mask[top:top + size // 3, left:left + size // 3] = rng.integers(1, len(VOC_CLASSES))
        png = Image.fromarray(mask)
        png.putpalette(flat_palette())
        png.save(root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(names) + "\n")


class Batches(torch.utils.data.Dataset):
    """``total`` items cycling over a few pre-made batches (``batch_size=None`` loaders)."""

    def __init__(self, batches: list[dict], total: int):
        self.batches, self.total = batches, total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, i: int) -> dict:
        return self.batches[i % len(self.batches)]


def param_groups(net, p: dict) -> list[dict]:
    return [{"params": net.backbone_parameters(), "lr": p["lr"] * p["backbone_lr_mult"]},
            {"params": net.head_parameters(), "lr": p["lr"]}]


def bare_loop(p, batches, args, device, precision: str, channels_last: bool) -> float:
    """Seconds per step of a plain PyTorch training loop over the pre-made batches."""
    net = make_net(p, device, channels_last).train()
    opt = torch.optim.AdamW(param_groups(net, p), lr=p["lr"], weight_decay=1e-4)
    total = args.warmup + args.steps
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=total, power=0.9)
    loader = torch.utils.data.DataLoader(Batches(batches, total), batch_size=None, pin_memory=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    start = None
    for i, batch in enumerate(loader):
        if i == args.warmup:
            sync(device)
            start = time.perf_counter()
        images = batch["image"].to(device, non_blocking=True)
        masks = batch["mask"].to(device, non_blocking=True)
        with autocast:
            out, aux = net.forward_train(images)
            loss = uncertainty_aware_ce(out, masks) + AUX_WEIGHT * uncertainty_aware_ce(aux, masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    sync(device)
    return (time.perf_counter() - start) / args.steps


def lightning_loop(p, batches, args, device, precision: str, channels_last: bool, callbacks: bool) -> float:
    """Seconds per step of Segmenter under lightning.Trainer over the same pre-made batches."""
    import lightning as L

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == args.warmup:
                sync(device)
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx == args.warmup + args.steps - 1:
                sync(device)
                self.seconds = time.perf_counter() - self.start

    net = make_net(p, device, channels_last)
    model = Segmenter(net, list(p["classes"]), optimizer=partial(torch.optim.AdamW, lr=p["lr"], weight_decay=1e-4),
                      scheduler=partial(torch.optim.lr_scheduler.PolynomialLR, power=0.9),
                      aux_weight=AUX_WEIGHT, backbone_lr_mult=p["backbone_lr_mult"])
    timer = StepTimer()
    extra, logger = [], False
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    if callbacks:  # what a training run adds: conf/callbacks/default.yaml's per-step ones, CSV logging
        from lightning.pytorch.callbacks import LearningRateMonitor
        from lightning.pytorch.loggers import CSVLogger

        from dsdiff.models.ema import EMAWeights

        extra = [EMAWeights(decay=0.999), LearningRateMonitor(logging_interval="step")]
        logger = CSVLogger(tmp)
    total = args.warmup + args.steps
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision, max_steps=total,
        logger=logger, callbacks=[timer, *extra], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=20,
        default_root_dir=tmp,
    )
    loader = torch.utils.data.DataLoader(Batches(batches, total), batch_size=None, pin_memory=device.type == "cuda")
    trainer.fit(model, train_dataloaders=loader)
    return timer.seconds / args.steps


def sample_loader(dm: SegDataModule, distinct: int, timed: int) -> tuple[list[dict], float, int]:
    """``distinct`` batches from the train loader, then the seconds per batch of ``timed`` more
    (after the first, which pays the worker start-up), and the worker count."""
    loader = dm.train_dataloader()
    it = iter(loader)
    batches = []
    for _ in range(distinct):
        batch = next(it)
        batches.append({"image": batch["image"], "mask": batch["mask"]})
    start = time.perf_counter()
    for _ in range(timed):
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            next(it)
    seconds = (time.perf_counter() - start) / timed
    workers = loader.num_workers
    del it, loader  # stops the persistent workers before the training loops run
    return batches, seconds, workers


def run_preset(name: str, args, device, root: Path) -> list[dict]:
    p = dict(PRESETS[name])
    p.update({k: v for k, v in (("batch", args.batch), ("crop", args.crop)) if v is not None})
    dm = datamodule(p, name, root / name)
    batches, load_s, workers = sample_loader(dm, args.distinct, args.loader_batches)
    print(f"[{name}] loader ({workers} workers): {load_s * 1e3:.1f} ms/batch", flush=True)
    rows = []
    variants = [(prec, False) for prec in args.precision]
    if args.channels_last:
        variants.append((args.precision[-1], True))
    for prec, cl in variants:
        label = prec + (", channels-last" if cl else "")
        bare, light, full = [], [], []
        for _ in range(args.rounds):  # interleaved, so load drifts on a shared machine hit all three alike
            bare.append(bare_loop(p, batches, args, device, prec, cl))
            light.append(lightning_loop(p, batches, args, device, prec, cl, callbacks=False))
            full.append(lightning_loop(p, batches, args, device, prec, cl, callbacks=True))
        bare.append(bare_loop(p, batches, args, device, prec, cl))  # the bare loop brackets the others
        bare_s, light_s, full_s = statistics.median(bare), statistics.median(light), statistics.median(full)
        row = {"preset": name, "setting": label, "batch": p["batch"], "crop": p["crop"], "bare_s": bare_s,
               "bare_runs": bare, "lightning_runs": light, "lightning_callbacks_runs": full,
               "lightning_s": light_s, "lightning_callbacks_s": full_s,
               "ratio": bare_s / light_s, "ratio_callbacks": bare_s / full_s, "loader_s": load_s, "workers": workers,
               "loader_vs_step": load_s / bare_s}
        rows.append(row)
        print(f"[{name}, {label}] bare {1 / bare_s:.2f} steps/s (runs {[round(b * 1e3) for b in bare]} ms), "
              f"lightning {1 / light_s:.2f} ({row['ratio']:.3f} of bare), with callbacks {1 / full_s:.2f} "
              f"({row['ratio_callbacks']:.3f}); loader {load_s * 1e3:.1f} ms/batch = {row['loader_vs_step']:.2f} of a step",
              flush=True)
    return rows


def render(args, device, rows) -> str:
    import lightning

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} thread(s)"
    lines = [
        f"## {device.type.upper()}: Lightning vs a bare loop, data pipeline",
        "",
        f"Written by `python experiments/bench_train.py {' '.join(sys.argv[1:])}`.",
        "",
        f"- device: {device.type} ({where}); torch {torch.__version__}; lightning {lightning.__version__}",
        f"- {args.warmup} warm-up steps then {args.steps} timed steps per loop over {args.distinct} pre-made batches "
        f"from the preset's real data pipeline; {args.rounds} interleaved round(s) of bare, Lightning, Lightning + callbacks, "
        "then bare once more; medians (every run in the JSON)",
        "- shapes: DeepLabV3+ ResNet-18 (the demo's), 32 px crops, batch 32, 0 workers; voc: DeepLabV3 ResNet-101 OS 8, "
        "512 px crops, batch 8, 4 workers (random VOC-format JPEGs). Random init (no download).",
        "- 'with callbacks': the run's EMA of the weights, lr monitor and CSV logger (log_every_n_steps 20). "
        "Loader: the train DataLoader alone at the preset's worker count; 'loader / step' < 1 means it keeps up.",
        "",
        "| preset | precision / layout | batch | bare steps/s | Lightning steps/s | Lightning / bare | + callbacks steps/s | + callbacks / bare | loader ms/batch (workers) | loader / step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['setting']} | {r['batch']} | {1 / r['bare_s']:.2f} | {1 / r['lightning_s']:.2f} | {r['ratio']:.3f} "
            f"| {1 / r['lightning_callbacks_s']:.2f} | {r['ratio_callbacks']:.3f} | {r['loader_s'] * 1e3:.1f} ({r['workers']}) | {r['loader_vs_step']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", nargs="+", choices=sorted(PRESETS), default=None, help="default: shapes on CPU, voc on CUDA")
    ap.add_argument("--precision", nargs="+", default=["32-true"], choices=["32-true", "bf16-mixed"])
    ap.add_argument("--channels-last", action="store_true", help="also the last precision with a channels-last network")
    ap.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    ap.add_argument("--crop", type=int, default=None, help="override the preset's crop size (quick checks)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the three loops (medians)")
    ap.add_argument("--distinct", type=int, default=4, help="pre-made batches the loops cycle over")
    ap.add_argument("--loader-batches", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1: steadiest on a shared machine)")
    ap.add_argument("--out", type=Path, default=None, help=f"the results file (default: {RESULTS} in the run's folder)")
    ap.add_argument("--json", type=Path, default=None)
    add_write_results(ap)
    args = ap.parse_args()
    if args.out is None:
        args.out = run_folder("bench_train", args.write_results) / RESULTS
        print(f"results -> {args.out}", flush=True)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        if "bf16-mixed" in args.precision:
            ap.error("--precision bf16-mixed is measured on CUDA only")
    presets = args.preset or (["voc"] if device.type == "cuda" else ["shapes"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train_data_") as tmp:
        for name in presets:
            rows += run_preset(name, args, device, Path(tmp))
            text = render(args, device, rows)
            write_section(args.out, f"bench_train:{device.type}", text, "bench_train")
            if args.json:
                write_json_atomic(args.json, {"device": device.type, "torch": torch.__version__, "rows": rows})
    print(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
