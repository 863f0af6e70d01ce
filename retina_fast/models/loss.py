"""RetinaNet's training loss for a whole batch in one pass.

Targets are padded once into batch tensors (``[B, M, 4]`` boxes, ``[B, M]`` labels, ``[B]``
counts and, when the batch has crowd boxes, a ``[B, M]`` crowd mask); nothing else is copied.
``match_anchors`` matches every image's anchors in one call, crowd boxes acting inside it as
ignore regions; the focal loss runs once over all ``B * A`` anchors through
``sigmoid_focal_loss_labels`` (labels -1 background, -2 ignored: no one-hot tensor); the box
loss (L1 on encoded targets, smooth L1, GIoU on decoded boxes) gathers each foreground
anchor's gt and computes its loss in one pass (``matched_box_loss``: no ``[B, A, 4]`` target
tensor). Per-image normalisation by ``max(1, foreground anchors)`` and the mean over images
are torchvision's.
"""

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import complete_box_iou_loss, distance_box_iou_loss

from retina_fast.ops.boxes import DEFAULT_CLIP, decode_boxes, match_anchors, matched_box_loss
from retina_fast.ops.focal_loss import sigmoid_focal_loss_labels

__all__ = ["PackedTargets", "pack_targets", "check_degenerate_boxes", "RetinaNetLoss", "Matched", "BOX_LOSSES"]

BOX_LOSSES = ("l1", "smooth_l1", "giou", "diou", "ciou")


class PackedTargets(NamedTuple):
    boxes: Tensor  # [B, M, 4]: per image its boxes in the targets' order, zero-padded
    labels: Tensor  # [B, M] int64
    counts: Tensor  # [B] int64: valid rows per image (crowd boxes included)
    crowd: Optional[Tensor]  # [B, M] bool: crowd rows (iscrowd != 0); None when the batch has none


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

    Boxes keep their order; crowd boxes (``iscrowd != 0``) are flagged in ``crowd``, which
    matching reads (they are never matched, and background anchors inside them are ignored).
    """
    for i, t in enumerate(targets):
        _check_target(i, t)
    B = len(targets)
    n = [int(t["boxes"].shape[0]) for t in targets]
    M = max([1] + n)  # at least one (zero) row, so gathers on an all-empty batch stay valid
    boxes = torch.zeros((B, M, 4), dtype=dtype, device=device)
    labels = torch.zeros((B, M), dtype=torch.int64, device=device)
    for b, t in enumerate(targets):
        if n[b]:
            boxes[b, :n[b]] = t["boxes"].reshape(-1, 4)
            labels[b, :n[b]] = t["labels"].reshape(-1)
    counts = torch.tensor(n, dtype=torch.int64, device=device)
    crowd = None
    if any("iscrowd" in t for t in targets):
        crowd = torch.zeros((B, M), dtype=torch.bool, device=device)
        for b, t in enumerate(targets):
            if n[b] and "iscrowd" in t:
                crowd[b, :n[b]] = t["iscrowd"].reshape(-1) != 0
        if not bool(crowd.any()):
            crowd = None
    return PackedTargets(boxes, labels, counts, crowd)


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
    valid = torch.arange(M, device=packed.boxes.device)[None, :] < packed.counts[:, None]
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


class Matched(NamedTuple):
    labels: Tensor  # [B, A] int64: gt class in [0, K), -1 background, -2 ignored
    matches: Tensor  # [B, A] int64: matched row of packed.boxes, -1, -2 (crowd regions applied)


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

    def match(self, anchors: Tensor, packed: PackedTargets) -> Matched:
        """``Matched(labels [B, A], matches [B, A])`` with crowd regions applied (-2 on
        background anchors inside them)."""
        # counts come from pack_targets, in [0, M] by construction: skip the CUDA range check
        # (a device sync)
        matches = match_anchors(anchors, packed.boxes, packed.counts, self.fg_iou_thresh, self.bg_iou_thresh,
                                self.allow_low_quality_matches, self.zero_iou_quirk, check_counts=False,
                                gt_crowd=packed.crowd, crowd_ioa_thresh=self.crowd_ioa_thresh)
        fg = matches >= 0
        labels = torch.where(fg, packed.labels.gather(1, matches.clamp(min=0)), matches)
        return Matched(labels, matches)

    def forward(self, cls_logits: Tensor, bbox_regression: Tensor, anchors: Tensor, packed: PackedTargets,
                box_loss: str = "l1") -> Dict[str, Tensor]:
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"Unsupported loss: {box_loss} (expected one of {', '.join(BOX_LOSSES)})")
        B, A, K = cls_logits.shape
        anchors = anchors.detach()
        mt = self.match(anchors, packed)
        fg = mt.matches >= 0  # [B, A]
        acc = torch.float64 if cls_logits.dtype == torch.float64 else torch.float32
        norm = fg.sum(1).clamp(min=1).to(acc)  # [B]: max(1, foreground anchors)
        image_w = 1.0 / (norm * max(1, B))  # [B]: torchvision's per-image normalisation and mean

        # Per-image normalisation as a per-anchor weight 1 / (B * max(1, fg of its image)) inside
        # the kernel: one reduced call over the batch, no [B*A, K] intermediate in either pass.
        row_w = image_w.repeat_interleave(A)
        cls_loss = sigmoid_focal_loss_labels(cls_logits.reshape(B * A, K), mt.labels.reshape(-1), self.focal_alpha,
                                             self.focal_gamma, reduction="sum", weights=row_w)

        if box_loss in ("l1", "smooth_l1", "giou"):
            # one pass over the foreground anchors, forward and backward (no [B, A, 4] targets)
            box = matched_box_loss(bbox_regression, anchors, mt.matches, packed.boxes, image_w, box_loss,
                                   self.box_coder_weights, self.bbox_xform_clip, beta=self.smooth_l1_beta,
                                   eps=self.giou_eps)
        else:
            # DIoU / CIoU: decoded densely, the matched gts gathered ([B, A, 4] each)
            codes = bbox_regression if bbox_regression.dtype == torch.float64 else bbox_regression.to(acc)
            # Off the foreground, compare each anchor with itself (codes 0): the gathered gt
            # may be a zero padding row, whose 0/0 aspect ratio (CIoU) would put NaN into the
            # gradient through torch.where.
            fg4 = fg[..., None]
            codes = torch.where(fg4, codes, torch.zeros_like(codes))
            pred_boxes = decode_boxes(codes, anchors, self.box_coder_weights, self.bbox_xform_clip)
            gt = packed.boxes.to(codes.dtype).gather(1, mt.matches.clamp(min=0)[..., None].expand(B, A, 4))
            gt = torch.where(fg4, gt, anchors.to(codes.dtype)[None])
            fn = {"diou": distance_box_iou_loss, "ciou": complete_box_iou_loss}[box_loss]
            per_anchor = fn(pred_boxes, gt, reduction="none", eps=self.giou_eps)
            # torch.where, not a product: a non-finite prediction on a background anchor must
            # not turn into NaN (torchvision never looks at those anchors).
            per_anchor = torch.where(fg, per_anchor, torch.zeros_like(per_anchor))
            box = (per_anchor.sum(1) / norm).sum() / max(1, B)
        return {"classification": cls_loss, "bbox_regression": box.to(cls_loss.dtype)}
