"""The bad-input matrix: every public op and model entry point called with each class of bad
input. Run as a script (by tests/robustness/test_bad_input_matrix.py, in a subprocess, so that a
segfault or an abort is a failed case, not a dead test run):

    python -m tests.robustness.bad_input_cases [--from N] [--only N]

prints ``START i`` before and one JSON line after each call: ``{"i", "entry", "cls", "outcome":
"raised" | "returned" | "wrong", "type", "msg"}``. A case expects either an error
(RuntimeError/ValueError whose message names the argument: any of ``names``, case-insensitive)
or a documented result (``check`` returns None when the result is the documented one, else what
is wrong with it)."""

import json
import math
import sys

import torch

NAN = float("nan")

# The bad-input classes (the matrix's columns).
CLASSES = ["rank", "shape", "dtype", "device", "range", "batch", "negative", "nan-threshold", "topk",
           "tiny-image", "empty"]

CASES = []


def case(entry, cls, names=None, check=None):
    assert cls in CLASSES, cls

    def deco(fn):
        CASES.append(dict(entry=entry, cls=cls, names=names, check=check, fn=fn))
        return fn

    return deco


def err(entry, cls, *names):
    return case(entry, cls, names=list(names))


def ok(entry, cls, check):
    return case(entry, cls, check=check)


def shape_is(*shape):
    def check(r):
        return None if tuple(r.shape) == shape else f"shape {tuple(r.shape)}, documented {shape}"
    return check


def meta(*shape):
    return torch.empty(*shape, device="meta")


def boxes(n, off=0.0):
    t = torch.rand(n, 4) * 50 + off
    t[:, 2:] += t[:, :2] + 1
    return t


# ------------------------------------------------------------------------------------- ops

def _ops():
    import retina_fast.ops as rf
    return rf


E = "box_iou"
err(E, "rank", "boxes")(lambda: _ops().box_iou(torch.rand(4), torch.rand(4)))  # (one 1-D box vs [M, 4] is [1, M])
err(E, "shape", "boxes2")(lambda: _ops().box_iou(boxes(3), torch.rand(3, 5)))
err(E, "dtype", "boxes")(lambda: _ops().box_iou(torch.ones(3, 4, dtype=torch.bool), boxes(3)))  # (integers are boxes)
err(E, "device", "device")(lambda: _ops().box_iou(boxes(3), meta(2, 4)))
ok(E, "empty", shape_is(0, 3))(lambda: _ops().box_iou(torch.empty(0, 4), boxes(3)))

E = "grid_anchors"
_cells = [torch.tensor([[-8.0, -8, 8, 8]])]
err(E, "rank", "cell_anchors")(lambda: _ops().grid_anchors([torch.rand(4)], [(2, 2)], [(8, 8)]))
err(E, "shape", "cell_anchors")(lambda: _ops().grid_anchors([torch.rand(2, 5)], [(2, 2)], [(8, 8)]))
err(E, "dtype", "cell_anchors")(lambda: _ops().grid_anchors([torch.ones(1, 4, dtype=torch.long)], [(2, 2)], [(8, 8)]))
err(E, "batch", "grid_sizes")(lambda: _ops().grid_anchors(_cells, [(2, 2), (1, 1)], [(8, 8)]))
err(E, "batch", "strides")(lambda: _ops().grid_anchors(_cells, [(2, 2)], [(8, 8), (4, 4)]))
err(E, "negative", "grid_sizes")(lambda: _ops().grid_anchors(_cells, [(-1, 2)], [(8, 8)]))
err(E, "negative", "strides")(lambda: _ops().grid_anchors(_cells, [(2, 2)], [(-8, 8)]))
err(E, "empty", "cell anchors")(lambda: _ops().grid_anchors([], [], []))
ok(E, "tiny-image", shape_is(0, 4))(lambda: _ops().grid_anchors(_cells, [(0, 3)], [(8, 8)]))

