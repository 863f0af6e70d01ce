"""What torchvision's own ``test/test_ops.py`` checks of the ops we mirror (its classes
``TestNMS``, ``TestBoxIou`` and ``TestFocalLoss``), re-expressed for ours, plus the result
types of every input torchvision accepts.

One entry per behaviour of theirs (their test in brackets):

* nms against a sort-and-suppress reference on boxes built to sit just past the threshold
  [test_nms_ref]; shape errors [test_nms_input_errors]; quantized boxes and scores equal nms of
  the dequantized ones [test_qnms]; CPU vs CUDA in float64, under autocast, and float16 boxes
  keeping what float32 keeps [test_nms_gpu, test_autocast, test_nms_float16]; batched_nms equal
  to per-class nms and to nms of class-offset boxes, and empty 1-D boxes with None arguments
  [test_batched_nms_implementations]; opcheck [their generated opcheck tests].
* box_iou of int16/int32/int64 boxes and float16/32/64 boxes against known values, scripted,
  and against the matrix built one pair at a time [TestBoxIou].
* focal / BCE equals ``alpha_t (1 - p_t)^gamma``, alpha = -1 and gamma = 0 equal to BCE with
  the same gradient, the scripted function equal to eager, an unknown reduction a ValueError,
  on inputs spanning small/large/any probabilities with all-0/all-1/random targets
  [TestFocalLoss].

The one behaviour of theirs not here, "focal <= BCE element-wise, exactly, when gamma = 0",
belongs with the focal-loss kernel's math (tests/ops/test_focal_loss.py).
"""

import inspect

import pytest
import torch
import torch.nn.functional as F
import torchvision

import retina_fast.ops as rf
from tests.conftest import CUDA, cuda_param, devices, requires_cuda

# ------------------------------------------------------------------------------ nms


def _boxes_with_a_pair_past(n, thr, seed):
    """n random boxes; box n-1 is box 0 widened so that their IoU is a hair above thr, so
    one of the two must be suppressed whenever the other is kept."""
    g = torch.Generator().manual_seed(seed)
    b = torch.rand(n, 4, generator=g) * 100
    b[:, 2:] += b[:, :2]
    b[-1] = b[0]
    w = (b[0, 2] - b[0, 0]).item()
    t = thr + 1e-5
    b[-1, 2] += w * (1 - t) / t  # IoU(b0, b_last) = w / (w + d) = t
    return b, torch.rand(n, generator=g)


def _sort_and_suppress(boxes, scores, thr):
    """The textbook algorithm: take the best remaining box, drop every box overlapping it by
    more than thr (IoU from torchvision's box_iou), repeat."""
    order = torch.sort(scores, descending=True, stable=True).indices
    kept = []
    while order.numel():
        i = order[0]
        kept.append(int(i))
        rest = order[1:]
        iou = torchvision.ops.box_iou(boxes[rest], boxes[i][None])[:, 0]
        order = rest[iou <= thr]
    return torch.tensor(kept, dtype=torch.int64)


def iou64(a, b):
    """IoU [N, M] in float64, written here (not the op under test): exact for integer
    coordinates below 2^26; 0/0 (two empty boxes) is NaN."""
    a, b = a.double(), b.double()
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def _sort_and_suppress_exact(boxes, scores, thr):
    """The textbook algorithm on integer coordinates with the float64 IoU above, rounded once
    to float32 (the precision torchvision's and our kernels compare in) and compared with the
    threshold: suppress iff IoU > thr, so a NaN IoU suppresses nothing; stable order."""
    order = torch.sort(scores, descending=True, stable=True).indices
    kept = []
    while order.numel():
        i = order[0]
        kept.append(int(i))
        rest = order[1:]
        iou = iou64(boxes[rest], boxes[i][None])[:, 0].float().double()
        order = rest[~(iou > thr)]
    return torch.tensor(kept, dtype=torch.int64)


