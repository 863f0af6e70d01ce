"""NMS, batched NMS and RetinaNet post-processing: retina_fast vs torchvision vs the reference.

    pytest benchmarks/bench_nms.py --benchmark-only [--benchmark-json out.json]

Inputs (fixed seeds, the same tensors for every implementation in a run):

* nms / batched_nms: "COCO-like density" = detector-like candidates in a 1333x800 image:
  N/60 objects with log-normal sizes (median ~55 px), each candidate a jittered copy of an
  object (centre +-10% of its size, size x e^N(0, 0.1)), 20% uniform background boxes; unique
  random scores. batched_nms draws 80 classes uniformly.
* post-processing: an 800x800 image (5 levels, 100^2 ... 7^2 positions, 9 anchors: 120,087
  anchors, torchvision's AnchorGenerator sizes), 91 classes. Logits look like a trained
  model's: background N(-7, 1.2) (about 0.04% of logits above logit(0.05) by chance), plus
  25 objects per image whose class logit at each anchor is 4 * (IoU(anchor, object) - 0.25)
  + N(0, 0.5) where the IoU > 0.2, so every object lights a cluster of overlapping anchors, as
  a trained RetinaNet does. Box codes N(0, 0.1).

* post-processing at every score density (test_postprocess_density): an untrained head's
  logits, N(-4.595, 0.25) (torchvision's prior bias; no score above 0.05), then N(-4.595, s)
  with s set so that 0.1 %, 1 %, 5 % or 25 % of the scores pass 0.05, and N(logit(0.05), 2.5)
  for 50 %; batch 1 and 8, the same 800 px levels and 91 classes, box codes N(0, 0.1).
  extra_info holds the measured density and the peak memory of one call: the growth of the
  peak resident set size (VmHWM) of a fresh subprocess over the call, after building the inputs
  and a small warm-up call (CUDA: max_memory_allocated over the inputs).

The density sweep ("trained" adds the trained-like input above), ours and torchvision
interleaved round by round in one process (ratios from
neighbouring rounds, so a machine shared with other work skews both alike), with peak memory:

    python -m benchmarks.bench_nms sweep [--batches 1,8] [--densities trained,0,0.001,...]
        [--rounds 5] [--threads 2] [--clock wall|cpu] [--device cpu] [--no-memory] [--json F]

CUDA cases (when a GPU is present) synchronise inside the timed call.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from statistics import NormalDist, median

import pytest
import torch
import torchvision
from torchvision.ops import box_iou

import retina_fast.ops as R
from benchmarks import quick
from tests.detections import assert_same_detections, assert_same_keep
from retina_fast.ops import _reference as ref

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def coco_like_boxes(n, seed=0, W=1333.0, H=800.0):
    g = torch.Generator().manual_seed(seed)
    objects = max(1, n // 60)
    oc = torch.rand(objects, 2, generator=g) * torch.tensor([W, H])
    ow = torch.exp(torch.randn(objects, 2, generator=g) * 0.8 + 4.0)
    k = torch.randint(0, objects, (n,), generator=g)
    c = oc[k] + torch.randn(n, 2, generator=g) * ow[k] * 0.1
    wh = ow[k] * torch.exp(torch.randn(n, 2, generator=g) * 0.1)
    bg = torch.rand(n, generator=g) < 0.2
    c[bg] = torch.rand(int(bg.sum()), 2, generator=g) * torch.tensor([W, H])
    boxes = torch.cat([c - wh / 2, c + wh / 2], 1)
    scores = (torch.randperm(n, generator=g).float() + 1) / (n + 1)
    return boxes, scores


def _run(benchmark, fn, device, rounds):
    def call():
        out = fn()
        _sync(device)
        return out

    return benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)


IMPLS = ["retina_fast", "torchvision", "reference"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [1000, 5000, 20000])
def test_nms(benchmark, n, impl, device):
    n = n // 20 if quick() else n
    if impl == "reference" and device == "cuda":
        pytest.skip("the reference is a CPU loop")
    b, s = coco_like_boxes(n)
    b, s = b.to(device), s.to(device)
    fn = {"retina_fast": R.nms, "torchvision": torchvision.ops.nms, "reference": ref.nms}[impl]
    benchmark.group = f"nms N={n} {device}"
    out = _run(benchmark, lambda: fn(b, s, 0.5), device, rounds=3 if impl == "reference" else 20)
    assert_same_keep(out, torchvision.ops.nms(b, s, 0.5), s)  # what is timed is torchvision's nms


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [5000, 20000])
def test_batched_nms_80_classes(benchmark, n, impl, device):
    n = n // 20 if quick() else n
    if impl == "reference" and device == "cuda":
        pytest.skip("the reference is a CPU loop")
    b, s = coco_like_boxes(n, seed=1)
    i = torch.randint(0, 80, (n,), generator=torch.Generator().manual_seed(2))
    b, s, i = b.to(device), s.to(device), i.to(device)
    fn = {"retina_fast": R.batched_nms, "torchvision": torchvision.ops.batched_nms, "reference": ref.batched_nms}[impl]
    benchmark.group = f"batched_nms 80 classes N={n} {device}"
    out = _run(benchmark, lambda: fn(b, s, i, 0.5), device, rounds=3 if impl == "reference" else 20)
    assert_same_keep(out, torchvision.ops.batched_nms(b, s, i, 0.5), s)


_LEVELS_HW = [100, 50, 25, 13, 7]  # 800 px, strides 8..128 (800 // 13 = 61 as torchvision computes)
_K = 91


def _anchors_800():
    from torchvision.models.detection.retinanet import _default_anchorgen
    from torchvision.models.detection.image_list import ImageList

    gen = _default_anchorgen()
    img = ImageList(torch.zeros(1, 3, 800, 800), [(800, 800)])
    feats = [torch.zeros(1, 1, h, h) for h in _LEVELS_HW]
    anchors = gen(img, feats)[0]
    levels = [h * h * 9 for h in _LEVELS_HW]
    return anchors, levels


def trained_like_head(B, seed=0, objects=25):
    anchors, levels = _anchors_800()
    A = anchors.shape[0]
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, A, _K, generator=g) * 1.2 - 7.0
    for b in range(B):
        c = torch.rand(objects, 2, generator=g) * 700 + 50
        wh = torch.exp(torch.randn(objects, 2, generator=g) * 0.6 + 4.5).clamp(max=600)
        obj = torch.cat([c - wh / 2, c + wh / 2], 1)
        iou = box_iou(obj, anchors)  # [objects, A]
        cls = torch.randint(0, _K, (objects,), generator=g)
        for o in range(objects):
            near = torch.where(iou[o] > 0.2)[0]
            val = 4 * (iou[o, near] - 0.25) + torch.randn(len(near), generator=g) * 0.5
            logits[b, near, cls[o]] = torch.maximum(logits[b, near, cls[o]], val)
    reg = torch.randn(B, A, 4, generator=g) * 0.1
    return logits, reg, anchors, levels


@pytest.fixture(scope="module")
def tv_model():
    from torchvision.models.detection import retinanet_resnet50_fpn

    return retinanet_resnet50_fpn(weights=None, weights_backbone=None).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B", [1, 8] + ([16] if HAS_CUDA else []))
def test_postprocess(benchmark, tv_model, B, impl, device):
    if impl == "reference" and device == "cuda":
        pytest.skip("the reference is a CPU loop")
    if B == 16 and device == "cpu":
        pytest.skip("batch 16 is the GPU goal")
    B = 1 if quick() else B
    logits, reg, anchors, levels = trained_like_head(B)
    logits, reg, anchors = logits.to(device), reg.to(device), anchors.to(device)
    sizes = [(800, 800)] * B
    benchmark.group = f"postprocess B={B} 800px K=91 {device}"
    if impl == "retina_fast":
        fn = lambda: R.postprocess_detections(logits, reg, anchors, sizes, levels)  # noqa: E731
    elif impl == "torchvision":
        # torchvision's forward splits per level before calling this; the split is left out of the timing.
        split = {"cls_logits": list(logits.split(levels, 1)), "bbox_regression": list(reg.split(levels, 1))}
        split_anchors = [list(anchors.split(levels))] * B
        fn = lambda: tv_model.postprocess_detections(split, split_anchors, sizes)  # noqa: E731
    else:
        fn = lambda: ref.postprocess_detections(logits, reg, anchors, sizes, levels)  # noqa: E731
    with torch.no_grad():
        out = _run(benchmark, fn, device, rounds=3 if impl == "reference" else 10)
        if impl != "torchvision":  # the detections torchvision's post-processing gives (tie-tolerant)
            split = {"cls_logits": list(logits.split(levels, 1)), "bbox_regression": list(reg.split(levels, 1))}
            want = tv_model.postprocess_detections(split, [list(anchors.split(levels))] * B, sizes)
            assert sum(len(d["scores"]) for d in want) > 0
            assert_same_detections(out, want, box_atol=1e-4, box_rtol=2e-6)


# ------------------------------------------------------------------------------ score density sweep

DENSITIES = [0.0, 0.001, 0.01, 0.05, 0.25, 0.5]
_PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)  # torchvision's cls_logits bias: every score at 0.01
_LOGIT_THRESH = math.log(0.05 / 0.95)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def density_head(B, density, seed=0):
    """Head outputs with `density` of the scores above 0.05 (see the module docstring);
    density "trained": trained_like_head's."""
    if density == "trained":
        return trained_like_head(B, seed)
    anchors, levels = _anchors_800()
    if quick():  # --benchmark-disable: the last 2,000 anchors (the coarsest levels) as one level
        anchors, levels = anchors[-2000:].contiguous(), [2000]
    A = anchors.shape[0]
    g = torch.Generator().manual_seed(seed)
    if density <= 0:
        mu, sigma = _PRIOR_BIAS, 0.25
    elif density >= 0.5:
        mu, sigma = _LOGIT_THRESH, 2.5
    else:
        mu, sigma = _PRIOR_BIAS, (_LOGIT_THRESH - _PRIOR_BIAS) / NormalDist().inv_cdf(1 - density)
    logits = torch.empty(B, A, _K)
    for b in range(B):  # per image: no batch-sized temporaries
        logits[b] = torch.randn(A, _K, generator=g) * sigma + mu
    reg = torch.randn(B, A, 4, generator=g) * 0.1
    return logits, reg, anchors, levels


