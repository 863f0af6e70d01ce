import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from retina_fast.data import CocoDetection, eval_transforms
from retina_fast.engine import STAT_NAMES, detect_dataset, draw_detections, evaluate, predict_images
from retina_fast.engine.predict import image_ids_for, set_input_size

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
    # per class: both classes found perfectly; the crowd box is not a ground truth to find
    assert [(r["id"], r["name"], r["AP"], r["AP50"], r["num_gt"]) for r in saved["per_class"]] == [
        (5, "five", 1.0, 1.0, 2), (9, "nine", 1.0, 1.0, 1)]
    rows = (tmp_path / "out" / "per_class.csv").read_text().splitlines()
    assert rows[0].startswith("id,name,AP,AP50,AP75,APs,APm,APl,num_gt") and rows[1].startswith("5,five,1.0")
    assert (tmp_path / "out" / "pr_curves.png").stat().st_size > 1000


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


class _Recorder(torch.nn.Module):
    """One box per image, label = image index % 2; records the batches it is given."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, images):
        self.batches.append([im.clone() for im in images])
        return [{"boxes": torch.tensor([[1.0, 2.0, 11.0, 22.0]]), "scores": torch.tensor([0.8]),
                 "labels": torch.tensor([i % 2])} for i in range(len(images))]


def _with_orientation(path, arr, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation  # EXIF Orientation: 6 = shown turned 90 degrees clockwise, 8 = counter-clockwise
    Image.fromarray(arr).save(path, exif=exif)


def test_predict_batches_reads_exif_upright_and_writes_coco_results(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 255, (20, 40, 3), dtype=np.uint8)      # stored 40 wide, 20 high
    paths = [tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.png"]
    _with_orientation(paths[0], raw, 6)
    _with_orientation(paths[1], raw, 8)
    Image.fromarray(raw).save(paths[2])                         # no tag: as stored
    model = _Recorder()
    recs = predict_images(model, [str(p) for p in paths], str(tmp_path / "pred"), ["x", "y"],
                          score_thresh=0.5, label_to_cat_id={0: 7, 1: 9}, batch_size=2)
    assert [len(b) for b in model.batches] == [2, 1]
    seen = [im for b in model.batches for im in b]
    assert [tuple(im.shape) for im in seen] == [(3, 40, 20), (3, 40, 20), (3, 20, 40)]
    # PNG is lossless: the model saw exactly the stored pixels turned clockwise
    upright = torch.from_numpy(np.rot90(raw, k=-1).copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(seen[0], upright)
    assert [(r["width"], r["height"], r["image_id"]) for r in recs] == [(20, 40, 1), (20, 40, 2), (40, 20, 3)]
    drawn = Image.open(tmp_path / "pred" / "b.jpg")
    assert drawn.height == 2 * drawn.width                     # drawn upright too
    results = json.load(open(tmp_path / "pred" / "coco_results.json"))
    assert results == [{"image_id": i, "category_id": c, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.8}
                       for i, c in ((1, 7), (2, 9), (3, 7))]


def test_predict_reads_images_without_a_warning(tmp_path):
    """PIL hands back a read-only buffer; torch.from_numpy on it prints a UserWarning (once per
    process, so a fresh one), which the demo showed after training."""
    import subprocess
    import sys

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    code = ("import sys, warnings; from retina_fast.engine.predict import read_image\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always'); im = read_image(sys.argv[1])\n"
            "assert tuple(im.shape) == (3, 8, 8) and not w, [str(x.message) for x in w]")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_prediction_image_ids_and_input_size():
    assert image_ids_for(["val/000000397133.jpg", "12.png"]) == [397133, 12]
    assert image_ids_for(["a.png", "1.png"]) == [1, 2]          # not all numbers: positions
    assert image_ids_for(["x/1.png", "y/1.jpg"]) == [1, 2]      # the same number twice: positions
    from retina_fast.engine import build_model

    m = build_model("shapes-small", 3)                          # 160 / 160
    set_input_size(m, 320)
    assert (m.transform.min_size, m.transform.max_size) == ((320,), 320)
    set_input_size(m, 200, 500)
    assert (m.transform.min_size, m.transform.max_size) == ((200,), 500)


def _tiny_detector():
    """A tiny shapes-small with BatchNorm statistics away from the identity and scores above
    the threshold: the inference-prepared copy has folding and post-processing to do."""
    from retina_fast.engine import build_model

    torch.manual_seed(0)
    m = build_model("shapes-small", 2, widths=[8, 8, 16, 16, 16], fpn_channels=16, min_size=64,
                    score_thresh=0.05)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
        m.head.classification_head.cls_logits.bias.normal_(-1.5, 0.5)
    return m.eval()


def test_evaluate_and_predict_with_run_settings(tmp_path):
    """settings=None runs the model as given (float32, NCHW); bf16 + channels_last runs a
    prepared copy (BatchNorms folded, bfloat16 weights) under autocast: float32 detections close
    to the float32 model's, the caller's model untouched, metrics.json says what ran."""
    from retina_fast.engine.precision import resolve

    ds = _dataset(tmp_path)
    model = _tiny_detector()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = detect_dataset(model, ds, batch_size=2)
    assert ref == detect_dataset(model, ds, batch_size=2, settings=None)
    fp32 = detect_dataset(model, ds, batch_size=2, settings=resolve("fp32", False, "cpu"))
    assert len(ref) > 10 and len(fp32) == len(ref)
    assert max(abs(a["score"] - b["score"]) for a, b in zip(fp32, ref)) < 1e-4
    bf16 = resolve("bf16", True, "cpu")
    m = evaluate(model, ds, str(tmp_path / "ev"), batch_size=2, verbose=False, settings=bf16)
    assert m["precision"]["precision"] == "bf16" and m["precision"]["channels_last"]
    assert m["precision"]["folded"] == 10
    assert json.load(open(tmp_path / "ev" / "metrics.json"))["precision"] == m["precision"]
    dets = json.load(open(tmp_path / "ev" / "detections.json"))
    assert len(dets) == m["num_detections"] > 0 and all(isinstance(d["score"], float) for d in dets)
    best = max(r["score"] for r in ref)
    assert abs(max(d["score"] for d in dets) - best) < 2e-2
    assert "precision" not in evaluate(model, ds, None, batch_size=2, verbose=False)
    from retina_fast.models.fuse import prepare_for_inference

    prepared = prepare_for_inference(model, bf16)
    assert len(detect_dataset(prepared, ds, batch_size=2, settings=bf16)) == len(dets)  # prepared once only
    with pytest.raises(ValueError, match="prepared for bf16, channels_last, not for precision fp32"):
        detect_dataset(prepared, ds, settings=resolve("fp32", False, "cpu"))
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)

    img = tmp_path / "images" / "1.png"
    recs = predict_images(model, [str(img)], str(tmp_path / "pred"), ["a", "b"], score_thresh=0.0,
                          settings=bf16)
    want = predict_images(model, [str(img)], str(tmp_path / "pred32"), ["a", "b"], score_thresh=0.0)
    assert len(recs[0]["scores"]) > 0 and abs(recs[0]["scores"][0] - want[0]["scores"][0]) < 2e-2
