"""Property-based fuzzing of NMS and the fused post-processing against the reference (exact:
same stable tie order) and torchvision (where its result is defined: distinct scores; for
batched_nms integer coordinates, which its coordinate-offset trick does not round)."""

import torch
import torchvision
from hypothesis import assume, event, given
from hypothesis import strategies as st

import retina_fast.ops as rf
from retina_fast.ops import _reference as ref
from tests.detections import assert_same_detections
from tests.fuzz.strategies import (
    FLOAT_DTYPES, NAN, assert_bitwise, assert_close, box_rows, dtypes, eps, finite_floats, is_integer_valued,
    layout, tensors, wild_floats,
)

thresholds = st.one_of(st.sampled_from([0.0, 0.3, 0.5, 0.7, 1.0, -0.1, 1.5]), finite_floats(-0.25, 1.25))
score_values = st.one_of(finite_floats(-5.0, 5.0), st.sampled_from([0.0, 0.5, 1.0, 1e7, -1e7, NAN, float("inf"), float("-inf")]))


@st.composite
def _nms_case(draw, n_max=24, tv=False):
    """boxes, scores, threshold. Empty in about one example in ten (an edge case the kernels
    must handle: it asserts only shapes). tv: a case where torchvision's result is defined
    and exact (see _tv_batched_defined): float32/float64 boxes and scores of the same dtype,
    distinct finite scores, integer coordinates >= 0, threshold >= 0."""
    n = 0 if draw(st.integers(0, 9)) == 9 and not tv else draw(st.integers(1, n_max))
    if tv:
        bd = sd = draw(st.sampled_from([torch.float32, torch.float64]))
        boxes = draw(box_rows(n, bd, "int"), "boxes")
        boxes = draw(layout(boxes - boxes.min().clamp(max=0)))
        rank = torch.tensor(draw(st.permutations(range(n))), dtype=torch.float64)
        scores = draw(layout(((rank + 1) / (n + 1)).to(sd)), "scores")  # distinct in every dtype
        return boxes, scores, abs(draw(thresholds))
    bd = draw(dtypes)
    sd = draw(st.sampled_from([bd] + FLOAT_DTYPES))
    boxes = draw(layout(draw(box_rows(n, bd), "boxes")))
    scores = draw(layout(draw(tensors((n,), sd, score_values), "scores")))
    return boxes, scores, draw(thresholds)


def _distinct(scores):
    s = scores.double()
    return bool(torch.isfinite(s).all()) and len(torch.unique(s)) == len(s)


@given(case=_nms_case())
def test_nms(case):
    boxes, scores, thr = case
    ours = rf.nms(boxes, scores, thr)
    assert_bitwise(ours, ref.nms(boxes, scores, thr), "nms vs reference")
    if boxes.dtype in (torch.float32, torch.float64) and scores.dtype == boxes.dtype and _distinct(scores):
        event("nms: compared with torchvision")
        assert_bitwise(ours, torchvision.ops.nms(boxes, scores, thr), "nms vs torchvision")
    event(f"nms: {'empty' if boxes.shape[0] == 0 else 'boxes'}, {'nothing' if ours.numel() == 0 else 'some'} kept")


@given(case=_nms_case(), data=st.data())
def test_batched_nms(case, data):
    boxes, scores, thr = case
    n = boxes.shape[0]
    idxs = torch.tensor(data.draw(st.lists(st.integers(-2, 3), min_size=n, max_size=n)), dtype=data.draw(st.sampled_from([torch.int64, torch.int32])))
    ours = rf.batched_nms(boxes, scores, idxs, thr)
    assert_bitwise(ours, ref.batched_nms(boxes, scores, idxs.long(), thr), "batched_nms vs reference")
    if _tv_batched_defined(boxes, scores, idxs, thr):
        event("batched_nms: compared with torchvision")
        assert_bitwise(ours, torchvision.ops.batched_nms(boxes, scores, idxs.long(), thr), "batched_nms vs torchvision")
    event(f"batched_nms: {'empty' if boxes.shape[0] == 0 else 'boxes'}")


def _tv_batched_defined(boxes, scores, idxs, thr):
    """Where torchvision's batched_nms result is defined and exact: float32/float64, distinct
    finite scores, integer coordinates >= 0 (which its coordinate-offset trick does not
    round), and thr >= 0 unless one class (thr < 0: see the post-processing test)."""
    return bool(boxes.dtype in (torch.float32, torch.float64) and scores.dtype == boxes.dtype and _distinct(scores)
                and is_integer_valued(boxes) and (boxes.numel() == 0 or boxes.min() >= 0)
                and (thr >= 0 or len(torch.unique(idxs)) <= 1))


