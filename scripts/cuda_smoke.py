"""A short run of every CUDA kernel and every path inside it, on small inputs, for
compute-sanitizer (memcheck with PYTORCH_NO_CUDA_MEMORY_CACHING=1, racecheck): each op forward
and backward, every dtype, vector body + scalar tail and misaligned storage, empty inputs, the
NMS warp and block scans and the block scan's global-memory path, float64 post-processing.

Every result (and every gradient) is compared with the same op on the CPU, on the same inputs
(seeded, drawn on the CPU and copied to the device): integers and kept indices exactly, floats
within the dtype's tolerance (float32 1e-5 relative, float64 1e-12, float16/bfloat16 1e-2),
detections as multisets per image and label (tied scores may come in either order).
Exits non-zero on any error or mismatch; prints "cuda_smoke: all ok" last.

Usage: python scripts/cuda_smoke.py   (RF_SMOKE_DEVICE=simt runs it on the CPU emulator of the
CUDA kernels, in the environment `python build_tools/simt.py env` prints: the CUDA kernels against
the CPU kernels without a GPU; RF_SMOKE_DEVICE=cpu dry-runs it on the CPU kernels, where each
comparison is the CPU against itself: it checks the script, not the kernels)
"""

import os
import sys

import torch

import retina_fast
from retina_fast import ops

dev = os.environ.get("RF_SMOKE_DEVICE", "cuda")
if dev == "cuda":
    assert torch.cuda.is_available() and retina_fast.cuda_built(), "needs a CUDA device and a CUDA build"
elif dev == "simt":  # the emulated CUDA kernels (build_tools/simt.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests import simt_support

    simt_support.load(os.environ["RETINA_FAST_SIMT_LIB"])

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
GEN = torch.Generator().manual_seed(0)
MISMATCHES = []
CHECKED = [0]


# ------------------------------------------------------------------ inputs and comparison

def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=GEN).to(dtype)


def rand(*shape, dtype=torch.float32):
    return torch.rand(*shape, generator=GEN).to(dtype)


def randint(lo, hi, shape):
    return torch.randint(lo, hi, shape, generator=GEN)


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _tol(dtype):
    return {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-6)}.get(dtype, (1e-2, 1e-3))


def _close(a, b):
    """a (device) and b (CPU): the same dtype and shape; integers equal; floats within the
    dtype's tolerance at b's scale, NaN where b is NaN, the same infinities."""
    a = a.detach().cpu()
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"dtype/shape {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
    if not b.is_floating_point():
        bad = a != b
        return f"{int(bad.sum())} of {b.numel()} differ, first at {torch.nonzero(bad)[:3].tolist()}" if bad.any() else None
    rtol, atol = _tol(b.dtype)
    x, y = a.double(), b.double()
    scale = y[torch.isfinite(y)].abs().max().item() if torch.isfinite(y).any() else 1.0
    ok = (x == y) | (torch.isnan(x) & torch.isnan(y)) | ((x - y).abs() <= rtol * y.abs() + atol * max(scale, 1.0))
    if ok.all():
        return None
    i = torch.nonzero(~ok)[:3]
    return f"{int((~ok).sum())} of {b.numel()} off, e.g. at {i.tolist()}: {x[~ok][:3].tolist()} vs {y[~ok][:3].tolist()}"


def _same_detections(got, want):
    """Per image: the same count, and each device detection paired with a distinct CPU one of
    the same label, score and box within the tolerance (greedy: tolerances are tight)."""
    if len(got) != len(want):
        return f"{len(got)} images vs {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        g = {k: v.detach().cpu() for k, v in g.items()}
        if len(g["scores"]) != len(w["scores"]):
            return f"image {i}: {len(g['scores'])} detections vs {len(w['scores'])}"
        rtol, atol = _tol(w["scores"].dtype)
        used = torch.zeros(len(w["scores"]), dtype=torch.bool)
        ws, wb = w["scores"].double(), w["boxes"].double()
        bscale = max(wb.abs().max().item(), 1.0) if len(wb) else 1.0
        for r in range(len(g["scores"])):
            cand = (~used & (w["labels"] == g["labels"][r])
                    & ((ws - float(g["scores"][r])).abs() <= rtol * ws.abs() + atol)
                    & ((wb - g["boxes"][r].double()).abs().amax(-1) <= (rtol + atol) * bscale))
            if not cand.any():
                return f"image {i}: detection {r} (label {int(g['labels'][r])}, score {float(g['scores'][r]):.6g}) " \
                       "has no CPU counterpart"
            used[torch.nonzero(cand)[0]] = True
    return None


def check(name, fn, *args, **kw):
    """fn(*args, **kw) on the device and on the CPU (inputs: CPU tensors); compare."""
    got = fn(*_to(args, dev), **_to(kw, dev))
    want = fn(*args, **kw)
    CHECKED[0] += 1
    if isinstance(want, list) and want and isinstance(want[0], dict):  # detections
        err = _same_detections(got, want)
        if err:
            MISMATCHES.append(f"{name}: {err}")
        return got
    gl = list(got) if isinstance(got, (tuple, list)) else [got]
    wl = list(want) if isinstance(want, (tuple, list)) else [want]
    for k, (g, w) in enumerate(zip(gl, wl)):
        err = _close(g, w)
        if err:
            MISMATCHES.append(f"{name}[{k}]: {err}")
    return got


