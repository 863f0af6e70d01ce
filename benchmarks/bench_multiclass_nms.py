"""YOLO-style multi-class NMS: retina_fast.ops.multiclass_nms vs ultralytics' non_max_suppression.

    pytest benchmarks/bench_multiclass_nms.py --benchmark-only [--benchmark-json out.json]
    python -m benchmarks.bench_multiclass_nms sweep [--rounds 5] [--threads 2] [--json F]

Inputs: a YOLOv8/11 head's output at 640 px, ``[B, 4 + 80, 8400]`` (8400 = 80^2 + 40^2 + 20^2
positions at strides 8, 16, 32), made to look like a trained model's (fixed seeds, the same
tensor for both implementations):

* 8 objects per image (COCO's mean is 7.3), log-normal sizes (median ~90 px), random classes.
  Every position whose centre falls inside an object predicts a jittered copy of it (centre
  +-10 % of its size, size x e^N(0, 0.1)) with that class's score sigmoid(N(2, 1.5)), so each
  object lights a cluster of overlapping candidates, as a trained head does.
* every other (position, class) score is background, sigmoid(N(mu, 1)), mu set so that a
  share ``density`` of the background scores passes conf 0.001 (a trained YOLOv8's share is
  of the order of 0.1-1 %; the sweep covers 0.05 % to 5 %). Background boxes sit at their
  position with a size of 1-4 strides.

Settings (ultralytics' own): the mAP-evaluation one, conf 0.001, iou 0.7, multi_label=True,
max_det 300, batch 16 (its validator's); and the prediction one, conf 0.25, iou 0.7, best
class only, batch 1. ultralytics stops after ``2 + 0.05 B`` s and skips the images it did not
reach: its timing then is a lower bound (the sweep says when it happened).

Every benchmark first checks, once, that ours equals ultralytics' result up to its offset
trick's rounding: the same number of rows per image, within 1 row in 100 (the offset changes
a few decisions at IoUs near the threshold; tests/ops/test_multiclass_nms.py checks exactness).

The sweep runs both interleaved round by round in one process, each round at least 50 ms of
repeated calls (ratios of neighbouring rounds: a machine shared with other work slows both
alike), and prints a Markdown table.
"""

import argparse
import functools
import json
import math
import os
import tempfile
import time
from statistics import NormalDist, median

import pytest
import torch

import retina_fast.ops as R
from retina_fast.engine.speed import interleaved_rounds
from benchmarks import quick

HAS_CUDA = torch.cuda.is_available()
STRIDES = (8, 16, 32)
NC = 80
LOGIT_001 = math.log(0.001 / 0.999)


def _ultralytics():
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", os.path.join(tempfile.gettempdir(), "retina_fast_yolo_config"))
    saved = torch.save
    try:
        import ultralytics.utils.nms as m
    finally:
        torch.save = saved  # ultralytics replaces torch.save on import
    return m