@given(case=_nms_case(), data=st.data())
def test_batched_nms_multi(case, data):
    boxes, scores, thr = case
    n = boxes.shape[0]
    B = data.draw(st.integers(0 if n == 0 else 1, 3))
    idxs = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)), dtype=torch.long)
    img = torch.tensor(data.draw(st.lists(st.integers(0, max(B - 1, 0)), min_size=n, max_size=n)), dtype=torch.long)
    mpi = data.draw(st.sampled_from([-1, -1, 1, 2, 3, 4, 5, 6, 100, 0]))  # 0 (keep nothing): 1 in 10
    keep, counts = rf.batched_nms_multi(boxes, scores, idxs, img, B, thr, mpi)
    ek, ec = ref.batched_nms_multi(boxes, scores, idxs, img, B, thr, mpi)
    assert_bitwise(keep, ek, "batched_nms_multi keep")
    assert_bitwise(counts, ec, "batched_nms_multi counts")
    event(f"batched_nms_multi: {'empty' if n == 0 else 'boxes'}, {'nothing' if int(counts.sum()) == 0 else 'some'} kept")


@given(case=_nms_case(tv=True))
def test_nms_vs_torchvision(case):
    """Every example where torchvision's nms is defined (drawn so): bitwise the same keep."""
    boxes, scores, thr = case
    assert _distinct(scores)
    assert_bitwise(rf.nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr), "nms vs torchvision")


@given(case=_nms_case(tv=True), data=st.data())
def test_batched_nms_and_multi_vs_torchvision(case, data):
    """batched_nms against torchvision's, and batched_nms_multi against the composition of
    torchvision's own ops (per image, batched_nms of that image's boxes, the first
    max_per_image), on every example (drawn where torchvision's result is defined)."""
    boxes, scores, thr = case
    n = boxes.shape[0]
    idxs = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)), dtype=torch.long)
    assert _tv_batched_defined(boxes, scores, idxs, thr)
    assert_bitwise(rf.batched_nms(boxes, scores, idxs, thr), torchvision.ops.batched_nms(boxes, scores, idxs, thr),
                   "batched_nms vs torchvision")
    B = data.draw(st.integers(1, 3))
    img = torch.tensor(data.draw(st.lists(st.integers(0, B - 1), min_size=n, max_size=n)), dtype=torch.long)
    mpi = data.draw(st.sampled_from([-1, -1, 1, 2, 3, 4, 5, 6, 100, 0]))  # 0 (keep nothing): 1 in 10
    keep, counts = rf.batched_nms_multi(boxes, scores, idxs, img, B, thr, mpi)
    for k in range(B):
        m = torch.nonzero(img == k).flatten()
        exp = m[torchvision.ops.batched_nms(boxes[m], scores[m], idxs[m], thr)]
        if mpi >= 0:
            exp = exp[:mpi]
        c = int(counts[k])
        assert_bitwise(keep[k, :c], exp, f"batched_nms_multi image {k} vs torchvision")
        assert bool((keep[k, c:] == -1).all())
    event(f"batched_nms_multi vs torchvision: {'some' if int(counts.sum()) else 'nothing'} kept")


@st.composite
def _post_case(draw, min_images=0, min_level=0):
    dtype = draw(dtypes)
    B = 0 if min_images == 0 and draw(st.integers(0, 9)) == 9 else draw(st.integers(max(1, min_images), 2))
    # an empty level in about one draw in ten (unless min_level says none)
    levels = draw(st.lists(st.integers(0, 9).flatmap(lambda r: st.just(0) if r == 9 and min_level == 0
                                                     else st.integers(max(1, min_level), 12)),
                           min_size=1, max_size=3))
    A, K = sum(levels), draw(st.integers(1, 4))
    logits = draw(tensors((B, A, K), dtype, st.one_of(finite_floats(-6, 6), st.sampled_from([0.0, NAN, float("inf"), float("-inf"), 30.0, -30.0]))), "logits")
    reg = draw(tensors((B, A, 4), dtype, wild_floats(-3.0, 3.0)), "codes")
    anchors = draw(box_rows(A, draw(dtypes)), "anchors")
    if draw(st.booleans()) and B:
        anchors = torch.stack([anchors] * B) + torch.arange(B, dtype=anchors.dtype)[:, None, None]
    sizes = [(draw(st.integers(1, 200)), draw(st.integers(1, 200))) for _ in range(B)]
    # the parameters that empty the output (score_thresh 1, no top-k, no detections) in about
    # one example in ten each
    def rarely_zero(hi):
        return 0 if draw(st.integers(0, 9)) == 9 else draw(st.integers(1, hi))

    kw = dict(score_thresh=draw(st.sampled_from([0.05, 0.05, -0.1, 0.0, 0.5, 0.05, 0.05, 0.0, -0.1, 1.0])),
              topk_candidates=rarely_zero(30), nms_thresh=draw(thresholds), detections_per_img=rarely_zero(20))
    return (draw(layout(logits)), draw(layout(reg)), draw(layout(anchors)), sizes, levels, kw)


