"""RetinaNet's training loss for a whole batch in one pass.

Targets are packed once into padded tensors (``[B, M, 4]`` boxes, ``[B, M]`` labels, ``[B]``
counts); ``matched_targets`` matches every image's anchors and gathers class labels and
encoded box targets in one call; the focal loss runs once over all ``B * A`` anchors through
``sigmoid_focal_loss_labels`` (labels -1 background, -2 ignored: no one-hot tensor); the box
loss runs densely over all anchors with the non-foreground ones masked out. Per-image
normalisation by ``max(1, foreground anchors)`` and the mean over images are torchvision's.
"""

import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss, generalized_box_iou_loss

from retina_fast.ops.boxes import DEFAULT_CLIP, decode_boxes, matched_targets
from retina_fast.ops.focal_loss import sigmoid_focal_loss_labels

__all__ = ["PackedTargets", "pack_targets", "check_degenerate_boxes", "RetinaNetLoss", "BOX_LOSSES"]

BOX_LOSSES = ("l1", "smooth_l1", "giou", "diou", "ciou")


class PackedTargets(NamedTuple):
    boxes: Tensor  # [B, M, 4]: per image its non-crowd boxes first (original order), then crowd boxes
    labels: Tensor  # [B, M] int64
    counts: Tensor  # [B] int64: non-crowd boxes (the ones that are matched)
    crowd_counts: Optional[Tensor]  # [B] int64 crowd boxes after them, or None when there are none
    all_counts: Tensor  # [B] int64: every valid row (counts + crowd_counts)


class InputError(ValueError, TypeError, AssertionError):
    """Bad input to the model (images, targets): a ``ValueError``, and also the ``TypeError`` /
    ``AssertionError`` torchvision's detection models raise for the same input, so code written
    against torchvision's RetinaNet still catches it."""


