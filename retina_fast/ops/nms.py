"""Non-maximum suppression and the fused RetinaNet post-processing.

``nms`` and ``batched_nms`` are drop-ins for :func:`torchvision.ops.nms` and
:func:`torchvision.ops.batched_nms`: same signature, same kept indices, except where scores
tie exactly (see "Ties"). ``batched_nms_multi`` runs NMS over (image, class) segments of a
whole batch in one call, and ``postprocess_detections`` is
``torchvision.models.detection.RetinaNet.postprocess_detections`` for a batch in one call.

Semantics (torchvision's):
    * a box is suppressed iff a kept box with a higher score has IoU > ``iou_threshold``
      (IoU in float32 for float16/bfloat16/float32 boxes, float64 for float64; decided exactly
      as ``float_iou > threshold`` in double, which is what torchvision's CPU kernel does);
    * a pair whose union is 0 (or with a NaN coordinate) has NaN IoU and suppresses nothing;
    * thresholds outside [0, 1] are accepted as torchvision accepts them: ``< 0`` lets every
      pair (IoU 0 included) suppress, so one box survives per class unless IoUs are NaN;
      ``>= 1`` suppresses (practically) nothing. A NaN threshold is an error;
    * NaN scores sort first (torch sorts NaN as the largest value), as torchvision's do.

Ties:
    Among exactly equal scores the lower index comes first (a stable descending sort), on CPU
    and CUDA alike, so the two kernels agree bit for bit. torchvision's CPU sort is not stable,
    so torchvision may order tied boxes differently and, where tied boxes overlap, keep a
    different one of them.

``batched_nms`` never shifts boxes by class (torchvision's coordinate trick rounds boxes at
large coordinates, ~1e5, and can then merge or split boxes of different classes); boxes of
different classes never cost an IoU.

torch.compile: ``nms``, ``batched_nms`` and ``batched_nms_multi(max_per_image < 0)`` return
data-dependent sizes (unbacked symbolic sizes in their fake kernels): they trace under
``fullgraph=True`` but what follows must not branch on the size.
``postprocess_detections_padded`` has static output shapes; ``postprocess_detections`` (the
list of dicts) reads the counts on the host, which needs a graph break (and on CUDA is the one
device-to-host synchronisation of the post-processing).
"""

from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

import retina_fast._C_loader  # noqa: F401  (registers torch.ops.retina_fast.*)

__all__ = ["nms", "batched_nms", "batched_nms_multi", "postprocess_detections", "postprocess_detections_padded"]

_ops = torch.ops.retina_fast


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Drop-in for :func:`torchvision.ops.nms`.

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)``, float16/bfloat16/float32/float64, or
            quantized (quint8/qint8/qint32, per-tensor) on the CPU together with quantized
            scores of the same dtype, as torchvision's quantized kernel takes them.
        scores (Tensor[N]): floating scores (quantized with quantized boxes).
        iou_threshold (float): suppress boxes with IoU > iou_threshold.

    Returns:
        Tensor[M], int64: indices of the kept boxes in descending score order (lower index
        first among equal scores). Quantized inputs: the IoU of the integer representations
        (scale and zero point cancel), in float as torchvision computes it, so the result is
        ``nms`` of the dequantized tensors (exactly, for 8-bit types with integer scales).
    """
    return _ops.nms(boxes, scores, float(iou_threshold))


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Drop-in for :func:`torchvision.ops.batched_nms`: NMS per category ``idxs``.

    Args:
        boxes (Tensor[N, 4]), scores (Tensor[N]): as in :func:`nms`.
        idxs (Tensor[N]): category of each box, integer (any values, any range) or floating
            (as torchvision accepts them; equal values are one category).
        iou_threshold (float): as in :func:`nms`.

    Returns:
        Tensor[M], int64: kept indices in descending score order (ties: lower index first).
        Empty boxes (``numel() == 0``, any shape) give an empty int64 tensor on their device
        whatever the other arguments are, as torchvision's does (its tests call
        ``batched_nms(torch.empty((0,)), None, None, None)``).
    """
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    if idxs.is_floating_point():
        idxs = torch.unique(idxs, return_inverse=True)[1]  # (a device sync on CUDA)
    return _ops.batched_nms(boxes, scores, idxs, float(iou_threshold))


def batched_nms_multi(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    image_ids: Tensor,
    num_images: int,
    iou_threshold: float,
    max_per_image: int = -1,
) -> Tuple[Tensor, Tensor]:
    """Batched NMS over the (image, category) segments of a whole batch, in one call.

    Args:
        boxes (Tensor[N, 4]), scores (Tensor[N]): every box of every image.
        idxs (Tensor[N]): integer category of each box.
        image_ids (Tensor[N]): integer image of each box, in ``[0, num_images)``; any other
            value is an error on both devices.
        num_images (int): B.
        iou_threshold (float): as in :func:`nms`.
        max_per_image (int): keep at most this many per image (the best ones); ``< 0``: all.

    Returns:
        ``(keep, counts)``: keep (Tensor[B, W], int64) holds each image's kept indices (into
        the N boxes) in descending score order, padded with -1; counts (Tensor[B], int64) how
        many. W = max_per_image when >= 0 (a static shape), else the largest count
        (data-dependent).

    On CUDA each (image, category) segment gets its own suppression mask, so memory grows with
    the sum of the squared segment sizes, not with N^2; sizing those masks (and checking the
    image ids) takes one device sync, and ``max_per_image < 0`` a second for the width.
    """
    return _ops.batched_nms_multi(boxes, scores, idxs, image_ids, int(num_images), float(iou_threshold), int(max_per_image))