@pytest.mark.parametrize("thr", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("seed", range(4))
def test_nms_equals_sort_and_suppress_with_a_pair_just_past_the_threshold(thr, seed):
    b, s = _boxes_with_a_pair_past(1000, thr, seed)
    iou = torchvision.ops.box_iou(b[:1], b[-1:]).item()
    assert thr < iou < thr + 1e-4  # the constructed pair really sits just past the threshold
    keep = rf.nms(b, s, thr)
    assert keep.dtype == torch.int64
    assert torch.equal(keep, _sort_and_suppress(b, s, thr))
    assert not ({0, 999} <= set(keep.tolist()))  # never both


def test_nms_shape_errors_are_runtime_errors():
    for boxes, scores in [
        (torch.rand(4), torch.rand(3)),        # 1-D boxes
        (torch.rand(3, 5), torch.rand(3)),     # 5 coordinates
        (torch.rand(3, 4), torch.rand(3, 2)),  # 2-D scores
        (torch.rand(3, 4), torch.rand(4)),     # N mismatch
    ]:
        with pytest.raises(RuntimeError, match="expected"):
            rf.nms(boxes, scores, 0.5)


@pytest.mark.filterwarnings("ignore:.*quantize.*:UserWarning")
@pytest.mark.parametrize("qdtype", [torch.quint8, torch.qint8, torch.qint32])
@pytest.mark.parametrize("scale,zero_point", [(1.0, 0), (2.0, 50), (3.0, 10), (0.7, 3)])
def test_nms_quantized_equals_nms_of_dequantized_and_torchvision(qdtype, scale, zero_point):
    b, s = _boxes_with_a_pair_past(1000, 0.5, seed=7)
    s = s * 100  # else most 8-bit scores round to 0 or 1
    if qdtype == torch.qint8:
        b, zero_point = b / 2, min(zero_point, 20)  # inside qint8's range
    qb = torch.quantize_per_tensor(b, scale=scale, zero_point=zero_point, dtype=qdtype)
    qs = torch.quantize_per_tensor(s, scale=scale, zero_point=zero_point, dtype=qdtype)
    for thr in (0.2, 0.5, 0.8):
        keep = rf.nms(qb, qs, thr)
        assert keep.dtype == torch.int64 and keep.device.type == "cpu"
        # every box the textbook algorithm on the integers keeps, in its order (the IoU of the
        # integer representations: a shared scale and zero point cancel)
        assert torch.equal(keep, _sort_and_suppress_exact(qb.int_repr(), qs.int_repr(), thr))
        if scale == int(scale):  # integer scales: the dequantized IoUs round as the integers' do
            # torchvision's float nms on the dequantized boxes, the tied 8-bit scores replaced
            # by distinct ones in our (stable) order
            order = torch.sort(qs.int_repr(), descending=True, stable=True).indices
            distinct = torch.empty(1000).index_put_((order,), torch.linspace(1.0, 0.0, 1000))
            assert torch.equal(keep, torchvision.ops.nms(qb.dequantize(), distinct, thr))
        tv = torchvision.ops.nms(qb, qs, thr)
        assert len(keep) == len(tv)
        # same score at every rank (8-bit scores tie a lot; ours breaks ties by index)
        assert torch.equal(qs.int_repr()[keep], qs.int_repr()[tv])


@pytest.mark.filterwarnings("ignore:.*quantize.*:UserWarning")
def test_nms_quantized_bad_input():
    b, s = _boxes_with_a_pair_past(20, 0.5, seed=1)
    qb = torch.quantize_per_tensor(b, 0.5, 0, torch.quint8)
    qs = torch.quantize_per_tensor(s, 0.01, 0, torch.quint8)
    with pytest.raises(RuntimeError, match="both quantized"):
        rf.nms(qb, s, 0.5)
    with pytest.raises(RuntimeError, match="both quantized"):
        rf.nms(b, qs, 0.5)
    with pytest.raises(RuntimeError, match="same dtype"):
        rf.nms(qb, torch.quantize_per_tensor(s, 0.01, 0, torch.qint8), 0.5)
    per_channel = torch.quantize_per_channel(b, torch.full((4,), 0.5), torch.zeros(4, dtype=torch.long), 1, torch.quint8)
    with pytest.raises(RuntimeError, match="per-tensor"):
        rf.nms(per_channel, qs, 0.5)
    with pytest.raises(RuntimeError, match=r"boxes of shape \[N, 4\]"):
        rf.nms(torch.quantize_per_tensor(torch.rand(20, 5), 0.5, 0, torch.quint8), qs, 0.5)
    assert rf.nms(qb[:0], qs[:0], 0.5).dtype == torch.int64


@requires_cuda
@pytest.mark.parametrize("thr", [0.2, 0.5, 0.8])
def test_cuda_nms_float64_and_under_autocast_equal_cpu(thr):
    b, s = _boxes_with_a_pair_past(1000, thr, seed=3)
    for dtype in (torch.float64, torch.float32, torch.float16):
        bb, ss = b.to(dtype), s.to(dtype)
        expected = rf.nms(bb, ss, thr)
        with torch.autocast("cuda" if CUDA == "cuda" else "cpu"):
            got = rf.nms(bb.to(CUDA), ss.to(CUDA), thr).cpu()
        assert torch.equal(got, expected), dtype


@pytest.mark.parametrize("device", ["cpu", cuda_param()])
def test_nms_float16_keeps_what_float32_keeps(device):
    # three nearly identical large boxes; only the best survives at 0.2 in either precision
    b = torch.tensor([[285.3538, 185.5758, 1193.5110, 851.4551],
                      [285.1472, 188.7374, 1192.4984, 851.0669],
                      [279.2440, 197.9812, 1189.4746, 849.2019]], device=device)
    s = torch.tensor([0.6370, 0.7569, 0.3966], device=device)
    k32 = rf.nms(b, s, 0.2)
    assert k32.tolist() == [1]
    assert torch.equal(rf.nms(b.half(), s.half(), 0.2), k32)
    assert torch.equal(rf.nms(b.bfloat16(), s.bfloat16(), 0.2), k32)


@pytest.mark.parametrize("seed", range(4))
def test_batched_nms_equals_per_class_nms_and_offset_boxes(seed):
    """Strongly overlapping boxes (every x1 < every x2) in 4 classes at IoU 0.9: torchvision's
    per-class nms merged by score (its "vanilla") and its nms of boxes shifted apart by class
    (its "coordinate trick") give the same as our batched_nms."""
    g = torch.Generator().manual_seed(seed)
    n = 1000
    b = torch.cat([torch.rand(n, 2, generator=g), torch.rand(n, 2, generator=g) + 10], 1)
    assert b[:, 0].max() < b[:, 2].min() and b[:, 1].max() < b[:, 3].min()
    s = torch.rand(n, generator=g)
    idx = torch.randint(0, 4, (n,), generator=g)
    keep = rf.batched_nms(b, s, idx, 0.9)
    mask = torch.zeros(n, dtype=torch.bool)
    for c in idx.unique():
        members = torch.where(idx == c)[0]
        mask[members[torchvision.ops.nms(b[members], s[members], 0.9)]] = True
    vanilla = torch.where(mask)[0]
    vanilla = vanilla[torch.sort(s[vanilla], descending=True, stable=True).indices]
    offset = idx.to(b)[:, None] * (b.max() + 1)
    trick = torchvision.ops.nms(b + offset, s, 0.9)
    assert torch.equal(keep, vanilla) and torch.equal(keep, trick)


def test_batched_nms_empty_boxes_any_shape_and_none_arguments():
    for empty in (torch.empty((0,)), torch.empty((0, 4)), torch.empty((0, 4), dtype=torch.float64)):
        out = rf.batched_nms(empty, None, None, None)
        assert out.dtype == torch.int64 and out.shape == (0,)
        assert torch.equal(out, torchvision.ops.batched_nms(empty, None, None, None))
    out = rf.batched_nms(torch.empty(0, 4), torch.empty(0), torch.empty(0, dtype=torch.long), 0.5)
    assert out.dtype == torch.int64 and out.shape == (0,)


def test_nms_ops_pass_opcheck():
    b, s = _boxes_with_a_pair_past(300, 0.5, seed=2)
    idx = torch.randint(0, 4, (300,), generator=torch.Generator().manual_seed(2))
    for op, args in [(torch.ops.retina_fast.nms.default, (b, s, 0.5)),
                     (torch.ops.retina_fast.batched_nms.default, (b, s, idx, 0.5))]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                    "test_faketensor", "test_aot_dispatch_dynamic"))


