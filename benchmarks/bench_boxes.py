"""Box-op benchmarks (pytest-benchmark): ours vs torchvision vs the pure-PyTorch reference,
same inputs, same run.

    python -m pytest benchmarks/bench_boxes.py --benchmark-only [--benchmark-json out.json]

Matching: B = 8 images at 640x640 (RetinaNet anchors, A = 76,725), M = 20 and 100 gts per
image; torchvision is its per-image ``box_iou`` + ``Matcher`` loop (what RetinaNet.compute_loss
runs). CUDA timings synchronise inside the timed call. Peak memory lands in each result's
``extra_info``:
  - CUDA: ``torch.cuda.max_memory_allocated()`` over one call after
    ``reset_peak_memory_stats()``, minus the memory allocated before it (bytes the call added);
  - CPU: growth of the peak resident set size (``VmHWM``) of a fresh subprocess over one
    call, after the inputs are built. Coarse (page granularity; includes lazy
    initialisation and torch's temporaries), but the same method for all implementations.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder, Matcher

import retina_fast.ops as rf
from retina_fast.models import retinanet_anchor_generator
from retina_fast.ops import _reference as ref
from benchmarks import quick, record_untimed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def anchors_for(size, device):
    grids = [(math.ceil(size / s), math.ceil(size / s)) for s in (8, 16, 32, 64, 128)]
    return retinanet_anchor_generator().grid((size, size), grids, torch.float32, torch.device(device))


def make_batch(B, M, size, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(B, M, 2, generator=g) * (size - 40)
    wh = torch.rand(B, M, 2, generator=g) * 250 + 4
    gt = torch.cat([xy, xy + wh], -1)
    labels = torch.randint(0, 80, (B, M), generator=g)
    counts = torch.full((B,), M, dtype=torch.long)
    return gt.to(device), labels.to(device), counts.to(device)


def tv_match(anchors, gt, counts):
    matcher = Matcher(0.5, 0.4, True)
    return [matcher(torchvision.ops.box_iou(gt[b, : int(n)], anchors)) for b, n in enumerate(counts.tolist())]


IMPLS = {
    "ours": lambda a, gt, c: rf.match_anchors(a, gt, c),
    "torchvision": tv_match,
    "reference": lambda a, gt, c: ref.match_anchors(a, gt, c),
}


def synced(fn, device):
    if device == "cuda":
        def run(*args):
            out = fn(*args)
            torch.cuda.synchronize()
            return out
        return run
    return fn


_CPU_PEAK_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {root!r})
from benchmarks.bench_boxes import IMPLS, anchors_for, make_batch
torch.set_num_threads({threads})
a = anchors_for({size}, "cpu")
gt, _, c = make_batch({B}, {M}, {size}, "cpu")
fn = IMPLS[{impl!r}]
# VmHWM (this process's peak RSS), not ru_maxrss: Linux carries ru_maxrss across exec, so a
# child of a big pytest process would start at its parent's peak.
def hwm_kb():
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1])
before = hwm_kb()
fn(a, gt, c)
print((hwm_kb() - before) * 1024)
"""