def postprocess_fn(impl, logits, reg, anchors, levels, model=None):
    B = logits.shape[0]
    sizes = [(800, 800)] * B
    if impl == "retina_fast":
        return lambda: R.postprocess_detections(logits, reg, anchors, sizes, levels)
    if impl == "torchvision":
        if model is None:
            from torchvision.models.detection import retinanet_resnet50_fpn

            model = retinanet_resnet50_fpn(weights=None, weights_backbone=None).eval()
        # torchvision's forward splits per level before calling this; the split is not timed.
        split = {"cls_logits": list(logits.split(levels, 1)), "bbox_regression": list(reg.split(levels, 1))}
        split_anchors = [list(anchors.split(levels))] * B
        return lambda: model.postprocess_detections(split, split_anchors, sizes)
    return lambda: ref.postprocess_detections(logits, reg, anchors, sizes, levels)


def _reference_too_slow(B, density, device):
    return device == "cuda" or B > 1 or density == "trained" or density > 0.05


_PP_PEAK_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
import benchmarks.bench_nms as bn
device = {device!r}
logits, reg, anchors, levels = bn.density_head({B}, {density!r})
logits, reg, anchors = logits.to(device), reg.to(device), anchors.to(device)
small = bn.postprocess_fn({impl!r}, logits[:1, :441].contiguous(), reg[:1, :441].contiguous(), anchors[:441], [441])
with torch.no_grad():
    small()  # warm-up: thread pools, first allocations
    fn = bn.postprocess_fn({impl!r}, logits, reg, anchors, levels)
    if device == "cuda":
        torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec (see bench_boxes.py). Writing 5
    # to clear_refs resets VmHWM to the current RSS (Linux >= 4.0), so the inputs' temporaries
    # do not hide the call's peak; the growth is then over the RSS at that point.
    status = lambda key: int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1])
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS:")
    except OSError:
        before = status("VmHWM:")
    hwm = lambda: status("VmHWM:")
    fn()
    if device == "cuda":
        torch.cuda.synchronize(); print(torch.cuda.max_memory_allocated() - base)
    else:
        print((hwm() - before) * 1024)