# ------------------------------------------------------------------------------ box_iou

# CI also runs these with torch 2.11 / torchvision 0.26, whose box_iou may lack fmt= and rotated
# boxes: compare with torchvision where it has them
TV_FMT = "fmt" in inspect.signature(torchvision.ops.box_iou).parameters
TV_ROTATED = hasattr(torch.ops.torchvision, "box_iou_rotated")

INT_BOXES = [[0, 0, 100, 100], [0, 0, 50, 50], [200, 200, 300, 300], [0, 0, 25, 25]]
INT_EXPECTED = [[1.0, 0.25, 0.0], [0.25, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0625, 0.25, 0.0]]
FLOAT_BOXES = [[285.3538, 185.5758, 1193.5110, 851.4551],
               [285.1472, 188.7374, 1192.4984, 851.0669],
               [279.2440, 197.9812, 1189.4746, 849.2019]]
FLOAT_EXPECTED = [[1.0, 0.9933, 0.9673], [0.9933, 1.0, 0.9737], [0.9673, 0.9737, 1.0]]


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64, torch.uint8, torch.int8])
def test_box_iou_integer_boxes_give_float32(dtype):
    a = torch.tensor(INT_BOXES, dtype=torch.int64).clamp(max=torch.iinfo(dtype).max).to(dtype)
    b = a[:3]
    out = rf.box_iou(a, b)
    assert out.dtype == torch.float32
    if dtype in (torch.int16, torch.int32, torch.int64):
        assert out.tolist() == INT_EXPECTED  # every one of these IoUs is exact in float32
        assert torch.equal(out, torchvision.ops.box_iou(a, b))
    # (8-bit: torchvision subtracts in the 8-bit type, so its disjoint pairs wrap around; ours
    # are exact. int8 clamps box 2 to a point: 0/0 is NaN, as in torchvision). The exact IoU,
    # rounded once to float32
    torch.testing.assert_close(out, iou64(a, b).float(), rtol=0, atol=0, equal_nan=True)


