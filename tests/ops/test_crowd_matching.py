"""match_anchors with crowd regions (gt_crowd): crowd rows are never matched and background
anchors mostly inside them are ignored, inside the kernel (no [B, A, M] temporaries). Checked
against retina_fast.ops._reference (the loss's former Python implementation) and, independently of
it, torchvision's Matcher with a float64 intersection-over-anchor-area written in the test; CUDA vs CPU,
bad input, opcheck, and the memory promise."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

import retina_fast.ops as rf
from retina_fast.ops import _reference as ref
from tests.conftest import CUDA, EMULATED_CUDA, requires_cuda
from tests.ops.test_boxes import random_gts, retinanet_anchors, with_garbage

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def crowd_case(seed=0, dtype=torch.float32, size=320):
    """Anchors, gts with crowd rows among them (large ones, so that whole anchors fall inside),
    counts, crowd flags (also set on padding rows, which must be ignored)."""
    g = torch.Generator().manual_seed(seed)
    anchors = retinanet_anchors(size, size).to(dtype)
    B, M = 5, 24
    gt = random_gts(B, M, size=size, gen=g)
    crowd = torch.rand(B, M, generator=g) < 0.3
    big = torch.rand(B, M, 2, generator=g) * size * 0.5 + size * 0.2
    gt[..., 2:] = torch.where(crowd[..., None], gt[..., :2] + big, gt[..., 2:])
    counts = torch.tensor([24, 9, 4, 0, 6])
    crowd[2, :4] = True   # an image with crowd boxes only
    crowd[4] = False      # an image without
    crowd[0, 0] = True    # the first row a crowd box: the default best gt is the first other one
    gt[1, 3] = torch.tensor([float("nan"), 0.0, 50.0, 50.0])  # a NaN crowd box
    crowd[1, 3] = True
    gt = with_garbage(gt, counts)
    crowd[3, :5] = True   # flags on padding rows: ignored
    return anchors, gt.to(dtype), counts, crowd


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("thresh", [0.5, 0.0, 1.0])
def test_crowd_match_equals_reference(dtype, thresh):
    anchors, gt, counts, crowd = crowd_case(0, dtype)
    for allow in (True, False):
        for quirk in (True, False):
            ours = rf.match_anchors(anchors, gt, counts, 0.5, 0.4, allow, quirk, gt_crowd=crowd,
                                    crowd_ioa_thresh=thresh)
            exp = ref.match_anchors(anchors, gt, counts, 0.5, 0.4, allow, quirk, gt_crowd=crowd,
                                    crowd_ioa_thresh=thresh)
            assert torch.equal(ours, exp), (allow, quirk)
    # not vacuous: crowd regions ignore background anchors, crowd rows are never matched
    plain = rf.match_anchors(anchors, gt, counts, zero_iou_quirk=False)
    ours = rf.match_anchors(anchors, gt, counts, zero_iou_quirk=False, gt_crowd=crowd, crowd_ioa_thresh=thresh)
    assert ((plain == -1) & (ours == -2)).sum() > 50
    assert (ours[2] < 0).all()  # crowd boxes only: nothing to match
    rows = torch.arange(gt.shape[1])[None, :] < counts[:, None]
    for b in range(gt.shape[0]):
        assert not (crowd[b] & rows[b])[ours[b][ours[b] >= 0]].any()
    if thresh <= 0:  # every background anchor is ignored (also in images without crowd boxes) ...
        assert not (ours[[0, 2, 3, 4]] == -1).any()
    # ... but a NaN crowd box makes every share of its image NaN, which reaches no threshold
    unreachable = rf.match_anchors(anchors, gt, counts, zero_iou_quirk=False, gt_crowd=crowd, crowd_ioa_thresh=2.0)
    assert torch.equal(ours[1], unreachable[1])


def _ioa64(anchors, boxes):
    """Share of each anchor inside each box, [A, G], in float64, written here (not the
    reference's crowd_ignore): intersection over the anchor's area clamped at 1e-6."""
    a, g = anchors.double(), boxes.double()
    lt = torch.maximum(a[:, None, :2], g[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], g[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])).clamp(min=1e-6)
    return inter / area[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("thresh", [0.5, 0.0, 1.0])
def test_crowd_match_equals_torchvision_matcher_and_float64_ioa(dtype, thresh):
    """Independent of retina_fast's reference: torchvision's Matcher (0.5, 0.4, low-quality
    matches) on torchvision's box_iou of the non-crowd rows, indices mapped back to the padded
    rows; then a background anchor whose largest share inside a crowd box (0 without crowd
    boxes; a NaN crowd box makes it NaN, which reaches no threshold) is >= thresh is ignored.
    Anchors whose float64 share lies within 1e-5 of the threshold may round either way in the
    kernel's precision: left out (and counted: few)."""
    from torchvision.models.detection._utils import Matcher

    anchors, gt, counts, crowd = crowd_case(0, dtype)
    ours = rf.match_anchors(anchors, gt, counts, 0.5, 0.4, True, True, gt_crowd=crowd, crowd_ioa_thresh=thresh)
    A = anchors.shape[0]
    near_total = ignored_total = 0
    for b in range(gt.shape[0]):
        n = int(counts[b])
        rows = torch.nonzero(~crowd[b, :n]).flatten()
        crowd_rows = torch.nonzero(crowd[b, :n]).flatten()
        if len(rows) == 0:
            exp = torch.full((A,), -1, dtype=torch.int64)
        else:
            m = Matcher(0.5, 0.4, True)(torchvision.ops.box_iou(gt[b, rows], anchors))
            exp = torch.where(m >= 0, rows[m.clamp(min=0)], m)
        share = torch.zeros(A, dtype=torch.float64)
        if len(crowd_rows):
            share = torch.maximum(share, _ioa64(anchors, gt[b, crowd_rows]).amax(1))  # NaN propagates
        ignore = (exp == -1) & (share >= thresh)
        exp = torch.where(ignore, torch.full_like(exp, -2), exp)
        near = (share != thresh) & ((share - thresh).abs() <= 1e-5 * max(thresh, 1e-3))
        near_total += int(near.sum())
        ignored_total += int(ignore.sum())
        assert torch.equal(ours[b][~near], exp[~near]), (b, torch.nonzero((ours[b] != exp) & ~near)[:5].flatten().tolist())
    assert near_total <= 20 and ignored_total > 50, (near_total, ignored_total)


def test_crowd_rows_removed_is_the_same_match():
    """Matching with crowd flags = matching the non-crowd rows alone (indices mapped back),
    before the crowd regions apply: the loss's former layout (crowd rows moved behind)."""
    anchors, gt, counts, crowd = crowd_case(1)
    ours = rf.match_anchors(anchors, gt, counts, gt_crowd=crowd, crowd_ioa_thresh=2.0)  # no anchor reaches 2
    for b in range(gt.shape[0]):
        keep = torch.where(~crowd[b, :counts[b]])[0]
        sub = rf.match_anchors(anchors, gt[b:b + 1, keep], torch.tensor([len(keep)]))[0]
        if len(keep) == 0:
            assert (sub == -1).all() and (ours[b] == -1).all()
            continue
        assert torch.equal(ours[b], torch.where(sub >= 0, keep[sub.clamp(min=0)], sub))


def test_crowd_thread_count_independent():
    anchors, gt, counts, crowd = crowd_case(2)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rf.match_anchors(anchors, gt, counts, gt_crowd=crowd)
        torch.set_num_threads(max(2, n))
        assert torch.get_num_threads() > 1
        many = rf.match_anchors(anchors, gt, counts, gt_crowd=crowd)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, many)


