"""A short run of every CUDA kernel and every path inside it, on small inputs, for
compute-sanitizer (memcheck with PYTORCH_NO_CUDA_MEMORY_CACHING=1, racecheck): each op forward
and backward, every dtype, vector body + scalar tail and misaligned storage, empty inputs, the
NMS warp and block scans and the block scan's global-memory path, float64 post-processing.
Exits non-zero on any error; prints "cuda_smoke: all ok" last.

Usage: python scripts/cuda_smoke.py   (RF_SMOKE_DEVICE=cpu dry-runs it on the CPU kernels)
"""

import os

import torch

import retina_fast
from retina_fast import ops

dev = os.environ.get("RF_SMOKE_DEVICE", "cuda")
if dev == "cuda":
    assert torch.cuda.is_available() and retina_fast.cuda_built(), "needs a CUDA device and a CUDA build"

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def focal_loss():
    for dtype in DTYPES:
        # (1027, 81): vector body + a tail of 3; (1024, 80): no tail; offset 1: misaligned
        for n, k, off in ((1027, 81, 0), (1024, 80, 0), (257, 5, 1), (3, 1, 0), (0, 5, 0)):
            buf = torch.randn(n * k + off, device=dev, dtype=dtype)
            x = buf[off:].view(n, k).requires_grad_()
            t = (torch.rand(n, k, device=dev) < 0.1).to(dtype)
            lab = torch.randint(-2, k, (n,), device=dev)
            w = torch.rand(n, device=dev)
            for red in ("none", "mean", "sum"):
                out = ops.sigmoid_focal_loss(x, t, reduction=red)
                out.sum().backward()
                out = ops.sigmoid_focal_loss_labels(x, lab, reduction=red, label_smoothing=0.1, weights=w)
                out.sum().backward()
        x = torch.tensor([[float("inf"), -float("inf"), float("nan"), 0.0]], device=dev, dtype=dtype)
        ops.sigmoid_focal_loss_labels(x, torch.tensor([1], device=dev), reduction="none")


def _boxes(n, scale=200.0):
    xy = torch.rand(n, 2, device=dev) * scale
    wh = torch.rand(n, 2, device=dev) * scale / 4 + 1
    return torch.cat([xy, xy + wh], 1)


def box_ops():
    for dtype in DTYPES:
        a, b = _boxes(1031).to(dtype), _boxes(37).to(dtype)
        ops.box_iou(a, b)
        ops.box_iou(a[:0], b)
        ops.box_iou(a.view(1031, 4)[None].expand(2, -1, -1), b, fmt="cxcywh")  # batched, float64 path
        cells = [torch.tensor([[-16.0, -16.0, 16.0, 16.0], [-8.0, -24.0, 8.0, 24.0]], device=dev, dtype=dtype)] * 3
        anchors = ops.grid_anchors(cells, [(13, 17), (0, 4), (7, 9)], [(8, 8), (16, 16), (16, 16)])
        gts = _boxes(2 * 300).view(2, 300, 4).to(dtype)
        gts[0, 5] = float("nan")
        gts[0, 6] = torch.tensor([0.0, 0.0, float("inf"), 10.0])
        counts = torch.tensor([300, 0], device=dev)
        gt_labels = torch.randint(0, 80, (2, 300), device=dev)
        for quirk in (True, False):
            ops.match_anchors(anchors, gts, counts, zero_iou_quirk=quirk)
            ops.matched_targets(anchors, gts, gt_labels, counts, zero_iou_quirk=quirk)
        m = ops.match_anchors(anchors, gts, counts)
        torch.ops.retina_fast.gather_targets(m, anchors, gts, gt_labels, [1.0] * 4)  # checked: one sync
        crowd = torch.rand(2, 300, device=dev) < 0.3  # crowd regions inside matching
        for thresh in (0.5, 0.0):
            ops.match_anchors(anchors, gts, counts, gt_crowd=crowd, crowd_ioa_thresh=thresh)
        codes = torch.randn(2, anchors.shape[0], 4, device=dev, dtype=dtype, requires_grad=True)
        for loss in ("l1", "smooth_l1", "giou"):  # gathered box loss, forward and backward
            ops.matched_box_loss(codes, anchors, m, gts, torch.rand(2, device=dev), loss).backward()
        ops.encode_boxes(b, b.flip(0))
        ops.encode_boxes(gts, gts[0])  # shared proposals
        rel = torch.randn(2, anchors.shape[0], 8, device=dev, dtype=dtype, requires_grad=True)
        (ops.decode_boxes(rel, anchors) * torch.randn_like(rel)).sum().backward()
        ops.decode_boxes(rel.detach(), anchors.expand(2, -1, -1).contiguous())
    ops.box_iou(_boxes(50).round().int(), _boxes(20).round().long())  # integer boxes: float64 kernel