def test_box_iou_integer_boxes_random_bitwise_and_mixed_with_floats():
    g = torch.Generator().manual_seed(4)
    for dtype in (torch.int16, torch.int32, torch.int64):
        xy = torch.randint(0, 3000, (60, 2), generator=g)
        a = torch.cat([xy, xy + torch.randint(0, 900, (60, 2), generator=g)], 1).to(dtype)
        o, t = rf.box_iou(a, a[:40]), torchvision.ops.box_iou(a, a[:40])
        assert o.dtype == t.dtype == torch.float32
        torch.testing.assert_close(o, t, rtol=0, atol=0, equal_nan=True)  # zero-area pairs: NaN in both
        for other in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            f = a[:40].to(other)
            for x, y in ((a, f), (f, a)):
                o, t = rf.box_iou(x, y), torchvision.ops.box_iou(x, y)
                assert o.dtype == t.dtype, (dtype, other)
                if other in (torch.float32, torch.float64):
                    torch.testing.assert_close(o, t, rtol=0, atol=0, equal_nan=True)
                else:  # torchvision rounds the integers to 16 bits here, ours to float32 (exact
                    # below 2^24): the exact IoU of the integers, rounded once
                    torch.testing.assert_close(o, iou64(x, y).float(), rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="numeric"):
        rf.box_iou(torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2), (torch.float32, 1e-3),
                                        (torch.float64, 1e-3)])
def test_box_iou_float_boxes_known_values(dtype, atol):
    b = torch.tensor(FLOAT_BOXES, dtype=dtype)
    out = rf.box_iou(b, b)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(out, torch.tensor(FLOAT_EXPECTED, dtype=out.dtype), rtol=0, atol=atol)