def _assert_same_dets(ours, exp):
    assert len(ours) == len(exp)
    for b, (o, e) in enumerate(zip(ours, exp)):
        assert_bitwise(o["labels"], e["labels"], f"image {b} labels")
        # torch's CPU sigmoid differs by an ulp or two between its vectorised body and its tail,
        # and the op applies it to a gathered buffer (found by the long profile: 2 ulps)
        sd = e["scores"].dtype
        assert_close(o["scores"], e["scores"], 4 * eps(sd) * e["scores"].double().abs() + torch.finfo(sd).tiny,
                     f"image {b} scores")
        dt = e["boxes"].dtype
        # decode's C exp may differ from torch's by an ulp; x1 = cx - w/2 cancels
        mag = e["boxes"].double().abs().amax(-1, keepdim=True).nan_to_num(0, 0, 0) + 1
        assert_close(o["boxes"], e["boxes"], 8 * eps(dt) * mag + torch.finfo(dt).tiny, f"image {b} boxes",
                     overflow_ok=torch.finfo(dt).max / 4)


@given(case=_post_case())
def test_postprocess_detections(case):
    logits, reg, anchors, sizes, levels, kw = case
    ours = rf.postprocess_detections(logits, reg, anchors, sizes, levels, **kw)
    exp = ref.postprocess_detections(logits, reg, anchors, sizes, levels, **kw)
    _assert_same_dets(ours, exp)
    boxes, scores, labels, counts = rf.postprocess_detections_padded(logits, reg, anchors, sizes, levels, **kw)
    D = kw["detections_per_img"]
    B = logits.shape[0]
    assert boxes.shape == (B, D, 4) and scores.shape == (B, D) and labels.shape == (B, D) and counts.shape == (B,)
    for b in range(B):
        n = int(counts[b])
        assert n == len(ours[b]["scores"])
        assert bool((labels[b, n:] == -1).all()) and bool((scores[b, n:] == 0).all()) and bool((boxes[b, n:] == 0).all())
    event(f"postprocess: {'no image' if B == 0 else 'no detection' if int(counts.sum()) == 0 else 'detections'}")


_TV_MODEL = []


def _torchvision_postprocess(logits, reg, anchors, sizes, levels, **kw):
    from torchvision.models.detection import retinanet_resnet50_fpn

    if not _TV_MODEL:
        _TV_MODEL.append(retinanet_resnet50_fpn(weights=None, weights_backbone=None).eval())
    model = _TV_MODEL[0]
    for k, v in kw.items():
        setattr(model, k, v)
    head = {"cls_logits": list(logits.split(levels, 1)), "bbox_regression": list(reg.split(levels, 1))}
    anc = anchors if anchors.dim() == 3 else anchors.expand(logits.shape[0], -1, -1)
    with torch.no_grad():
        return model.postprocess_detections(head, [list(a.split(levels)) for a in anc], sizes)


@given(case=_post_case(min_images=1, min_level=1), dt=st.sampled_from([torch.float32, torch.float64]))
def test_postprocess_detections_vs_torchvision(case, dt):
    """Where torchvision's result is defined: at least one image, finite distinct logits (its
    top-k and NMS order ties arbitrarily), finite codes and anchors, float32/float64, the
    anchors in the codes' dtype, no empty level (drawn so). The drawn case is repaired to fit."""
    logits, reg, anchors, sizes, levels, kw = case
    assert logits.shape[0] >= 1 and 0 not in levels
    # nms_thresh < 0: torchvision's batched_nms shifts classes apart, and their IoU 0 then
    # suppresses across classes (its per-class path above 4000 boxes does not): the op keeps one
    # box per class, as that path does (found by the long profile)
    kw = dict(kw, nms_thresh=abs(kw["nms_thresh"]))
    n = logits.numel()
    # distinct scores: sigmoid saturates to 1.0f past ~17, so keep the logits within [-8, 8]
    logits = logits.to(dt).nan_to_num(0.0, 8.0, -8.0).clamp(-8.0, 8.0).contiguous()
    logits = logits + torch.arange(n, dtype=dt).reshape(logits.shape) * 1e-3
    # (rarely the offsets make two logits equal: such a case has no defined torchvision result)
    assume(_distinct(torch.sigmoid(logits).reshape(-1)))
    reg = reg.to(dt).nan_to_num(0.0, 3.0, -3.0)
    anchors = anchors.to(dt).nan_to_num(0.0, 1e3, -1e3)
    ours = rf.postprocess_detections(logits, reg, anchors, sizes, levels, **kw)
    tv = _torchvision_postprocess(logits, reg, anchors, sizes, levels, **kw)
    # labels equal, scores within 4 ulps, boxes within 4 ulps of their magnitude: as multisets
    # per image and label (tests/detections.py)
    event(f"postprocess vs torchvision: {'no detection' if sum(len(d['scores']) for d in tv) == 0 else 'detections'}")
    e = torch.finfo(dt).eps
    mag = max([float(d["boxes"].abs().max()) for d in tv if len(d["boxes"])] + [0.0]) + 1
    assert_same_detections(ours, tv, score_rtol=4 * e, box_atol=4 * e * mag)