E = "match_anchors"
_A = boxes(6)
err(E, "rank", "gt_boxes")(lambda: _ops().match_anchors(_A, boxes(2), torch.tensor([2])))
err(E, "shape", "anchors")(lambda: _ops().match_anchors(torch.rand(6, 5), boxes(2)[None], torch.tensor([2])))
err(E, "dtype", "gt_counts")(lambda: _ops().match_anchors(_A, boxes(2)[None], torch.tensor([2.0])))
err(E, "dtype", "anchors")(lambda: _ops().match_anchors(_A.long(), boxes(2)[None], torch.tensor([2])))
err(E, "device", "device")(lambda: _ops().match_anchors(_A, meta(1, 2, 4), torch.tensor([2])))
err(E, "range", "gt_counts")(lambda: _ops().match_anchors(_A, boxes(2)[None], torch.tensor([3])))
err(E, "negative", "gt_counts")(lambda: _ops().match_anchors(_A, boxes(2)[None], torch.tensor([-1])))
err(E, "batch", "gt_counts")(lambda: _ops().match_anchors(_A, boxes(2)[None], torch.tensor([2, 1])))
err(E, "nan-threshold", "high")(lambda: _ops().match_anchors(_A, boxes(2)[None], torch.tensor([2]), high=NAN))
err(E, "nan-threshold", "low")(lambda: _ops().match_anchors(_A, boxes(2)[None], torch.tensor([2]), low=NAN))
err(E, "range", "low")(lambda: _ops().match_anchors(_A, boxes(2)[None], torch.tensor([2]), high=0.3, low=0.6))
ok(E, "empty", shape_is(0, 6))(lambda: _ops().match_anchors(_A, torch.empty(0, 2, 4), torch.empty(0, dtype=torch.long)))

E = "matched_targets"
_gl = torch.tensor([[0, 1]])
err(E, "rank", "gt_labels")(lambda: _ops().matched_targets(_A, boxes(2)[None], torch.tensor([0, 1]), torch.tensor([2])))
err(E, "shape", "gt_labels")(lambda: _ops().matched_targets(_A, boxes(2)[None], torch.tensor([[0, 1, 2]]), torch.tensor([2])))
err(E, "dtype", "gt_labels")(lambda: _ops().matched_targets(_A, boxes(2)[None], _gl.float(), torch.tensor([2])))
err(E, "device", "device")(lambda: _ops().matched_targets(_A, boxes(2)[None], _gl.to("meta"), torch.tensor([2])))
err(E, "range", "gt_labels")(lambda: _ops().matched_targets(_A, boxes(2)[None], torch.tensor([[0, -1]]), torch.tensor([2])))
err(E, "batch", "gt_labels")(lambda: _ops().matched_targets(_A, boxes(2)[None], torch.tensor([[0, 1], [0, 1]]), torch.tensor([2])))
err(E, "negative", "gt_counts")(lambda: _ops().matched_targets(_A, boxes(2)[None], _gl, torch.tensor([-2])))
err(E, "nan-threshold", "high")(lambda: _ops().matched_targets(_A, boxes(2)[None], _gl, torch.tensor([2]), high=NAN))
ok(E, "empty", lambda r: None if r.labels.shape == (0, 6) and r.regression_targets.shape == (0, 6, 4) else str(r))(
    lambda: _ops().matched_targets(_A, torch.empty(0, 2, 4), torch.empty(0, 2, dtype=torch.long), torch.empty(0, dtype=torch.long)))

E = "encode_boxes"
err(E, "rank", "reference_boxes")(lambda: _ops().encode_boxes(torch.rand(4), boxes(1)))
err(E, "shape", "proposals")(lambda: _ops().encode_boxes(boxes(3), boxes(4)))
err(E, "dtype", "reference_boxes")(lambda: _ops().encode_boxes(boxes(3).bool(), boxes(3)))  # (integer gts encode)
err(E, "device", "device")(lambda: _ops().encode_boxes(boxes(3), meta(3, 4)))
err(E, "batch", "proposals")(lambda: _ops().encode_boxes(boxes(6).reshape(2, 3, 4), boxes(9).reshape(3, 3, 4)))
ok(E, "empty", shape_is(0, 4))(lambda: _ops().encode_boxes(torch.empty(0, 4), torch.empty(0, 4)))

