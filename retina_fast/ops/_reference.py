"""Pure-PyTorch references of every op: readable, slow, the ground truth the CPU and CUDA
kernels are tested against (together with torchvision where it has the same function)."""

import torch
from torch import Tensor

__all__ = ["sigmoid_focal_loss", "sigmoid_focal_loss_labels"]


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> Tensor:
    """torchvision.ops.sigmoid_focal_loss, written out."""
    p = torch.sigmoid(inputs)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"Invalid Value for arg 'reduction': '{reduction}'")


def labels_to_targets(labels: Tensor, num_classes: int, dtype: torch.dtype,
                      label_smoothing: float = 0.0) -> Tensor:
    """The dense targets a labels vector stands for (the one-hot the fused op never builds)."""
    t = torch.zeros(labels.shape[0], num_classes, dtype=dtype, device=labels.device)
    fg = labels >= 0
    t[fg.nonzero().squeeze(1), labels[fg]] = 1
    return t * (1 - label_smoothing) + label_smoothing / 2


def sigmoid_focal_loss_labels(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                              reduction: str = "sum", normalizer=None, label_smoothing: float = 0.0) -> Tensor:
    K = logits.shape[1]
    valid = labels != -2
    t = labels_to_targets(labels, K, logits.dtype, label_smoothing)
    loss = sigmoid_focal_loss(logits, t, alpha, gamma, "none")
    loss = torch.where(valid[:, None], loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    if reduction != "none":
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        total = loss.to(acc).sum()
        loss = total / (valid.sum() * K) if reduction == "mean" else total
    if normalizer is not None:
        loss = loss / normalizer
    return loss


# ---- nms ----
# Plain PyTorch NMS and RetinaNet post-processing with the kernels' exact semantics: stable
# descending sort (NaN first, lower index first on ties), suppress iff IoU > threshold (the
# float IoU compared in double), NaN IoU suppresses nothing, IoU in float32 for half inputs.

import math  # noqa: E402  (this section's own import, kept with it)


def _iou_one_to_many(box: Tensor, boxes: Tensor) -> Tensor:
    # torchvision's box_iou order: inter = clamp(min x2 - max x1, 0) * clamp(min y2 - max y1, 0),
    # union = area_a + area_b - inter; torch.maximum/minimum propagate NaN.
    area_a = (box[2] - box[0]) * (box[3] - box[1])
    area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    w = (torch.minimum(box[2], boxes[:, 2]) - torch.maximum(box[0], boxes[:, 0])).clamp(min=0)
    h = (torch.minimum(box[3], boxes[:, 3]) - torch.maximum(box[1], boxes[:, 1])).clamp(min=0)
    inter = w * h
    return inter / (area_a + area_b - inter)


def _stable_desc_order(scores: Tensor) -> Tensor:
    s = scores.double().clone()
    s[s == 0] = 0.0  # -0.0 ties +0.0
    s[torch.isnan(s)] = float("inf")  # NaN sorts first
    # +inf and NaN must not tie: NaN before +inf.
    nan_first = torch.isnan(scores).double()
    order = torch.sort(s, descending=True, stable=True)[1]
    return order[torch.sort(nan_first[order], descending=True, stable=True)[1]]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    f = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    b = boxes.to(f)
    order = _stable_desc_order(scores)
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for p in range(len(order)):
        if suppressed[p]:
            continue
        keep.append(int(order[p]))
        rest = order[p + 1:]
        iou = _iou_one_to_many(b[order[p]], b[rest])
        suppressed[p + 1:] |= iou.double() > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    keep = []
    for c in torch.unique(idxs):
        members = torch.where(idxs == c)[0]
        keep.append(members[nms(boxes[members], scores[members], iou_threshold)])
    if not keep:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    kept = torch.sort(torch.cat(keep))[0]  # index order, so the stable sort breaks ties by index
    return kept[_stable_desc_order(scores[kept])]


def batched_nms_multi(boxes: Tensor, scores: Tensor, idxs: Tensor, image_ids: Tensor, num_images: int,
                      iou_threshold: float, max_per_image: int = -1):
    lists = []
    for b in range(num_images):
        members = torch.where(image_ids == b)[0]
        k = members[batched_nms(boxes[members], scores[members], idxs[members], iou_threshold)]
        lists.append(k if max_per_image < 0 else k[:max_per_image])
    width = max_per_image if max_per_image >= 0 else max([len(k) for k in lists], default=0)
    keep = torch.full((num_images, width), -1, dtype=torch.long)
    for b, k in enumerate(lists):
        keep[b, :len(k)] = k
    return keep, torch.tensor([len(k) for k in lists], dtype=torch.long)


def decode_boxes_single(rel_codes: Tensor, boxes: Tensor, clip: float = math.log(1000.0 / 16)) -> Tensor:
    """torchvision BoxCoder.decode_single with weights (1, 1, 1, 1)."""
    boxes = boxes.to(rel_codes.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    dx, dy = rel_codes[:, 0] / 1.0, rel_codes[:, 1] / 1.0
    dw = torch.clamp(rel_codes[:, 2] / 1.0, max=clip)
    dh = torch.clamp(rel_codes[:, 3] / 1.0, max=clip)
    pcx = dx * widths + ctr_x
    pcy = dy * heights + ctr_y
    pw = torch.exp(dw) * widths
    ph = torch.exp(dh) * heights
    half = torch.tensor(0.5, dtype=pcx.dtype, device=pcx.device)
    return torch.stack([pcx - half * pw, pcy - half * ph, pcx + half * pw, pcy + half * ph], dim=1)


def postprocess_detections(cls_logits: Tensor, bbox_regression: Tensor, anchors: Tensor, image_sizes,
                           num_anchors_per_level, score_thresh: float = 0.05, topk_candidates: int = 1000,
                           nms_thresh: float = 0.5, detections_per_img: int = 300):
    """RetinaNet.postprocess_detections on [B, A, K] / [B, A, 4] / [A, 4] or [B, A, 4] inputs,
    ties resolved as the kernels do (lower index first in top-k, level order in NMS)."""
    out = []
    for b in range(cls_logits.shape[0]):
        h, w = (int(v) for v in image_sizes[b])
        anc = anchors if anchors.dim() == 2 else anchors[b]
        boxes_l, scores_l, labels_l = [], [], []
        start = 0
        for n in num_anchors_per_level:
            logits = cls_logits[b, start:start + n]
            K = logits.shape[-1]
            scores = torch.sigmoid(logits).flatten()
            cand = torch.where(scores > score_thresh)[0]
            s = scores[cand]
            order = torch.sort(s, descending=True, stable=True)[1][:min(topk_candidates, len(cand))]
            idx = cand[order]
            a = start + torch.div(idx, K, rounding_mode="floor")
            bx = decode_boxes_single(bbox_regression[b, a], anc[a])
            bx[:, 0::2] = bx[:, 0::2].clamp(min=0, max=w)
            bx[:, 1::2] = bx[:, 1::2].clamp(min=0, max=h)
            boxes_l.append(bx)
            scores_l.append(s[order])
            labels_l.append(idx % K)
            start += n
        boxes, scores, labels = torch.cat(boxes_l), torch.cat(scores_l), torch.cat(labels_l)
        keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
        out.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return out
