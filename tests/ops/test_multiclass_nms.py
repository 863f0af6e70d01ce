"""multiclass_nms: ultralytics' own non_max_suppression is the oracle.

* On coordinates that ultralytics' class offset (``class * 7680``) does not round (multiples of
  1/32 px below 2^16 after the shift), the results are equal row for row: same boxes, scores,
  classes, extras, order (distinct scores), and ``return_idxs``.
* On arbitrary float coordinates with up to 80 classes, ours equals an exact per-class oracle
  built from ultralytics' own function (one class-agnostic call per class, merged), and a
  built case shows the offset trick's error against that exact oracle.
* Ties, dtypes, bad input, CUDA against CPU.
"""

import math

import pytest
import torch
from torchvision.ops import box_iou
try:
    from hypothesis import assume, given, settings
    from hypothesis import strategies as st
except ImportError:  # the GPU machine has no hypothesis: the property tests skip, the others run

    class _Unavailable:
        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):
            return self

    st = _Unavailable()

    def given(*args, **kwargs):
        return pytest.mark.skip(reason="needs hypothesis")

    def settings(*args, **kwargs):
        return lambda f: f

    def assume(condition):
        return True

import retina_fast.ops as R
from tests.conftest import CUDA, cuda_param
from tests.oracles import ultralytics_nms

MAX_WH = 7680  # ultralytics' class offset