E = "decode_boxes"
err(E, "rank", "rel_codes")(lambda: _ops().decode_boxes(torch.rand(4), boxes(1)))
err(E, "shape", "rel_codes")(lambda: _ops().decode_boxes(torch.rand(3, 5), boxes(3)))
err(E, "shape", "boxes")(lambda: _ops().decode_boxes(torch.rand(3, 4), boxes(4)))
err(E, "dtype", "rel_codes")(lambda: _ops().decode_boxes(torch.ones(3, 4, dtype=torch.long), boxes(3)))
err(E, "device", "device")(lambda: _ops().decode_boxes(torch.rand(3, 4), meta(3, 4)))
err(E, "batch", "boxes")(lambda: _ops().decode_boxes(torch.rand(2, 3, 4), boxes(9).reshape(3, 3, 4)))
err(E, "nan-threshold", "clip")(lambda: _ops().decode_boxes(torch.rand(3, 4), boxes(3), clip=NAN))
ok(E, "empty", shape_is(0, 4))(lambda: _ops().decode_boxes(torch.empty(0, 4), torch.empty(0, 4)))

E = "sigmoid_focal_loss"
err(E, "shape", "targets")(lambda: _ops().sigmoid_focal_loss(torch.rand(4, 3), torch.rand(4, 2)))
err(E, "rank", "targets")(lambda: _ops().sigmoid_focal_loss(torch.rand(4, 3), torch.rand(12)))
err(E, "dtype", "inputs")(lambda: _ops().sigmoid_focal_loss(torch.ones(4, 3, dtype=torch.long), torch.rand(4, 3)))
err(E, "dtype", "targets")(lambda: _ops().sigmoid_focal_loss(torch.rand(4, 3), torch.ones(4, 3, dtype=torch.long)))
err(E, "device", "device")(lambda: _ops().sigmoid_focal_loss(torch.rand(4, 3), meta(4, 3)))
err(E, "range", "reduction")(lambda: _ops().sigmoid_focal_loss(torch.rand(4, 3), torch.rand(4, 3), reduction="avg"))
err(E, "range", "alpha")(lambda: _ops().sigmoid_focal_loss(torch.rand(4, 3), torch.rand(4, 3), alpha=1.5))
err(E, "negative", "gamma")(lambda: _ops().sigmoid_focal_loss(torch.rand(4, 3), torch.rand(4, 3), gamma=-1.0))
err(E, "nan-threshold", "gamma")(lambda: _ops().sigmoid_focal_loss(torch.rand(4, 3), torch.rand(4, 3), gamma=NAN))
err(E, "nan-threshold", "alpha")(lambda: _ops().sigmoid_focal_loss(torch.rand(4, 3), torch.rand(4, 3), alpha=NAN))
ok(E, "empty", lambda r: None if r.shape == () and float(r) == 0.0 else str(r))(
    lambda: _ops().sigmoid_focal_loss(torch.empty(0, 3), torch.empty(0, 3), reduction="sum"))

E = "sigmoid_focal_loss_labels"
_L = torch.tensor([0, -1, -2, 2])
err(E, "rank", "logits")(lambda: _ops().sigmoid_focal_loss_labels(torch.rand(12), _L))
err(E, "rank", "labels")(lambda: _ops().sigmoid_focal_loss_labels(torch.rand(4, 3), _L[None]))
err(E, "batch", "labels")(lambda: _ops().sigmoid_focal_loss_labels(torch.rand(4, 3), torch.tensor([0, 1, 2])))
err(E, "dtype", "labels")(lambda: _ops().sigmoid_focal_loss_labels(torch.rand(4, 3), _L.float()))
err(E, "dtype", "logits")(lambda: _ops().sigmoid_focal_loss_labels(torch.ones(4, 3, dtype=torch.long), _L))
err(E, "device", "device")(lambda: _ops().sigmoid_focal_loss_labels(meta(4, 3), _L))
err(E, "range", "label")(lambda: _ops().sigmoid_focal_loss_labels(torch.rand(4, 3), torch.tensor([0, 3, -1, -1])))
err(E, "negative", "label")(lambda: _ops().sigmoid_focal_loss_labels(torch.rand(4, 3), torch.tensor([0, -3, -1, -1])))
err(E, "batch", "weights")(lambda: _ops().sigmoid_focal_loss_labels(torch.rand(4, 3), _L, weights=torch.ones(5)))
err(E, "range", "label_smoothing")(lambda: _ops().sigmoid_focal_loss_labels(torch.rand(4, 3), _L, label_smoothing=2.0))
err(E, "nan-threshold", "label_smoothing")(lambda: _ops().sigmoid_focal_loss_labels(torch.rand(4, 3), _L, label_smoothing=NAN))
err(E, "nan-threshold", "gamma")(lambda: _ops().sigmoid_focal_loss_labels(torch.rand(4, 3), _L, gamma=NAN))
err(E, "negative", "gamma")(lambda: _ops().sigmoid_focal_loss_labels(torch.rand(4, 3), _L, gamma=-2.0))
ok(E, "empty", lambda r: None if float(r) == 0.0 else str(r))(
    lambda: _ops().sigmoid_focal_loss_labels(torch.empty(0, 3), torch.empty(0, dtype=torch.long)))