"""


def postprocess_peak_memory(impl, B, density, device="cpu", threads=None):
    """Peak extra memory of one call in bytes (see the module docstring), or None on failure."""
    code = _PP_PEAK_SCRIPT.format(root=ROOT, threads=threads or torch.get_num_threads(), device=device, B=B,
                                  density=density, impl=impl)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        return None
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("B", [1, 8])
def test_postprocess_density(benchmark, tv_model, B, density, impl, device):
    if impl == "reference" and _reference_too_slow(B, density, device):
        pytest.skip("the reference is a per-image loop: only batch 1 up to 5 %")
    logits, reg, anchors, levels = density_head(B, density)
    measured = (logits > _LOGIT_THRESH).float().mean().item()
    logits, reg, anchors = logits.to(device), reg.to(device), anchors.to(device)
    fn = postprocess_fn(impl, logits, reg, anchors, levels, tv_model)
    benchmark.group = f"postprocess density {density:g} B={B} 800px K=91 {device}"
    benchmark.extra_info.update({"density": measured, "B": B, "threads": torch.get_num_threads(),
                                 # a fresh process per case: not under --benchmark-disable (quick)
                                 "peak_mem_bytes": None if quick() else postprocess_peak_memory(impl, B, density,
                                                                                                 device),
                                 "peak_mem_method": "VmHWM growth over one call, fresh subprocess"
                                 if device == "cpu" else "cuda max_memory_allocated over the inputs"})
    rounds = 2 if impl != "retina_fast" and (B > 1 or density > 0.05) else 5
    with torch.no_grad():
        _run(benchmark, fn, device, rounds=rounds if impl != "retina_fast" else 10)


def sweep(batches, densities, rounds, device, memory, reference, clock="wall"):
    """Ours and torchvision interleaved round by round; prints a Markdown table. clock "cpu"
    times with the process's CPU time (meaningful on one thread: on a shared machine it leaves
    out the time spent waiting for a core, which inflates short calls most)."""
    from torchvision.models.detection import retinanet_resnet50_fpn

    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None).eval()
    print(f"postprocess_detections density sweep: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{device}, {rounds} interleaved rounds, {clock} clock, 800 px (A = 120,087), K = 91\n")
    print("| B | scores > 0.05 | ours (ms) | torchvision (ms) | speed-up (median of paired rounds) "
          "| ours peak extra (MB) | torchvision peak extra (MB) | reference (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for B in batches:
        for d in densities:
            logits, reg, anchors, levels = density_head(B, d)
            measured = (logits > _LOGIT_THRESH).float().mean().item()
            logits, reg, anchors = logits.to(device), reg.to(device), anchors.to(device)
            fns = {impl: postprocess_fn(impl, logits, reg, anchors, levels, model)
                   for impl in ("retina_fast", "torchvision")}
            times = {impl: [] for impl in fns}

            def timed(f):
                now = time.process_time if clock == "cpu" else time.perf_counter
                _sync(device)
                t0 = now()
                f()
                _sync(device)
                return now() - t0

            with torch.no_grad():
                for f in fns.values():
                    f()  # warm-up
                for _ in range(rounds):
                    for impl, f in fns.items():
                        times[impl].append(timed(f))
                ref_ms = None
                if reference and not _reference_too_slow(B, d, device):
                    ref_ms = 1e3 * timed(postprocess_fn("reference", logits, reg, anchors, levels))
            ours, tv = median(times["retina_fast"]), median(times["torchvision"])
            paired = median(t / o for o, t in zip(times["retina_fast"], times["torchvision"]))
            mem = {impl: (postprocess_peak_memory(impl, B, d, device) if memory else None) for impl in fns}
            fmt_mem = lambda v: "-" if v is None else f"{v / 2**20:.1f}"  # noqa: E731
            print(f"| {B} | {100 * measured:.2f} % | {1e3 * ours:.1f} | {1e3 * tv:.1f} | {paired:.1f}x "
                  f"| {fmt_mem(mem['retina_fast'])} | {fmt_mem(mem['torchvision'])} "
                  f"| {'-' if ref_ms is None else f'{ref_ms:.0f}'} |", flush=True)
            rows.append({"B": B, "density": measured, "ours_s": times["retina_fast"],
                         "torchvision_s": times["torchvision"], "speedup_paired_median": paired,
                         "peak_bytes": mem, "reference_ms": ref_ms})
            del logits, reg, fns
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="post-processing density sweep (see the module docstring)")
    ap.add_argument("what", choices=["sweep"])
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--densities", default=",".join(f"{d:g}" for d in DENSITIES),
                    help='comma-separated shares of scores above 0.05, or "trained" (trained_like_head)')
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: process CPU time (use with --threads 1 on a shared machine)")
    ap.add_argument("--json", help="also write the raw timings here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = sweep([int(b) for b in args.batches.split(",")],
                 [d if d == "trained" else float(d) for d in args.densities.split(",")],
                 args.rounds, args.device, not args.no_memory, not args.no_reference, args.clock)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "device": args.device, "clock": args.clock, "rows": rows}, f, indent=1)
