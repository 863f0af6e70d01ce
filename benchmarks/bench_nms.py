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

CUDA cases (when a GPU is present) synchronise inside the timed call.
"""

import math

import pytest
import torch
import torchvision
from torchvision.ops import box_iou

import retina_fast.ops as R
from benchmarks import quick
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
    _run(benchmark, lambda: fn(b, s, 0.5), device, rounds=3 if impl == "reference" else 20)


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
    _run(benchmark, lambda: fn(b, s, i, 0.5), device, rounds=3 if impl == "reference" else 20)


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
        _run(benchmark, fn, device, rounds=3 if impl == "reference" else 10)
