"""The one place where models are built: ``build_model(name, num_classes, **kw)``.

Every model here follows torchvision's detection contract:
``model(images: list[Tensor[3, H, W] float in [0, 1]], targets)`` → ``{"classification",
"bbox_regression"}`` losses in train mode, ``model(images)`` → ``[{"boxes", "scores",
"labels"}]`` in eval mode, and ``model.transform`` resizes (min/max size), normalises and pads.

For now the detector is torchvision's ``RetinaNet`` class (a thin subclass that understands crowd
boxes, see :class:`CrowdAwareRetinaNet`). When ``retina_fast.models`` lands, swap
``_detector_class`` / the three builders below for it; nothing else in the engine or the CLI
needs to change (checkpoints record ``name``, ``num_classes`` and the keyword arguments, and are
rebuilt through this function).

Names:

* ``shapes-small``: the CPU demo model, ~1.8 M parameters. A plain conv backbone (5 stages of
  2 x [conv3x3-BN-ReLU], the first with stride 2; widths 32/48/96/160/256), a 64-channel FPN on
  P2-P5 (stride 4 matters for 8-12 px objects), a 2-conv GroupNorm head, 3 anchors per location
  (ratio 1, scales 2^0, 2^(1/3), 2^(2/3), base 8 * 2^level for P2..P5 = 8, 16, 32, 64 px),
  GIoU box loss, input 160 px (``min_size = max_size = 160``).
* ``resnet18-fpn``: ResNet-18 (BatchNorm, trained from scratch), 256-channel FPN P3-P7,
  torchvision's 4-conv head; torchvision's anchors and transform (``min_size`` 800 unless given).
* ``resnet50-fpn``: torchvision's ``retinanet_resnet50_fpn`` (v1) without pretrained weights.

Keyword arguments (all optional): ``min_size`` (int or tuple for multi-scale training),
``max_size``, ``norm`` (``"bn"`` or ``"gn"`` for the shapes-small backbone; ``gn`` makes
per-image results independent of batch composition, which the DDP gradient test relies on),
``widths``, ``fpn_channels``, ``head_convs``, ``box_loss`` (``"giou"`` or ``"l1"``),
``score_thresh``, ``nms_thresh``, ``detections_per_img``, ``topk_candidates``.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
from torch import nn
from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, box_iou

MODEL_NAMES = ("shapes-small", "resnet18-fpn", "resnet50-fpn")

# Anchors whose match is background but which lie at least this much inside a crowd box
# (intersection / anchor area) are ignored (-2) instead of trained as background.
CROWD_IOA_THRESH = 0.5


class CrowdAwareRetinaNet(RetinaNet):
    """torchvision's RetinaNet, plus crowd regions: ``target["iscrowd"]`` (optional) marks boxes
    that are never matched; background anchors mostly inside them get label -2 (no loss)."""

    def compute_loss(self, targets, head_outputs, anchors):
        matched_idxs, clean = [], []
        for anchors_per_image, t in zip(anchors, targets):
            boxes, labels = t["boxes"], t["labels"]
            crowd = t.get("iscrowd")
            crowd = crowd.bool() if crowd is not None else torch.zeros_like(labels, dtype=torch.bool)
            keep = ~crowd
            boxes_k, labels_k = boxes[keep], labels[keep]
            clean.append({"boxes": boxes_k, "labels": labels_k})
            if boxes_k.numel() == 0:
                m = torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64,
                               device=anchors_per_image.device)
            else:
                m = self.proposal_matcher(box_iou(boxes_k, anchors_per_image))
            if bool(crowd.any()):
                cb = boxes[crowd]
                lt = torch.max(anchors_per_image[:, None, :2], cb[None, :, :2])
                rb = torch.min(anchors_per_image[:, None, 2:], cb[None, :, 2:])
                inter = (rb - lt).clamp(min=0).prod(-1)  # [A, C]
                area = (anchors_per_image[:, 2:] - anchors_per_image[:, :2]).prod(-1)
                ioa = (inter / area.clamp(min=1e-6)[:, None]).max(dim=1).values
                m = torch.where((m == -1) & (ioa >= CROWD_IOA_THRESH), torch.full_like(m, -2), m)
            matched_idxs.append(m)
        return self.head.compute_loss(clean, head_outputs, anchors, matched_idxs)


_detector_class = CrowdAwareRetinaNet


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    raise ValueError(f"norm must be 'bn' or 'gn', not {kind!r}")


class PlainConvFPNBackbone(nn.Module):
    """Stages of 2 x [conv3x3, norm, ReLU] (first conv strided), FPN over the last four stages.

    Returns an ``OrderedDict`` of ``fpn_channels``-wide maps at strides 4, 8, 16, 32 (P2-P5)."""

    def __init__(self, widths=(32, 48, 96, 160, 256), fpn_channels: int = 64, norm: str = "bn",
                 fpn_from: int = 1):
        super().__init__()
        stages, c_in = [], 3
        for w in widths:
            stages.append(nn.Sequential(
                nn.Conv2d(c_in, w, 3, 2, 1, bias=False), _norm(norm, w), nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, 1, 1, bias=False), _norm(norm, w), nn.ReLU(inplace=True),
            ))
            c_in = w
        self.stages = nn.ModuleList(stages)
        self.fpn_from = fpn_from
        self.fpn = FeaturePyramidNetwork(list(widths[fpn_from:]), fpn_channels)
        self.out_channels = fpn_channels

    def forward(self, x):
        feats = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= self.fpn_from:
                feats[f"p{i + 1}"] = x
        return self.fpn(feats)


def _trim_head(head: RetinaNetHead, n_convs: int) -> None:
    if n_convs < 4:
        head.classification_head.conv = nn.Sequential(*list(head.classification_head.conv)[:n_convs])
        head.regression_head.conv = nn.Sequential(*list(head.regression_head.conv)[:n_convs])


def _post_kw(kw):
    return {k: kw.pop(k) for k in ("score_thresh", "nms_thresh", "detections_per_img",
                                   "topk_candidates") if k in kw}


def build_shapes_small(num_classes: int, min_size=160, max_size=None, norm="bn",
                       widths=(32, 48, 96, 160, 256), fpn_channels=64, head_convs=2,
                       box_loss="giou", **kw):
    post = _post_kw(kw)
    if kw:
        raise TypeError(f"unknown option(s) for shapes-small: {sorted(kw)}")
    backbone = PlainConvFPNBackbone(tuple(widths), fpn_channels, norm)
    n_levels = len(widths) - 1
    sizes = tuple(tuple(int(8 * 2 ** lvl * 2 ** (k / 3)) for k in range(3)) for lvl in range(n_levels))
    anchor_gen = AnchorGenerator(sizes, ((1.0,),) * n_levels)
    head = RetinaNetHead(fpn_channels, anchor_gen.num_anchors_per_location()[0], num_classes,
                         norm_layer=partial(nn.GroupNorm, min(32, fpn_channels // 4)))
    _trim_head(head, head_convs)
    head.regression_head._loss_type = box_loss
    if max_size is None:
        max_size = max(min_size) if isinstance(min_size, (tuple, list)) else min_size
    return _detector_class(backbone, num_classes, min_size=min_size, max_size=max_size,
                           anchor_generator=anchor_gen, head=head, **post)


def build_resnet_fpn(depth: int, num_classes: int, min_size=800, max_size=1333, box_loss="l1",
                     **kw):
    from torchvision.models import resnet18, resnet34, resnet50
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    post = _post_kw(kw)
    if kw:
        raise TypeError(f"unknown option(s) for resnet{depth}-fpn: {sorted(kw)}")
    ctor = {18: resnet18, 34: resnet34, 50: resnet50}[depth]
    # From scratch: plain BatchNorm (FrozenBatchNorm only makes sense with pretrained weights).
    body = ctor(weights=None, norm_layer=nn.BatchNorm2d)
    p6_in = 256 if depth == 50 else 256
    backbone = _resnet_fpn_extractor(body, 5, returned_layers=[2, 3, 4],
                                     extra_blocks=LastLevelP6P7(p6_in, 256))
    model = _detector_class(backbone, num_classes, min_size=min_size, max_size=max_size, **post)
    model.head.regression_head._loss_type = box_loss
    return model


def build_model(name: str, num_classes: int, **kw) -> nn.Module:
    """Build detector ``name`` (one of :data:`MODEL_NAMES`) for ``num_classes`` classes
    (labels ``0..num_classes-1``, no background class). See the module docstring."""
    if num_classes < 1:
        raise ValueError("num_classes must be at least 1")
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items()}
    if name == "shapes-small":
        return build_shapes_small(num_classes, **kw)
    if name == "resnet18-fpn":
        return build_resnet_fpn(18, num_classes, **kw)
    if name == "resnet34-fpn":
        return build_resnet_fpn(34, num_classes, **kw)
    if name == "resnet50-fpn":
        return build_resnet_fpn(50, num_classes, **kw)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def param_groups(model: nn.Module, weight_decay: float):
    """Two optimizer groups: weight decay on conv/linear weights, none on norms and biases."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
