"""COCOeval backends: faster-coco-eval gives pycocotools' numbers; per-class AP is COCOeval's
AP restricted to that class; a backend that is not installed is a one-line error."""

import copy
import json
import sys

import numpy as np
import pytest

from retina_fast.data.errors import RetinaFastError
from retina_fast.engine.coco_backends import per_class_table, resolve_backend, run_cocoeval

from .helpers import synthetic_coco
from .test_evaluate import _dataset

pytest.importorskip("pycocotools")


def _test_sets(tmp_path):
    """(name, gt dict, detections): crowd boxes, gaps in the ids, an image without objects,
    a class without ground truth, no detections at all, and a COCO-like random set."""
    ds = _dataset(tmp_path)
    small = [{"image_id": 1, "category_id": 5, "bbox": [12, 10, 18, 30], "score": 0.9},
             {"image_id": 1, "category_id": 5, "bbox": [50, 50, 20, 20], "score": 0.95},
             {"image_id": 2, "category_id": 5, "bbox": [40, 5, 30, 30], "score": 0.3},
             {"image_id": 2, "category_id": 5, "bbox": [0, 50, 12, 12], "score": 0.7},
             {"image_id": 3, "category_id": 9, "bbox": [60, 40, 30, 30], "score": 0.99},
             {"image_id": 3, "category_id": 9, "bbox": [5, 5, 10, 10], "score": 0.5}]
    gt_extra = copy.deepcopy(ds.dataset)
    gt_extra["categories"].append({"id": 12, "name": "never seen"})
    coco_like = synthetic_coco(40, n_classes=10, seed=3, dets_per_image=30)
    return [("small", ds.dataset, small), ("class without gt", gt_extra, small),
            ("no detections", ds.dataset, []), ("coco-like", *coco_like)]


def test_faster_coco_eval_equals_pycocotools(tmp_path):
    pytest.importorskip("faster_coco_eval")
    for name, gt, dets in _test_sets(tmp_path):
        ref = run_cocoeval(copy.deepcopy(gt), dets, backend="pycocotools")
        fast = run_cocoeval(copy.deepcopy(gt), dets, backend="faster")
        assert (ref.backend, fast.backend) == ("pycocotools", "faster")
        assert fast.stats == pytest.approx(ref.stats, abs=1e-12), name
        assert fast.cat_ids == ref.cat_ids
        # the whole precision array (what per-class AP and the PR plot read), not just the 12 numbers
        np.testing.assert_allclose(fast.precision, ref.precision, rtol=0, atol=1e-12, err_msg=name)


def test_per_class_ap_is_cocoeval_on_that_class_alone(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, dets = synthetic_coco(30, n_classes=4, seed=5, dets_per_image=25)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    rows = per_class_table(run_cocoeval(copy.deepcopy(gt), dets, backend="pycocotools"), gt)
    coco = COCO(str(tmp_path / "gt.json"))
    for row in rows:
        ev = COCOeval(coco, coco.loadRes([dict(d) for d in dets]), "bbox")
        ev.params.catIds = [row["id"]]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        assert [row[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")] == pytest.approx(
            [None if v == -1 else v for v in ev.stats[:6]], abs=1e-12)
        n = sum(1 for a in gt["annotations"] if a["category_id"] == row["id"] and not a["iscrowd"])
        assert row["num_gt"] == n == row["num_gt_small"] + row["num_gt_medium"] + row["num_gt_large"]


def test_backend_choice_without_faster_coco_eval(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # as if not installed
    assert resolve_backend("auto") == "pycocotools"
    with pytest.raises(RetinaFastError, match="pip install faster-coco-eval"):
        resolve_backend("faster")
    gt, dets = synthetic_coco(3, n_classes=2, dets_per_image=5)
    assert run_cocoeval(gt, dets).backend == "pycocotools"
    from retina_fast.cli import main

    assert main(["eval", "--checkpoint", str(tmp_path / "c.pt"), "--data", str(tmp_path),
                 "--coco-backend", "faster"]) == 2
