"""Pure-PyTorch references of every op: readable, slow, the ground truth the CPU and CUDA
kernels are tested against (together with torchvision where it has the same function)."""

import math

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


def smoothed_focal_loss(logits: Tensor, targets: Tensor, label_smoothing: float, alpha: float = 0.25,
                        gamma: float = 2.0) -> Tensor:
    """Focal loss with label smoothing as NVIDIA apex's fused focal loss (MLPerf RetinaNet) and
    EfficientDet's official loss define it, written out independently of the kernels: the
    cross-entropy uses the smoothed targets t (1 - s) + s / 2; the alpha weight and the
    modulating factor (1 - p_t)^gamma use the unsmoothed 0/1 targets. No reduction."""
    p = torch.sigmoid(logits)
    smooth = targets * (1 - label_smoothing) + label_smoothing / 2
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logits, smooth, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def sigmoid_focal_loss_labels(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                              reduction: str = "sum", normalizer=None, label_smoothing: float = 0.0,
                              weights=None) -> Tensor:
    K = logits.shape[1]
    valid = labels != -2
    t = labels_to_targets(labels, K, logits.dtype)
    if label_smoothing:
        loss = smoothed_focal_loss(logits, t, label_smoothing, alpha, gamma)
    else:
        loss = sigmoid_focal_loss(logits, t, alpha, gamma, "none")
    if weights is not None:
        loss = loss * weights.to(loss.dtype)[:, None]
    loss = torch.where(valid[:, None], loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    if reduction != "none":
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        total = loss.to(acc).sum()
        loss = total / (valid.sum() * K) if reduction == "mean" else total
    if normalizer is not None:
        loss = loss / normalizer
    return loss


# ---- boxes ----
# torchvision's box_iou / Matcher / BoxCoder / AnchorGenerator written out in plain PyTorch,
# one image at a time, for the batched kernels to be checked against.


__all__ += [
    "box_iou",
    "grid_anchors",
    "match_anchors",
    "crowd_ignore",
    "matched_box_loss",
    "matched_targets",
    "encode_boxes",
    "decode_boxes",
]


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """torchvision.ops.box_iou: `rb - lt` in the boxes' dtype, then float32 (float64 stays);
    each set's areas in its own upcast dtype (float32 unless float64), then promoted."""
    def area(b):
        up = torch.float64 if b.dtype == torch.float64 else torch.float32
        return (b[:, 2].to(up) - b[:, 0].to(up)) * (b[:, 3].to(up) - b[:, 1].to(up))

    area1, area2 = area(boxes1), area(boxes2)
    dtype = torch.promote_types(boxes1.dtype, boxes2.dtype)
    boxes1, boxes2 = boxes1.to(dtype), boxes2.to(dtype)
    up = torch.float64 if dtype == torch.float64 else torch.float32
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).to(up).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union


def _match_one(iou: Tensor, high: float, low: float, allow_low_quality_matches: bool, zero_iou_quirk: bool) -> Tensor:
    """Matcher on iou[gt, anchor] (M >= 1)."""
    vals, matches = iou.max(dim=0)  # first index on ties, NaN wins
    all_matches = matches.clone()
    out = matches.clone()
    out[vals < low] = -1
    out[(vals >= low) & (vals < high)] = -2
    if allow_low_quality_matches:
        best_per_gt, _ = iou.max(dim=1)
        if not zero_iou_quirk:
            # A gt whose best IoU is 0 would tie with every anchor it misses: drop it.
            best_per_gt = torch.where(best_per_gt > 0, best_per_gt, torch.full_like(best_per_gt, float("nan")))
        restore = (iou == best_per_gt[:, None]).any(dim=0)
        out[restore] = all_matches[restore]
    return out


