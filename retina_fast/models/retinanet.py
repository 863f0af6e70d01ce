"""RetinaNet (Lin et al. 2017) with torchvision's parameter names, forward contract and
transform, whose anchors, matching, losses and post-processing run on retina_fast's kernels.

``retinanet_resnet50_fpn(variant="v1")`` has the keys and shapes of torchvision's
``retinanet_resnet50_fpn`` (and ``"v2"`` of ``retinanet_resnet50_fpn_v2``), so a torchvision
state_dict loads with ``strict=True`` and gives the same losses and detections.
"""

import warnings
from collections import OrderedDict
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.misc import FrozenBatchNorm2d

from retina_fast.models.anchors import AnchorGenerator, retinanet_anchor_generator
from retina_fast.models.backbone import resnet_fpn_backbone
from retina_fast.models.head import RetinaNetHead
from retina_fast.models.loss import (
    BOX_LOSSES, InputError, RetinaNetLoss, _check_target, check_degenerate_boxes, pack_targets,
)
from retina_fast.ops.nms import postprocess_detections

__all__ = ["RetinaNet", "retinanet_resnet50_fpn", "retinanet_resnet_fpn"]


class RetinaNet(nn.Module):
    """RetinaNet = ``backbone`` (features) + ``head`` + ``anchor_generator`` + loss +
    post-processing, with torchvision's ``RetinaNet`` constructor arguments and behaviour.

    Args:
        backbone: module returning an OrderedDict (or one Tensor) of feature maps with
            ``backbone.out_channels`` channels each, highest resolution first.
        num_classes: K (no background class: labels are in ``[0, K)``).
        min_size, max_size, image_mean, image_std, **kwargs: torchvision's
            ``GeneralizedRCNNTransform`` (resize, normalise, pad to a multiple of 32).
        anchor_generator: :class:`retina_fast.models.AnchorGenerator` (default: RetinaNet's
            9 anchors per location on 5 levels).
        head: :class:`retina_fast.models.RetinaNetHead` (default: 4 convs per branch, no norm).
            The box loss is ``head.regression_head._loss_type`` (``"l1"`` by default), as in
            torchvision.
        score_thresh, nms_thresh, detections_per_img, topk_candidates: post-processing.
        fg_iou_thresh, bg_iou_thresh: the matcher's thresholds.
        box_loss: sets ``head.regression_head._loss_type`` when given.
        crowd_ioa_thresh: targets may carry ``iscrowd``; crowd boxes are never matched and
            background anchors at least this much inside one (intersection over anchor area)
            are ignored.
        zero_iou_quirk: torchvision's matcher behaviour for gts that overlap no anchor
            (see :func:`retina_fast.ops.match_anchors`); True for parity.

    ``forward(images, targets=None)``: ``images`` a list of Tensor[3, H, W] in [0, 1] (sizes
    may differ); in training, ``targets`` a list of dicts with ``boxes`` (float[n, 4],
    ``x1 y1 x2 y2`` in pixels), ``labels`` (int64[n]) and optionally ``iscrowd``, and the
    result is ``{"classification", "bbox_regression"}``; in eval a list of dicts ``boxes``,
    ``scores``, ``labels`` in the original image coordinates.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, min_size=800, max_size=1333,
                 image_mean: Optional[List[float]] = None, image_std: Optional[List[float]] = None,
                 anchor_generator: Optional[AnchorGenerator] = None, head: Optional[RetinaNetHead] = None,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 300,
                 fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4, topk_candidates: int = 1000,
                 box_loss: Optional[str] = None, crowd_ioa_thresh: float = 0.5, zero_iou_quirk: bool = True,
                 **kwargs: Any):
        super().__init__()
        if not hasattr(backbone, "out_channels"):
            raise ValueError(
                "backbone should contain an attribute out_channels specifying the number of output channels "
                "(assumed to be the same for all the levels)"
            )
        self.backbone = backbone
        if anchor_generator is None:
            anchor_generator = retinanet_anchor_generator()
        if not isinstance(anchor_generator, AnchorGenerator):
            raise TypeError(
                f"anchor_generator should be a retina_fast.models.AnchorGenerator, got {type(anchor_generator)}"
            )
        self.anchor_generator = anchor_generator
        if head is None:
            head = RetinaNetHead(backbone.out_channels, anchor_generator.num_anchors_per_location()[0], num_classes)
        self.head = head
        if box_loss is not None:
            if box_loss not in BOX_LOSSES:
                raise ValueError(f"box_loss must be one of {', '.join(BOX_LOSSES)}, got {box_loss!r}")
            self.head.regression_head._loss_type = box_loss
        self.loss = RetinaNetLoss(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True,
                                  zero_iou_quirk=zero_iou_quirk, crowd_ioa_thresh=crowd_ioa_thresh)
        if image_mean is None:
            image_mean = [0.485, 0.456, 0.406]
        if image_std is None:
            image_std = [0.229, 0.224, 0.225]
        self.transform = GeneralizedRCNNTransform(min_size, max_size, image_mean, image_std, **kwargs)
        self.num_classes = num_classes
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates

    # ---------------------------------------------------------------- pieces

    @property
    def box_loss(self) -> str:
        return getattr(self.head.regression_head, "_loss_type", "l1")

    def anchors(self, image_size: Tuple[int, int], features: List[Tensor]) -> Tensor:
        """Tensor[A, 4] (float32, cached) shared by every image of the padded batch.

        Always float32: under bfloat16 autocast, anchors in the features' dtype would round
        coordinates above 256 (torchvision's do)."""
        return self.anchor_generator.grid(image_size, [tuple(f.shape[-2:]) for f in features], torch.float32,
                                          features[0].device)

    def compute_loss(self, targets: List[Dict[str, Tensor]], head_outputs: Dict[str, Tensor], anchors,
                     packed=None) -> Dict[str, Tensor]:
        """The whole batch's losses; ``anchors`` Tensor[A, 4] (or torchvision's per-image list)."""
        if isinstance(anchors, (list, tuple)):
            anchors = anchors[0]
        cls_logits = head_outputs["cls_logits"]
        if packed is None:
            packed = pack_targets(targets, cls_logits.device)
        return self.loss(cls_logits, head_outputs["bbox_regression"], anchors, packed, self.box_loss)

    def postprocess_detections(self, head_outputs: Dict[str, Tensor], anchors: Tensor,
                               image_sizes: List[Tuple[int, int]], num_anchors_per_level: List[int]
                               ) -> List[Dict[str, Tensor]]:
        """Detections in the transformed (resized) image coordinates, one dict per image."""
        cls_logits, bbox_regression = head_outputs["cls_logits"], head_outputs["bbox_regression"]
        if cls_logits.dtype not in (torch.float32, torch.float64):
            # autocast: scores and boxes from float32 (exact upcast of the logits; decoding in
            # half would round box coordinates above 1024 / 256 for bfloat16).
            cls_logits, bbox_regression = cls_logits.float(), bbox_regression.float()
        elif bbox_regression.dtype != cls_logits.dtype:
            bbox_regression = bbox_regression.to(cls_logits.dtype)
        return postprocess_detections(cls_logits, bbox_regression, anchors.to(bbox_regression.dtype), image_sizes,
                                      num_anchors_per_level, self.score_thresh, self.topk_candidates,
                                      self.nms_thresh, self.detections_per_img)

    # ---------------------------------------------------------------- forward

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None):
        # Bad input is an InputError (a ValueError, and the AssertionError / TypeError that
        # torchvision raises for the same input) naming what is wrong, never a crash or an
        # empty result (tests/robustness: the bad-input matrix).
        if len(images) == 0:
            raise InputError("images: expected a non-empty list of Tensor[C, H, W]")
        if self.training:
            if targets is None:
                raise InputError("targets should not be none when in training mode")
            if len(targets) != len(images):
                raise InputError(f"targets: expected one dict per image, got {len(targets)} targets for "
                                 f"{len(images)} images")
            for i, target in enumerate(targets):
                _check_target(i, target)
        channels = len(self.transform.image_mean)
        original_image_sizes: List[Tuple[int, int]] = []
        for i, img in enumerate(images):
            if img.dim() != 3:
                raise InputError(f"images[{i}]: expected a Tensor[C, H, W], got shape {list(img.shape)}")
            if img.shape[0] != channels:
                raise InputError(f"images[{i}]: expected {channels} channels (the normalisation's "
                                 f"image_mean), got shape {list(img.shape)}")
            if not img.is_floating_point():
                raise InputError(f"images[{i}]: Expected input images to be of floating type (in range [0, 1]), "
                                 f"but found type {img.dtype} instead")
            if img.shape[-1] == 0 or img.shape[-2] == 0:
                raise InputError(f"images[{i}]: an empty image, shape {list(img.shape)}")
            val = img.shape[-2:]
            original_image_sizes.append((val[0], val[1]))

        images, targets = self.transform(images, targets)
        packed = None
        if self.training:
            packed = pack_targets(targets, images.tensors.device)
            check_degenerate_boxes(packed, targets, self.num_classes)

        features = self.backbone(images.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        features = list(features.values())
        head_outputs = self.head(features)
        anchors = self.anchors(tuple(images.tensors.shape[-2:]), features)

        if self.training:
            return self.compute_loss(targets, head_outputs, anchors, packed)
        A = head_outputs["cls_logits"].shape[1] // sum(f.shape[-2] * f.shape[-1] for f in features)
        num_anchors_per_level = [f.shape[-2] * f.shape[-1] * A for f in features]
        detections = self.postprocess_detections(head_outputs, anchors, images.image_sizes, num_anchors_per_level)
        return self.transform.postprocess(detections, images.image_sizes, original_image_sizes)


# -------------------------------------------------------------------- builders


def _validate_trainable_layers(is_trained: bool, trainable: Optional[int], max_value: int, default: int) -> int:
    if not is_trained:
        if trainable is not None:
            warnings.warn(
                "Changing trainable_backbone_layers has no effect if neither pretrained nor pretrained_backbone "
                f"have been set to True, falling back to trainable_backbone_layers={max_value} so that all layers "
                "are trainable"
            )
        return max_value
    trainable = default if trainable is None else trainable
    if not 0 <= trainable <= max_value:
        raise ValueError(f"Trainable backbone layers should be in the range [0,{max_value}], got {trainable} ")
    return trainable


def retinanet_resnet_fpn(
    depth: int = 50,
    variant: str = "v1",
    num_classes: int = 91,
    weights_path: Optional[str] = None,
    backbone_weights_path: Optional[str] = None,
    trainable_backbone_layers: Optional[int] = None,
    frozen_bn: Optional[bool] = None,
    fpn_channels: int = 256,
    **kwargs: Any,
) -> RetinaNet:
    """RetinaNet on a ResNet-``depth`` FPN (P3-P7), built like torchvision's builders.

    Args:
        depth: 18, 34, 50 or 101 (18/34 for CPU-sized work; 50 is torchvision's).
        variant: ``"v1"`` (``retinanet_resnet50_fpn``: P6 from P5, plain head, L1 box loss) or
            ``"v2"`` (``retinanet_resnet50_fpn_v2``: P6 from C5, GroupNorm(32) head, GIoU).
        num_classes: K (91 for torchvision's COCO numbering).
        weights_path: a state_dict file (e.g. a torchvision checkpoint) loaded with
            ``strict=True``. Nothing is ever downloaded.
        backbone_weights_path: a ResNet state_dict file for the body (ImageNet weights).
        trainable_backbone_layers: as torchvision (default 3 with weights, else all 5).
        frozen_bn: v1's body norm is ``FrozenBatchNorm2d`` when weights are given (torchvision's
            rule), else ``BatchNorm2d``; set to force either. (v2 always uses BatchNorm2d.)
        **kwargs: :class:`RetinaNet` arguments (``min_size``, ``score_thresh``...).
    """
    if variant not in ("v1", "v2"):
        raise ValueError(f"variant must be 'v1' or 'v2', got {variant!r}")
    is_trained = weights_path is not None or backbone_weights_path is not None
    trainable = _validate_trainable_layers(is_trained, trainable_backbone_layers, 5, 3)
    if frozen_bn is None:
        frozen_bn = variant == "v1" and is_trained
    norm_layer = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    backbone = resnet_fpn_backbone(depth, trainable, [2, 3, 4], norm_layer=norm_layer, fpn_channels=fpn_channels,
                                   p6_from="p5" if variant == "v1" else "c5")
    if backbone_weights_path is not None:
        state = torch.load(backbone_weights_path, map_location="cpu", weights_only=True)
        backbone.body.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=True)
    anchor_generator = retinanet_anchor_generator()
    if variant == "v2":
        head = RetinaNetHead(fpn_channels, anchor_generator.num_anchors_per_location()[0], num_classes,
                             norm_layer=partial(nn.GroupNorm, 32))
        head.regression_head._loss_type = "giou"
    else:
        head = RetinaNetHead(fpn_channels, anchor_generator.num_anchors_per_location()[0], num_classes)
    model = RetinaNet(backbone, num_classes, anchor_generator=anchor_generator, head=head, **kwargs)
    if weights_path is not None:
        model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True), strict=True)
    return model


def retinanet_resnet50_fpn(variant: str = "v1", num_classes: int = 91, weights_path: Optional[str] = None,
                           **kwargs: Any) -> RetinaNet:
    """torchvision's ``retinanet_resnet50_fpn`` (``variant="v1"``) or
    ``retinanet_resnet50_fpn_v2`` (``"v2"``) on our kernels; see :func:`retinanet_resnet_fpn`.

    The published torchvision v1 COCO weights were trained with BatchNorm eps 0: after loading
    them, set ``m.eps = 0.0`` on every ``FrozenBatchNorm2d`` as torchvision does."""
    return retinanet_resnet_fpn(50, variant, num_classes, weights_path, **kwargs)