def _sizes_tensor(image_sizes: Union[Tensor, List[Tuple[int, int]]], device: torch.device) -> Tensor:
    # Negative sizes would clip every box to garbage. A list (or a CPU tensor) is checked here;
    # a CUDA tensor is not (a device sync).
    if isinstance(image_sizes, Tensor):
        if not torch.jit.is_scripting():  # (TorchScript skips this branch at compile time)
            if image_sizes.device.type == "cpu" and image_sizes.numel() > 0 and not torch.compiler.is_compiling() \
                    and bool((image_sizes < 0).any()):
                raise ValueError(f"postprocess_detections: expected image_sizes (h, w) >= 0, got {image_sizes.tolist()}")
        return image_sizes.to(device=device, dtype=torch.long)
    hw = [[int(s[0]), int(s[1])] for s in image_sizes]
    for s in hw:
        if s[0] < 0 or s[1] < 0:
            raise ValueError(f"postprocess_detections: expected image_sizes (h, w) >= 0, got {hw}")
    return torch.tensor(hw, dtype=torch.long).reshape(-1, 2).to(device)


def postprocess_detections_padded(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: Tensor,
    image_sizes: Union[Tensor, List[Tuple[int, int]]],
    num_anchors_per_level: List[int],
    score_thresh: float = 0.05,
    topk_candidates: int = 1000,
    nms_thresh: float = 0.5,
    detections_per_img: int = 300,
    upcast: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`postprocess_detections` with padded outputs of static shape (no host sync).

    Returns:
        ``(boxes [B, D, 4], scores [B, D], labels [B, D] int64, counts [B] int64)`` with
        D = detections_per_img; rows at and past ``counts[b]`` hold boxes 0, scores 0, labels -1.
    """
    sizes = _sizes_tensor(image_sizes, cls_logits.device)
    return _ops.postprocess_detections(
        cls_logits, bbox_regression, anchors, sizes, [int(a) for a in num_anchors_per_level],
        float(score_thresh), int(topk_candidates), float(nms_thresh), int(detections_per_img), bool(upcast),
    )


def postprocess_detections(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    anchors: Tensor,
    image_sizes: Union[Tensor, List[Tuple[int, int]]],
    num_anchors_per_level: List[int],
    score_thresh: float = 0.05,
    topk_candidates: int = 1000,
    nms_thresh: float = 0.5,
    detections_per_img: int = 300,
    upcast: bool = False,
) -> List[Dict[str, Tensor]]:
    """``torchvision.models.detection.RetinaNet.postprocess_detections`` for a whole batch.

    Layout (torchvision passes per-level lists; here the levels are concatenated, which is how
    the head produces them before torchvision splits them):

    Args:
        cls_logits (Tensor[B, A, K]): class logits, A = sum(num_anchors_per_level) anchors in
            level order (torchvision's ``head_outputs["cls_logits"]``), float16/bfloat16/
            float32/float64.
        bbox_regression (Tensor[B, A, 4]): box codes, same dtype as cls_logits.
        anchors (Tensor[A, 4] shared by the batch, or Tensor[B, A, 4]): ``(x1, y1, x2, y2)``;
            cast to the codes' dtype as ``BoxCoder.decode_single`` does (float32 under
            ``upcast``).
        image_sizes: ``[(h, w), ...]`` or an integer Tensor[B, 2] of (height, width): boxes
            are clipped to ``[0, w] x [0, h]``.
        num_anchors_per_level (list of int): anchors per FPN level (HWA of each level).
        score_thresh, topk_candidates, nms_thresh, detections_per_img: torchvision's
            (0.05, 1000, 0.5, 300): per level keep ``sigmoid > score_thresh`` (strict, in the
            logits' dtype), the best ``min(topk_candidates, n)``, then batched NMS by label
            at ``nms_thresh`` over the image, then the first ``detections_per_img``.
        upcast (bool): float16/bfloat16 logits and codes are read as float32 (an exact
            conversion) and everything after is float32, outputs included: the result of
            passing ``cls_logits.float(), bbox_regression.float()``, bit for bit, without
            making those copies (what :class:`retina_fast.models.RetinaNet` does under
            autocast: a float16/bfloat16 threshold and decoding would round). No effect on
            float32/float64 inputs.

    Returns:
        One dict per image with ``boxes`` (Tensor[M, 4], the codes' dtype), ``scores``
        (Tensor[M], the logits' dtype) and ``labels`` (Tensor[M], int64), best first.
        Scores are torch's sigmoid (CPU: computed by ``torch.sigmoid`` itself, always on its
        vectorised path, where ``torch.sigmoid`` over a whole level computes the last few
        elements of its loop with the scalar ``exp``, which may differ by an ulp; CUDA: the same
        formula as torch's CUDA kernel). Ties (exactly equal scores) are resolved by the lower
        index (top-k) and by level order (NMS), where torchvision's order is unspecified.
        Boxes are decoded by ``decode_box`` (csrc/common/box_math.h), whose C-library exp can
        differ from torch's vectorised exp by an ulp, so boxes match torchvision's to ~1e-6
        relative rather than bitwise. Every ranking (top-k and NMS) uses the scores in the
        logits' own dtype, float64 included. A ``score_thresh`` below 0 lets every non-NaN
        logit through, ``-inf`` ones (score 0) too, as torchvision does.

    Cost does not depend on how many scores pass ``score_thresh``: the top-k is selected on the
    logits against a cut that rises as better candidates are found (CPU: a streaming scan;
    CUDA: a radix select), exact scores are computed only for logits that can still make it,
    and the extra memory is O(B * levels * topk_candidates) at any score density.

    The padded outputs are computed without any host synchronisation; splitting them into a
    list reads ``counts`` on the host (on CUDA, the one sync; under torch.compile a graph
    break: use :func:`postprocess_detections_padded` for a fully traced graph).
    """
    boxes, scores, labels, counts = postprocess_detections_padded(
        cls_logits, bbox_regression, anchors, image_sizes, num_anchors_per_level,
        score_thresh, topk_candidates, nms_thresh, detections_per_img, upcast,
    )
    out: List[Dict[str, Tensor]] = []
    for b, n in enumerate(torch.jit.annotate(List[int], counts.tolist())):
        out.append({"boxes": boxes[b, :n], "scores": scores[b, :n], "labels": labels[b, :n]})
    return out


# ---------------------------------------------------------------- fake (meta) kernels


def _same_device(op, **tensors):
    # As in boxes.py: a meta tensor mixed with CPU ones must not reach a fake kernel silently.
    (n0, t0), *rest = tensors.items()
    for n, t in rest:
        torch._check(
            t.device == t0.device,
            lambda: f"retina_fast::{op}: expected {n0} and {n} on the same device, got {n0} on {t0.device} and {n} on {t.device}",
        )


def _check_nms_fake(boxes, scores):
    _same_device("nms", boxes=boxes, scores=scores)
    torch._check(boxes.dim() == 2 and boxes.shape[1] == 4, lambda: "boxes must be [N, 4]")
    torch._check(scores.dim() == 1 and scores.shape[0] == boxes.shape[0], lambda: "scores must be [N]")


@torch.library.register_fake("retina_fast::nms")
def _nms_fake(boxes, scores, iou_threshold):
    _check_nms_fake(boxes, scores)
    n = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((n,), dtype=torch.long)


@torch.library.register_fake("retina_fast::batched_nms")
def _batched_nms_fake(boxes, scores, idxs, iou_threshold):
    _check_nms_fake(boxes, scores)
    torch._check(idxs.dim() == 1 and idxs.shape[0] == boxes.shape[0], lambda: "idxs must be [N]")
    _same_device("batched_nms", boxes=boxes, idxs=idxs)
    n = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((n,), dtype=torch.long)


@torch.library.register_fake("retina_fast::batched_nms_multi")
def _batched_nms_multi_fake(boxes, scores, idxs, image_ids, num_images, iou_threshold, max_per_image):
    _check_nms_fake(boxes, scores)
    _same_device("batched_nms_multi", boxes=boxes, idxs=idxs, image_ids=image_ids)
    if max_per_image >= 0:
        w = max_per_image
    else:
        w = torch.library.get_ctx().new_dynamic_size()
    return (
        boxes.new_empty((num_images, w), dtype=torch.long),
        boxes.new_empty((num_images,), dtype=torch.long),
    )


@torch.library.register_fake("retina_fast::postprocess_detections")
def _postprocess_fake(cls_logits, bbox_regression, anchors, image_sizes, num_anchors_per_level,
                      score_thresh, topk_candidates, nms_thresh, detections_per_img, upcast=False):
    torch._check(cls_logits.dim() == 3, lambda: "cls_logits must be [B, A, K]")
    _same_device("postprocess_detections", cls_logits=cls_logits, bbox_regression=bbox_regression,
                 anchors=anchors, image_sizes=image_sizes)
    B = cls_logits.shape[0]
    D = detections_per_img
    dtype = bbox_regression.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return (
        bbox_regression.new_empty((B, D, 4), dtype=dtype),
        cls_logits.new_empty((B, D), dtype=dtype),
        cls_logits.new_empty((B, D), dtype=torch.long),
        cls_logits.new_empty((B,), dtype=torch.long),
    )