E = "nms"
err(E, "rank", "boxes")(lambda: _ops().nms(torch.rand(4), torch.rand(1), 0.5))
err(E, "shape", "boxes")(lambda: _ops().nms(torch.rand(3, 5), torch.rand(3), 0.5))
err(E, "batch", "scores")(lambda: _ops().nms(boxes(3), torch.rand(4), 0.5))
err(E, "dtype", "boxes")(lambda: _ops().nms(boxes(3).long(), torch.rand(3), 0.5))
err(E, "dtype", "scores")(lambda: _ops().nms(boxes(3), torch.ones(3, dtype=torch.long), 0.5))
err(E, "device", "device")(lambda: _ops().nms(boxes(3), meta(3), 0.5))
err(E, "nan-threshold", "iou_threshold")(lambda: _ops().nms(boxes(3), torch.rand(3), NAN))
ok(E, "empty", shape_is(0))(lambda: _ops().nms(torch.empty(0, 4), torch.empty(0), 0.5))

E = "batched_nms"
err(E, "rank", "idxs")(lambda: _ops().batched_nms(boxes(3), torch.rand(3), torch.zeros(3, 1, dtype=torch.long), 0.5))
err(E, "batch", "idxs")(lambda: _ops().batched_nms(boxes(3), torch.rand(3), torch.zeros(4, dtype=torch.long), 0.5))
err(E, "dtype", "idxs")(lambda: _ops().batched_nms(boxes(3), torch.rand(3), torch.zeros(3, dtype=torch.bool), 0.5))  # (float ids are ids)
err(E, "device", "device")(lambda: _ops().batched_nms(boxes(3), torch.rand(3), torch.zeros(3, dtype=torch.long, device="meta"), 0.5))
err(E, "nan-threshold", "iou_threshold")(lambda: _ops().batched_nms(boxes(3), torch.rand(3), torch.zeros(3, dtype=torch.long), NAN))
ok(E, "negative", shape_is(2))(  # negative category ids are ids like any other (torchvision's too)
    lambda: _ops().batched_nms(boxes(2), torch.rand(2), torch.tensor([-5, -7]), 0.5))
ok(E, "empty", shape_is(0))(lambda: _ops().batched_nms(torch.empty(0, 4), torch.empty(0), torch.empty(0, dtype=torch.long), 0.5))