def match_anchors(anchors: Tensor, gt_boxes: Tensor, gt_counts: Tensor, high: float = 0.5, low: float = 0.4,
                  allow_low_quality_matches: bool = True, zero_iou_quirk: bool = True, gt_crowd=None,
                  crowd_ioa_thresh: float = 0.5) -> Tensor:
    """Per image: Matcher(high, low, allow_low_quality_matches)(box_iou(gt, anchors)); no gt -> -1.

    gt_crowd ([B, M] bool): crowd rows are left out of matching (indices stay those of the
    padded rows), then background anchors inside a crowd region become -2 (crowd_ignore)."""
    out = []
    for b in range(gt_boxes.shape[0]):
        n = int(gt_counts[b])
        rows = torch.arange(n, device=gt_boxes.device)
        if gt_crowd is not None:
            rows = rows[~gt_crowd[b, :n].bool()]
        if rows.numel() == 0 or anchors.shape[0] == 0:
            out.append(torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device))
            continue
        iou = box_iou(gt_boxes[b, rows], anchors)
        dt = iou.dtype
        m = _match_one(iou, torch.tensor(high, dtype=dt).item(), torch.tensor(low, dtype=dt).item(),
                       allow_low_quality_matches, zero_iou_quirk)
        out.append(torch.where(m >= 0, rows[m.clamp(min=0)], m))
    if not out:
        return torch.empty((0, anchors.shape[0]), dtype=torch.int64, device=anchors.device)
    matches = torch.stack(out)
    if gt_crowd is not None:
        matches = crowd_ignore(matches, anchors, gt_boxes, gt_counts, gt_crowd, crowd_ioa_thresh)
    return matches


