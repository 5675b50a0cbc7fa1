"""Mask2Former (transformers' ``Mask2FormerForUniversalSegmentation``) as a semantic segmenter.

:class:`Mask2FormerNet` has the interface of :class:`dsdiff.models.net.SegmentationNet`, so the
Segmenter's inference (padding, eval scale, TTA, sliding window) and the pseudo-labeller use it
unchanged: ``forward(x)`` maps (B, 3, H, W) to (B, C, H, W) *log* semantic scores, the log of
mmseg's / transformers' ``einsum(softmax(class)[..., :-1], sigmoid(masks))`` (mask logits upsampled
first), so a softmax over classes is the normalised score ``s_c / sum_k s_k``.

Training is semantic: one binary mask per class present among a label map's certain pixels,
Hungarian-matched to the queries, with transformers' class, mask (BCE) and dice losses. Uncertain
pixels (255) give no gradient: every point of the matcher and the mask losses is a certain pixel,
and a class seen only in the uncertain band is no target (:class:`IgnoreAwareMask2FormerLoss`;
transformers' own loss samples points anywhere in the image).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from dsdiff.data.classes import IGNORE_INDEX
from dsdiff.models.net import plain_init_args
from dsdiff.utils.config import check_number
from dsdiff.utils.errors import ModelLoadError, SettingError

log = logging.getLogger("dsdiff")

# encoder_weights -> timm's pretrained tag. mmseg's Mask2Former-R50 starts from torchvision's ResNet-50
# ("torchvision://resnet50"), which timm names "<arch>.tv_in1k"; smp's "imagenet" ResNets are the same weights.
WEIGHT_TAGS = {"imagenet": "tv_in1k"}
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def semantic_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, Q, C+1) class logits and (B, Q, h, w) mask logits -> (B, C, H, W) semantic scores at ``size``.

    mmseg's Mask2Former inference: the mask logits resized (bilinear) to ``size``, then
    ``einsum(softmax(class)[..., :-1], sigmoid(mask))``; each score lies in [0, Q].
    """
    masks = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
    return torch.einsum("bqc,bqhw->bchw", class_logits.softmax(-1)[..., :-1], masks.sigmoid())