def test_crowd_bad_inputs():
    anchors, gt, counts, crowd = crowd_case(3)
    with pytest.raises(RuntimeError, match=r"gt_crowd of shape \[B, M\]"):
        rf.match_anchors(anchors, gt, counts, gt_crowd=crowd[:, :3])
    with pytest.raises(RuntimeError, match="gt_crowd of dtype bool"):
        rf.match_anchors(anchors, gt, counts, gt_crowd=crowd.float())
    # uint8 flags are accepted as bool
    assert torch.equal(rf.match_anchors(anchors, gt, counts, gt_crowd=crowd.to(torch.uint8)),
                       rf.match_anchors(anchors, gt, counts, gt_crowd=crowd))


def test_crowd_opcheck():
    anchors, gt, counts, crowd = crowd_case(4, size=128)
    torch.library.opcheck(torch.ops.retina_fast.match_anchors.default,
                          (anchors, gt, counts, 0.5, 0.4, True, True, crowd, 0.5))


def test_crowd_compile_fullgraph():
    anchors, gt, counts, crowd = crowd_case(5, size=128)

    def f(a, g, c, cr):
        return rf.match_anchors(a, g, c, check_counts=False, gt_crowd=cr)

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(cf(anchors, gt, counts, crowd), f(anchors, gt, counts, crowd))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_crowd_match_equals_cpu(dtype):
    # 256 px on the CPU emulator of the CUDA kernels (12,276 anchors), 640 px on a GPU
    anchors, gt, counts, crowd = crowd_case(6, dtype, size=256 if EMULATED_CUDA else 640)
    for thresh in (0.5, 0.0):
        for allow, quirk in ((True, True), (True, False), (False, True)):
            cpu = rf.match_anchors(anchors, gt, counts, 0.5, 0.4, allow, quirk, gt_crowd=crowd,
                                   crowd_ioa_thresh=thresh)
            cuda = rf.match_anchors(anchors.to(CUDA), gt.to(CUDA), counts.to(CUDA), 0.5, 0.4, allow, quirk,
                                    gt_crowd=crowd.to(CUDA), crowd_ioa_thresh=thresh)
            assert torch.equal(cuda.cpu(), cpu)


_MEM_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[2])
import retina_fast.ops as rf
from retina_fast.ops import _reference as ref
from tests.ops.test_boxes import random_gts, retinanet_anchors
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
anchors = retinanet_anchors(640, 640)
B, M = 2, 60
gt = random_gts(B, M, gen=g)
crowd = torch.rand(B, M, generator=g) < 0.5
counts = torch.tensor([M, M])
if sys.argv[1] == "reference":
    m = rf.match_anchors(anchors, gt, counts, gt_crowd=crowd, crowd_ioa_thresh=2.0)
def hwm():
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1])
def rss():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS:")][0].split()[1])
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
base = rss()
if sys.argv[1] == "ours":
    rf.match_anchors(anchors, gt, counts, gt_crowd=crowd)
else:
    ref.crowd_ignore(m, anchors, gt, counts, crowd, 0.5)
print(json.dumps({"peak_extra_kb": hwm() - base}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_crowd_memory_is_not_B_A_M():
    """B = 2, A = 76,725 (640 px), M = 60: the former Python path needs [B, A, M, 2] float32
    temporaries (74 MB each); the kernel's extra memory is O(A + M) per image."""
    out = {}
    for impl in ("ours", "reference"):
        res = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, impl, ROOT], capture_output=True, text=True,
                             cwd=ROOT)
        assert res.returncode == 0, res.stderr[-2000:]
        out[impl] = json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_kb"] / 1024
    assert out["reference"] > 150, out  # the measurement sees the [B, A, M] tensors
    assert out["ours"] < 16, out       # labels (1.2 MB), per-image best IoU/index, chunk buffers
