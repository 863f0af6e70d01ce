"""Other detectors' own code, patched vs unpatched: torchvision's R-CNN post-processing under
``patch_torchvision_ops()`` and effdet's loss under ``patch_effdet()``.

    pytest benchmarks/bench_dropin.py --benchmark-only [--benchmark-json out.json]
    python -m benchmarks.bench_dropin sweep [--rounds 5] [--threads 2]

Cases (fixed seeds, the same inputs for both sides, each checked equal once first):

* ``rpn``: Faster R-CNN's ``RegionProposalNetwork.filter_proposals`` at 800 x 1088 (5 levels,
  3 anchors, 261,888 anchors per image), batch 2, training settings (2,000 pre-NMS per level,
  2,000 kept) and test settings (1,000 / 1,000): per image a ``batched_nms`` over its levels.
  Proposals are jittered copies of 100 objects (as a trained RPN's cluster), objectness
  N(0, 2) logits.
* ``roi``: ``RoIHeads.postprocess_detections``: 1,000 proposals x 91 classes per image, batch 2,
  trained-like class logits (background high, 30 % of proposals with a foreground class at
  N(3, 1.5)), score 0.05, per-image ``batched_nms`` over the classes, 100 detections.
* ``effdet``: effdet's ``DetectionLoss`` forward + backward, EfficientDet-D0 at 512 px (P3-P7,
  9 anchors, 49,104 anchors, 90 classes), batch 4, label smoothing 0.1, 5 % foreground.

The sweep runs each pair interleaved round by round in one process, each round at least 50 ms
of repeated calls (ratios of neighbouring rounds, so a shared machine slows both alike), and
prints a Markdown table.
"""

import argparse
import copy
import functools
import json
from statistics import median

import pytest
import torch

import retina_fast
from retina_fast.engine.speed import interleaved_rounds
from benchmarks import quick