E = "batched_nms_multi"
_z3 = torch.zeros(3, dtype=torch.long)
err(E, "range", "image_ids")(lambda: _ops().batched_nms_multi(boxes(3), torch.rand(3), _z3, torch.tensor([0, 1, 2]), 2, 0.5))
err(E, "negative", "image_ids")(lambda: _ops().batched_nms_multi(boxes(3), torch.rand(3), _z3, torch.tensor([0, -1, 0]), 2, 0.5))
err(E, "negative", "num_images")(lambda: _ops().batched_nms_multi(boxes(3), torch.rand(3), _z3, _z3, -1, 0.5))
err(E, "batch", "image_ids")(lambda: _ops().batched_nms_multi(boxes(3), torch.rand(3), _z3, torch.zeros(2, dtype=torch.long), 1, 0.5))
err(E, "dtype", "image_ids")(lambda: _ops().batched_nms_multi(boxes(3), torch.rand(3), _z3, torch.zeros(3), 1, 0.5))
err(E, "rank", "boxes")(lambda: _ops().batched_nms_multi(torch.rand(12), torch.rand(3), _z3, _z3, 1, 0.5))
err(E, "device", "device")(lambda: _ops().batched_nms_multi(boxes(3), torch.rand(3), _z3, _z3.to("meta"), 1, 0.5))
err(E, "nan-threshold", "iou_threshold")(lambda: _ops().batched_nms_multi(boxes(3), torch.rand(3), _z3, _z3, 1, NAN))
ok(E, "topk", lambda r: None if r[0].shape[0] == 1 and int(r[1][0]) >= 1 else str(r))(  # max_per_image < 0: all
    lambda: _ops().batched_nms_multi(boxes(3), torch.rand(3), _z3, _z3, 1, 0.5, -5))
ok(E, "empty", lambda r: None if r[0].shape == (0, 0) and r[1].shape == (0,) else str(r))(
    lambda: _ops().batched_nms_multi(torch.empty(0, 4), torch.empty(0), torch.empty(0, dtype=torch.long),
                                     torch.empty(0, dtype=torch.long), 0, 0.5))


def _head(B=2, levels=(12, 3), K=3):
    A = sum(levels)
    return torch.randn(B, A, K), torch.randn(B, A, 4) * 0.1, boxes(A), [(64, 64)] * B, list(levels)


for E in ("postprocess_detections", "postprocess_detections_padded"):
    def P(*a, _E=E, **k):
        return getattr(_ops(), _E)(*a, **k)

    def H(i, v, **kw):  # the head case with argument i replaced by v
        args = list(_head(**kw))
        args[i] = v
        return args

    err(E, "rank", "cls_logits")(lambda P=P: P(*H(0, torch.randn(15, 3))))
    err(E, "shape", "bbox_regression")(lambda P=P: P(*H(1, torch.randn(2, 15, 5))))
    err(E, "shape", "anchors")(lambda P=P: P(*H(2, boxes(14))))
    err(E, "batch", "bbox_regression")(lambda P=P: P(*H(1, torch.randn(3, 15, 4))))
    err(E, "batch", "image_sizes")(lambda P=P: P(*H(3, [(64, 64)] * 3)))
    err(E, "shape", "num_anchors_per_level")(lambda P=P: P(*H(4, [12, 4])))
    err(E, "negative", "num_anchors_per_level")(lambda P=P: P(*H(4, [16, -1])))
    err(E, "negative", "image_sizes")(lambda P=P: P(*H(3, [(64, -5), (64, 64)])))
    err(E, "dtype", "cls_logits")(lambda P=P: P(*H(0, torch.ones(2, 15, 3, dtype=torch.long))))
    err(E, "dtype", "bbox_regression")(lambda P=P: P(*H(1, torch.ones(2, 15, 4, dtype=torch.long))))
    err(E, "device", "device")(lambda P=P: P(*H(2, meta(15, 4))))
    err(E, "topk", "topk_candidates")(lambda P=P: P(*_head(), topk_candidates=-1))
    err(E, "negative", "detections_per_img")(lambda P=P: P(*_head(), detections_per_img=-1))
    err(E, "nan-threshold", "score_thresh")(lambda P=P: P(*_head(), score_thresh=NAN))
    err(E, "nan-threshold", "nms_thresh")(lambda P=P: P(*_head(), nms_thresh=NAN))
    ok(E, "empty", lambda r: None if (len(r) == 0 if isinstance(r, list) else r[0].shape == (0, 300, 4)) else str(r))(
        lambda P=P: P(*_head(B=0)))
    ok(E, "tiny-image", lambda r: None if (isinstance(r, list) and all(bool((d["boxes"] <= 1).all()) for d in r))
       or (not isinstance(r, list) and bool((r[0] <= 1).all())) else str(r))(  # boxes clipped into a 1x1 image
        lambda P=P: P(*H(3, [(1, 1), (1, 1)])))


