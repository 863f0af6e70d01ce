"""nms / batched_nms / batched_nms_multi / postprocess_detections: parity with torchvision and
with the plain-PyTorch reference, edge cases, bad input, opcheck, torch.compile, CUDA vs CPU."""

import math

import pytest
import torch
import torchvision
from torchvision.ops import boxes as tv_boxes

import retina_fast.ops as R
from retina_fast.ops import _reference as ref
from tests.conftest import CUDA, cuda_param, devices, requires_cuda
from tests.detections import assert_same_detections, assert_same_keep


def rand_boxes(n, seed=0, W=1333.0, H=800.0, mean_log_size=3.5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(n, 2, generator=g) * torch.tensor([W, H])
    wh = torch.exp(torch.randn(n, 2, generator=g) * 0.7 + mean_log_size)
    return torch.cat([c - wh / 2, c + wh / 2], 1).to(dtype)


def clustered_boxes(n, seed=0, objects=60, W=1333.0, H=800.0):
    """Detector-like candidates: jittered copies of `objects` boxes plus 20% background."""
    g = torch.Generator().manual_seed(seed)
    oc = torch.rand(objects, 2, generator=g) * torch.tensor([W, H])
    ow = torch.exp(torch.randn(objects, 2, generator=g) * 0.8 + 4.0)
    k = torch.randint(0, objects, (n,), generator=g)
    c = oc[k] + torch.randn(n, 2, generator=g) * ow[k] * 0.1
    wh = ow[k] * torch.exp(torch.randn(n, 2, generator=g) * 0.1)
    bg = torch.rand(n, generator=g) < 0.2
    c[bg] = torch.rand(int(bg.sum()), 2, generator=g) * torch.tensor([W, H])
    return torch.cat([c - wh / 2, c + wh / 2], 1)


def unique_scores(n, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return (torch.randperm(n, generator=g).float() + 1) / (n + 1)


def assert_tie_tolerant(ours, theirs, scores):
    """Same number kept and the same score at every rank (tied boxes may be swapped)."""
    assert ours.dtype == torch.long
    assert len(ours) == len(theirs)
    torch.testing.assert_close(scores[ours.cpu()], scores[theirs.cpu()], rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------ nms


@pytest.mark.parametrize("n", [1, 2, 10, 300, 3000])
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("gen", [rand_boxes, clustered_boxes])
def test_nms_matches_torchvision(n, thr, gen):
    b, s = gen(n, seed=n), unique_scores(n, seed=n)
    expected = torchvision.ops.nms(b, s, thr)
    got = R.nms(b, s, thr)
    assert torch.equal(got, expected)
    if n <= 300:
        assert torch.equal(got, ref.nms(b, s, thr))


def test_nms_float64_matches_torchvision():
    b, s = rand_boxes(2000, seed=3).double(), unique_scores(2000).double()
    assert torch.equal(R.nms(b, s, 0.5), torchvision.ops.nms(b, s, 0.5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nms_reduced_precision_is_float32_iou(dtype):
    b, s = rand_boxes(1000, seed=5).to(dtype), unique_scores(1000).to(dtype)
    # IoU in float32 of the (exactly) widened boxes; scores widen exactly too.
    expected = ref.nms(b, s, 0.5)
    assert torch.equal(R.nms(b, s, 0.5), expected)
    assert torch.equal(R.nms(b, s, 0.5), R.nms(b.float(), s.float(), 0.5))


def _pair_boxes(heights):
    """Pairs (A, B): A = [0,0,10,10] (higher score), B = [0,0,10,h]: IoU = h/10 exactly in float."""
    boxes, scores = [], []
    for j, h in enumerate(heights):
        x = 100.0 * j  # pairs far apart
        boxes += [[x, 0.0, x + 10.0, 10.0], [x, 0.0, x + 10.0, h]]
        scores += [1.0 - 0.001 * j, 0.5 - 0.001 * j]
    return torch.tensor(boxes), torch.tensor(scores)


@pytest.mark.parametrize("thr", [0.5, 0.6, 0.7])
def test_nms_just_over_and_under_threshold(thr):
    # IoU exactly float(thr), one float step below and above: torchvision compares the float
    # IoU with the double threshold; so must we (0.6 rounds up in float, 0.7 down).
    t = torch.tensor(thr * 10, dtype=torch.float32)
    hs = [float(torch.nextafter(t, torch.tensor(0.0))), float(t), float(torch.nextafter(t, torch.tensor(100.0)))]
    b, s = _pair_boxes(hs)
    iou = (b[1::2, 3] * 10) / 100
    expected = torchvision.ops.nms(b, s, thr)
    got = R.nms(b, s, thr)
    assert torch.equal(got, expected)
    assert torch.equal(got, ref.nms(b, s, thr))
    suppressed = 6 - len(got)
    assert suppressed == int((iou.double() > thr).sum())  # both sides of the boundary occur
    assert 0 < suppressed < 3


def test_nms_identical_boxes():
    b = torch.tensor([[10.0, 20.0, 50.0, 80.0]]).repeat(64, 1)
    s = unique_scores(64)
    assert torch.equal(R.nms(b, s, 0.5), torchvision.ops.nms(b, s, 0.5))
    assert R.nms(b, s, 0.5).tolist() == [int(s.argmax())]
    # all scores tied: the stable sort keeps the first box
    assert R.nms(b, torch.ones(64), 0.5).tolist() == [0]
    assert len(torchvision.ops.nms(b, torch.ones(64), 0.5)) == 1


def test_nms_tied_scores():
    b = clustered_boxes(2000, seed=7)
    s = torch.randint(0, 20, (2000,), generator=torch.Generator().manual_seed(1)).float() / 20
    got = R.nms(b, s, 0.5)
    assert_tie_tolerant(got, torchvision.ops.nms(b, s, 0.5), s)
    assert torch.equal(got, ref.nms(b, s, 0.5))  # the reference is stable too
    # stable: equal scores come out in index order
    ss = s[got]
    same = ss[1:] == ss[:-1]
    assert bool((got[1:][same] > got[:-1][same]).all())


def test_nms_empty_and_single():
    e = R.nms(torch.empty(0, 4), torch.empty(0), 0.5)
    assert e.dtype == torch.long and e.shape == (0,)
    assert R.nms(torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([0.3]), 0.5).tolist() == [0]


def test_nms_100k():
    b, s = clustered_boxes(100_000, seed=11, objects=400), unique_scores(100_000, seed=11)
    got = R.nms(b, s, 0.5)
    assert torch.equal(got, torchvision.ops.nms(b, s, 0.5))


def test_nms_nan_and_degenerate():
    b = rand_boxes(200, seed=2)
    s = unique_scores(200)
    b[5] = float("nan")  # NaN box: NaN IoU with everything, never suppresses nor is suppressed
    b[7, 2] = b[7, 0]  # empty box: IoU 0 (or NaN with another empty one)
    b[9] = b[7]
    b[11, 2] = float("inf")
    s[13] = float("nan")  # NaN score: sorts first, as torch sorts it
    got = R.nms(b, s, 0.5)
    assert torch.equal(got, ref.nms(b, s, 0.5))
    assert got[0].item() == 13
    assert {5, 7, 9} <= set(got.tolist())


@pytest.mark.parametrize("thr", [-0.5, 0.0, 1.0, 1.5])
def test_nms_thresholds_outside_unit_interval(thr):
    b, s = rand_boxes(400, seed=4), unique_scores(400)
    got = R.nms(b, s, thr)
    assert torch.equal(got, torchvision.ops.nms(b, s, thr))
    if thr < 0:
        assert len(got) == 1  # every pair, disjoint ones too, has IoU 0 > thr
    if thr >= 1:
        assert len(got) == 400


def test_nms_bad_input():
    b, s = rand_boxes(10), unique_scores(10)
    with pytest.raises(RuntimeError, match=r"boxes of shape \[N, 4\]"):
        R.nms(b[:, :3], s, 0.5)
    with pytest.raises(RuntimeError, match=r"scores of shape \[N\]"):
        R.nms(b, s[:9], 0.5)
    with pytest.raises(RuntimeError, match=r"scores of shape \[N\]"):
        R.nms(b, s[:, None], 0.5)
    with pytest.raises(RuntimeError, match="floating"):
        R.nms(b.long(), s, 0.5)
    with pytest.raises(RuntimeError, match="NaN"):
        R.nms(b, s, float("nan"))


# ------------------------------------------------------------------------------ batched_nms


@pytest.mark.parametrize("classes", [1, 80, 1000])
@pytest.mark.parametrize("n", [500, 5000])
def test_batched_nms_matches_torchvision(classes, n):
    b, s = clustered_boxes(n, seed=classes), unique_scores(n, seed=classes)
    i = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(2))
    got = R.batched_nms(b, s, i, 0.5)
    assert torch.equal(got, torchvision.ops.batched_nms(b, s, i, 0.5))
    if n <= 500:
        assert torch.equal(got, ref.batched_nms(b, s, i, 0.5))


def test_batched_nms_arbitrary_idx_values_and_int32():
    b, s = clustered_boxes(1000, seed=1), unique_scores(1000)
    i = torch.randint(0, 5, (1000,), generator=torch.Generator().manual_seed(3))
    big = i * 10**15 - 7  # far beyond any counting-sort range, negative too
    expected = torchvision.ops.batched_nms(b, s, i, 0.5)
    assert torch.equal(R.batched_nms(b, s, big, 0.5), expected)
    assert torch.equal(R.batched_nms(b, s, i.int(), 0.5), expected)


def test_batched_nms_tied_scores():
    b = clustered_boxes(3000, seed=9)
    s = torch.randint(0, 10, (3000,), generator=torch.Generator().manual_seed(4)).float() / 10
    i = torch.randint(0, 7, (3000,), generator=torch.Generator().manual_seed(5))
    got = R.batched_nms(b, s, i, 0.5)
    assert_tie_tolerant(got, torchvision.ops.batched_nms(b, s, i, 0.5), s)


def test_batched_nms_large_coordinates_no_class_merging():
    # Boxes ~1e5 px, 1000 classes, <= 1000 boxes: torchvision's CPU path offsets each class by
    # idx * (max + 1) ~ 1e8, where float32 steps are 8 px, and the 2-4 px boxes collapse. Ours
    # must equal exact per-class NMS (torchvision's own per-class "vanilla" path).
    g = torch.Generator().manual_seed(0)
    n = 900
    c = 1e5 + torch.rand(n, 2, generator=g) * 20
    wh = 2 + torch.rand(n, 2, generator=g) * 2
    b = torch.cat([c - wh / 2, c + wh / 2], 1)
    s = unique_scores(n)
    i = torch.randint(0, 1000, (n,), generator=g)
    i[: n // 2] = 999  # one crowded class
    exact = tv_boxes._batched_nms_vanilla(b, s, i, 0.5)
    got = R.batched_nms(b, s, i, 0.5)
    assert torch.equal(got, exact)
    trick = tv_boxes._batched_nms_coordinate_trick(b, s, i, 0.5)
    assert not torch.equal(trick, exact)  # the precision loss this op avoids is real here


def test_batched_nms_bad_input():
    b, s = rand_boxes(10), unique_scores(10)
    with pytest.raises(RuntimeError, match=r"idxs of shape \[N\]"):
        R.batched_nms(b, s, torch.zeros(9, dtype=torch.long), 0.5)
    # floating category ids are categories, as torchvision accepts them
    cats = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 1, 0])
    assert torch.equal(R.batched_nms(b, s, cats.float() * 0.5, 0.5), R.batched_nms(b, s, cats, 0.5))
    with pytest.raises(RuntimeError, match="integer dtype"):
        R.batched_nms(b, s, torch.zeros(10, dtype=torch.bool), 0.5)
    assert R.batched_nms(torch.empty(0, 4), torch.empty(0), torch.empty(0, dtype=torch.long), 0.5).shape == (0,)


# ------------------------------------------------------------------------------ multi-image


def _multi_case(n=4000, images=6, classes=20, seed=0):
    b, s = clustered_boxes(n, seed=seed), unique_scores(n, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    return b, s, torch.randint(0, classes, (n,), generator=g), torch.randint(0, images, (n,), generator=g)


@pytest.mark.parametrize("max_per_image", [-1, 0, 50])
def test_batched_nms_multi_matches_per_image(max_per_image):
    b, s, i, img = _multi_case()
    keep, counts = R.batched_nms_multi(b, s, i, img, 7, 0.5, max_per_image)  # image 6 is empty
    assert keep.shape[0] == 7 and counts.tolist()[6] == 0
    if max_per_image >= 0:
        assert keep.shape[1] == max_per_image
    for k in range(7):
        m = torch.where(img == k)[0]
        expected = m[torchvision.ops.batched_nms(b[m], s[m], i[m], 0.5)]
        if max_per_image >= 0:
            expected = expected[:max_per_image]
        c = int(counts[k])
        assert torch.equal(keep[k, :c], expected)
        assert bool((keep[k, c:] == -1).all())
    rk, rc = ref.batched_nms_multi(b, s, i, img, 7, 0.5, max_per_image)
    assert torch.equal(keep, rk) and torch.equal(counts, rc)


def test_batched_nms_multi_bad_input():
    b, s, i, img = _multi_case(100)
    with pytest.raises(RuntimeError, match=r"image id in \[0, 3\)"):
        R.batched_nms_multi(b, s, i, img, 3, 0.5)
    with pytest.raises(RuntimeError, match=r"image_ids of shape \[N\]"):
        R.batched_nms_multi(b, s, i, img[:-1], 6, 0.5)
    k, c = R.batched_nms_multi(torch.empty(0, 4), torch.empty(0), torch.empty(0, dtype=torch.long),
                               torch.empty(0, dtype=torch.long), 2, 0.5)
    assert k.shape == (2, 0) and c.tolist() == [0, 0]


# ------------------------------------------------------------------------------ opcheck / compile


def test_opcheck_nms_ops():
    b, s = clustered_boxes(300), unique_scores(300)
    i = torch.randint(0, 4, (300,))
    img = torch.randint(0, 2, (300,))
    # Data-dependent output sizes: the fake tensor tests cannot compare sizes, the rest can.
    for op, args in [
        (torch.ops.retina_fast.nms.default, (b, s, 0.5)),
        (torch.ops.retina_fast.batched_nms.default, (b, s, i, 0.5)),
        (torch.ops.retina_fast.batched_nms_multi.default, (b, s, i, img, 2, 0.5, 40)),
    ]:
        torch.library.opcheck(op, args)


def test_compile_fullgraph_static_shapes():
    b, s, i, img = _multi_case(500, images=3)

    @torch.compile(fullgraph=True, backend="eager")
    def f(b, s, i, img):
        keep, counts = R.batched_nms_multi(b, s, i, img, 3, 0.5, 100)
        return keep, counts

    k, c = f(b, s, i, img)
    ek, ec = R.batched_nms_multi(b, s, i, img, 3, 0.5, 100)
    assert torch.equal(k, ek) and torch.equal(c, ec)


def test_compile_fullgraph_dynamic_nms():
    b, s = clustered_boxes(500), unique_scores(500)

    @torch.compile(fullgraph=True, backend="eager")
    def f(b, s):
        return R.nms(b, s, 0.5)

    assert torch.equal(f(b, s), R.nms(b, s, 0.5))


# ------------------------------------------------------------------------------ post-processing


def _head_case(B, A_levels, K, seed=0, dtype=torch.float32, trained_like=True):
    g = torch.Generator().manual_seed(seed)
    A = sum(A_levels)
    if trained_like:
        # Most logits far below logit(0.05) = -2.94, a tail above it and a few confident anchors.
        logits = torch.randn(B, A, K, generator=g) * 1.3 - 6.0
        hot = torch.rand(B, A, K, generator=g) < 2e-3
        logits[hot] += 6.0 + 3 * torch.rand(int(hot.sum()), generator=g)
    else:
        logits = torch.randn(B, A, K, generator=g) * 2.0
    reg = torch.randn(B, A, 4, generator=g) * 0.3
    reg[..., 2:] += 5 * (torch.rand(B, A, 2, generator=g) < 0.001)  # hits the log(1000/16) clamp
    c = torch.rand(A, 2, generator=g) * 500
    wh = 16 + torch.rand(A, 2, generator=g) * 120
    anchors = torch.cat([c - wh / 2, c + wh / 2], 1)
    sizes = [(480 + 7 * b, 500 - 3 * b) for b in range(B)]
    return logits.to(dtype), reg.to(dtype), anchors, sizes


def assert_dets_equal(ours, theirs, box_rtol=2e-6, box_atol=1e-4, score_exact=True):
    """Same detections per image: scores exact (or within float32 rounding), boxes within the
    tolerances, labels equal; as multisets per image and label, tied scores in any order
    (tests/detections.py). Box decode uses C library exp (box_math.h) where torch uses SLEEF:
    ~1 ulp apart."""
    st = dict(score_atol=0.0, score_rtol=0.0) if score_exact else dict(score_atol=1e-5, score_rtol=1.3e-6)
    assert_same_detections(ours, theirs, box_atol=box_atol, box_rtol=box_rtol, **st)


_TV_MODEL = []


def tv_postprocess(logits, reg, anchors, sizes, levels, **kw):
    """torchvision's own RetinaNet.postprocess_detections (a model with random weights: only
    its post-processing runs) on the same head outputs: the oracle that is not ours."""
    from torchvision.models.detection import retinanet_resnet50_fpn

    if not _TV_MODEL:
        _TV_MODEL.append(retinanet_resnet50_fpn(weights=None, weights_backbone=None).eval())
    model = _TV_MODEL[0]
    defaults = dict(score_thresh=0.05, topk_candidates=1000, nms_thresh=0.5, detections_per_img=300)
    for k, v in {**defaults, **kw}.items():
        setattr(model, k, v)
    head = {"cls_logits": list(logits.split(levels, 1)), "bbox_regression": list(reg.split(levels, 1))}
    anc = anchors if anchors.dim() == 3 else anchors.expand(logits.shape[0], -1, -1)
    with torch.no_grad():
        return model.postprocess_detections(head, [list(a.to(reg.dtype).split(levels)) for a in anc],
                                            [tuple(int(v) for v in s) for s in sizes])


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("trained_like", [True, False])
def test_postprocess_matches_reference(B, trained_like):
    levels = [1200, 300, 75]
    logits, reg, anchors, sizes = _head_case(B, levels, 12, seed=B, trained_like=trained_like)
    got = R.postprocess_detections(logits, reg, anchors, sizes, levels, topk_candidates=400, detections_per_img=100)
    expected = ref.postprocess_detections(logits, reg, anchors, sizes, levels, topk_candidates=400,
                                          detections_per_img=100)
    assert sum(len(d["scores"]) for d in got) > 0
    assert_dets_equal(got, expected)
    assert_dets_equal(got, tv_postprocess(logits, reg, anchors, sizes, levels, topk_candidates=400,
                                          detections_per_img=100))
    # per-image anchors give the same
    got2 = R.postprocess_detections(logits, reg, anchors.expand(B, -1, -1), torch.tensor(sizes), levels,
                                    topk_candidates=400, detections_per_img=100)
    for a, b in zip(got, got2):
        for k in a:
            assert torch.equal(a[k], b[k])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_postprocess_dtypes(dtype):
    levels = [600, 150]
    logits, reg, anchors, sizes = _head_case(2, levels, 9, seed=4, dtype=dtype)
    got = R.postprocess_detections(logits, reg, anchors, sizes, levels, topk_candidates=300)
    expected = ref.postprocess_detections(logits, reg, anchors, sizes, levels, topk_candidates=300)
    assert got[0]["boxes"].dtype == dtype and got[0]["scores"].dtype == dtype
    assert got[0]["labels"].dtype == torch.long
    # reduced precision: tied scores are common; the comparison takes them in any order
    assert_dets_equal(got, expected)
    if dtype == torch.float64:
        assert_dets_equal(got, tv_postprocess(logits, reg, anchors, sizes, levels, topk_candidates=300))


@pytest.mark.parametrize("device", ["cpu", cuda_param()])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_image_anchors", [False, True])
def test_postprocess_upcast_equals_float32_copies(device, dtype, per_image_anchors):
    """upcast=True reads float16/bfloat16 logits and codes as float32 inside the kernel: float32
    outputs equal, bit for bit, those of the same kernel on .float() copies (what the model
    passed before), with NaN logits, the decode clamp, levels past topk and coordinates that a
    bfloat16 decode would round (anchors up to ~640 px)."""
    levels = [2000, 500, 120]
    logits, reg, anchors, sizes = _head_case(3, levels, 20, seed=11, dtype=dtype)
    logits[0, :40] = float("nan")
    if per_image_anchors:
        anchors = torch.stack([anchors + 3 * b for b in range(3)])
    kw = dict(topk_candidates=300, detections_per_img=200)
    d = torch.device(device)
    got = R.postprocess_detections_padded(logits.to(d), reg.to(d), anchors.to(d), sizes, levels, upcast=True, **kw)
    exp = R.postprocess_detections_padded(logits.float().to(d), reg.float().to(d), anchors.to(d), sizes, levels, **kw)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert got[3].min() > 50
    for g, e in zip(got, exp):
        assert torch.equal(g, e)
    # without upcast the kernel computes in the logits' own dtype (torchvision's rule), which differs
    native = R.postprocess_detections_padded(logits.to(d), reg.to(d), anchors.to(d), sizes, levels, **kw)
    assert native[1].dtype == dtype and not torch.equal(native[0].float(), got[0])
    # float32 / float64 inputs: upcast changes nothing
    for t in (torch.float32, torch.float64):
        a = R.postprocess_detections_padded(logits.to(d, t), reg.to(d, t), anchors.to(d), sizes, levels, upcast=True,
                                            **kw)
        b = R.postprocess_detections_padded(logits.to(d, t), reg.to(d, t), anchors.to(d), sizes, levels, **kw)
        assert a[1].dtype == t and all(torch.equal(x, y) for x, y in zip(a, b))


def test_postprocess_ties_and_edge_parameters():
    levels = [500, 125]
    logits, reg, anchors, sizes = _head_case(2, levels, 5, seed=8)
    logits = (logits * 2).round() / 2  # many exactly tied scores
    kw = dict(topk_candidates=50, detections_per_img=30)
    got = R.postprocess_detections(logits, reg, anchors, sizes, levels, **kw)
    assert_dets_equal(got, ref.postprocess_detections(logits, reg, anchors, sizes, levels, **kw))
    # nothing passes / zero top-k / zero detections / empty batch
    for kw in [dict(score_thresh=1.0), dict(topk_candidates=0), dict(detections_per_img=0)]:
        out = R.postprocess_detections(logits, reg, anchors, sizes, levels, **kw)
        assert all(len(d["boxes"]) == 0 for d in out)
        assert_dets_equal(out, tv_postprocess(logits, reg, anchors, sizes, levels, **kw))
    assert R.postprocess_detections(logits[:0], reg[:0], anchors, [], levels) == []
    # negative score threshold: everything is a candidate
    out = R.postprocess_detections(logits, reg, anchors, sizes, levels, score_thresh=-1.0, **kw)
    assert_dets_equal(out, ref.postprocess_detections(logits, reg, anchors, sizes, levels, score_thresh=-1.0, **kw))


def test_postprocess_nan_logits():
    levels = [400]
    logits, reg, anchors, sizes = _head_case(1, levels, 6, seed=3)
    logits[0, :50] = float("nan")  # NaN > thresh is False: never a candidate, as in torchvision
    got = R.postprocess_detections(logits, reg, anchors, sizes, levels)
    assert_dets_equal(got, ref.postprocess_detections(logits, reg, anchors, sizes, levels))
    assert_dets_equal(got, tv_postprocess(logits, reg, anchors, sizes, levels))


def test_postprocess_bad_input():
    levels = [100, 25]
    logits, reg, anchors, sizes = _head_case(2, levels, 4)
    with pytest.raises(RuntimeError, match="sum to A"):
        R.postprocess_detections(logits, reg, anchors, sizes, [100, 24])
    with pytest.raises(RuntimeError, match=r"bbox_regression of shape \[B, A, 4\]"):
        R.postprocess_detections(logits, reg[:, :-1], anchors, sizes, levels)
    with pytest.raises(RuntimeError, match=r"anchors of shape"):
        R.postprocess_detections(logits, reg, anchors[:-1], sizes, levels)
    with pytest.raises(RuntimeError, match=r"image_sizes"):
        R.postprocess_detections(logits, reg, anchors, sizes[:1], levels)
    with pytest.raises(RuntimeError, match="same dtype"):
        R.postprocess_detections(logits, reg.double(), anchors, sizes, levels)
    with pytest.raises(RuntimeError, match="NaN"):
        R.postprocess_detections(logits, reg, anchors, sizes, levels, nms_thresh=float("nan"))


def test_postprocess_opcheck_and_compile():
    levels = [200, 50]
    logits, reg, anchors, sizes = _head_case(2, levels, 5, seed=6)
    st = torch.tensor(sizes)
    torch.library.opcheck(torch.ops.retina_fast.postprocess_detections.default,
                          (logits, reg, anchors, st, levels, 0.05, 100, 0.5, 20))
    torch.library.opcheck(torch.ops.retina_fast.postprocess_detections.default,
                          (logits.bfloat16(), reg.bfloat16(), anchors, st, levels, 0.05, 100, 0.5, 20, True))

    @torch.compile(fullgraph=True, backend="eager")
    def f(logits, reg, anchors, st):
        return R.postprocess_detections_padded(logits, reg, anchors, st, levels, 0.05, 100, 0.5, 20)

    for a, b in zip(f(logits, reg, anchors, st), R.postprocess_detections_padded(logits, reg, anchors, st, levels,
                                                                                  0.05, 100, 0.5, 20)):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def tv_retinanet_outputs():
    """Head outputs of torchvision's RetinaNet (random weights) on random images, batch 8."""
    from torchvision.models.detection import retinanet_resnet50_fpn

    torch.manual_seed(0)
    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, min_size=128, max_size=160).eval()
    # Untrained, every score sits at the 0.01 prior: spread the logits so that some pass 0.05
    # and some levels have more candidates than topk.
    cls = model.head.classification_head.cls_logits
    torch.nn.init.normal_(cls.weight, std=0.03)
    torch.nn.init.constant_(cls.bias, -3.3)
    images = [torch.rand(3, 120 + 4 * k, 150 - 3 * k) for k in range(8)]
    with torch.no_grad():
        il, _ = model.transform(images)
        features = list(model.backbone(il.tensors).values())
        head = model.head(features)
        anchors = model.anchor_generator(il, features)
    hw = [f.shape[2] * f.shape[3] for f in features]
    a_per = head["cls_logits"].shape[1] // sum(hw)
    levels = [x * a_per for x in hw]
    return model, head, anchors, il.image_sizes, levels


@pytest.mark.parametrize("B", [1, 8])
def test_postprocess_matches_torchvision_retinanet(tv_retinanet_outputs, B):
    model, head, anchors, sizes, levels = tv_retinanet_outputs
    head = {k: v[:B] for k, v in head.items()}
    anchors, sizes = anchors[:B], sizes[:B]
    split_head = {k: list(v.split(levels, dim=1)) for k, v in head.items()}
    split_anchors = [list(a.split(levels)) for a in anchors]
    with torch.no_grad():
        expected = model.postprocess_detections(split_head, split_anchors, sizes)
    got = R.postprocess_detections(head["cls_logits"], head["bbox_regression"], torch.stack(anchors), sizes, levels)
    assert sum(len(d["scores"]) for d in got) > 50
    assert_dets_equal(got, expected)


# ------------------------------------------------------------------------------ CUDA vs CPU


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("n", [0, 1, 1000, 20000])
def test_cuda_nms_matches_cpu(n, dtype):
    b = clustered_boxes(n, seed=n).to(dtype)
    s = torch.randint(0, 50, (n,), generator=torch.Generator().manual_seed(n)).to(dtype) / 50  # ties
    assert torch.equal(R.nms(b.to(CUDA), s.to(CUDA), 0.5).cpu(), R.nms(b, s, 0.5))
    i = torch.randint(0, 80, (n,))
    assert torch.equal(R.batched_nms(b.to(CUDA), s.to(CUDA), i.to(CUDA), 0.5).cpu(), R.batched_nms(b, s, i, 0.5))


@requires_cuda
def test_cuda_nms_matches_torchvision_and_edge_cases():
    b, s = clustered_boxes(5000, seed=1), unique_scores(5000)
    assert torch.equal(R.nms(b.to(CUDA), s.to(CUDA), 0.5), torchvision.ops.nms(b.to(CUDA), s.to(CUDA), 0.5))
    bb = rand_boxes(300, seed=2)
    ss = unique_scores(300)
    bb[5] = float("nan")
    ss[13] = float("nan")
    for thr in [-0.5, 0.6, 1.5]:
        assert torch.equal(R.nms(bb.to(CUDA), ss.to(CUDA), thr).cpu(), R.nms(bb, ss, thr))


@requires_cuda
@pytest.mark.parametrize("max_per_image", [-1, 30])
def test_cuda_batched_nms_multi_matches_cpu(max_per_image):
    b, s, i, img = _multi_case(6000, images=16, classes=80)
    got = R.batched_nms_multi(b.to(CUDA), s.to(CUDA), i.to(CUDA), img.to(CUDA), 16, 0.5, max_per_image)
    exp = R.batched_nms_multi(b, s, i, img, 16, 0.5, max_per_image)
    assert torch.equal(got[0].cpu(), exp[0]) and torch.equal(got[1].cpu(), exp[1])


# CUDA post-processing vs the CPU kernel and torchvision's CUDA post-processing:
# tests/ops/test_cuda_paths.py::test_cuda_postprocess_matches_cpu_and_torchvision