def yolo_prediction(B, density=0.005, size=640, objects=8, seed=0):
    """[B, 84, N] trained-like YOLO head output (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    centres, strides = [], []
    for s in STRIDES:
        n = size // s
        ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        centres.append(torch.stack([xs.flatten(), ys.flatten()], 1).float() * s + s / 2)
        strides.append(torch.full((n * n,), float(s)))
    centres, strides = torch.cat(centres), torch.cat(strides)
    N = centres.shape[0]
    mu = LOGIT_001 - NormalDist().inv_cdf(1 - density)
    pred = torch.empty(B, 4 + NC, N)
    for b in range(B):
        pred[b, 4:] = torch.sigmoid(torch.randn(NC, N, generator=g) + mu)
        wh = strides[:, None] * torch.exp(torch.rand(N, 2, generator=g) * math.log(4))
        xy = centres + torch.randn(N, 2, generator=g) * strides[:, None] * 0.25
        oc = torch.rand(objects, 2, generator=g) * size
        owh = torch.exp(torch.randn(objects, 2, generator=g) * 0.7 + 4.5).clamp(4, size)
        ocls = torch.randint(0, NC, (objects,), generator=g)
        for o in range(objects):
            inside = ((centres - oc[o]).abs() < owh[o] / 2).all(1).nonzero().flatten()
            k = inside.numel()
            xy[inside] = oc[o] + torch.randn(k, 2, generator=g) * owh[o] * 0.1
            wh[inside] = owh[o] * torch.exp(torch.randn(k, 2, generator=g) * 0.1)
            pred[b, 4 + ocls[o], inside] = torch.sigmoid(torch.randn(k, generator=g) * 1.5 + 2)
        pred[b, :2], pred[b, 2:4] = xy.T, wh.T
    return pred


@functools.lru_cache(maxsize=4)
def _cached_prediction(B, density):
    return yolo_prediction(B, density)


def assert_matches_ultralytics(ours, U, pred, conf, iou, multi_label):
    """One call of ultralytics' function on the same input: row counts per image equal up to
    its offset trick's few flipped decisions (1 %), and the same best detection. When it hits
    its time limit, the images it did not reach (empty, at the end) are left out."""
    t0 = time.perf_counter()
    theirs = U.non_max_suppression(pred, conf, iou, multi_label=multi_label, max_det=300)
    timed_out = time.perf_counter() - t0 > 2.0 + 0.05 * pred.shape[0]
    assert len(ours) == len(theirs)
    reached = len(theirs)
    if timed_out:
        while reached and theirs[reached - 1].shape[0] == 0:
            reached -= 1
    for o, t in zip(ours[:reached], theirs[:reached]):
        assert abs(o.shape[0] - t.shape[0]) <= max(1, t.shape[0] // 100), (o.shape, t.shape)
        if t.shape[0]:
            torch.testing.assert_close(o[0, :6], t[0, :6].to(o.dtype), rtol=0, atol=0)
    return timed_out


SETTINGS = {
    # name: (batch, conf, iou, multi_label)
    "map_eval": (16, 0.001, 0.7, True),
    "predict": (1, 0.25, 0.7, False),
}


def _fns(U, pred, conf, iou, multi_label):
    return {
        "retina_fast": lambda: R.multiclass_nms(pred, conf, iou, multi_label=multi_label, max_det=300),
        "ultralytics": lambda: U.non_max_suppression(pred, conf, iou, multi_label=multi_label, max_det=300),
    }


@pytest.fixture(scope="module")
def ultra():
    pytest.importorskip("ultralytics")
    return _ultralytics()


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
@pytest.mark.parametrize("impl", ["retina_fast", "ultralytics"])
@pytest.mark.parametrize("density", [0.001, 0.005, 0.02])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_multiclass_nms(benchmark, ultra, setting, density, impl, device):
    B, conf, iou, ml = SETTINGS[setting]
    if quick():  # CI: one density, 2 images
        if density != 0.005:
            pytest.skip("--benchmark-disable runs one density")
        B = min(B, 2)
    pred = _cached_prediction(B, density).to(device)
    fns = _fns(ultra, pred, conf, iou, ml)
    assert_matches_ultralytics(fns["retina_fast"](), ultra, pred, conf, iou, ml)
    benchmark.group = f"multiclass_nms {setting} B={B} density={density:g} {device}"
    benchmark.extra_info.update({"B": B, "conf": conf, "iou": iou, "multi_label": ml, "density": density})

    def call():
        out = fns[impl]()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.pedantic(call, rounds=3 if B > 1 else 10, iterations=1, warmup_rounds=1)


def sweep(settings, densities, rounds, device="cpu"):
    U = _ultralytics()
    print(f"multiclass_nms vs ultralytics {getattr(U, '__file__', '')}: torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {device}, {rounds} interleaved rounds, 640 px, 8400 x 80\n")
    print("| setting | B | background > conf | candidates / image | ours (ms) | ultralytics (ms) "
          "| speed-up (median of paired rounds) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name in settings:
        B, conf, iou, ml = SETTINGS[name]
        for d in (densities if ml else densities[:1]):  # conf 0.25: no background score passes anyway
            pred = yolo_prediction(B, d).to(device)
            cand = int((pred[:, 4:] > conf).sum()) if ml else int((pred[:, 4:].amax(1) > conf).sum())
            fns = _fns(U, pred, conf, iou, ml)
            assert_matches_ultralytics(fns["retina_fast"](), U, pred, conf, iou, ml)
            # a round lasts >= 50 ms (short cases are noisy); the order fixed, as before
            times = interleaved_rounds(fns, rounds, warmup=1, min_round_s=0.05, alternate=False,
                                       sync=torch.cuda.synchronize if device == "cuda" else None)
            ours, theirs = median(times["retina_fast"]), median(times["ultralytics"])
            paired = median(t / o for o, t in zip(times["retina_fast"], times["ultralytics"]))
            limit = 2.0 + 0.05 * B
            flag = " (hit its time limit)" if max(times["ultralytics"]) > limit else ""
            print(f"| {name} | {B} | {100 * d:g} % | {cand // B} | {1e3 * ours:.1f} | {1e3 * theirs:.1f}{flag} "
                  f"| {paired:.1f}x |", flush=True)
            rows.append({"setting": name, "B": B, "conf": conf, "iou": iou, "multi_label": ml, "density": d,
                         "candidates_per_image": cand / B, "ours_s": times["retina_fast"],
                         "ultralytics_s": times["ultralytics"], "speedup_paired_median": paired})
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="multiclass_nms vs ultralytics (see the module docstring)")
    ap.add_argument("what", choices=["sweep"])
    ap.add_argument("--settings", default="map_eval,predict")
    ap.add_argument("--densities", default="0.0005,0.001,0.005,0.02,0.05")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = sweep(args.settings.split(","), [float(d) for d in args.densities.split(",")], args.rounds, args.device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "device": args.device, "rows": rows}, f, indent=1)