def nms_ops():
    for box_dtype, score_dtype in ((torch.float32, torch.float32), (torch.float16, torch.float16),
                                   (torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
        bx = _boxes(2053).to(box_dtype)
        sc = torch.rand(2053, device=dev).to(score_dtype)
        ops.nms(bx, sc, 0.5)  # one group of 2053 boxes: the block scan
        ops.nms(bx[:0], sc[:0], 0.5)
        ops.nms(bx[:1], sc[:1], 0.5)
        ops.batched_nms(bx[:0], sc[:0], sc[:0].long(), 0.5)
        idx = torch.randint(0, 80, (2053,), device=dev)
        ops.batched_nms(bx, sc, idx, 0.5)  # many small groups: the warp scan
        img = torch.randint(0, 3, (2053,), device=dev)
        ops.batched_nms_multi(bx, sc, idx, img, 3, 0.5)
        ops.batched_nms_multi(bx, sc, idx, img, 3, 0.5, max_per_image=100)
    # the block scan's global-memory path (taken past 262,144 boxes), forced on 3,000
    old = torch.ops.retina_fast._nms_scan_shared_limit(0)
    try:
        ops.nms(_boxes(3000), torch.rand(3000, device=dev), 0.5)
    finally:
        torch.ops.retina_fast._nms_scan_shared_limit(old)
    # post-processing: 3 images, 3 levels (one empty), 91 classes
    levels = [(16, 16), (0, 8), (4, 4)]
    A = sum(h * w * 9 for h, w in levels)
    anchors = _boxes(A, 128.0)
    for dtype in DTYPES:
        logits = (torch.randn(3, A, 91, device=dev) * 1.5 - 4).to(dtype)
        reg = (torch.randn(3, A, 4, device=dev) * 0.2).to(dtype)
        nl = [h * w * 9 for h, w in levels]
        ops.postprocess_detections(logits, reg, anchors.to(dtype), [(128, 128)] * 3, nl)
        ops.postprocess_detections(logits, reg, anchors.to(dtype).expand(3, -1, -1), [(128, 128)] * 3, nl,
                                   score_thresh=-1.0, topk_candidates=2100)  # groups > 2048: block scan
        # the top-k select: every digit pass at ~50 % density; long runs of equal scores (1.0)
        # that only the index digits separate; nothing / everything passing; no top-k
        dense = (torch.randn(3, A, 91, device=dev) * 2.5 - 2.9).to(dtype)
        dense[1, :1000] = 30.0
        for kw in (dict(topk_candidates=300), dict(topk_candidates=1), dict(score_thresh=1.0),
                   dict(score_thresh=-1.0, topk_candidates=50), dict(topk_candidates=0)):
            ops.postprocess_detections(dense, reg, anchors.to(dtype), [(128, 128)] * 3, nl, **kw)
    # more than 32 levels (two launch groups) and more than 8,192 images with a searched level
    # (two batches of histograms)
    nl = [20 + l for l in range(40)]
    anchors = _boxes(sum(nl), 128.0)
    ops.postprocess_detections(torch.randn(2, sum(nl), 3, device=dev), torch.zeros(2, sum(nl), 4, device=dev),
                               anchors, [(128, 128)] * 2, nl, topk_candidates=10)
    ops.postprocess_detections_padded(torch.randn(8200, 3, 2, device=dev), torch.zeros(8200, 3, 4, device=dev),
                                      _boxes(3, 128.0), torch.full((8200, 2), 128, device=dev), [3],
                                      topk_candidates=2)


CHECKS = [focal_loss, box_ops, nms_ops]

if __name__ == "__main__":
    for f in CHECKS:
        f()
        if dev == "cuda":
            torch.cuda.synchronize()
        print("ok", f.__name__, flush=True)
    print("cuda_smoke: all ok")