def make_prediction(B, C, N, extra=0, seed=0, grid=True, size=640.0, objects=None, dtype=torch.float32):
    """[B, 4 + C + extra, N] YOLO head output: boxes clustered around a few objects (so NMS
    suppresses), every score distinct (no ties), extras N(0, 1). ``grid``: centres on 1/32 px
    and sizes on 1/16 px, so ``cx -+ w / 2`` and ultralytics' shifted copies are exact."""
    g = torch.Generator().manual_seed(seed)
    objects = objects or max(1, N // 6)
    oc = torch.rand(B, objects, 2, generator=g) * size
    owh = torch.rand(B, objects, 2, generator=g) * 120 + 8
    k = torch.randint(0, objects, (B, N), generator=g)
    centre = torch.gather(oc, 1, k[..., None].expand(B, N, 2))
    wh = torch.gather(owh, 1, k[..., None].expand(B, N, 2))
    centre = centre + torch.randn(B, N, 2, generator=g) * wh * 0.15
    wh = wh * torch.exp(torch.randn(B, N, 2, generator=g) * 0.15)
    if grid:
        centre, wh = torch.round(centre * 32) / 32, torch.clamp(torch.round(wh * 16) / 16, min=1 / 16)
    scores = (torch.randperm(B * C * N, generator=g).double() + 1) / (B * C * N + 1)
    scores = scores.reshape(B, C, N)
    ex = torch.randn(B, extra, N, generator=g)
    pred = torch.cat([centre.transpose(1, 2).double(), wh.transpose(1, 2).double(), scores, ex.double()], 1)
    return pred.to(dtype)


def assert_rows_equal(ours, theirs, what=""):
    assert len(ours) == len(theirs), what
    for b, (o, t) in enumerate(zip(ours, theirs)):
        assert o.shape == t.shape, f"{what} image {b}: {tuple(o.shape)} vs {tuple(t.shape)}"
        torch.testing.assert_close(o, t.to(o.dtype), rtol=0, atol=0, msg=lambda m: f"{what} image {b}: {m}")


def exact_oracle(U, pred, conf, iou, classes, multi_label, max_det, nc):
    """Exact per-class NMS from ultralytics' own pipeline: one class-agnostic call per class
    (no coordinate offset), merged by score. max_nms must not bind (it is per call here)."""
    C = nc or pred.shape[1] - 4
    wanted = range(C) if classes is None else [c for c in range(C) if c in classes]
    per_class = [U.non_max_suppression(pred, conf, iou, classes=[c], agnostic=True, multi_label=multi_label,
                                       max_det=max_det, nc=nc) for c in wanted]
    out = []
    for b in range(pred.shape[0]):
        rows = [p[b] for p in per_class]
        if not rows:
            out.append(torch.zeros((0, pred.shape[1] - C + 2)))
            continue
        rows = torch.cat(rows)
        order = torch.sort(rows[:, 4], descending=True, stable=True).indices
        out.append(rows[order][:max_det])
    return out


@st.composite
def nms_args(draw, max_classes=8, max_boxes=80):
    B = draw(st.integers(1, 3))
    C = draw(st.integers(1, max_classes))
    N = draw(st.integers(0, max_boxes).filter(lambda n: n != 6))  # ultralytics reads N == 6 as end-to-end
    extra = draw(st.integers(0, 3))
    nc = draw(st.sampled_from([0, C])) if extra == 0 else C
    classes = draw(st.one_of(st.none(), st.lists(st.integers(0, C + 1), max_size=3, unique=True)))
    return dict(
        B=B, C=C, N=N, extra=extra, seed=draw(st.integers(0, 2**16)), nc=nc,
        conf=draw(st.sampled_from([0.0, 0.001, 0.1, 0.25, 0.5, 0.9, 1.0])),
        iou=draw(st.one_of(st.sampled_from([0.0, 0.45, 0.5, 0.7, 1.0]), st.floats(0.0, 1.0))),
        classes=classes, agnostic=draw(st.booleans()), multi_label=draw(st.booleans()),
        max_det=draw(st.sampled_from([0, 1, 5, 300])), max_nms=draw(st.sampled_from([0, 3, 40, 30000])),
    )


@settings(max_examples=120)
@given(a=nms_args())
def test_equals_ultralytics_on_exact_coordinates(a):
    U = ultralytics_nms()
    pred = make_prediction(a["B"], a["C"], a["N"], a["extra"], a["seed"])
    kw = dict(classes=a["classes"], agnostic=a["agnostic"], multi_label=a["multi_label"], max_det=a["max_det"],
              nc=a["nc"], max_nms=a["max_nms"])
    theirs, their_idx = U.non_max_suppression(pred, a["conf"], a["iou"], return_idxs=True, **kw)
    ours, our_idx = R.multiclass_nms(pred, a["conf"], a["iou"], return_idxs=True, **kw)
    assert_rows_equal(ours, theirs, "rows")
    for b, (o, t) in enumerate(zip(our_idx, their_idx)):
        assert torch.equal(o, t.long().reshape(-1)), f"return_idxs image {b}"
    # the default form (no indices) and a list input give the same rows
    assert_rows_equal(R.multiclass_nms([pred, None], a["conf"], a["iou"], **kw), theirs, "list input")


@settings(max_examples=40)
@given(a=nms_args(max_classes=80, max_boxes=120), size=st.sampled_from([640.0, 4000.0]))
def test_equals_exact_per_class_oracle_on_float_coordinates(a, size):
    """Arbitrary float coordinates, up to 80 classes: where ultralytics' offset rounds, the
    exact per-class result (built from ultralytics' own function) is the oracle."""
    U = ultralytics_nms()
    pred = make_prediction(a["B"], a["C"], a["N"], a["extra"], a["seed"], grid=False, size=size)
    ours = R.multiclass_nms(pred, a["conf"], a["iou"], classes=a["classes"], multi_label=a["multi_label"],
                            max_det=a["max_det"], nc=a["nc"])
    exact = exact_oracle(U, pred, a["conf"], a["iou"], a["classes"], a["multi_label"], a["max_det"], a["nc"])
    assert_rows_equal(ours, exact, "exact per-class oracle")


@pytest.mark.parametrize("x, w", [(3.79, 10.0), (3.835, 10.1)], ids=["ultralytics_keeps_a_duplicate",
                                                                      "ultralytics_suppresses_a_distinct_box"])
def test_offset_trick_error_against_exact_per_class_nms(x, w):
    """Two w x 10 boxes of class 79 of 80, the second shifted right by x. Shifted by
    79 * 7680 = 606,720 px, ultralytics' coordinates are rounded to 1/16 px, which moves their
    IoU across iou_thres = 0.45: (3.79, 10) is 0.4503 exactly and 0.4480 shifted (ultralytics
    keeps both), (3.835, 10.1) is 0.4496 exactly and 0.4529 shifted (it suppresses one)."""
    U = ultralytics_nms()
    pred = torch.zeros(1, 4 + 80, 2)
    pred[0, :4, 0] = torch.tensor([w / 2, 5.0, w, 10.0])
    pred[0, :4, 1] = torch.tensor([x + w / 2, 5.0, w, 10.0])
    pred[0, 4 + 79] = torch.tensor([0.9, 0.8])
    xy, wh = pred[0, :2].T, pred[0, 2:4].T
    xyxy = torch.cat([xy - wh / 2, xy + wh / 2], 1)
    shift = torch.tensor([79.0 * MAX_WH, 0.0, 79.0 * MAX_WH, 0.0])
    exact_iou = float(box_iou(xyxy[:1], xyxy[1:]))
    shifted_iou = float(box_iou(xyxy[:1] + shift, xyxy[1:] + shift))
    assert (exact_iou > 0.45) != (shifted_iou > 0.45), (exact_iou, shifted_iou)  # the rounding crosses 0.45
    theirs = U.non_max_suppression(pred, 0.25, 0.45)[0]
    ours = R.multiclass_nms(pred, 0.25, 0.45)[0]
    exact = exact_oracle(U, pred, 0.25, 0.45, None, False, 300, 0)[0]
    assert_rows_equal([ours], [exact], "exact")
    expected_kept = 1 if exact_iou > 0.45 else 2
    assert ours.shape[0] == expected_kept
    assert theirs.shape[0] == 3 - expected_kept  # ultralytics' known error
    # the same boxes as class 0 (no offset) give ultralytics the exact answer
    pred0 = pred.clone()
    pred0[0, 4 + 0], pred0[0, 4 + 79] = pred[0, 4 + 79], 0
    assert U.non_max_suppression(pred0, 0.25, 0.45)[0].shape[0] == expected_kept


def test_ties_lower_index_first_and_same_multiset():
    """Tied scores: ours orders by (box, class) index; ultralytics' order is unspecified, but
    the rows are the same multiset where tied boxes do not overlap."""
    U = ultralytics_nms()
    pred = torch.zeros(2, 4 + 3, 40)
    g = torch.Generator().manual_seed(3)
    pred[:, 0] = torch.arange(40.0) * 30 + 10  # disjoint 20 x 20 boxes in a row
    pred[:, 1] = 10
    pred[:, 2:4] = 20
    pred[:, 4:] = torch.randint(1, 4, (2, 3, 40), generator=g).float() / 4  # many ties
    for ml in (False, True):
        ours = R.multiclass_nms(pred, 0.1, 0.5, multi_label=ml)
        theirs = U.non_max_suppression(pred, 0.1, 0.5, multi_label=ml)
        for o, t in zip(ours, theirs):
            assert o.shape == t.shape
            key = lambda r: (-float(r[4]), float(r[0]), float(r[5]))  # noqa: E731
            assert sorted(map(tuple, o.tolist()), key=key) == sorted(map(tuple, t.tolist()), key=key)
            # ours: descending score, then box index, then class
            keys = [(-float(r[4]), float(r[0]), float(r[5])) for r in o]
            assert keys == sorted(keys)


def test_no_time_limit_every_image_processed():
    """ultralytics gives up after 2 + 0.05 B seconds; ours has no time limit (here simply:
    every image of a batch gets its detections)."""
    pred = make_prediction(8, 3, 50, seed=1)
    out = R.multiclass_nms(pred, 0.001, 0.5, multi_label=True)
    assert len(out) == 8 and all(o.shape[0] > 0 for o in out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    pred = make_prediction(2, 4, 60, extra=2, seed=2, dtype=dtype)
    out = R.multiclass_nms(pred, 0.2, 0.5, multi_label=True, nc=4)
    expect = torch.promote_types(dtype, torch.float32)
    assert all(o.dtype == expect and o.shape[1] == 8 for o in out)
    # scores and classes are the input's values; boxes are cx -+ w / 2 in the input dtype
    for b, o in enumerate(out):
        assert bool((o[:, 4] > 0.2).all())
        assert o.shape[0] > 0


def test_empty_and_degenerate_shapes():
    out = R.multiclass_nms(torch.zeros(3, 84, 0))
    assert len(out) == 3 and all(o.shape == (0, 6) for o in out)
    assert R.multiclass_nms(torch.zeros(0, 84, 10)) == []
    out = R.multiclass_nms(make_prediction(2, 5, 30, extra=4, seed=5), 0.0, 0.5, nc=5, max_det=0)
    assert all(o.shape == (0, 10) for o in out)
    # one class: multi_label is ignored, as in ultralytics
    p = make_prediction(1, 1, 30, seed=6)
    assert_rows_equal(R.multiclass_nms(p, 0.1, 0.5, multi_label=True), R.multiclass_nms(p, 0.1, 0.5), "nc=1")


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(prediction=torch.zeros(84, 10)), ValueError, "shape"),
    (dict(prediction=torch.zeros(1, 84, 10, dtype=torch.int64)), TypeError, "floating"),
    (dict(prediction=torch.zeros(1, 4, 10)), ValueError, "nc >= 1"),
    (dict(prediction=torch.zeros(1, 84, 10), nc=81), ValueError, "nc=81"),
    (dict(prediction=torch.zeros(1, 84, 10), nc=-1), ValueError, "nc=-1"),
    (dict(prediction=torch.zeros(1, 84, 10), conf_thres=1.5), ValueError, "conf_thres"),
    (dict(prediction=torch.zeros(1, 84, 10), conf_thres=-0.1), ValueError, "conf_thres"),
    (dict(prediction=torch.zeros(1, 84, 10), iou_thres=math.nan), ValueError, "iou_thres"),
    (dict(prediction=torch.zeros(1, 84, 10), iou_thres=1.01), ValueError, "iou_thres"),
    (dict(prediction=torch.zeros(1, 84, 10), max_det=-1), ValueError, "max_det"),
    (dict(prediction=torch.zeros(1, 84, 10), max_nms=-1), ValueError, "max_nms"),
    (dict(prediction=torch.zeros(1, 84, 10), classes=[True]), TypeError, "class indices"),
    (dict(prediction="boxes"), TypeError, "Tensor"),
])
def test_bad_input(kwargs, err, match):
    with pytest.raises(err, match=match):
        R.multiclass_nms(**kwargs)


@pytest.mark.parametrize("device", [cuda_param()])
@pytest.mark.parametrize("multi_label", [False, True])
def test_cuda_matches_cpu(device, multi_label):
    pred = make_prediction(4, 80, 2000, extra=3, seed=7, grid=False, objects=40)
    cpu = R.multiclass_nms(pred, 0.3, 0.6, multi_label=multi_label, nc=80, max_nms=500, return_idxs=True)
    dev = R.multiclass_nms(pred.to(device), 0.3, 0.6, multi_label=multi_label, nc=80, max_nms=500, return_idxs=True)
    assert all(o.device.type == torch.device(device).type for o in dev[0])
    assert_rows_equal([o.cpu() for o in dev[0]], cpu[0], "cuda vs cpu")
    for o, c in zip(dev[1], cpu[1]):
        assert torch.equal(o.cpu(), c)