def peak_memory(impl, B, M, size, device, args):
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        IMPLS[impl](*args)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, "cuda max_memory_allocated delta"
    code = _CPU_PEAK_SCRIPT.format(root=ROOT, threads=torch.get_num_threads(), size=size, B=B, M=M, impl=impl)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        return None, f"subprocess failed: {out.stderr[-300:]}"
    return int(out.stdout.strip().splitlines()[-1]), "cpu VmHWM growth over one call after building the inputs (fresh subprocess)"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("M", [20, 100])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_match_batch(benchmark, impl, M, device):
    B, size = (2, 256) if quick() else (8, 640)
    benchmark.group = f"match_anchors B={B} M={M} {size}px {device}"
    anchors = anchors_for(size, device)
    gt, _, counts = make_batch(B, M, size, device)
    args = (anchors, gt, counts)
    peak, how = peak_memory(impl, B, M, size, device, args)
    benchmark.extra_info.update(
        {"A": anchors.shape[0], "B": B, "M": M, "peak_mem_bytes": peak, "peak_mem_method": how,
         "threads": torch.get_num_threads()}
    )
    rounds = 3 if impl != "ours" else 10
    out = benchmark.pedantic(synced(IMPLS[impl], device), args=args, rounds=rounds, warmup_rounds=1)
    if impl != "torchvision":  # the timed call computes torchvision's matches (image 0: cheap)
        assert torch.equal(out[0], tv_match(anchors, gt[:1], counts[:1])[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["ours", "torchvision", "reference"])
def test_matched_targets(benchmark, impl, device):
    """Labels + regression targets for the loss, B=8, M=50 (torchvision: loop per image)."""
    B, M, size = 8, 50, 640
    benchmark.group = f"matched_targets B={B} M={M} {size}px {device}"
    anchors = anchors_for(size, device)
    gt, labels, counts = make_batch(B, M, size, device)
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))

    def tv():
        out = []
        for b, m in enumerate(tv_match(anchors, gt, counts)):
            fg = m >= 0
            out.append((labels[b][m[fg]], coder.encode_single(gt[b][m[fg]], anchors[fg])))
        return out

    fns = {
        "ours": lambda: rf.matched_targets(anchors, gt, labels, counts),
        "torchvision": tv,
        "reference": lambda: ref.matched_targets(anchors, gt, labels, counts),
    }
    out = benchmark.pedantic(synced(fns[impl], device), rounds=3, warmup_rounds=1)
    if impl != "torchvision":  # image 0's foreground labels and targets are torchvision's
        m = tv_match(anchors, gt[:1], counts[:1])[0]
        fg = m >= 0
        assert torch.equal(out[0][0][fg], labels[0][m[fg]])  # (labels, regression targets, matches)
        torch.testing.assert_close(out[1][0][fg], coder.encode_single(gt[0][m[fg]], anchors[fg]),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["ours", "torchvision"])
def test_box_iou(benchmark, impl, device):
    """[100, 4] x [76725, 4]."""
    benchmark.group = f"box_iou 100 x 76725 {device}"
    anchors = anchors_for(640, device)
    gt, _, _ = make_batch(1, 100, 640, device)
    fn = rf.box_iou if impl == "ours" else torchvision.ops.box_iou
    out = benchmark.pedantic(synced(fn, device), args=(gt[0], anchors), rounds=10, warmup_rounds=1)
    assert torch.equal(out, torchvision.ops.box_iou(gt[0], anchors))  # bitwise, by design


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["ours", "torchvision", "reference"])
def test_decode(benchmark, impl, device):
    """Decode [8 * 76725, 4] codes against their anchors."""
    benchmark.group = f"decode_boxes 8x76725 {device}"
    anchors = anchors_for(640, device)
    codes = torch.randn(8, anchors.shape[0], 4, device=device) * 0.2
    flat_anchors = anchors.repeat(8, 1)
    flat_codes = codes.reshape(-1, 4)
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    fns = {
        "ours": lambda: rf.decode_boxes(codes, anchors),
        "torchvision": lambda: coder.decode_single(flat_codes, flat_anchors),
        "reference": lambda: ref.decode_boxes(flat_codes, flat_anchors),
    }
    out = benchmark.pedantic(synced(fns[impl], device), rounds=10, warmup_rounds=1)
    torch.testing.assert_close(out.reshape(-1, 4), coder.decode_single(flat_codes, flat_anchors), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["ours_uncached", "torchvision"])