# ---------------------------------------------------------------------------- the model

_MODEL = {}


def model(train=False):
    from retina_fast.engine import build_model

    if "m" not in _MODEL:
        torch.manual_seed(0)
        _MODEL["m"] = build_model("shapes-small", 3, widths=[8, 8, 16, 16, 16], fpn_channels=16, min_size=64)
    m = _MODEL["m"]
    return m.train(train)


def tgt(n=2, K=3):
    return {"boxes": boxes(n), "labels": torch.arange(n) % K}


def _dets_ok(n):
    def check(r):
        if not isinstance(r, list) or len(r) != n:
            return f"expected {n} detection dicts, got {type(r)}"
        return None if all(set(d) == {"boxes", "scores", "labels"} for d in r) else str(r)
    return check


E = "RetinaNet.forward (eval)"
err(E, "rank", "image")(lambda: model()([torch.rand(64, 64)]))
err(E, "shape", "channels")(lambda: model()([torch.rand(1, 64, 64)]))
err(E, "dtype", "float")(lambda: model()([torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)]))
err(E, "device", "device")(lambda: model()([torch.rand(3, 64, 64, device="meta")]))
err(E, "negative", "image")(lambda: model()([torch.rand(3, 0, 64)]))
ok(E, "tiny-image", _dets_ok(1))(lambda: model()([torch.rand(3, 1, 1)]))
err(E, "empty", "images")(lambda: model()([]))

E = "RetinaNet.forward (train)"
err(E, "batch", "targets")(lambda: model(True)([torch.rand(3, 64, 64)] * 2, [tgt()]))
err(E, "rank", "boxes")(lambda: model(True)([torch.rand(3, 64, 64)], [{"boxes": torch.rand(4), "labels": torch.tensor([0])}]))
err(E, "shape", "boxes")(lambda: model(True)([torch.rand(3, 64, 64)], [{"boxes": torch.rand(2, 5), "labels": torch.tensor([0, 1])}]))
err(E, "batch", "labels")(lambda: model(True)([torch.rand(3, 64, 64)], [{"boxes": boxes(2), "labels": torch.tensor([0, 1, 2])}]))
err(E, "dtype", "labels")(lambda: model(True)([torch.rand(3, 64, 64)], [{"boxes": boxes(2), "labels": torch.tensor([0.0, 1.0])}]))
err(E, "range", "labels")(lambda: model(True)([torch.rand(3, 64, 64)], [{"boxes": boxes(2), "labels": torch.tensor([0, 3])}]))
err(E, "negative", "labels")(lambda: model(True)([torch.rand(3, 64, 64)], [{"boxes": boxes(2), "labels": torch.tensor([0, -1])}]))
err(E, "range", "box")(lambda: model(True)([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[10.0, 10, 5, 20]]), "labels": torch.tensor([0])}]))
err(E, "nan-threshold", "box")(lambda: model(True)([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[10.0, NAN, 15, 20]]), "labels": torch.tensor([0])}]))
err(E, "empty", "targets")(lambda: model(True)([torch.rand(3, 64, 64)], None))
ok(E, "tiny-image", lambda r: None if set(r) == {"classification", "bbox_regression"} and all(bool(torch.isfinite(v)) for v in r.values()) else str(r))(
    lambda: model(True)([torch.rand(3, 2, 2)], [{"boxes": torch.tensor([[0.0, 0, 1, 1]]), "labels": torch.tensor([1])}]))
ok(E, "empty", lambda r: None if all(bool(torch.isfinite(v)) for v in r.values()) else str(r))(  # an image without boxes
    lambda: model(True)([torch.rand(3, 64, 64)], [{"boxes": torch.empty(0, 4), "labels": torch.empty(0, dtype=torch.long)}]))

E = "build_model"
err(E, "range", "model")(lambda: __import__("retina_fast.engine", fromlist=["x"]).build_model("no-such-model", 3))
err(E, "negative", "num_classes")(lambda: __import__("retina_fast.engine", fromlist=["x"]).build_model("shapes-small", -1))
err(E, "empty", "num_classes")(lambda: __import__("retina_fast.engine", fromlist=["x"]).build_model("shapes-small", 0))