def with_grad(f, argnum=0):
    """f's output and the gradient of (output * fixed weights).sum() in args[argnum]."""
    def run(*args, **kw):
        args = list(args)
        x = args[argnum].detach().clone().requires_grad_()
        args[argnum] = x
        out = f(*args, **kw)
        w = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape).to(out.device)
        (g,) = torch.autograd.grad((out * w).sum(), x) if out.numel() else (torch.zeros_like(x),)
        return out.detach(), g
    return run


# ------------------------------------------------------------------ the ops

def focal_loss():
    for dtype in DTYPES:
        # (1027, 81): vector body + a tail of 3; (1024, 80): no tail; offset 1: misaligned
        for n, k, off in ((1027, 81, 0), (1024, 80, 0), (257, 5, 1), (3, 1, 0), (0, 5, 0)):
            buf = randn(n * k + off, dtype=dtype)
            t = (rand(n, k) < 0.1).to(dtype)
            lab = randint(-2, k, (n,))
            w = rand(n)

            def dense(b, t, red):
                return ops.sigmoid_focal_loss(b[off:].view(n, k), t, reduction=red)

            def labels(b, lab, w, red):
                return ops.sigmoid_focal_loss_labels(b[off:].view(n, k), lab, reduction=red, label_smoothing=0.1,
                                                     weights=w)

            for red in ("none", "mean", "sum"):
                check(f"focal dense {dtype} {n}x{k}+{off} {red}", with_grad(dense), buf, t, red)
                check(f"focal labels {dtype} {n}x{k}+{off} {red}", with_grad(labels), buf, lab, w, red)
        x = torch.tensor([[float("inf"), -float("inf"), float("nan"), 0.0]], dtype=dtype)
        check(f"focal labels non-finite {dtype}", ops.sigmoid_focal_loss_labels, x, torch.tensor([1]), reduction="none")


def _boxes(n, scale=200.0):
    xy = rand(n, 2) * scale
    wh = rand(n, 2) * scale / 4 + 1
    return torch.cat([xy, xy + wh], 1)


def box_ops():
    for dtype in DTYPES:
        a, b = _boxes(1031).to(dtype), _boxes(37).to(dtype)
        check(f"box_iou {dtype}", ops.box_iou, a, b)
        check(f"box_iou empty {dtype}", ops.box_iou, a[:0], b)
        check(f"box_iou batched cxcywh {dtype}", ops.box_iou, a.view(1031, 4)[None].expand(2, -1, -1), b,
              fmt="cxcywh")  # batched, float64 path
        cells = [torch.tensor([[-16.0, -16.0, 16.0, 16.0], [-8.0, -24.0, 8.0, 24.0]], dtype=dtype)] * 3
        sizes, strides = [(13, 17), (0, 4), (7, 9)], [(8, 8), (16, 16), (16, 16)]
        anchors = check(f"grid_anchors {dtype}", ops.grid_anchors, cells, sizes, strides).cpu()
        gts = _boxes(2 * 300).view(2, 300, 4).to(dtype)
        gts[0, 5] = float("nan")
        gts[0, 6] = torch.tensor([0.0, 0.0, float("inf"), 10.0])
        counts = torch.tensor([300, 0])
        gt_labels = randint(0, 80, (2, 300))
        for quirk in (True, False):
            check(f"match_anchors quirk={quirk} {dtype}", ops.match_anchors, anchors, gts, counts, zero_iou_quirk=quirk)
            check(f"matched_targets quirk={quirk} {dtype}", ops.matched_targets, anchors, gts, gt_labels, counts,
                  zero_iou_quirk=quirk)
        m = ops.match_anchors(anchors, gts, counts)
        check(f"gather_targets {dtype}", torch.ops.retina_fast.gather_targets, m, anchors, gts, gt_labels,
              [1.0] * 4)  # checked: one sync
        crowd = rand(2, 300) < 0.3  # crowd regions inside matching
        for thresh in (0.5, 0.0):
            check(f"match_anchors crowd {thresh} {dtype}", ops.match_anchors, anchors, gts, counts, gt_crowd=crowd,
                  crowd_ioa_thresh=thresh)
        codes = randn(2, anchors.shape[0], 4, dtype=dtype)
        bw = rand(2)
        for loss in ("l1", "smooth_l1", "giou"):  # gathered box loss, forward and backward
            check(f"matched_box_loss {loss} {dtype}",
                  with_grad(lambda c, a, m, g, w: ops.matched_box_loss(c, a, m, g, w, loss)), codes, anchors, m, gts, bw)
        check(f"encode_boxes {dtype}", ops.encode_boxes, b, b.flip(0))
        check(f"encode_boxes shared {dtype}", ops.encode_boxes, gts, gts[0])  # shared proposals
        rel = randn(2, anchors.shape[0], 8, dtype=dtype)
        check(f"decode_boxes {dtype}", with_grad(ops.decode_boxes), rel, anchors)
        check(f"decode_boxes per-image {dtype}", ops.decode_boxes, rel, anchors.expand(2, -1, -1).contiguous())
    check("box_iou integer", ops.box_iou, _boxes(50).round().int(), _boxes(20).round().long())  # float64 kernel