def test_anchor_grid(benchmark, impl, device):
    """RetinaNet anchors for an 800x1216 padded batch of 8 (ours: one kernel, cache off)."""
    from torchvision.models.detection.image_list import ImageList
    from torchvision.models.detection.retinanet import _default_anchorgen

    benchmark.group = f"anchors 800x1216 {device}"
    img = ImageList(torch.zeros(8, 3, 800, 1216, device=device), [(800, 1216)] * 8)
    feats = [torch.zeros(8, 1, math.ceil(800 / s), math.ceil(1216 / s), device=device) for s in (8, 16, 32, 64, 128)]
    if impl == "torchvision":
        gen = _default_anchorgen()
    else:
        gen = retinanet_anchor_generator()
        gen.cache_size = 0
    out = benchmark.pedantic(synced(lambda: gen(img, feats), device), rounds=10, warmup_rounds=1)
    assert torch.equal(out[0], _default_anchorgen()(img, feats)[0])  # torchvision's anchors


# ------------------------------------------------------------------ crowd regions (issue 11)

_CROWD_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from benchmarks.bench_boxes import anchors_for, crowd_targets
import retina_fast.ops as rf
from retina_fast.models import RetinaNetLoss, pack_targets
from tests.models.test_loss import _former_crowd_labels
impl, B, M, size, share = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
anchors = anchors_for(size, "cpu")
targets = crowd_targets(B, M, size, share)
cpu = torch.device("cpu")
def rss_kb(key):
    return int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1])
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = rss_kb("VmRSS:")
if impl == "ours":  # what the loss runs: padded targets, matching with crowd regions, labels
    RetinaNetLoss().match(anchors, pack_targets(targets, cpu))
elif share > 0:     # the former code: reordering pack, matched_targets, then _crowd_ignore
    _former_crowd_labels(targets, anchors)
else:               # the former code without crowd boxes: pack, matched_targets (labels + [B, A, 4] targets)
    p = pack_targets(targets, cpu)
    rf.matched_targets(anchors, p.boxes, p.labels, p.counts)
print(json.dumps({"peak_extra_MB": (rss_kb("VmHWM:") - base) / 1024, "A": anchors.shape[0]}))
"""


def crowd_targets(B, M, size, crowd_share, seed=0):
    """M boxes per image; a share of them crowd regions (larger boxes, iscrowd = 1)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(B):
        crowd = torch.rand(M, generator=g) < crowd_share
        xy = torch.rand(M, 2, generator=g) * (size - 40)
        wh = torch.rand(M, 2, generator=g) * 250 + 4
        wh = torch.where(crowd[:, None], wh * 2, wh)
        out.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 80, (M,), generator=g),
                    "iscrowd": crowd.to(torch.int64)})
    return out


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
@pytest.mark.parametrize("crowd_share", [0.0, 0.1])
@pytest.mark.parametrize("impl", ["ours", "former"])
def test_crowd_match_peak_memory(benchmark, impl, crowd_share):
    """Peak extra memory of the loss's matching at COCO scale: B = 16, 800 px (A = 120,087),
    M = 100 boxes per image, without and with crowd boxes (10 %): ours (crowd regions inside
    match_anchors) vs the former code (crowd boxes reordered in pack_targets, then
    [B, A, M, 2] / [B, A, M] float temporaries). VmHWM growth of a fresh subprocess over the
    call, the peak reset just before it; in extra_info (MB). Each former run with crowds peaks
    at several GB."""
    B, M, size = 16, 100, 800
    if getattr(benchmark, "disabled", False):  # --benchmark-disable (a smoke run): small, not GBs
        B, M, size = 2, 20, 320
    res = subprocess.run([sys.executable, "-c", _CROWD_SCRIPT, ROOT, impl, str(B), str(M), str(size),
                          str(crowd_share)], capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    benchmark.group = f"crowd matching peak memory B={B} M={M} {size}px crowd={crowd_share}"
    benchmark.extra_info.update(B=B, M=M, size=size, crowd_share=crowd_share, **r)
    print(f"\n{impl} crowd_share={crowd_share}: peak extra {r['peak_extra_MB']:.0f} MB (A = {r['A']})")
    record_untimed(benchmark)