def _check_target(i: int, t: Dict[str, Tensor]) -> None:
    boxes, labels = t.get("boxes"), t.get("labels")
    if not isinstance(boxes, Tensor) or not isinstance(labels, Tensor):
        raise InputError(f"targets[{i}]: expected Tensor 'boxes' and 'labels', got {sorted(t)}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise InputError(f"Expected target boxes to be a tensor of shape [N, 4], got {list(boxes.shape)} "
                         f"for target at index {i}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise InputError(f"targets[{i}]['labels']: expected integer class labels, got dtype {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != boxes.shape[0]:
        raise InputError(f"targets[{i}]['labels']: expected shape [{boxes.shape[0]}] (one per box), "
                         f"got {list(labels.shape)}")


def pack_targets(targets: Sequence[Dict[str, Tensor]], device: torch.device, dtype: torch.dtype = torch.float32
                 ) -> PackedTargets:
    """Pad the targets' ``boxes``/``labels`` (and ``iscrowd``, optional) into batch tensors.

    Crowd boxes (``iscrowd != 0``) are moved behind the image's other boxes, so that
    ``counts`` covers exactly the boxes to match and rows ``[counts, counts + crowd_counts)``
    hold the crowd regions. Without crowd boxes the order is the targets' own.
    """
    for i, t in enumerate(targets):
        _check_target(i, t)
    B = len(targets)
    n = [int(t["boxes"].shape[0]) for t in targets]
    M = max([1] + n)  # at least one (zero) row, so gathers on an all-empty batch stay valid
    boxes = torch.zeros((B, M, 4), dtype=dtype, device=device)
    labels = torch.zeros((B, M), dtype=torch.int64, device=device)
    if sum(n):
        boxes = nn.utils.rnn.pad_sequence([t["boxes"].to(device=device, dtype=dtype).reshape(-1, 4) for t in targets]
                                          + [boxes[0]], batch_first=True)[:B]
        labels = nn.utils.rnn.pad_sequence([t["labels"].to(device=device, dtype=torch.int64).reshape(-1)
                                            for t in targets] + [labels[0]], batch_first=True)[:B]
    counts = torch.tensor(n, dtype=torch.int64, device=device)
    crowd_counts = None
    if any("iscrowd" in t for t in targets):
        crowd = nn.utils.rnn.pad_sequence(
            [t["iscrowd"].to(device=device).reshape(-1).ne(0) if "iscrowd" in t
             else torch.zeros(k, dtype=torch.bool, device=device) for t, k in zip(targets, n)]
            + [torch.zeros(M, dtype=torch.bool, device=device)], batch_first=True)[:B]
        if bool(crowd.any()):
            valid = torch.arange(M, device=device)[None, :] < counts[:, None]
            # sort key: 0 regular box, 1 crowd box, 2 padding; stable, so each group keeps its order
            key = crowd.to(torch.int64) + 2 * (~valid).to(torch.int64)
            order = torch.sort(key, dim=1, stable=True).indices
            boxes = boxes.gather(1, order[..., None].expand(B, M, 4))
            labels = labels.gather(1, order)
            crowd_counts = (crowd & valid).sum(1)
            return PackedTargets(boxes, labels, counts - crowd_counts, crowd_counts, counts)
    return PackedTargets(boxes, labels, counts, crowd_counts, counts)


def check_degenerate_boxes(packed: PackedTargets, targets: Sequence[Dict[str, Tensor]],
                           num_classes: Optional[int] = None) -> None:
    """torchvision's check (after the transform): every box needs ``x2 > x1`` and ``y2 > y1``
    (a NaN coordinate fails it too: NaN boxes would silently match nothing); with
    ``num_classes``, every label must be in ``[0, num_classes)`` (a negative one would silently
    train as background or be ignored).

    One reduction over the batch; on failure the message names the first bad box (or label) and
    its image, as torchvision's does; the error is an :class:`InputError` (a ``ValueError`` and
    the ``AssertionError`` torchvision raises)."""
    M = packed.boxes.shape[1]
    valid = torch.arange(M, device=packed.boxes.device)[None, :] < packed.all_counts[:, None]
    bad = ~(packed.boxes[..., 2:] > packed.boxes[..., :2]).all(-1) & valid
    if num_classes is not None:
        bad_label = ((packed.labels < 0) | (packed.labels >= num_classes)) & valid
        bad = torch.stack([bad, bad_label])
    if bool(bad.any()):
        for target_idx, target in enumerate(targets):  # error path only
            b = target["boxes"]
            degenerate = ~(b[:, 2:] > b[:, :2]).all(dim=1)
            if degenerate.any():
                degen_bb: List[float] = b[torch.where(degenerate)[0][0]].tolist()
                raise InputError(
                    "All bounding boxes should have positive height and width."
                    f" Found invalid box {degen_bb} for target at index {target_idx}.")
            lab = target["labels"]
            if num_classes is not None and lab.numel() and bool(((lab < 0) | (lab >= num_classes)).any()):
                v = int(lab[(lab < 0) | (lab >= num_classes)][0])
                raise InputError(f"targets[{target_idx}]['labels']: expected classes in [0, {num_classes}), got {v}")


def _crowd_ignore(labels: Tensor, matches: Tensor, anchors: Tensor, packed: PackedTargets, thresh: float
                  ) -> Tuple[Tensor, Tensor]:
    # Background anchors lying mostly inside a crowd region (intersection / anchor area >= thresh)
    # become -2: no loss, as for anchors between the IoU thresholds.
    B, M, _ = packed.boxes.shape
    idx = torch.arange(M, device=anchors.device)[None, :]
    is_crowd = (idx >= packed.counts[:, None]) & (idx < packed.all_counts[:, None])  # [B, M]
    a = anchors.to(packed.boxes.dtype)
    lt = torch.maximum(a[None, :, None, :2], packed.boxes[:, None, :, :2])  # [B, A, M, 2]
    rb = torch.minimum(a[None, :, None, 2:], packed.boxes[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)  # [B, A, M]
    area = (a[:, 2:] - a[:, :2]).prod(-1).clamp(min=1e-6)  # [A]
    ioa = torch.where(is_crowd[:, None, :], inter / area[None, :, None], torch.zeros_like(inter)).amax(-1)
    ignore = (matches == -1) & (ioa >= thresh)
    return torch.where(ignore, torch.full_like(labels, -2), labels), torch.where(ignore, torch.full_like(matches, -2), matches)


class RetinaNetLoss(nn.Module):
    """Classification (sigmoid focal) and box-regression losses of RetinaNet, batched.

    Args:
        fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches, zero_iou_quirk: the matcher
            (torchvision: 0.5, 0.4, True; the quirk is torchvision's behaviour, see
            :func:`retina_fast.ops.match_anchors`).
        focal_alpha, focal_gamma: 0.25, 2.
        box_coder_weights, bbox_xform_clip: torchvision's BoxCoder (1, 1, 1, 1), log(1000/16).
        crowd_ioa_thresh: background anchors at least this much inside a crowd box are ignored.
        giou_eps: eps of the IoU-type losses (torchvision 1e-7); smooth_l1_beta (torchvision 1).

    ``forward(cls_logits [B, A, K], bbox_regression [B, A, 4], anchors [A, 4], packed, box_loss)``
    returns ``{"classification", "bbox_regression"}`` (float32 scalars, float64 for float64
    inputs): each the sum over images of (that image's loss / max(1, its foreground
    anchors)), divided by B.
    """

    def __init__(self, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4, allow_low_quality_matches: bool = True,
                 zero_iou_quirk: bool = True, focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 box_coder_weights: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
                 bbox_xform_clip: float = DEFAULT_CLIP, crowd_ioa_thresh: float = 0.5, giou_eps: float = 1e-7,
                 smooth_l1_beta: float = 1.0):
        super().__init__()
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.allow_low_quality_matches = allow_low_quality_matches
        self.zero_iou_quirk = zero_iou_quirk
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.box_coder_weights = tuple(float(w) for w in box_coder_weights)
        self.bbox_xform_clip = bbox_xform_clip
        self.crowd_ioa_thresh = crowd_ioa_thresh
        self.giou_eps = giou_eps
        self.smooth_l1_beta = smooth_l1_beta

    def match(self, anchors: Tensor, packed: PackedTargets):
        """``MatchedTargets(labels [B, A], regression_targets [B, A, 4], matches [B, A])`` with
        crowd regions applied (-2 on background anchors inside them)."""
        # counts come from pack_targets, in [0, M] by construction: skip the CUDA range check
        # (a device sync)
        mt = matched_targets(anchors, packed.boxes, packed.labels, packed.counts, self.fg_iou_thresh,
                             self.bg_iou_thresh, self.allow_low_quality_matches, self.zero_iou_quirk,
                             self.box_coder_weights, check_counts=False)
        if packed.crowd_counts is not None:
            labels, matches = _crowd_ignore(mt.labels, mt.matches, anchors, packed, self.crowd_ioa_thresh)
            mt = mt._replace(labels=labels, matches=matches)
        return mt

    def forward(self, cls_logits: Tensor, bbox_regression: Tensor, anchors: Tensor, packed: PackedTargets,
                box_loss: str = "l1") -> Dict[str, Tensor]:
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"Unsupported loss: {box_loss} (expected one of {', '.join(BOX_LOSSES)})")
        B, A, K = cls_logits.shape
        anchors = anchors.detach()
        mt = self.match(anchors, packed)
        fg = mt.labels >= 0  # [B, A]
        acc = torch.float64 if cls_logits.dtype == torch.float64 else torch.float32
        norm = fg.sum(1).clamp(min=1).to(acc)  # [B]: max(1, foreground anchors)

        # Per-image normalisation as a per-anchor weight 1 / (B * max(1, fg of its image)) inside
        # the kernel: one reduced call over the batch, no [B*A, K] intermediate in either pass.
        row_w = (1.0 / (norm * B)).repeat_interleave(A)
        cls_loss = sigmoid_focal_loss_labels(cls_logits.reshape(B * A, K), mt.labels.reshape(-1), self.focal_alpha,
                                             self.focal_gamma, reduction="sum", weights=row_w)

        if box_loss in ("l1", "smooth_l1"):
            pred = bbox_regression.to(acc) if bbox_regression.dtype != torch.float64 else bbox_regression
            target = mt.regression_targets.to(pred.dtype)
            if box_loss == "l1":
                per_anchor = (pred - target).abs().sum(-1)
            else:
                per_anchor = F.smooth_l1_loss(pred, target, reduction="none", beta=self.smooth_l1_beta).sum(-1)
        else:
            # Decoded in float32 even under autocast: box areas of a 1333 px image overflow half.
            codes = bbox_regression if bbox_regression.dtype == torch.float64 else bbox_regression.to(acc)
            # Off the foreground, compare each anchor with itself (codes 0): the gathered gt
            # may be a zero padding row, whose 0/0 aspect ratio (CIoU) would put NaN into the
            # gradient through torch.where.
            fg4 = fg[..., None]
            codes = torch.where(fg4, codes, torch.zeros_like(codes))
            pred_boxes = decode_boxes(codes, anchors, self.box_coder_weights, self.bbox_xform_clip)
            gt = packed.boxes.to(codes.dtype).gather(1, mt.matches.clamp(min=0)[..., None].expand(B, A, 4))
            gt = torch.where(fg4, gt, anchors.to(codes.dtype)[None])
            fn = {"giou": generalized_box_iou_loss, "diou": distance_box_iou_loss, "ciou": complete_box_iou_loss}[box_loss]
            per_anchor = fn(pred_boxes, gt, reduction="none", eps=self.giou_eps)
        # torch.where, not a product: a non-finite prediction on a background anchor must not
        # turn into NaN (torchvision never looks at those anchors).
        per_anchor = torch.where(fg, per_anchor, torch.zeros_like(per_anchor))
        box = (per_anchor.sum(1) / norm).sum() / max(1, B)
        return {"classification": cls_loss, "bbox_regression": box.to(cls_loss.dtype)}
