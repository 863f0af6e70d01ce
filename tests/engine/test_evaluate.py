import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from retina_fast.data import CocoDetection, eval_transforms
from retina_fast.engine import STAT_NAMES, detect_dataset, draw_detections, evaluate, predict_images

pytest.importorskip("pycocotools")


def _dataset(tmp_path):
    """3 images, non-contiguous category ids 5 and 9, one crowd box."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    images, anns = [], []
    gts = {1: [(5, [10, 10, 20, 30])], 2: [(9, [40, 5, 30, 30]), (5, [0, 50, 12, 12])], 3: []}
    aid = 1
    for iid, objs in gts.items():
        Image.fromarray(np.zeros((80, 100, 3), np.uint8)).save(img_dir / f"{iid}.png")
        images.append({"id": iid, "file_name": f"{iid}.png", "width": 100, "height": 80})
        for cat, bbox in objs:
            anns.append({"id": aid, "image_id": iid, "category_id": cat, "bbox": bbox,
                         "area": bbox[2] * bbox[3], "iscrowd": 0})
            aid += 1
    anns.append({"id": aid, "image_id": 3, "category_id": 9, "bbox": [60, 40, 30, 30], "area": 900, "iscrowd": 1})
    data = {"images": images, "annotations": anns,
            "categories": [{"id": 9, "name": "nine"}, {"id": 5, "name": "five"}]}
    (tmp_path / "instances.json").write_text(json.dumps(data))
    return CocoDetection(str(tmp_path / "instances.json"), str(img_dir), transforms=eval_transforms())


class _FixedModel(torch.nn.Module):
    """Returns given detections (xyxy, contiguous labels) for each image, by image size order."""

    def __init__(self, dets):
        super().__init__()
        self.dets, self.calls = dets, 0

    def forward(self, images):
        out = []
        for _ in images:
            boxes, scores, labels = self.dets[self.calls]
            self.calls += 1
            out.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "scores": torch.tensor(scores, dtype=torch.float32),
                        "labels": torch.tensor(labels, dtype=torch.int64)})
        return out


def _pycocotools_stats(ann_file, results):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(ann_file)
    ev = COCOeval(gt, gt.loadRes(results), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats


def test_perfect_detections_give_ap_1_and_labels_map_back(tmp_path):
    ds = _dataset(tmp_path)
    # label 0 = category 5, label 1 = category 9 (sorted by id)
    model = _FixedModel([([[10, 10, 30, 40]], [0.9], [0]),
                         ([[40, 5, 70, 35], [0, 50, 12, 62]], [0.8, 0.7], [1, 0]),
                         ([], [], [])])
    res = detect_dataset(model, ds, batch_size=2)
    assert sorted((r["image_id"], r["category_id"], tuple(r["bbox"])) for r in res) == [
        (1, 5, (10, 10, 20, 30)), (2, 5, (0, 50, 12, 12)), (2, 9, (40, 5, 30, 30))]
    m = evaluate(_FixedModel(model.dets), ds, str(tmp_path / "out"), verbose=False)
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0)
    saved = json.load(open(tmp_path / "out" / "metrics.json"))
    assert [saved[k] for k in STAT_NAMES] == [m[k] for k in STAT_NAMES]
    assert json.load(open(tmp_path / "out" / "detections.json")) == res


def test_metrics_equal_pycocotools_on_imperfect_detections(tmp_path):
    ds = _dataset(tmp_path)
    dets = [([[12, 10, 30, 40], [50, 50, 70, 70]], [0.9, 0.95], [0, 0]),       # shifted + false positive
            ([[40, 5, 70, 35], [0, 50, 12, 62]], [0.3, 0.7], [0, 0]),           # wrong class, correct
            ([[60, 40, 90, 70], [5, 5, 15, 15]], [0.99, 0.5], [1, 1])]          # on the crowd box, FP
    m = evaluate(_FixedModel(dets), ds, None, verbose=False)
    results = json.load(open(tmp_path / "instances.json"))  # noqa: F841 (file is the GT)
    want = [{"image_id": iid, "category_id": {0: 5, 1: 9}[l], "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": s}
            for iid, (bs, ss, ls) in zip([1, 2, 3], dets) for b, s, l in zip(bs, ss, ls)]
    stats = _pycocotools_stats(str(tmp_path / "instances.json"), want)
    assert [m[k] for k in STAT_NAMES] == pytest.approx(list(stats), abs=1e-9)
    assert 0 < m["AP"] < 1


def test_no_detections_give_zero(tmp_path):
    ds = _dataset(tmp_path)
    m = evaluate(_FixedModel([([], [], [])] * 3), ds, None, verbose=False)
    assert m["AP"] == 0 and m["num_detections"] == 0


def test_predict_draws_and_writes_json(tmp_path):
    img = torch.zeros(3, 50, 60, dtype=torch.uint8)
    det = {"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0], [1.0, 1.0, 2.0, 2.0]]),
           "scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([1, 0])}
    out = draw_detections(img, det, ["a", "b"], score_thresh=0.5, min_side=100)
    assert out.shape == (3, 100, 120) and out.dtype == torch.uint8      # upscaled x2
    assert out[:, 10, 10:60].sum() > 0 and out[:, 90:, :].sum() == 0    # only the kept box drawn
    paths = []
    for i in range(2):
        p = tmp_path / f"im{i}.{'png' if i == 0 else 'jpg'}"
        Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(p)
        paths.append(str(p))
    (tmp_path / "broken.png").write_bytes(b"xx")
    model = _FixedModel([([[5, 5, 30, 40]], [0.9], [1]), ([], [], [])])
    recs = predict_images(model, paths[:1] + [str(tmp_path / "broken.png")] + paths[1:],
                          str(tmp_path / "pred"), ["a", "b"], score_thresh=0.5)
    assert len(recs) == 2 and recs[0]["class_names"] == ["b"] and recs[0]["boxes"] == [[5, 5, 30, 40]]
    assert os.path.isfile(tmp_path / "pred" / "im0.png") and os.path.isfile(tmp_path / "pred" / "im1.jpg")
    assert json.load(open(tmp_path / "pred" / "predictions.json"))["images"][0]["scores"] == [0.9]