def test_box_iou_scripted_equals_eager():
    scripted = torch.jit.script(rf.box_iou)
    b = torch.tensor(INT_BOXES, dtype=torch.float)
    assert torch.equal(scripted(b, b), rf.box_iou(b, b))
    i = torch.tensor(INT_BOXES)
    assert torch.equal(scripted(i, i), rf.box_iou(i, i))
    for fmt in ("xywh", "cxcywh"):
        assert torch.equal(scripted(b, b, fmt), rf.box_iou(b, b, fmt=fmt))
    bb = torch.rand(2, 3, 4)
    assert torch.equal(scripted(bb, b), rf.box_iou(bb, b))


def test_box_iou_equals_the_matrix_built_pair_by_pair():
    g = torch.Generator().manual_seed(5)

    def boxes(n):
        xy = torch.rand(n, 2, generator=g)
        return torch.cat([xy, xy + torch.rand(n, 2, generator=g)], 1)

    a, b = boxes(5), boxes(7)
    # torchvision's box_iou one pair at a time: the same float32 arithmetic, bitwise
    pairwise = torch.stack([torch.cat([torchvision.ops.box_iou(a[i:i + 1], b[j:j + 1])[0] for j in range(7)])
                            for i in range(5)])
    out = rf.box_iou(a, b)
    assert torch.equal(out, pairwise)
    assert bool(((out.double() - iou64(a, b)).abs() <= 4 * torch.finfo(torch.float32).eps).all())