def _quick_scale(n):
    return max(1, n // 10) if quick() else n


@functools.lru_cache(maxsize=1)
def _faster_rcnn(train):
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    m = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    return m.train() if train else m.eval()


def rpn_case(train=True, B=2, seed=0):
    from torchvision.models.detection.image_list import ImageList

    model = copy.copy(_faster_rcnn(train))
    rpn = model.rpn
    H, W = (800, 1088) if not quick() else (256, 320)
    images = ImageList(torch.zeros(B, 3, H, W), [(H, W)] * B)
    feats = [torch.zeros(B, 1, H // s, W // s) for s in (4, 8, 16, 32, 64)]
    anchors = rpn.anchor_generator(images, feats)
    per_level = [f.shape[-2] * f.shape[-1] * 3 for f in feats]
    A = sum(per_level)
    g = torch.Generator().manual_seed(seed)
    props = []
    for b in range(B):
        objects = 100
        oc = torch.rand(objects, 2, generator=g) * torch.tensor([W, H])
        owh = torch.exp(torch.randn(objects, 2, generator=g) * 0.8 + 4.0)
        k = torch.randint(0, objects, (A,), generator=g)
        c = oc[k] + torch.randn(A, 2, generator=g) * owh[k] * 0.15
        wh = owh[k] * torch.exp(torch.randn(A, 2, generator=g) * 0.15)
        props.append(torch.cat([c - wh / 2, c + wh / 2], 1))
    proposals = torch.stack(props)  # [B, A, 4]
    objectness = torch.randn(B * A, 1, generator=g) * 2
    assert anchors[0].shape[0] == A
    return lambda: rpn.filter_proposals(proposals, objectness, images.image_sizes, per_level)


def roi_case(B=2, seed=0):
    model = _faster_rcnn(False)
    heads = model.roi_heads
    g = torch.Generator().manual_seed(seed)
    P, K, H, W = _quick_scale(1000), 91, 800, 1088
    proposals = []
    for _ in range(B):
        c = torch.rand(P, 2, generator=g) * torch.tensor([W, H])
        wh = torch.exp(torch.randn(P, 2, generator=g) * 0.8 + 4.0)
        proposals.append(torch.cat([c - wh / 2, c + wh / 2], 1))
    logits = torch.randn(B * P, K, generator=g) - 2
    logits[:, 0] += 4  # background
    fg = torch.rand(B * P, generator=g) < 0.3
    cls = torch.randint(1, K, (B * P,), generator=g)
    logits[fg, cls[fg]] = torch.randn(int(fg.sum()), generator=g) * 1.5 + 3
    codes = torch.randn(B * P, K * 4, generator=g) * 0.1
    return lambda: heads.postprocess_detections(logits, codes, proposals, [(H, W)] * B)


def effdet_case(B=4, seed=0):
    from effdet.config import get_efficientdet_config
    from effdet.loss import DetectionLoss

    cfg = get_efficientdet_config("tf_efficientdet_d0")
    cfg.label_smoothing = 0.1
    K, A = cfg.num_classes, 9
    loss = DetectionLoss(cfg)
    g = torch.Generator().manual_seed(seed)
    sizes = [64, 32, 16, 8, 4] if not quick() else [8, 4, 2, 1, 1]
    cls_out, box_out, cls_t, box_t = [], [], [], []
    for s in sizes:
        cls_out.append((torch.randn(B, A * K, s, s, generator=g) * 2 - 4).requires_grad_())
        box_out.append((torch.randn(B, A * 4, s, s, generator=g) * 0.1).requires_grad_())
        r = torch.rand(B, s, s, A, generator=g)
        labels = torch.full((B, s, s, A), -1, dtype=torch.long)
        labels[r < 0.05] = torch.randint(0, K, (int((r < 0.05).sum()),), generator=g)
        labels[(r >= 0.05) & (r < 0.08)] = -2
        cls_t.append(labels)
        box_t.append(torch.randn(B, s, s, A * 4, generator=g) * 0.1 * (labels >= 0).repeat_interleave(4, -1))
    num_pos = torch.stack([sum((t[b] >= 0).sum() for t in cls_t) for b in range(B)]).float()

    def step(fn):
        def call():
            for t in cls_out + box_out:
                t.grad = None
            total, c, bl = fn(cls_out, box_out, cls_t, box_t, num_pos)
            total.backward()
            return total.detach(), c.detach(), bl.detach()

        return call

    patched = retina_fast.patch_effdet(DetectionLoss(cfg))
    return step(loss), step(patched)


def _pairs(case):
    """{'unpatched': fn, 'patched': fn} for a case name."""
    if case == "effdet":
        theirs, ours = effdet_case()
        return {"unpatched": theirs, "patched": ours}
    fn = {"rpn_train": lambda: rpn_case(True), "rpn_test": lambda: rpn_case(False), "roi": roi_case}[case]()

    def patched():
        with retina_fast.patch_torchvision_ops():
            return fn()

    return {"unpatched": fn, "patched": patched}


def check_equal(case, fns):
    a, b = fns["unpatched"](), fns["patched"]()
    if case == "effdet":
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
    elif case.startswith("rpn"):
        for x, y in zip(a[0], b[0]):  # proposals per image: the same set (scores are distinct here)
            assert x.shape == y.shape
            torch.testing.assert_close(torch.sort(y.sum(1)).values, torch.sort(x.sum(1)).values)
    else:
        for x, y in zip(a[0], b[0]):
            assert x.shape == y.shape
            torch.testing.assert_close(torch.sort(y.sum(1)).values, torch.sort(x.sum(1)).values)


CASES = ["rpn_train", "rpn_test", "roi", "effdet"]


@pytest.mark.parametrize("impl", ["unpatched", "patched"])
@pytest.mark.parametrize("case", CASES)
def test_dropin(benchmark, case, impl):
    if case == "effdet":
        pytest.importorskip("effdet")
    fns = _pairs(case)
    check_equal(case, fns)
    benchmark.group = f"dropin {case}"
    with torch.no_grad() if case != "effdet" else torch.enable_grad():
        benchmark.pedantic(fns[impl], rounds=5, iterations=1, warmup_rounds=1)


def sweep(cases, rounds):
    print(f"patched vs unpatched: torch {torch.__version__}, {torch.get_num_threads()} threads, cpu, "
          f"{rounds} interleaved rounds\n")
    print("| case | unpatched (ms) | patched (ms) | speed-up (median of paired rounds) |")
    print("|---|---:|---:|---:|")
    rows = []
    for case in cases:
        fns = _pairs(case)
        check_equal(case, fns)
        with torch.no_grad() if case != "effdet" else torch.enable_grad():
            # a round lasts >= 50 ms (short cases are noisy); the order fixed, as before
            times = interleaved_rounds(fns, rounds, warmup=1, min_round_s=0.05, alternate=False)
        paired = median(u / p for u, p in zip(times["unpatched"], times["patched"]))
        print(f"| {case} | {1e3 * median(times['unpatched']):.1f} | {1e3 * median(times['patched']):.1f} "
              f"| {paired:.1f}x |", flush=True)
        rows.append({"case": case, "unpatched_s": times["unpatched"], "patched_s": times["patched"],
                     "speedup_paired_median": paired})
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="other detectors patched vs unpatched (see the module docstring)")
    ap.add_argument("what", choices=["sweep"])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = sweep(args.cases.split(","), args.rounds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": rows}, f, indent=1)