def crowd_ignore(matches: Tensor, anchors: Tensor, gt_boxes: Tensor, gt_counts: Tensor, gt_crowd: Tensor,
                 thresh: float) -> Tensor:
    """Background anchors (-1) lying mostly inside a crowd region become -2: intersection over
    the anchor's area (clamped at 1e-6) >= thresh for some crowd row below gt_counts. This is
    the loss's former Python implementation (retina_fast/models/loss.py before issue 11), which
    builds [B, A, M, 2] temporaries: the kernels must give the same labels."""
    B, M, _ = gt_boxes.shape
    idx = torch.arange(M, device=anchors.device)[None, :]
    is_crowd = gt_crowd.bool() & (idx < gt_counts[:, None])  # [B, M]
    a = anchors.to(gt_boxes.dtype)
    lt = torch.maximum(a[None, :, None, :2], gt_boxes[:, None, :, :2])  # [B, A, M, 2]
    rb = torch.minimum(a[None, :, None, 2:], gt_boxes[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)  # [B, A, M]
    area = (a[:, 2:] - a[:, :2]).prod(-1).clamp(min=1e-6)  # [A]
    ioa = torch.where(is_crowd[:, None, :], inter / area[None, :, None], torch.zeros_like(inter)).amax(-1)
    ignore = (matches == -1) & (ioa >= thresh)
    return torch.where(ignore, torch.full_like(matches, -2), matches)


def encode_boxes(reference_boxes: Tensor, proposals: Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """BoxCoder.encode_single(reference_boxes, proposals): `reference` are the gts."""
    dtype = torch.promote_types(reference_boxes.dtype, proposals.dtype)
    ref, prop = reference_boxes.to(dtype), proposals.to(dtype).expand_as(reference_boxes)
    wx, wy, ww, wh = torch.as_tensor(weights, dtype=dtype, device=ref.device)
    ex_w = prop[..., 2] - prop[..., 0]
    ex_h = prop[..., 3] - prop[..., 1]
    ex_cx = prop[..., 0] + 0.5 * ex_w
    ex_cy = prop[..., 1] + 0.5 * ex_h
    gt_w = ref[..., 2] - ref[..., 0]
    gt_h = ref[..., 3] - ref[..., 1]
    gt_cx = ref[..., 0] + 0.5 * gt_w
    gt_cy = ref[..., 1] + 0.5 * gt_h
    dx = wx * (gt_cx - ex_cx) / ex_w
    dy = wy * (gt_cy - ex_cy) / ex_h
    dw = ww * torch.log(gt_w / ex_w)
    dh = wh * torch.log(gt_h / ex_h)
    return torch.stack((dx, dy, dw, dh), dim=-1)


def decode_boxes(rel_codes: Tensor, boxes: Tensor, weights=(1.0, 1.0, 1.0, 1.0),
                 clip: float = math.log(1000.0 / 16)) -> Tensor:
    """BoxCoder.decode_single for rel_codes [..., N, 4k] and boxes [..., N, 4]."""
    boxes = boxes.to(rel_codes.dtype)
    shape = rel_codes.shape
    codes = rel_codes.reshape(*shape[:-1], -1, 4)
    boxes = boxes.unsqueeze(-2)
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    cx = boxes[..., 0] + 0.5 * w
    cy = boxes[..., 1] + 0.5 * h
    wx, wy, ww, wh = weights
    dx = codes[..., 0] / wx
    dy = codes[..., 1] / wy
    dw = torch.clamp(codes[..., 2] / ww, max=clip)
    dh = torch.clamp(codes[..., 3] / wh, max=clip)
    pcx = dx * w + cx
    pcy = dy * h + cy
    pw = torch.exp(dw) * w
    ph = torch.exp(dh) * h
    half = torch.tensor(0.5, dtype=pcx.dtype, device=pcx.device)
    out = torch.stack((pcx - half * pw, pcy - half * ph, pcx + half * pw, pcy + half * ph), dim=-1)
    return out.reshape(shape)


def matched_targets(anchors: Tensor, gt_boxes: Tensor, gt_labels: Tensor, gt_counts: Tensor, high: float = 0.5,
                    low: float = 0.4, allow_low_quality_matches: bool = True, zero_iou_quirk: bool = True,
                    weights=(1.0, 1.0, 1.0, 1.0)):
    """(labels [B, A], regression targets [B, A, 4], matches [B, A]) as a RetinaNet loss builds them."""
    matches = match_anchors(anchors, gt_boxes, gt_counts, high, low, allow_low_quality_matches, zero_iou_quirk)
    dtype = torch.promote_types(anchors.dtype, gt_boxes.dtype)
    B, A = matches.shape
    labels = matches.clone()
    targets = torch.zeros(B, A, 4, dtype=dtype, device=anchors.device)
    for b in range(B):
        fg = matches[b] >= 0
        idx = matches[b, fg]
        labels[b, fg] = gt_labels[b, idx]
        targets[b, fg] = encode_boxes(gt_boxes[b, idx].to(dtype), anchors[fg].to(dtype), weights)
    return labels, targets, matches


def matched_box_loss(bbox_regression: Tensor, anchors: Tensor, matches: Tensor, gt_boxes: Tensor,
                     image_weights: Tensor, loss: str = "l1", weights=(1.0, 1.0, 1.0, 1.0),
                     clip: float = math.log(1000.0 / 16), beta: float = 1.0, eps: float = 1e-7) -> Tensor:
    """torchvision's per-image box loss (RetinaNetRegressionHead.compute_loss's _box_loss on the
    foreground anchors), weighted per image and summed."""
    from torchvision.ops import generalized_box_iou_loss

    acc = torch.float64 if bbox_regression.dtype == torch.float64 else torch.float32
    total = torch.zeros((), dtype=acc, device=bbox_regression.device)
    for b in range(bbox_regression.shape[0]):
        fg = torch.where(matches[b] >= 0)[0]
        if fg.numel() == 0:
            continue
        gt = gt_boxes[b][matches[b, fg]]
        codes = bbox_regression[b, fg].to(acc)
        if loss == "giou":
            pred = decode_boxes(codes, anchors[fg].to(acc), weights, clip)
            per = generalized_box_iou_loss(pred, gt.to(acc), reduction="sum", eps=eps)
        else:
            target = encode_boxes(gt, anchors[fg], weights).to(acc)
            if loss == "smooth_l1" and beta > 0:
                per = torch.nn.functional.smooth_l1_loss(codes, target, reduction="sum", beta=beta)
            else:
                per = torch.nn.functional.l1_loss(codes, target, reduction="sum")
        total = total + image_weights[b].to(acc) * per
    return total


def cell_anchors(sizes, aspect_ratios, dtype=torch.float32, device="cpu") -> Tensor:
    """AnchorGenerator.generate_anchors: zero-centred anchors, ratio-major then scale."""
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (h_ratios[:, None] * scales[None, :]).view(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round().to(dtype=dtype, device=device)


def grid_anchors(cells, grid_sizes, strides) -> Tensor:
    """AnchorGenerator.grid_anchors concatenated over levels."""
    out = []
    for base, (gh, gw), (sh, sw) in zip(cells, grid_sizes, strides):
        sx = torch.arange(0, gw, dtype=torch.int32, device=base.device) * sw
        sy = torch.arange(0, gh, dtype=torch.int32, device=base.device) * sh
        yy, xx = torch.meshgrid(sy, sx, indexing="ij")
        xx, yy = xx.reshape(-1), yy.reshape(-1)
        shifts = torch.stack((xx, yy, xx, yy), dim=1)
        out.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
    return torch.cat(out)


# ---- nms ----
# Plain PyTorch NMS and RetinaNet post-processing with the kernels' exact semantics: stable
# descending sort (NaN first, lower index first on ties), suppress iff IoU > threshold (the
# float IoU compared in double), NaN IoU suppresses nothing, IoU in float32 for half inputs.

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