def semantic_targets(label: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """One (H, W) label map -> (classes (n,), binary masks (n, H, W)) of the classes among its certain pixels."""
    classes = torch.unique(label[label != ignore_index])
    return classes, (label[None] == classes[:, None, None]).float()


# the net's numeric settings: (lowest, highest or None, whole number)
_NUMBERS = {"num_queries": (1, None, True), "encoder_layers": (1, None, True), "num_heads": (1, None, True),
            "train_num_points": (1, None, True), "class_weight": (0, None, False), "mask_weight": (0, None, False),
            "dice_weight": (0, None, False), "no_object_weight": (0, None, False), "oversample_ratio": (1, None, False),
            "importance_sample_ratio": (0, 1, False)}


class IgnoreAwareMask2FormerLoss(nn.Module):
    """transformers' Mask2Former set loss for label maps with an ignored label.

    Per decoder layer: Hungarian matching (class cost + mask BCE + dice on ``num_points`` points),
    cross-entropy over all queries (no-object weight ``no_object_weight``), and the matched masks'
    BCE and dice on ``num_points`` points per mask (``importance_sample_ratio`` of them the most
    uncertain of ``oversample_ratio`` x as many candidates). Every point is a certain pixel of the
    label map, read from the mask logits resized (bilinear) to the label's size, so an ignored pixel
    is never read and its logit gets no gradient. An image without a certain pixel adds nothing.
    """

    def __init__(self, num_classes: int, class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0,
                 no_object_weight: float = 0.1, num_points: int = 12544, oversample_ratio: float = 3.0,
                 importance_sample_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_weight, self.mask_weight, self.dice_weight = class_weight, mask_weight, dice_weight
        self.num_points, self.oversample_ratio, self.importance_sample_ratio = num_points, oversample_ratio, importance_sample_ratio
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def targets(self, labels: torch.Tensor) -> dict:
        """(B, H, W) label maps -> the batch's targets: flat labels, certain pixels, classes present among them."""
        flat = labels.flatten(1).long()
        valid = flat != self.ignore_index
        if bool((flat[valid] >= self.num_classes).any()):
            raise SettingError(f"a label map holds class {int(flat[valid].max())}, but the network predicts "
                               f"{self.num_classes} classes (0..{self.num_classes - 1}, {self.ignore_index} uncertain)")
        present = torch.zeros(len(flat), self.num_classes + 1, dtype=torch.bool, device=flat.device)
        present.scatter_(1, torch.where(valid, flat, self.num_classes), True)
        has = valid.any(1)
        # the running count of certain pixels per image: the k-th certain pixel is where it first reaches k
        # (an image without one is skipped; its row is never drawn from)
        counts = torch.where(has[:, None], valid, torch.ones_like(valid)).cumsum(1)
        return {"flat": flat, "counts": counts, "has": has, "present": present[:, : self.num_classes],
                "size": tuple(labels.shape[-2:])}

    def _points(self, counts: torch.Tensor, count: int) -> torch.Tensor:
        """``count`` flat pixel indices per row of ``counts`` (running counts of certain pixels), drawn
        uniformly with replacement from the certain pixels."""
        total = counts[:, -1:]
        k = (torch.rand(len(counts), count, device=counts.device) * total).long().clamp(max=total - 1) + 1
        return torch.searchsorted(counts, k)

    @torch.no_grad()
    def match(self, mask_logits: torch.Tensor, class_logits: torch.Tensor, targets: dict) -> list:
        """(B, Q, h, w) mask and (B, Q, C+1) class logits -> per image None or (query indices, their classes):
        transformers' Hungarian matching costs on ``num_points`` certain pixels per image."""
        from scipy.optimize import linear_sum_assignment
        from transformers.models.mask2former.modeling_mask2former import (
            pair_wise_dice_loss,
            pair_wise_sigmoid_cross_entropy_loss,
            sample_point,
        )

        height, width = targets["size"]
        points = self._points(targets["counts"], self.num_points)  # (B, P)
        coords = torch.stack([(points % width + 0.5) / width, (points // width + 0.5) / height], -1).to(mask_logits.dtype)
        pred = sample_point(mask_logits, coords, align_corners=False)  # (B, Q, P): bilinear at the pixel centres
        labels = targets["flat"].gather(1, points)
        probs = class_logits.softmax(-1)
        out = []
        for b in range(len(points)):
            if not targets["has"][b]:
                out.append(None)
                continue
            classes = targets["present"][b].nonzero()[:, 0]
            target = (labels[b][None] == classes[:, None]).to(pred.dtype)  # (n, P)
            cost = (self.mask_weight * pair_wise_sigmoid_cross_entropy_loss(pred[b], target)
                    - self.class_weight * probs[b][:, classes]
                    + self.dice_weight * pair_wise_dice_loss(pred[b], target))
            big = torch.finfo(cost.dtype).max
            rows, cols = linear_sum_assignment(torch.nan_to_num(cost, nan=big, posinf=big, neginf=big).cpu())
            rows, cols = (torch.as_tensor(i, dtype=torch.long, device=classes.device) for i in (rows, cols))
            out.append((rows, classes[cols]))
        return out

    def layer_loss(self, mask_logits: torch.Tensor, class_logits: torch.Tensor, targets: dict) -> dict[str, torch.Tensor]:
        """One decoder layer's (B, Q, h, w) mask and (B, Q, C+1) class logits against ``targets``
        -> its unweighted ``cls``, ``mask`` and ``dice`` losses."""
        from transformers.models.mask2former.modeling_mask2former import dice_loss, sigmoid_cross_entropy_loss

        mask_logits, class_logits = mask_logits.float(), class_logits.float()
        zero = class_logits.sum() * 0 + mask_logits.sum() * 0  # attached to the graph
        has = targets["has"]
        if not bool(has.any()):  # no certain pixel in the batch: no target, no gradient
            return {"cls": zero, "mask": zero, "dice": zero}
        matches = self.match(mask_logits, class_logits, targets)
        goal = torch.full(class_logits.shape[:2], self.num_classes, dtype=torch.long, device=class_logits.device)
        images, queries, classes = [], [], []
        for b, found in enumerate(matches):
            if found is not None:
                goal[b, found[0]] = found[1]
                images.append(torch.full_like(found[0], b))
                queries.append(found[0])
                classes.append(found[1])
        # transformers' loss_labels (weighted mean over every query) over the images with a certain pixel
        loss_cls = F.cross_entropy(class_logits[has].transpose(1, 2), goal[has], weight=self.empty_weight)
        images, queries, classes = torch.cat(images), torch.cat(queries), torch.cat(classes)
        num_masks = max(float(len(classes)), 1.0)
        # the matched masks at the label's resolution: the points index its pixels, never an uncertain one
        pred = F.interpolate(mask_logits[images, queries][:, None], size=targets["size"], mode="bilinear",
                             align_corners=False)[:, 0].flatten(1)
        counts = targets["counts"][images]
        num_uncertain = int(self.importance_sample_ratio * self.num_points)
        with torch.no_grad():
            candidates = self._points(counts, int(self.num_points * self.oversample_ratio))
            uncertainty = -pred.gather(1, candidates).abs()
            chosen = candidates.gather(1, uncertainty.topk(num_uncertain, dim=1).indices)
            if num_uncertain < self.num_points:
                chosen = torch.cat([chosen, self._points(counts, self.num_points - num_uncertain)], 1)
            labels = (targets["flat"][images].gather(1, chosen) == classes[:, None]).float()
        logits = pred.gather(1, chosen)
        return {"cls": loss_cls, "mask": sigmoid_cross_entropy_loss(logits, labels, num_masks),
                "dice": dice_loss(logits, labels, num_masks)}

    def forward(self, mask_logits: list[torch.Tensor], class_logits: list[torch.Tensor],
                labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-layer logits (the last is the final layer's) against (B, H, W) label maps -> ``loss`` (every layer's
        weighted sum), ``loss_main`` (the final layer's), ``loss_aux`` (the others'), and the final layer's
        unweighted ``cls``, ``mask``, ``dice``."""
        targets = self.targets(labels)
        weights = {"cls": self.class_weight, "mask": self.mask_weight, "dice": self.dice_weight}
        totals = []
        for masks, classes in zip(mask_logits, class_logits):
            parts = self.layer_loss(masks, classes, targets)
            totals.append(sum(weights[k] * v for k, v in parts.items()))
        main, aux = totals[-1], sum(totals[:-1], torch.zeros_like(totals[-1]))
        return {"loss": main + aux, "loss_main": main, "loss_aux": aux, **{f"loss_{k}": v.detach() for k, v in parts.items()}}


class Mask2FormerNet(nn.Module):
    """transformers' Mask2Former with a timm ResNet backbone, as a semantic segmenter.

    ``forward(x)`` maps (B, 3, H, W) to log semantic scores (B, C, H, W) (see the module docstring);
    H and W must be multiples of ``output_stride`` (32, the backbone's stride; ``predict_logits``
    pads). ``training_loss(images, labels)`` is the ignore-aware set loss over every decoder layer.

    encoder_name: a timm ResNet (resnet50, resnet18, ...); encoder_weights: ``imagenet``
    (torchvision's ImageNet weights, timm tag ``tv_in1k``, mmseg's starting point), another timm tag,
    or None for random weights. decoder_channels: the hidden width of the pixel decoder and the
    transformer decoder (256 in the paper's R50 model; a multiple of 32 for the GroupNorms); the
    feed-forward widths follow it (4x in the pixel decoder, 8x in the transformer decoder, as
    1024/2048 at 256). decoder_layers: transformers' count (10: nine masked-attention layers plus the
    first prediction; every layer's prediction is supervised). encoder_norm_trainable: mmseg's R50
    recipe freezes the backbone's BatchNorm affine weights (``requires_grad=False``); a backbone
    trained from scratch wants them trainable. aux_channels: has no meaning here (Mask2Former has
    no FCN auxiliary head; its auxiliary losses are the decoder layers' own predictions); it is
    accepted so that settings shared by every model (``debug=fast``) apply to this one too.
    """

    def __init__(
        self,
        num_classes: int,
        encoder_name: str = "resnet50",
        encoder_weights: str | None = "imagenet",
        decoder_channels: int = 256,
        num_queries: int = 100,
        encoder_layers: int = 6,
        decoder_layers: int = 10,
        num_heads: int = 8,
        encoder_norm_trainable: bool = False,
        output_stride: int = 32,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        train_num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        aux_channels: int | None = None,
    ):
        super().__init__()
        self.init_args = plain_init_args(locals())  # what a checkpoint records to rebuild this net
        from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, TimmBackboneConfig

        for name, value in [(k, v) for k, v in locals().items() if k in _NUMBERS]:
            check_number(f"model.net.{name}", value, *_NUMBERS[name], hint=" (conf/model/mask2former.yaml: the R50 recipe's)")
        if not encoder_name.startswith("resnet"):
            raise SettingError(f"model.net.encoder_name={encoder_name!r}: Mask2Former here takes a timm ResNet "
                               "(resnet18, resnet50, resnet101, ...)")
        if decoder_channels % 32 or decoder_channels % num_heads:
            raise SettingError(f"model.net.decoder_channels={decoder_channels}: Mask2Former's width must be a multiple of "
                               f"32 (its GroupNorms) and of num_heads={num_heads}, e.g. 32, 64, 128, 256")
        if output_stride != 32:
            raise SettingError(f"model.net.output_stride={output_stride}: Mask2Former's ResNet backbone has stride 32 "
                               "(its inputs are padded to a multiple of 32); use 32")
        if decoder_layers < 2:
            raise SettingError(f"model.net.decoder_layers={decoder_layers}: use 2 or more (transformers counts the "
                               "first prediction as a layer; the paper's model has 10)")
        self.num_classes, self.output_stride = num_classes, output_stride
        quiet = logging.getLogger("transformers.models.mask2former.configuration_mask2former")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "timm_backbone is not a supported model": it is, for ResNets (tested here)
        try:
            config = Mask2FormerConfig(
                backbone_config=TimmBackboneConfig(backbone=encoder_name, out_indices=[1, 2, 3, 4]),
                num_labels=num_classes, feature_size=decoder_channels, mask_feature_size=decoder_channels,
                hidden_dim=decoder_channels, encoder_feedforward_dim=4 * decoder_channels, dim_feedforward=8 * decoder_channels,
                encoder_layers=encoder_layers, decoder_layers=decoder_layers, num_attention_heads=num_heads,
                num_queries=num_queries, class_weight=class_weight, mask_weight=mask_weight, dice_weight=dice_weight,
                no_object_weight=no_object_weight, train_num_points=train_num_points, oversample_ratio=oversample_ratio,
                importance_sample_ratio=importance_sample_ratio)
            self.model = Mask2FormerForUniversalSegmentation(config)
        finally:
            quiet.setLevel(level)
        self.model.criterion = None  # transformers' own loss samples ignored pixels: IgnoreAwareMask2FormerLoss instead
        if encoder_weights is not None:
            self._load_encoder_weights(encoder_name, encoder_weights)
        if not encoder_norm_trainable:
            for module in self.encoder.modules():
                if isinstance(module, _NORMS):
                    for param in module.parameters(recurse=False):
                        param.requires_grad_(False)
        self.criterion = IgnoreAwareMask2FormerLoss(
            num_classes, class_weight, mask_weight, dice_weight, no_object_weight, train_num_points, oversample_ratio,
            importance_sample_ratio)

    @property
    def encoder(self) -> nn.Module:
        """The backbone (transformers' TimmBackbone; ``encoder._backbone`` is the timm model)."""
        return self.model.model.pixel_level_module.encoder

    def _load_encoder_weights(self, encoder_name: str, encoder_weights: str) -> None:
        import timm

        name = encoder_name if "." in encoder_name else f"{encoder_name}.{WEIGHT_TAGS.get(encoder_weights, encoder_weights)}"
        try:
            pretrained = timm.create_model(name, pretrained=True, features_only=True, out_indices=(1, 2, 3, 4))
        except Exception as err:  # timm raises many kinds (RuntimeError, OSError, HTTP errors)
            raise ModelLoadError(
                f"could not load the Mask2Former encoder {name!r} (model.net.encoder_name={encoder_name!r}, "
                f"encoder_weights={encoder_weights!r}; {type(err).__name__}: {err}). Pretrained weights are downloaded "
                "from the Hugging Face hub (timm) on first use and cached: check the network or the cache, or pass "
                "model.net.encoder_weights=null to train from scratch."
            ) from err
        self.encoder._backbone.load_state_dict(pretrained.state_dict())
        log.info("Mask2Former encoder: %s (timm, pretrained)", name)

    def _check_size(self, x: torch.Tensor) -> None:
        h, w = x.shape[-2:]
        if h % self.output_stride or w % self.output_stride:
            raise SettingError(
                f"input size {h}x{w} is not a multiple of Mask2Former's stride {self.output_stride}: pad the image "
                "(dsdiff.models.inference.predict_logits does) or change the crop size")

    def forward_train(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(B, 3, H, W) -> every decoder layer's (B, Q, H/4, W/4) mask logits and (B, Q, C+1) class logits
        (the final layer's last)."""
        self._check_size(x)
        out = self.model(pixel_values=x, output_auxiliary_logits=True)
        aux = out.auxiliary_logits or []
        masks = [a["masks_queries_logits"] for a in aux] + [out.masks_queries_logits]
        classes = [a["class_queries_logits"] for a in aux] + [out.class_queries_logits]
        return masks, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> log semantic scores (B, C, H, W); softmax over C is the normalised score."""
        self._check_size(x)
        out = self.model(pixel_values=x)
        scores = semantic_scores(out.class_queries_logits.float(), out.masks_queries_logits.float(), x.shape[-2:])
        return scores.clamp_min(1e-6).log()

    def training_loss(self, images: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
        """The set loss of every decoder layer for (B, H, W) label maps; uncertain pixels give no gradient."""
        self.criterion.ignore_index = ignore_index
        masks, classes = self.forward_train(images)
        return self.criterion(masks, classes, labels)

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def head_parameters(self) -> list[nn.Parameter]:
        backbone = {id(p) for p in self.encoder.parameters()}
        return [p for p in self.parameters() if id(p) not in backbone and p.requires_grad]

    def param_groups(self, lr: float, backbone_lr_mult: float) -> list[dict]:
        """mmseg's Mask2Former groups: the backbone at ``lr * backbone_lr_mult``, the rest at ``lr``; no weight
        decay on norm layers, query embeddings/features and level embeddings (the optimizer's own elsewhere)."""
        no_decay: set[int] = set()
        for module in self.modules():
            if isinstance(module, (*_NORMS, nn.Embedding)):
                no_decay.update(id(p) for p in module.parameters(recurse=False))
        no_decay.update(id(p) for name, p in self.named_parameters() if name.endswith("level_embed"))
        groups = []
        for params, group_lr in ((self.backbone_parameters(), lr * backbone_lr_mult), (self.head_parameters(), lr)):
            decay = [p for p in params if id(p) not in no_decay]
            plain = [p for p in params if id(p) in no_decay]
            groups += [g for g in ({"params": decay, "lr": group_lr}, {"params": plain, "lr": group_lr, "weight_decay": 0.0})
                       if g["params"]]
        return groups
