"""YOLO-style multi-class NMS for a whole batch in one call (ultralytics' layout and results).

``multiclass_nms`` takes what a YOLOv8/11-style head emits, ``[B, 4 + C (+ extra), N]``
(``cx, cy, w, h``, then C class scores, then extra channels such as mask coefficients, for N
candidates), and returns what ``ultralytics.utils.nms.non_max_suppression`` returns: a list of
per-image ``[n, 6 + extra]`` tensors ``x1, y1, x2, y2, conf, cls, extra...``, best first.

How: the score filter, the ``classes`` filter, ``multi_label`` expansion and the ``max_nms``
cap are device-agnostic tensor ops over the whole batch; the suppression is one call of
``torch.ops.retina_fast.batched_nms_multi`` (exact greedy NMS per (image, class) segment,
CPU and CUDA kernels), which also keeps the best ``max_det`` of each image. No Python loop
over images, so it runs on CUDA through the existing CUDA kernels.

Differences from ultralytics' function, all on purpose:

* **Exact per-class NMS.** ultralytics shifts every box by ``class * max_wh`` (7680) and runs
  one NMS over the shifted boxes. At class 79 the shift is 606,720, where float32 rounds a
  coordinate to 1/16 px, so the IoU of two boxes of the same class is computed from rounded
  coordinates and a pair near ``iou_thres`` can be suppressed (or kept) wrongly. Here boxes of
  different classes are never compared and IoUs use the boxes' own coordinates
  (tests/ops/test_multiclass_nms.py shows such a case).
* **No time limit.** ultralytics stops after ``2 + 0.05 * B`` seconds and returns empty
  results for the images it did not reach; this returns every image.
* **Ties** (exactly equal scores) are ordered by the lower candidate index, (box, class) in
  row-major order, on CPU and CUDA alike; ultralytics' order (torchvision's CPU sort, and the
  ``max_nms`` argsort) is unspecified. Where tied boxes overlap, a different one of them may be
  kept, and a tie at the ``max_nms`` or ``max_det`` cut may select a different box.
* **dtype.** Rows are in ``promote_types(prediction.dtype, float32)`` for every image, empty
  ones too (ultralytics' empty results are float32 whatever the input).
* A ``prediction`` with exactly 6 candidates is an ordinary input here (ultralytics treats
  ``shape[-1] == 6`` as an end-to-end model's output); ``retina_fast.patch_ultralytics``
  hands such inputs, and ``rotated`` / ``end2end`` calls, to ultralytics' own function.
"""

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

import retina_fast._C_loader  # noqa: F401  (registers torch.ops.retina_fast.*)

__all__ = ["multiclass_nms"]

_ops = torch.ops.retina_fast


def _check_args(prediction, conf_thres, iou_thres, max_det, nc, max_nms) -> Tuple[int, int]:
    if not isinstance(prediction, Tensor):
        raise TypeError(f"multiclass_nms: expected prediction to be a Tensor [B, 4 + C (+ extra), N], got {type(prediction)}")
    if prediction.dim() != 3:
        raise ValueError(f"multiclass_nms: expected prediction of shape [B, 4 + C (+ extra), N], got {tuple(prediction.shape)}")
    if not prediction.is_floating_point():
        raise TypeError(f"multiclass_nms: expected floating-point predictions, got {prediction.dtype}")
    channels = prediction.shape[1]
    nc = int(nc)
    if nc < 0 or 4 + nc > channels or (nc == 0 and channels < 5):
        raise ValueError(
            f"multiclass_nms: expected 4 box channels and nc >= 1 class channels within the {channels} channels of "
            f"prediction {tuple(prediction.shape)} (nc=0 infers nc = channels - 4), got nc={nc}")
    nc = nc or channels - 4
    if not (0.0 <= float(conf_thres) <= 1.0):
        raise ValueError(f"multiclass_nms: expected conf_thres in [0, 1], got {conf_thres}")
    if not (0.0 <= float(iou_thres) <= 1.0):
        raise ValueError(f"multiclass_nms: expected iou_thres in [0, 1], got {iou_thres}")
    if int(max_det) < 0:
        raise ValueError(f"multiclass_nms: expected max_det >= 0, got {max_det}")
    if int(max_nms) < 0:
        raise ValueError(f"multiclass_nms: expected max_nms >= 0, got {max_nms}")
    return nc, channels - 4 - nc


def _class_mask(classes, nc: int, device) -> Tensor:
    """Bool [nc]: which class indices the ``classes`` filter lets through (ultralytics compares
    the float class index with each entry, so 2.0 selects class 2 and 2.5 nothing)."""
    wanted = torch.as_tensor(classes, device=device).reshape(-1)
    if wanted.dtype == torch.bool or wanted.is_complex():
        raise TypeError(f"multiclass_nms: expected classes as class indices (int), got {wanted.dtype}")
    ids = torch.arange(nc, device=device)
    return (ids[:, None] == wanted[None, :]).any(1)


def _cap_per_image(img: Tensor, scores: Tensor, num_images: int, cap: int) -> Optional[Tensor]:
    """Indices of the best ``cap`` candidates of each image (ultralytics' ``max_nms``), or None
    when no image has more (the common case: one count, no sort)."""
    if img.numel() <= cap:
        return None
    counts = torch.bincount(img, minlength=num_images)
    if int(counts.max()) <= cap:  # (a device sync on CUDA, only when the total exceeds the cap)
        return None
    # Descending score, stable, then stably grouped by image: each image's candidates best first.
    order = torch.sort(scores, descending=True, stable=True).indices
    order = order[torch.sort(img[order], stable=True).indices]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=img.device) - starts[img[order]]
    return torch.sort(order[rank < cap]).values  # back in candidate order (ties: lower index first)


