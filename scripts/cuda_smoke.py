"""A short run of every CUDA kernel on small inputs, for compute-sanitizer (memcheck,
racecheck): each op once, forward and backward, odd sizes (vector body + scalar tail), empty
inputs. Exits non-zero on any error. Usage: python scripts/cuda_smoke.py"""

import os

import torch

import retina_fast
from retina_fast import ops

# RF_SMOKE_DEVICE=cpu dry-runs the script here, without a GPU.
dev = os.environ.get("RF_SMOKE_DEVICE", "cuda")
if dev == "cuda":
    assert torch.cuda.is_available() and retina_fast.cuda_built(), "needs a CUDA device and a CUDA build"


def focal_loss():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for n, k in ((1027, 81), (3, 1), (0, 5)):
            x = torch.randn(n, k, device=dev, dtype=dtype, requires_grad=True)
            t = (torch.rand(n, k, device=dev) < 0.1).to(dtype)
            lab = torch.randint(-2, k, (n,), device=dev)
            for red in ("none", "mean", "sum"):
                out = ops.sigmoid_focal_loss(x, t, reduction=red)
                out.sum().backward()
                out = ops.sigmoid_focal_loss_labels(x, lab, reduction=red, label_smoothing=0.1)
                out.sum().backward()


def _boxes(n, scale=200.0, gen=None):
    xy = torch.rand(n, 2, device=dev) * scale
    wh = torch.rand(n, 2, device=dev) * scale / 4 + 1
    return torch.cat([xy, xy + wh], 1)


def box_ops():
    for dtype in (torch.float32, torch.float16, torch.float64):
        a, b = _boxes(1031).to(dtype), _boxes(37).to(dtype)
        ops.box_iou(a, b)
        ops.box_iou(a[:0], b)
        cells = [torch.tensor([[-16.0, -16.0, 16.0, 16.0], [-8.0, -24.0, 8.0, 24.0]], device=dev, dtype=dtype)] * 2
        anchors = ops.grid_anchors(cells, [(13, 17), (7, 9)], [(8, 8), (16, 16)])
        gts = _boxes(2 * 300).view(2, 300, 4).to(dtype)
        counts = torch.tensor([300, 0], device=dev)
        gt_labels = torch.randint(0, 80, (2, 300), device=dev)
        for quirk in (True, False):
            ops.match_anchors(anchors, gts, counts, zero_iou_quirk=quirk)
            ops.matched_targets(anchors, gts, gt_labels, counts, zero_iou_quirk=quirk)
        codes = ops.encode_boxes(b, b.flip(0))
        rel = torch.randn(2, anchors.shape[0], 4, device=dev, dtype=dtype, requires_grad=True)
        ops.decode_boxes(rel, anchors).sum().backward()
        del codes


def nms_ops():
    for dtype in (torch.float32, torch.float16):
        bx = _boxes(2053).to(dtype)
        sc = torch.rand(2053, device=dev).to(dtype)
        ops.nms(bx, sc, 0.5)
        ops.nms(bx[:0], sc[:0], 0.5)
        ops.nms(bx[:1], sc[:1], 0.5)
        idx = torch.randint(0, 80, (2053,), device=dev)
        ops.batched_nms(bx, sc, idx, 0.5)
        img = torch.randint(0, 3, (2053,), device=dev)
        ops.batched_nms_multi(bx, sc, idx, img, 3, 0.5)
        ops.batched_nms_multi(bx, sc, idx, img, 3, 0.5, max_per_image=100)
    # post-processing: 3 images, 3 levels, 91 classes
    levels = [(16, 16), (8, 8), (4, 4)]
    A = sum(h * w * 9 for h, w in levels)
    anchors = _boxes(A, 128.0)
    for dtype in (torch.float32, torch.float16):
        logits = (torch.randn(3, A, 91, device=dev) * 1.5 - 4).to(dtype)
        reg = (torch.randn(3, A, 4, device=dev) * 0.2).to(dtype)
        ops.postprocess_detections(logits, reg, anchors.to(dtype), [(128, 128)] * 3, [h * w * 9 for h, w in levels])


CHECKS = [focal_loss, box_ops, nms_ops]

if __name__ == "__main__":
    for f in CHECKS:
        f()
        if dev == "cuda":
            torch.cuda.synchronize()
        print("ok", f.__name__)
    print("cuda_smoke: all ok")