E = "AnchorGenerator"
err(E, "batch", "aspect ratios")(lambda: __import__("retina_fast.models", fromlist=["x"]).AnchorGenerator(((32,), (64,)), ((1.0,),) * 3))
err(E, "negative", "sizes")(lambda: __import__("retina_fast.models", fromlist=["x"]).AnchorGenerator(((-32,),), ((1.0,),)))
err(E, "range", "aspect_ratios")(lambda: __import__("retina_fast.models", fromlist=["x"]).AnchorGenerator(((32,),), ((0.0,),)))
err(E, "batch", "feature maps")(lambda: __import__("retina_fast.models", fromlist=["x"]).AnchorGenerator(((32,),), ((1.0,),)).grid((64, 64), [(8, 8), (4, 4)], torch.float32, "cpu"))
ok(E, "tiny-image", lambda r: None if r.shape == (1, 4) else str(r.shape))(  # a feature map larger than the image: stride 0
    lambda: __import__("retina_fast.models", fromlist=["x"]).AnchorGenerator(((32,),), ((1.0,),)).grid((1, 1), [(1, 1)], torch.float32, "cpu"))

E = "pack_targets"
err(E, "rank", "boxes")(lambda: __import__("retina_fast.models", fromlist=["x"]).pack_targets([{"boxes": torch.rand(4, 4, 1), "labels": torch.zeros(4, dtype=torch.long)}], "cpu"))
err(E, "batch", "labels")(lambda: __import__("retina_fast.models", fromlist=["x"]).pack_targets([{"boxes": boxes(3), "labels": torch.zeros(2, dtype=torch.long)}], "cpu"))
ok(E, "empty", lambda r: None if r.boxes.shape[0] == 0 else str(r))(lambda: __import__("retina_fast.models", fromlist=["x"]).pack_targets([], "cpu"))


# ---------------------------------------------------------------------------- the runner

if __import__("os").environ.get("RETINA_FAST_BAD_INPUT_SELFTEST") == "1":
    # The harness's own test: a case that kills the process (as a segfault in a kernel would)
    # and one that hangs; both must be reported against this case, and the others still run.
    def _die():
        import os
        import signal
        os.kill(os.getpid(), signal.SIGSEGV)

    def _hang():
        import time
        time.sleep(3600)

    case("selftest", "range", names=["never"])(_die)
    case("selftest", "range", names=["never"])(_hang)

def run_one(i):
    c = CASES[i]
    rec = {"i": i, "entry": c["entry"], "cls": c["cls"]}
    torch.manual_seed(i)
    try:
        r = c["fn"]()
    except (RuntimeError, ValueError) as e:
        msg = str(e)
        rec.update(type=type(e).__name__, msg=msg.splitlines()[0][:300] if msg else "")
        if c["names"] is None:
            rec["outcome"] = "wrong"
            rec["why"] = "raised where a result is documented"
        elif any(n.lower() in msg.lower() for n in c["names"]):
            rec["outcome"] = "raised"
        else:
            rec["outcome"] = "wrong"
            rec["why"] = f"the message does not name {c['names']}"
    except Exception as e:  # noqa: BLE001 - any other type is a wrong outcome, reported
        rec.update(outcome="wrong", type=type(e).__name__, msg=str(e).splitlines()[0][:300] if str(e) else "",
                   why="not a RuntimeError/ValueError")
    else:
        if c["check"] is None:
            rec.update(outcome="wrong", why="returned instead of raising", msg=str(r)[:200])
        else:
            problem = c["check"](r)
            rec.update(outcome="returned" if problem is None else "wrong", **({"why": problem} if problem else {}))
    return rec


def main(argv):
    torch.set_num_threads(1)
    if "--count" in argv:
        print(len(CASES))
        return
    if "--ids" in argv:
        ids = [int(v) for v in argv[argv.index("--ids") + 1].split(",") if v]
    else:
        ids = range(int(argv[argv.index("--from") + 1]) if "--from" in argv else 0, len(CASES))
    for i in ids:
        print(f"START {i}", flush=True)
        print(json.dumps(run_one(i)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