def multiclass_nms(
    prediction: Union[Tensor, Sequence[Tensor]],
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    classes: Optional[Sequence[int]] = None,
    agnostic: bool = False,
    multi_label: bool = False,
    max_det: int = 300,
    nc: int = 0,
    max_nms: int = 30000,
    return_idxs: bool = False,
) -> Union[List[Tensor], Tuple[List[Tensor], List[Tensor]]]:
    """ultralytics' ``non_max_suppression`` for a batch in one call, with exact per-class NMS.

    Args:
        prediction (Tensor[B, 4 + C + E, N]): ``cx, cy, w, h`` box centres and sizes, C class
            scores (probabilities; compared with ``conf_thres`` as they are) and E extra
            channels carried along (mask coefficients, keypoints), float16/bfloat16/float32/
            float64, any device. A list or tuple: its first element (a model's validation
            output, as ultralytics accepts it).
        conf_thres (float): keep a (box, class) whose score is ``> conf_thres``, in [0, 1].
        iou_thres (float): suppress a box whose IoU with a better kept box of the same class
            (any class with ``agnostic``) is ``> iou_thres``, in [0, 1].
        classes (sequence of int, optional): keep only these class indices.
        agnostic (bool): one NMS over all classes of an image.
        multi_label (bool): every (box, class) above ``conf_thres`` is a candidate (the
            mAP-evaluation setting); else each box's best class only. Ignored when C == 1.
        max_det (int): keep at most this many detections per image (the best ones).
        nc (int): number of class channels; channels after ``4 + nc`` are extras. 0: all
            channels after the box are classes.
        max_nms (int): at most this many candidates per image enter the NMS (the best by
            score), as ultralytics caps them.
        return_idxs (bool): also return, per image, the index in ``[0, N)`` of the candidate
            each kept row came from (ultralytics' ``return_idxs``).

    Returns:
        A list of B tensors ``[n_b, 6 + E]``: ``x1, y1, x2, y2`` (``cx -+ w / 2``, computed
        as ultralytics' ``xywh2xyxy``), the score, the class index (as a float), the extras;
        rows in descending score order (ties: lower box index, then lower class), in
        ``promote_types(prediction.dtype, float32)``. With ``return_idxs``: ``(that list,
        a list of int64 [n_b] candidate indices)``.

    See the module docstring for where the results differ from ultralytics' (its
    coordinate-offset trick's rounding, its time limit, tie order). Host syncs: one to read the
    per-image counts (and on CUDA the NMS kernel's own), plus one when the candidates exceed
    ``max_nms``.
    """
    if isinstance(prediction, (list, tuple)):
        prediction = prediction[0]
    nc, extra = _check_args(prediction, conf_thres, iou_thres, max_det, nc, max_nms)
    B, _, N = prediction.shape
    device = prediction.device
    out_dtype = torch.promote_types(prediction.dtype, torch.float32)
    multi_label = bool(multi_label) and nc > 1
    cls = prediction[:, 4:4 + nc, :]  # [B, C, N] (a view; the box axis is the contiguous one)
    keep_class = None if classes is None else _class_mask(classes, nc, device)

    # Boxes with any score above the threshold first (ultralytics' own first filter, so NaN
    # scores act alike): one pass over the [B, C, N] scores, then work on those boxes only.
    img, box = (cls.amax(1) > conf_thres).nonzero(as_tuple=True)  # [Mb]
    sub = cls[img, :, box]  # [Mb, C]: the candidate boxes' scores
    if multi_label:
        # every (box, class) above the threshold, in row-major (box, class) order, as
        # ultralytics' torch.where(cls > conf_thres) lists them per image
        above = sub > conf_thres
        if keep_class is not None:
            above &= keep_class
        row, label = above.nonzero(as_tuple=True)
        scores = sub[row, label]
        img, box = img[row], box[row]
    else:
        scores, label = sub.max(1)  # each box's best class (first index on ties, as ultralytics)
        take = scores > conf_thres
        if keep_class is not None:
            take &= keep_class[label]
        img, box, label, scores = img[take], box[take], label[take], scores[take]

    capped = _cap_per_image(img, scores, B, int(max_nms))
    if capped is not None:
        img, box, label, scores = img[capped], box[capped], label[capped], scores[capped]

    xywh = prediction[:, :4, :].transpose(1, 2)[img, box]  # [M, 4]
    xy, half_wh = xywh[:, :2], xywh[:, 2:] / 2  # ultralytics' xywh2xyxy, operation for operation
    boxes = torch.cat([xy - half_wh, xy + half_wh], 1)
    groups = torch.zeros_like(label) if agnostic else label
    keep, counts = _ops.batched_nms_multi(boxes, scores, groups, img, B, float(iou_thres), int(max_det))
    flat = keep.reshape(-1)
    kept = flat[flat >= 0]  # image-major, best first within each image
    cols = [boxes[kept].to(out_dtype), scores[kept, None].to(out_dtype), label[kept, None].to(out_dtype)]
    if extra:
        cols.append(prediction[:, 4 + nc:, :].transpose(1, 2)[img[kept], box[kept]].to(out_dtype))
    rows = torch.cat(cols, 1)
    sizes = counts.tolist()
    out = list(rows.split(sizes))
    if return_idxs:
        return out, list(box[kept].split(sizes))
    return out
