"""COCOeval (bbox): faster-coco-eval vs pycocotools on 5,000 synthetic images (COCO val's size).

    python -m pytest benchmarks/bench_cocoeval.py --benchmark-only [--benchmark-json out.json]

Inputs: ``tests.engine.helpers.synthetic_coco`` (fixed seed), 640x480 images, 80 classes with
gaps in the ids, 1-15 ground-truth boxes per image (about 40k in all; COCO val2017 has 36k), 3%
crowd, sizes 4-400 px so that every area range fills. Detections per image, swept because the
work grows with them: 100 (COCO's maxDets, what a detector at score 0.05 gives) and 20 (a
detector thresholded higher). Each is a jittered copy of a ground-truth box (a quarter twice,
10% with the wrong class) or a false positive.

Timed: what ``retina-fast eval`` does after detection, ``run_cocoeval``: index the ground
truth, load the results, evaluate, accumulate, summarise. Each backend's numbers are checked
against pycocotools' in the same run (the 12 stats and the whole precision array). A run takes
a few minutes on 2 cores, most of it pycocotools. ``COCOEVAL_BENCH_IMAGES=200`` for a quick check.
"""

import copy
import os

import numpy as np
import pytest

pytest.importorskip("pycocotools")

from retina_fast.engine.coco_backends import run_cocoeval  # noqa: E402
from tests.engine.helpers import synthetic_coco  # noqa: E402

N_IMAGES = int(os.environ.get("COCOEVAL_BENCH_IMAGES", "5000"))  # smaller for a quick check
DETS = (100, 20)
BACKENDS = ("pycocotools", "faster")
_DATA, _REFERENCE = {}, {}


def _data(dets):
    if dets not in _DATA:
        _DATA[dets] = synthetic_coco(N_IMAGES, n_classes=80, seed=0, dets_per_image=dets)
    return _DATA[dets]


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dets", DETS)
def test_cocoeval(benchmark, impl, dets):
    if impl == "faster":
        pytest.importorskip("faster_coco_eval")
    gt, results = _data(dets)
    benchmark.group = f"cocoeval {N_IMAGES} images x {dets} detections"
    benchmark.extra_info.update(images=N_IMAGES, detections=len(results),
                                ground_truth=len(gt["annotations"]))
    # A fresh copy per round (COCOeval writes flags into the annotations), made outside the timing.
    res = benchmark.pedantic(run_cocoeval, setup=lambda: ((copy.deepcopy(gt), results),
                                                          {"backend": impl}),
                             rounds=2 if impl == "faster" else 1, iterations=1)
    assert res.backend == impl
    if impl == "pycocotools":
        _REFERENCE[dets] = res
    elif dets not in _REFERENCE:  # run alone (-k faster): the reference, untimed
        _REFERENCE[dets] = run_cocoeval(copy.deepcopy(gt), results, backend="pycocotools")
    ref = _REFERENCE[dets]
    assert res.stats == pytest.approx(ref.stats, abs=1e-12)
    np.testing.assert_allclose(res.precision, ref.precision, rtol=0, atol=1e-12)