@pytest.mark.parametrize("fmt", ["xywh", "cxcywh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int32])
def test_box_iou_fmt_matches_torchvision(fmt, dtype):
    g = torch.Generator().manual_seed(6)
    a = torch.cat([torch.rand(40, 2, generator=g) * 500, torch.rand(40, 2, generator=g) * 200 + 1], 1)
    if dtype == torch.int32:
        a = a.round()
    a = a.to(dtype)
    b = a[:25].flip(0)
    if not TV_FMT:
        pytest.skip("this torchvision's box_iou has no fmt=")
    o, t = rf.box_iou(a, b, fmt=fmt), torchvision.ops.box_iou(a, b, fmt=fmt)
    assert o.dtype == t.dtype and o.shape == t.shape
    # ours: the IoU of the boxes as given (corners exact in float64), rounded once; torchvision
    # rounds x1 + w in the boxes' dtype first and takes the area as w * h. The exact side:
    # torchvision's box_convert in float64, then the float64 formula of this file
    exact = iou64(torchvision.ops.box_convert(a.double(), fmt, "xyxy"),
                  torchvision.ops.box_convert(b.double(), fmt, "xyxy"))
    ulp = torch.finfo(o.dtype).eps * exact.abs() + torch.finfo(o.dtype).tiny
    assert bool(((o.double() - exact).abs() <= ulp).all())
    assert bool(((o.double() - t.double()).abs() <= (t.double() - exact).abs() + ulp).all())
    if dtype == torch.int32:  # every conversion exact on both sides: bitwise
        assert torch.equal(o, t)
    # the conversion itself: same IoU as the xyxy boxes torchvision's box_convert gives
    xyxy = torchvision.ops.box_convert(a.double(), fmt, "xyxy")
    torch.testing.assert_close(exact, rf.box_iou(xyxy, xyxy[:25].flip(0)), rtol=1e-12, atol=1e-12)


def test_box_iou_fmt_errors_and_rotated_formats():
    a = torch.rand(3, 4)
    with pytest.raises(ValueError, match="Unsupported format"):
        rf.box_iou(a, a, fmt="xyhw")
    if not TV_ROTATED:
        pytest.skip("this torchvision has no rotated box IoU")
    r1 = torch.cat([torch.rand(5, 2) * 50, torch.rand(5, 2) * 20 + 1, torch.rand(5, 1) * 90], 1)
    assert torch.equal(rf.box_iou(r1, r1, fmt="cxcywhr"), torchvision.ops.box_iou(r1, r1, fmt="cxcywhr"))


def test_box_iou_leading_dimensions_broadcast_like_torchvision():
    g = torch.Generator().manual_seed(7)

    def boxes(*shape):
        xy = torch.rand(*shape, 2, generator=g)
        return torch.cat([xy, xy + torch.rand(*shape, 2, generator=g)], -1)

    for s1, s2 in [((2, 3), (5,)), ((5,), (2, 3)), ((4, 1, 3), (2, 6)), ((2, 3), (2, 4)), ((0, 3), (5,))]:
        a, b = boxes(*s1), boxes(*s2)
        o = rf.box_iou(a, b)
        lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        aa = a.expand(*lead, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
        bb = b.expand(*lead, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
        one_by_one = [rf.box_iou(x, y) for x, y in zip(aa, bb)]
        expected = torch.stack(one_by_one).reshape(*lead, a.shape[-2], b.shape[-2]) if one_by_one else None
        assert o.shape == (*lead, a.shape[-2], b.shape[-2])
        assert expected is None or torch.equal(o, expected)
        if TV_FMT:  # (the torchvision that has fmt= has leading dimensions too)
            assert torch.equal(o, torchvision.ops.box_iou(a, b))
    with pytest.raises(ValueError, match="broadcast"):
        rf.box_iou(boxes(2, 3), boxes(3, 3))
    one = boxes(3)
    assert torch.equal(rf.box_iou(one[0], one), rf.box_iou(one[:1], one))  # one 1-D box: [1, M]
    with pytest.raises(ValueError, match=r"\[\.\.\., N, 4\]"):
        rf.box_iou(torch.rand(4), torch.rand(4))


# ------------------------------------------------------------------------------ focal loss


def _diverse_pairs(dtype, device, seed, rows=5, cols=2):
    """Logits of probabilities drawn small (0-0.2), large (0.8-1) or anywhere, each with
    all-0, all-1 or random binary targets: nine blocks of rows x cols."""
    g = torch.Generator().manual_seed(seed)
    ranges = {"small": (0.0, 0.2), "big": (0.8, 1.0), "random": (0.0, 1.0)}
    xs, ts = [], []
    for p_range in ranges.values():
        for target in ("zeros", "ones", "binary"):
            lo, hi = p_range
            p = lo + (hi - lo) * torch.rand(rows, cols, generator=g, dtype=torch.float64)
            p = p.clamp(1e-6, 1 - 1e-6)  # finite logits
            xs.append(torch.log(p / (1 - p)))
            t = {"zeros": torch.zeros(rows, cols, dtype=torch.float64), "ones": torch.ones(rows, cols, dtype=torch.float64),
                 "binary": torch.randint(0, 2, (rows, cols), generator=g).double()}[target]
            ts.append(t)
    return torch.cat(xs).to(device, dtype), torch.cat(ts).to(device, dtype)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("alpha", [-1.0, 0.0, 0.58, 1.0])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_focal_over_bce_is_the_modulating_factor(device, dtype, alpha, gamma, seed):
    x, t = _diverse_pairs(dtype, device, seed)
    focal = rf.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction="none")
    assert focal.dtype == dtype
    # BCE of the same inputs in float32 (torch's half BCE on the CPU rounds every step to half,
    # which is why torchvision skips half on the CPU); ours computes half in float32 too
    x, t, focal = x.float(), t.float(), focal.float()
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    # focal <= BCE (a factor <= 1) up to our rounding, against the float64 BCE (torch's float32
    # BCE is itself up to ~2.6e-5 relative off); bit-exactness against torch's BCE at gamma = 0
    # is test_focal_loss.py's
    bce64 = F.binary_cross_entropy_with_logits(x.double(), t.double(), reduction="none")
    assert bool((focal.double() <= bce64 * (1 + 4 * torch.finfo(dtype).eps) + 1e-30).all())
    p = torch.sigmoid(x)
    p_t = p * t + (1 - p) * (1 - t)
    factor = (1 - p_t) ** gamma
    if alpha >= 0:
        factor = factor * (alpha * t + (1 - alpha) * (1 - t))
    tol = 1e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(focal / bce, factor, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("seed", [2, 3])
def test_focal_with_no_alpha_and_gamma_0_is_bce_with_its_gradient(device, dtype, reduction, seed):
    x, t = _diverse_pairs(dtype, device, seed)
    xf, xb = x.clone().requires_grad_(), x.float().requires_grad_()
    focal = rf.sigmoid_focal_loss(xf, t, alpha=-1, gamma=0, reduction=reduction)
    bce = F.binary_cross_entropy_with_logits(xb, t.float(), reduction=reduction)  # float32: see above
    assert focal.dtype == dtype
    torch.testing.assert_close(focal, bce.to(dtype))
    focal.backward()
    bce.backward()
    torch.testing.assert_close(xf.grad, xb.grad.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_focal_scripted_equals_eager(dtype, reduction):
    scripted = torch.jit.script(rf.sigmoid_focal_loss)
    for seed in (4, 5):
        x, t = _diverse_pairs(dtype, "cpu", seed)
        for alpha in (-1.0, 0.0, 0.58, 1.0):
            for gamma in (0.0, 2.0):
                eager = rf.sigmoid_focal_loss(x, t, gamma=gamma, alpha=alpha, reduction=reduction)
                torch.testing.assert_close(scripted(x, t, gamma=gamma, alpha=alpha, reduction=reduction), eager,
                                           rtol=0, atol=0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_focal_unknown_reduction_is_a_value_error(device, dtype):
    x, t = _diverse_pairs(dtype, device, 0)
    with pytest.raises(ValueError, match="Invalid"):
        rf.sigmoid_focal_loss(x, t, 0.25, 2, "xyz")


# ------------------------------------------------------------------------------ audit: inputs
# torchvision accepts beyond its own test_ops.py (the issue-13 audit), same result types


@pytest.mark.parametrize("xd,td", [(torch.float16, torch.float32), (torch.bfloat16, torch.float16),
                                   (torch.float32, torch.float64), (torch.float64, torch.float16)])
def test_focal_mixed_float_dtypes_promote_like_torchvision(xd, td):
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(40, 3, generator=g) * 3).to(xd).requires_grad_()
    t = torch.rand(40, 3, generator=g).to(td)
    out = rf.sigmoid_focal_loss(x, t, reduction="none")
    tv = torchvision.ops.sigmoid_focal_loss(x.detach(), t, reduction="none")
    common = torch.promote_types(xd, td)
    assert out.dtype == tv.dtype == common
    # torchvision's formula in float64 on the same values: ours (float32 math, rounded once to
    # the common dtype) within one unit of the common dtype's precision
    tv64 = torchvision.ops.sigmoid_focal_loss(x.detach().double(), t.double(), reduction="none")
    e = torch.finfo(common).eps
    assert bool(((out.double() - tv64).abs() <= e * tv64.abs() + 16 * torch.finfo(torch.float32).eps * tv64.abs()
                 + torch.finfo(common).tiny).all()), (out.double() - tv64).abs().max()
    torch.testing.assert_close(out, rf.sigmoid_focal_loss(x.detach().to(common), t.to(common), reduction="none"),
                               rtol=0, atol=0)
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert gx.dtype == xd


def test_box_coder_ops_take_integer_boxes_like_torchvision():
    from torchvision.models.detection._utils import BoxCoder

    g = torch.Generator().manual_seed(9)
    xy = torch.randint(0, 500, (30, 2), generator=g)
    anchors = torch.cat([xy, xy + torch.randint(4, 100, (30, 2), generator=g)], 1)  # int64
    gts = anchors.flip(0) + 3
    codes = torch.randn(30, 4, generator=g) * 0.3
    for w in ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)):
        coder = BoxCoder(w)
        d = rf.decode_boxes(codes, anchors, w)
        assert d.dtype == torch.float32
        torch.testing.assert_close(d, coder.decode_single(codes, anchors), rtol=1e-6, atol=1e-4)
        for ref_b, prop in ((gts, anchors.float()), (gts.float(), anchors), (gts, anchors)):
            e, t = rf.encode_boxes(ref_b, prop, w), coder.encode_single(ref_b, prop)
            assert e.dtype == t.dtype == torch.float32
            torch.testing.assert_close(e, t, rtol=1e-6, atol=1e-6)


def test_box_coder_mixed_dtypes_are_the_exact_codes_rounded_once():
    g = torch.Generator().manual_seed(10)
    xy = torch.rand(50, 2, generator=g) * 700
    anchors = torch.cat([xy, xy + torch.rand(50, 2, generator=g) * 100 + 8], 1)
    gts = anchors + torch.randn(50, 4, generator=g) * 3
    half = anchors.half()
    ours = rf.encode_boxes(gts, half)
    # the codes of the boxes as given: torchvision's BoxCoder in float64
    from torchvision.models.detection._utils import BoxCoder

    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    exact = coder.encode_single(gts.double(), half.double())
    assert ours.dtype == torch.float32
    # float32 arithmetic (the differences x_gt - x_anchor cancel): at most twice the error of
    # torchvision's own float32 encode of the same values, plus a few ulps
    base = (coder.encode_single(gts, half.float()).double() - exact).abs().max()
    err = (ours.double() - exact).abs()
    assert 0 < base < 1e-5 and bool((err <= 2 * base + 4 * torch.finfo(torch.float32).eps * exact.abs()).all()), \
        (err.max(), base)


def test_batched_nms_float_category_ids_like_torchvision():
    b, s = _boxes_with_a_pair_past(500, 0.5, seed=11)
    cats = torch.randint(0, 5, (500,), generator=torch.Generator().manual_seed(11))
    expected = rf.batched_nms(b, s, cats, 0.5)
    for idxs in (cats.float(), cats.double() * 0.5 - 1):
        got = rf.batched_nms(b, s, idxs, 0.5)
        assert torch.equal(got, expected)
        assert torch.equal(got, torchvision.ops.batched_nms(b, s, idxs, 0.5))


def test_box_iou_one_box_against_many():
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0], [0.0, 0.0, 5.0, 5.0]])
    out = rf.box_iou(a[0], a)
    assert out.shape == (1, 3)
    assert torch.equal(out, torchvision.ops.box_iou(a[0], a))