def nms_ops():
    for box_dtype, score_dtype in ((torch.float32, torch.float32), (torch.float16, torch.float16),
                                   (torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
        bx = _boxes(2053).to(box_dtype)
        sc = rand(2053).to(score_dtype)
        name = f"{box_dtype}/{score_dtype}"
        check(f"nms {name}", ops.nms, bx, sc, 0.5)  # one group of 2053 boxes: the block scan
        check(f"nms empty {name}", ops.nms, bx[:0], sc[:0], 0.5)
        check(f"nms one {name}", ops.nms, bx[:1], sc[:1], 0.5)
        check(f"batched_nms empty {name}", ops.batched_nms, bx[:0], sc[:0], sc[:0].long(), 0.5)
        idx = randint(0, 80, (2053,))
        check(f"batched_nms {name}", ops.batched_nms, bx, sc, idx, 0.5)  # many small groups: the warp scan
        img = randint(0, 3, (2053,))
        check(f"batched_nms_multi {name}", ops.batched_nms_multi, bx, sc, idx, img, 3, 0.5)
        check(f"batched_nms_multi max 100 {name}", ops.batched_nms_multi, bx, sc, idx, img, 3, 0.5, max_per_image=100)
    # the block scan's global-memory path (taken past 262,144 boxes), forced on 3,000
    bx, sc = _boxes(3000), rand(3000)
    want = ops.nms(bx, sc, 0.5)
    old = torch.ops.retina_fast._nms_scan_shared_limit(0)
    try:
        got = ops.nms(bx.to(dev), sc.to(dev), 0.5)
    finally:
        torch.ops.retina_fast._nms_scan_shared_limit(old)
    err = _close(got, want)
    CHECKED[0] += 1
    if err:
        MISMATCHES.append(f"nms global-memory scan: {err}")
    # post-processing: 3 images, 3 levels (one empty), 91 classes
    levels = [(16, 16), (0, 8), (4, 4)]
    A = sum(h * w * 9 for h, w in levels)
    anchors = _boxes(A, 128.0)
    nl = [h * w * 9 for h, w in levels]
    for dtype in DTYPES:
        logits = (randn(3, A, 91) * 1.5 - 4).to(dtype)
        reg = (randn(3, A, 4) * 0.2).to(dtype)
        anc = anchors.to(dtype)
        check(f"postprocess {dtype}", ops.postprocess_detections, logits, reg, anc, [(128, 128)] * 3, nl)
        check(f"postprocess per-image anchors {dtype}", ops.postprocess_detections, logits, reg,
              anc.expand(3, -1, -1), [(128, 128)] * 3, nl, score_thresh=-1.0,
              topk_candidates=2100)  # groups > 2048: block scan
        # the top-k select: every digit pass at ~50 % density; long runs of equal scores (1.0)
        # that only the index digits separate; nothing / everything passing; no top-k
        dense = (randn(3, A, 91) * 2.5 - 2.9).to(dtype)
        dense[1, :1000] = 30.0
        for kw in (dict(topk_candidates=300), dict(topk_candidates=1), dict(score_thresh=1.0),
                   dict(score_thresh=-1.0, topk_candidates=50), dict(topk_candidates=0)):
            check(f"postprocess dense {kw} {dtype}", ops.postprocess_detections, dense, reg, anc, [(128, 128)] * 3,
                  nl, **kw)
    # more than 32 levels (two launch groups) and more than 8,192 images with a searched level
    # (two batches of histograms)
    nl = [20 + l for l in range(40)]
    check("postprocess 40 levels", ops.postprocess_detections, randn(2, sum(nl), 3), torch.zeros(2, sum(nl), 4),
          _boxes(sum(nl), 128.0), [(128, 128)] * 2, nl, topk_candidates=10)
    check("postprocess_padded 8200 images", ops.postprocess_detections_padded, randn(8200, 3, 2),
          torch.zeros(8200, 3, 4), _boxes(3, 128.0), torch.full((8200, 2), 128), [3], topk_candidates=2)


CHECKS = [focal_loss, box_ops, nms_ops]

if __name__ == "__main__":
    for f in CHECKS:
        f()
        if dev == "cuda":
            torch.cuda.synchronize()
        print("ok", f.__name__, flush=True)
    if MISMATCHES:
        print(f"cuda_smoke: {len(MISMATCHES)} of {CHECKED[0]} results differ from the CPU ops:", flush=True)
        for m in MISMATCHES[:40]:
            print("  " + m)
        sys.exit(1)
    print(f"cuda_smoke: all ok ({CHECKED[0]} results equal to the CPU ops')")
