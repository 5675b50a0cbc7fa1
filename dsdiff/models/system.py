"""The LightningModule: uncertainty-aware cross-entropy training, mIoU on the tune split, TTA testing.

Inference (tune split, test, pseudo-labels) runs at ``eval_scale``: each image resized keeping its
ratio into (long, short) as mmseg's test pipeline does, the logits resized back to the input's size.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric

from dsdiff.data.classes import CITYSCAPES_CLASSES, CITYSCAPES_COLORS, IGNORE_INDEX, voc_palette
from dsdiff.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dsdiff.models.inference import predict_logits
from dsdiff.models.metrics import iou_metric, mean_iou
from dsdiff.models.tta import PAPER_SCALES, keep_ratio_size, tta_logits
from dsdiff.utils.errors import SettingError


def uncertainty_aware_ce(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy over certain pixels only; uncertain (ignore_index) pixels give no gradient.

    logits (B, C, H, W), target (B, H, W). A batch with no certain pixel gives a zero loss
    (still attached to the graph), not NaN.
    """
    valid = (target != ignore_index).sum()
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return loss / valid.clamp(min=1)


class Segmenter(L.LightningModule):
    """Trains a ``SegmentationNet``; logs ``tune/mIoU``, ``tune/IoU/<class>``, ``test/mIoU(_tta)``.

    A net with a ``training_loss`` (``Mask2FormerNet``) trains with it instead of the cross-entropy,
    and one with ``param_groups`` gives the optimizer its own parameter groups.

    Validation runs on the tune split (never the test split); ``tune_step`` is the global step of
    the last tune/mIoU logged, so a caller can tell whether it measured the final weights.
    """

    def __init__(
        self,
        net: nn.Module,
        class_names: Sequence[str],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        aux_weight: float = 0.4,
        backbone_lr_mult: float = 0.1,
        ignore_index: int = IGNORE_INDEX,
        tta_scales: Sequence[float] = PAPER_SCALES,
        tta_flip: bool = True,
        test_tta: bool = True,
        slide_crop: int | None = None,
        eval_scale: Sequence[int] | None = None,
    ):
        super().__init__()
        class_names = [str(name) for name in class_names]  # plain types (not ListConfig) in checkpoints
        tta_scales = [float(scale) for scale in tta_scales]
        if eval_scale is not None:
            eval_scale = [int(side) for side in eval_scale]
            if len(eval_scale) != 2 or min(eval_scale) < 1:
                raise SettingError(f"model.eval_scale={eval_scale}: expected [long side, short side], e.g. [2048, 512], "
                                 "or null for the native size")
        # factories stay out of the hyperparameters: checkpoints then hold plain values only and
        # load with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.class_names = list(class_names)
        num_classes = len(self.class_names)
        if getattr(net, "num_classes", num_classes) != num_classes:
            raise SettingError(
                f"the network predicts {net.num_classes} classes but the class list has {num_classes}: "
                "set model.net.num_classes to the dataset's number of classes (the default "
                "${data.num_classes} does this)"
            )
        self.tune_iou = iou_metric(num_classes, ignore_index)
        self.tune_miou_best = MaxMetric()
        self.tune_step: int | None = None
        self.test_iou = iou_metric(num_classes, ignore_index)
        self.test_iou_tta = iou_metric(num_classes, ignore_index)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, C, H, W) for normalised images (B, 3, H, W), predicted at ``eval_scale``."""
        return tta_logits(self._predict, images, (1.0,), flip=False, base_size=self._eval_size(images))

    def forward_tta(self, images: torch.Tensor) -> torch.Tensor:
        """Multi-scale + flip logits; the TTA ratios are relative to ``eval_scale``."""
        return tta_logits(self._predict, images, self.hparams.tta_scales, self.hparams.tta_flip, self._eval_size(images))

    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        return predict_logits(self.net, images, self.hparams.slide_crop)

    def _eval_size(self, images: torch.Tensor) -> tuple[int, int]:
        return keep_ratio_size(*images.shape[-2:], self.hparams.get("eval_scale"))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, masks = batch["image"], batch["mask"]
        if hasattr(self.net, "training_loss"):  # a query-based net (Mask2Former): its own ignore-aware set loss
            losses = self.net.training_loss(images, masks, self.hparams.ignore_index)
            for name, value in losses.items():
                self.log(f"train/{name}", value, prog_bar=name == "loss", batch_size=len(images))
            return losses["loss"]
        out, aux = self.net.forward_train(images)
        loss_main = uncertainty_aware_ce(out, masks, self.hparams.ignore_index)
        loss = loss_main
        if aux is not None and self.hparams.aux_weight > 0:
            loss_aux = uncertainty_aware_ce(aux, masks, self.hparams.ignore_index)
            loss = loss + self.hparams.aux_weight * loss_aux
            self.log("train/loss_aux", loss_aux, batch_size=len(images))
        self.log("train/loss_main", loss_main, batch_size=len(images))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        pred = self(batch["image"]).argmax(1)
        self.tune_iou.update(pred, batch["mask"])
        return {"pred": pred}  # for ValidationPanel's overlays

    def on_validation_epoch_end(self) -> None:
        per_class = self.tune_iou.compute()
        miou = mean_iou(per_class)
        self.tune_iou.reset()
        self.tune_miou_best.update(miou)
        self.log("tune/mIoU", miou, prog_bar=True, sync_dist=True)
        self.log("tune/mIoU_best", self.tune_miou_best.compute(), sync_dist=True)
        for name, value in zip(self.class_names, per_class):
            self.log(f"tune/IoU/{name}", value, sync_dist=True)
        self.tune_step = self.global_step

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.test_iou.update(self(batch["image"]).argmax(1), batch["mask"])
        if self.hparams.test_tta:
            self.test_iou_tta.update(self.forward_tta(batch["image"]).argmax(1), batch["mask"])

    def on_test_epoch_end(self) -> None:
        per_class = self.test_iou.compute()
        self.log("test/mIoU", mean_iou(per_class), sync_dist=True)
        for name, value in zip(self.class_names, per_class):
            self.log(f"test/IoU/{name}", value, sync_dist=True)
        self.test_iou.reset()
        if self.hparams.test_tta:
            per_class = self.test_iou_tta.compute()
            self.log("test/mIoU_tta", mean_iou(per_class), sync_dist=True)
            for name, value in zip(self.class_names, per_class):
                self.log(f"test/IoU_tta/{name}", value, sync_dist=True)
            self.test_iou_tta.reset()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Make the checkpoint self-describing (plain types, ``weights_only=True``-loadable): the net's
        class and arguments, the classes, palette, normalisation and inference settings, so that
        ``dsdiff.Segmenter.from_checkpoint`` needs only the file."""
        checkpoint["dsdiff"] = self.describe()
        if getattr(self, "provenance", None):  # what trained it (dsdiff.chain.provenance), set by the training chain
            checkpoint["dsdiff"]["training"] = self.provenance

    def describe(self) -> dict:
        net = {"class": f"{type(self.net).__module__}.{type(self.net).__qualname__}",
               "args": {**getattr(self.net, "init_args", {}), "encoder_weights": None}}
        colors = CITYSCAPES_COLORS if tuple(self.class_names) == CITYSCAPES_CLASSES else voc_palette(len(self.class_names))
        eval_scale = self.hparams.get("eval_scale")
        return {
            "format": 1, "net": net, "class_names": list(self.class_names),
            "palette": [int(v) for rgb in colors for v in rgb],
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "eval_scale": None if eval_scale is None else list(eval_scale),
            "tta_scales": list(self.hparams.tta_scales), "tta_flip": bool(self.hparams.tta_flip),
            "slide_crop": self.hparams.slide_crop, "ignore_index": int(self.hparams.ignore_index),
        }

    def configure_optimizers(self):
        base_lr = self.optimizer_factory.keywords["lr"]
        if hasattr(self.net, "param_groups"):  # the net's own groups (Mask2Former: no decay on norms, embeddings)
            groups = self.net.param_groups(base_lr, self.hparams.backbone_lr_mult)
        elif hasattr(self.net, "backbone_parameters"):  # pretrained backbone: smaller lr
            groups = [
                {"params": self.net.backbone_parameters(), "lr": base_lr * self.hparams.backbone_lr_mult},
                {"params": self.net.head_parameters(), "lr": base_lr},
            ]
        else:
            groups = [{"params": list(self.net.parameters()), "lr": base_lr}]
        optimizer = self.optimizer_factory(params=groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer, total_iters=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