def test_anchor_generator_like_torchvisions_tests():
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
    from torchvision.models.detection.image_list import ImageList

    from retina_fast.models import AnchorGenerator

    images = ImageList(torch.zeros(2, 3, 15, 15), [(15, 15), (15, 15)])
    feats = [torch.zeros(2, 8, 3, 3)]
    ours = AnchorGenerator(((10,),), ((1,),))
    assert ours.num_anchors_per_location() == [1]
    expected = torch.tensor([[x - 5.0, y - 5.0, x + 5.0, y + 5.0] for y in (0, 5, 10) for x in (0, 5, 10)])
    out = ours(images, feats)
    assert len(out) == 2 and all(torch.equal(a, expected) for a in out)
    for sizes, ratios in [(((10, 20),), ((0.5, 1.0, 2.0),)), ((10, 20), (0.5, 1.0))]:
        maps = [torch.zeros(2, 8, 3, 3), torch.zeros(2, 8, 2, 2)][: len(sizes) if isinstance(sizes[0], int) else 1]
        for dtype in (torch.float32, torch.float16, torch.float64):
            fm = [f.to(dtype) for f in maps]
            a, t = AnchorGenerator(sizes, ratios)(images, fm), TVAnchorGenerator(sizes, ratios)(images, fm)
            assert all(x.dtype == y.dtype == dtype and torch.equal(x, y) for x, y in zip(a, t))
    # one feature map for two levels of sizes: torchvision asserts (AssertionError), ours a
    # ValueError that says what was expected
    bad = AnchorGenerator(((2, 4, 8), (32, 8)), (0.5, 1.0))
    with pytest.raises(ValueError, match="expected 2 feature maps"):
        bad(ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)]), [torch.zeros(1, 1, 8, 8)])
