"""Box ops vs torchvision and vs retina_fast.ops._reference: box_iou, match_anchors,
matched_targets, encode_boxes, decode_boxes, grid_anchors."""

import math

import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

import retina_fast.ops as rf
from retina_fast.ops import _reference as ref
from tests.conftest import CUDA, EMULATED_CUDA, requires_cuda, requires_gpu

SIZES = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in [32, 64, 128, 256, 512])
RATIOS = ((0.5, 1.0, 2.0),) * 5


def retinanet_anchors(h=640, w=640, dtype=torch.float32, device="cpu"):
    """torchvision's RetinaNet anchors for one padded h x w image (strides 8..128)."""
    ag = TVAnchorGenerator(SIZES, RATIOS)
    img = ImageList(torch.zeros(1, 3, h, w, device=device), [(h, w)])
    feats = [torch.zeros(1, 1, math.ceil(h / s), math.ceil(w / s), dtype=dtype, device=device)
             for s in (8, 16, 32, 64, 128)]
    return ag(img, feats)[0]


def random_gts(B, M, size=640, gen=None, dtype=torch.float32):
    xy = torch.rand(B, M, 2, generator=gen) * (size - 40)
    wh = torch.rand(B, M, 2, generator=gen) * 250 + 4
    return torch.cat([xy, xy + wh], -1).to(dtype)


def tv_match(anchors, gt_boxes, gt_counts, high=0.5, low=0.4, allow=True):
    """torchvision's per-image loop, as RetinaNet.compute_loss runs it."""
    m = Matcher(high, low, allow)
    out = []
    for b in range(gt_boxes.shape[0]):
        n = int(gt_counts[b])
        if n == 0:
            out.append(torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device))
        else:
            out.append(m(torchvision.ops.box_iou(gt_boxes[b, :n], anchors)))
    return torch.stack(out)


def assert_bitwise(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b), "NaN positions differ"
    ai = torch.where(nan_a, torch.zeros_like(a), a)
    bi = torch.where(nan_b, torch.zeros_like(b), b)
    itype = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}[a.dtype]
    diff = (ai.view(itype) != bi.view(itype)).sum().item()
    assert diff == 0, f"{diff} elements differ bitwise"


def with_garbage(gt, counts, gen=None):
    """Fill padded rows (beyond counts) with NaN/inf/huge/overlapping junk."""
    gt = gt.clone()
    B, M, _ = gt.shape
    junk = torch.tensor([[float("nan"), 0, 1, 1], [-float("inf"), -float("inf"), float("inf"), float("inf")],
                         [0, 0, 640, 640], [5, 5, 5, 5], [1e30, -1e30, 3e38, 3e38]], dtype=gt.dtype)
    for b in range(B):
        for m in range(int(counts[b]), M):
            gt[b, m] = junk[(b + m) % len(junk)]
    return gt


# ------------------------------------------------------------------ box_iou


def degenerate_boxes(dtype=torch.float32):
    return torch.tensor([
        [0, 0, 10, 10], [5, 5, 15, 15], [0, 0, 0, 0], [3, 3, 3, 3], [10, 10, 5, 5],   # zero / negative extent
        [0, 0, 10, 0], [2, 2, 1, 8], [0, 0, 10, 10], [-5, -5, 0, 0], [20, 20, 30, 30],
    ], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_box_iou_matches_torchvision_bitwise(dtype):
    g = torch.Generator().manual_seed(0)
    b1 = torch.cat([random_gts(1, 300, gen=g)[0], degenerate_boxes()]).to(dtype)
    b2 = torch.cat([random_gts(1, 500, gen=g)[0], degenerate_boxes()]).to(dtype)
    ours = rf.box_iou(b1, b2)
    tv = torchvision.ops.box_iou(b1, b2)
    assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_bitwise(ours, tv)
    assert_bitwise(ours, ref.box_iou(b1, b2))
    # not vacuous: overlaps, zeros and NaN (0/0) all occur
    assert (ours > 0.1).any() and (ours == 0).any() and torch.isnan(ours).any()


def test_box_iou_mixed_dtypes_and_empty():
    b1 = random_gts(1, 20)[0]
    b2 = random_gts(1, 30)[0].half()
    assert_bitwise(rf.box_iou(b1, b2), torchvision.ops.box_iou(b1, b2))
    assert rf.box_iou(b1[:0], b2).shape == (0, 30)
    assert rf.box_iou(b1, b2[:0]).shape == (20, 0)


# ------------------------------------------------------------------ match_anchors


@pytest.fixture(scope="module")
def anchors640():
    return retinanet_anchors(640, 640)


def test_match_random_batch_with_empty_images_and_garbage(anchors640):
    g = torch.Generator().manual_seed(1)
    B, M = 4, 30
    gt = random_gts(B, M, gen=g)
    counts = torch.tensor([30, 0, 7, 1])
    gt = with_garbage(gt, counts)
    ours = rf.match_anchors(anchors640, gt, counts)
    assert ours.shape == (B, anchors640.shape[0]) and ours.dtype == torch.int64
    assert torch.equal(ours, tv_match(anchors640, gt, counts))
    assert torch.equal(ours, ref.match_anchors(anchors640, gt, counts))
    assert (ours[1] == -1).all()
    # all three outcomes occur
    assert (ours[0] >= 0).any() and (ours[0] == -1).any() and (ours[0] == -2).any()
    assert ours[3].max() == 0 and (ours[2] > 0).any()


def test_match_padding_does_not_matter(anchors640):
    g = torch.Generator().manual_seed(2)
    gt = random_gts(3, 12, gen=g)
    counts = torch.tensor([12, 5, 9])
    a = rf.match_anchors(anchors640, with_garbage(gt, counts), counts)
    trimmed = torch.zeros(3, 12, 4)
    for b in range(3):
        trimmed[b, : counts[b]] = gt[b, : counts[b]]
    assert torch.equal(a, rf.match_anchors(anchors640, trimmed, counts))


def test_match_exact_thresholds():
    # anchor 0 is 10x10 at the origin; IoU of each gt with it is exact in float32.
    anchors = torch.tensor([[0, 0, 10, 10], [100, 100, 110, 110], [200, 200, 210, 210],
                            [300, 300, 310, 310], [400, 400, 410, 410]], dtype=torch.float32)
    gt = torch.tensor([[[0, 0, 10, 5],            # IoU 0.5 with anchor 0 -> foreground
                        [100, 100, 110, 104],     # IoU 0.4 with anchor 1 -> ignored (-2)
                        [200, 200, 210, 203.99],  # just below 0.4 with anchor 2 -> -1
                        [300, 300, 310, 304.99],  # just below 0.5 with anchor 3 -> -2
                        ]], dtype=torch.float32)
    counts = torch.tensor([4])
    iou = rf.box_iou(gt[0], anchors)
    assert iou[0, 0] == 0.5 and iou[1, 1] == torch.tensor(0.4, dtype=torch.float32)
    ours = rf.match_anchors(anchors, gt, counts, allow_low_quality_matches=False)
    assert ours[0].tolist() == [0, -2, -1, -2, -1]
    assert torch.equal(ours, tv_match(anchors, gt, counts, allow=False))
    # low-quality restore: each gt's best anchor comes back to it (anchor 4 overlaps nothing)
    ours_lq = rf.match_anchors(anchors, gt, counts, zero_iou_quirk=False)
    assert ours_lq[0].tolist() == [0, 1, 2, 3, -1]
    assert torch.equal(rf.match_anchors(anchors, gt, counts), tv_match(anchors, gt, counts))


def test_match_duplicated_gts_and_tied_anchors(anchors640):
    g = torch.Generator().manual_seed(3)
    gt = random_gts(1, 10, gen=g)
    gt = torch.cat([gt, gt[:, [3, 3, 0]]], 1)  # gts 10, 11 duplicate 3; 12 duplicates 0
    counts = torch.tensor([13])
    ours = rf.match_anchors(anchors640, gt, counts)
    assert torch.equal(ours, tv_match(anchors640, gt, counts))
    assert not ((ours == 10) | (ours == 11) | (ours == 12)).any()  # ties go to the lowest index
    assert (ours == 3).any() and (ours == 0).any()
    # two anchors symmetric about a gt tie at its maximum: both restored (below thresholds)
    anchors = torch.tensor([[0, 0, 10, 10], [20, 0, 30, 10], [100, 100, 110, 110]], dtype=torch.float32)
    gt2 = torch.tensor([[[5.0, 0, 25, 10]]])  # IoU 1/5 with anchors 0 and 1
    c2 = torch.tensor([1])
    out = rf.match_anchors(anchors, gt2, c2, zero_iou_quirk=False)
    assert out[0].tolist() == [0, 0, -1]
    assert torch.equal(rf.match_anchors(anchors, gt2, c2), tv_match(anchors, gt2, c2))


def test_match_gt_overlapping_no_anchor_quirk(anchors640):
    g = torch.Generator().manual_seed(4)
    gt = random_gts(2, 6, gen=g)
    gt[0, 2] = torch.tensor([5000.0, 5000.0, 5100.0, 5100.0])  # outside the image: IoU 0 everywhere
    counts = torch.tensor([6, 6])
    ours = rf.match_anchors(anchors640, gt, counts)
    tv = tv_match(anchors640, gt, counts)
    assert torch.equal(ours, tv)
    # torchvision's quirk: every anchor of image 0 becomes foreground of its own best gt
    assert (ours[0] >= 0).all() and (ours[1] < 0).any()
    off = rf.match_anchors(anchors640, gt, counts, zero_iou_quirk=False)
    assert torch.equal(off, ref.match_anchors(anchors640, gt, counts, zero_iou_quirk=False))
    assert (off[0] == -1).any() and not (off[0] == 2).any()
    assert torch.equal(off[1], ours[1])


@pytest.mark.parametrize("case", ["zero_area_gt", "inverted_gt", "degenerate_anchors", "nan_gt"])
def test_match_degenerate_boxes(case, anchors640):
    g = torch.Generator().manual_seed(5)
    gt = random_gts(1, 5, gen=g)
    anchors = anchors640
    if case == "zero_area_gt":
        gt[0, 1] = torch.tensor([50.0, 50.0, 50.0, 80.0])
    elif case == "inverted_gt":
        gt[0, 1] = torch.tensor([100.0, 100.0, 60.0, 140.0])  # negative area
        gt[0, 3] = torch.tensor([100.0, 100.0, 60.0, 60.0])   # both extents negative, area > 0
    elif case == "degenerate_anchors":
        anchors = torch.cat([degenerate_boxes(), anchors640[:5000]])
        gt[0, 0] = torch.tensor([0.0, 0.0, 0.0, 0.0])  # zero area gt vs zero area anchors: 0/0 = NaN
    else:
        gt[0, 2, 0] = float("nan")
    counts = torch.tensor([5])
    for quirk in (True, False):
        ours = rf.match_anchors(anchors, gt, counts, zero_iou_quirk=quirk)
        assert torch.equal(ours, ref.match_anchors(anchors, gt, counts, zero_iou_quirk=quirk))
        if quirk:
            assert torch.equal(ours, tv_match(anchors, gt, counts))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_match_dtypes(dtype, anchors640):
    g = torch.Generator().manual_seed(6)
    gt = random_gts(2, 15, gen=g).to(dtype)
    anchors = anchors640.to(dtype)
    counts = torch.tensor([15, 4])
    ours = rf.match_anchors(anchors, gt, counts)
    assert torch.equal(ours, tv_match(anchors, gt, counts))
    mixed = rf.match_anchors(anchors640.half(), gt.float(), counts)  # promoted as torch does
    assert torch.equal(mixed, tv_match(anchors640.half(), gt.float(), counts))


@pytest.mark.parametrize("high,low,allow", [(0.5, 0.4, False), (0.5, 0.5, True), (0.7, 0.3, True), (0.3, 0.0, True)])
def test_match_thresholds_and_flags(high, low, allow, anchors640):
    g = torch.Generator().manual_seed(7)
    gt = random_gts(2, 20, gen=g)
    counts = torch.tensor([20, 11])
    ours = rf.match_anchors(anchors640, gt, counts, high, low, allow)
    assert torch.equal(ours, tv_match(anchors640, gt, counts, high, low, allow))


def test_match_large_A():
    g = torch.Generator().manual_seed(8)
    A = 200_000
    xy = torch.rand(A, 2, generator=g) * 1300
    anchors = torch.cat([xy, xy + torch.rand(A, 2, generator=g) * 300 + 8], 1)
    gt = random_gts(2, 20, size=1300, gen=g)
    counts = torch.tensor([20, 3])
    assert torch.equal(rf.match_anchors(anchors, gt, counts), tv_match(anchors, gt, counts))


def test_match_large_M():
    g = torch.Generator().manual_seed(9)
    anchors = retinanet_anchors(320, 320)  # 19,215 anchors
    gt = random_gts(2, 300, size=320, gen=g)
    counts = torch.tensor([300, 299])
    ours = rf.match_anchors(anchors, gt, counts)
    assert torch.equal(ours, tv_match(anchors, gt, counts))
    assert ours.max() > 256


def test_match_independent_of_threads(anchors640):
    g = torch.Generator().manual_seed(10)
    gt = random_gts(3, 25, gen=g)
    counts = torch.tensor([25, 25, 10])
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rf.match_anchors(anchors640, gt, counts)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, rf.match_anchors(anchors640, gt, counts))


def test_match_empty_shapes():
    anchors = torch.tensor([[0.0, 0, 10, 10]])
    assert rf.match_anchors(anchors[:0], torch.zeros(2, 3, 4), torch.tensor([1, 2])).shape == (2, 0)
    assert rf.match_anchors(anchors, torch.zeros(0, 3, 4), torch.zeros(0, dtype=torch.long)).shape == (0, 1)
    out = rf.match_anchors(anchors, torch.zeros(2, 0, 4), torch.tensor([0, 0]))
    assert out.tolist() == [[-1], [-1]]
    assert rf.match_anchors(anchors, torch.ones(1, 2, 4), torch.tensor([0], dtype=torch.int32)).tolist() == [[-1]]


def test_match_bad_inputs():
    a = torch.rand(10, 4)
    gt = torch.rand(2, 3, 4)
    c = torch.tensor([3, 1])
    with pytest.raises(RuntimeError, match="last dimension of 4"):
        rf.match_anchors(torch.rand(10, 5), gt, c)
    with pytest.raises(RuntimeError, match="last dimension of 4"):
        rf.match_anchors(a, torch.rand(2, 3, 3), c)
    with pytest.raises(RuntimeError, match=r"gt_boxes of shape \[B, M, 4\]"):
        rf.match_anchors(a, torch.rand(3, 4), c)
    with pytest.raises(RuntimeError, match=r"gt_counts of shape \[B\]"):
        rf.match_anchors(a, gt, torch.tensor([3, 1, 1]))
    with pytest.raises(RuntimeError, match=r"gt_counts\[b\] in \[0, M\]"):
        rf.match_anchors(a, gt, torch.tensor([4, 1]))
    with pytest.raises(RuntimeError, match=r"gt_counts\[b\] in \[0, M\]"):
        rf.match_anchors(a, gt, torch.tensor([1, -1]))
    with pytest.raises(RuntimeError, match="low <= high"):
        rf.match_anchors(a, gt, c, high=0.4, low=0.5)
    with pytest.raises(RuntimeError, match="floating"):
        rf.match_anchors(a.long(), gt, c)
    with pytest.raises(RuntimeError, match="int64 or int32"):
        rf.match_anchors(a, gt, c.float())
    with pytest.raises(RuntimeError, match="last dimension of 4"):
        rf.box_iou(torch.rand(3, 5), torch.rand(3, 4))
    # devices that differ (meta stands in for a second device here; CUDA: test_cuda_bad_inputs)
    with pytest.raises(RuntimeError, match="same device"):
        rf.match_anchors(a, gt.to("meta"), c)
    with pytest.raises(RuntimeError, match="same device"):
        rf.match_anchors(a, gt, c.to("meta"))
    with pytest.raises(RuntimeError, match="same device"):
        rf.box_iou(a, a.to("meta"))


# ------------------------------------------------------------------ matched_targets


def test_matched_targets_vs_torchvision_loss_targets(anchors640):
    g = torch.Generator().manual_seed(11)
    B, M = 3, 16
    gt = random_gts(B, M, gen=g)
    labels = torch.randint(0, 80, (B, M), generator=g)
    counts = torch.tensor([16, 0, 5])
    gt_g = with_garbage(gt, counts)
    out = rf.matched_targets(anchors640, gt_g, labels, counts)
    r_labels, r_targets, r_matches = ref.matched_targets(anchors640, gt_g, labels, counts)
    assert torch.equal(out.matches, r_matches) and torch.equal(out.labels, r_labels)
    torch.testing.assert_close(out.regression_targets, r_targets, rtol=0, atol=2e-6)
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    for b in range(B):
        m = out.matches[b]
        fg = m >= 0
        assert torch.equal(out.labels[b][~fg], m[~fg])
        assert torch.equal(out.labels[b][fg], labels[b][m[fg]])
        assert (out.regression_targets[b][~fg] == 0).all()
        tv_t = coder.encode_single(gt[b][m[fg]], anchors640[fg])
        # dx, dy: elementary arithmetic, bitwise; dw, dh: libm log vs torch's vectorised log (<= 1 ulp each)
        assert_bitwise(out.regression_targets[b][fg][:, :2], tv_t[:, :2])
        torch.testing.assert_close(out.regression_targets[b][fg][:, 2:], tv_t[:, 2:], rtol=0, atol=1e-6)
    assert (out.labels[0] >= 0).sum() > 10 and (out.labels[1] == -1).all()


# ------------------------------------------------------------------ encode / decode


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_matches_boxcoder(dtype, weights):
    g = torch.Generator().manual_seed(12)
    gt = random_gts(1, 500, gen=g)[0].to(dtype)
    an = random_gts(1, 500, gen=g)[0].to(dtype)
    ours = rf.encode_boxes(gt, an, weights)
    tv = BoxCoder(weights).encode_single(gt, an)
    assert ours.dtype == dtype
    assert_bitwise(ours[:, :2], tv[:, :2])
    # log: libm vs torch's vectorised log differ by <= 1 ulp of the result (in float32; in
    # 16-bit that ulp can flip one rounding of the result)
    tol = {torch.float32: 1e-6, torch.float64: 1e-14, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(ours[:, 2:], tv[:, 2:], rtol=0, atol=tol * max(weights))
    r = ref.encode_boxes(gt, an, weights)
    assert_bitwise(ours[:, :2], r[:, :2])
    torch.testing.assert_close(ours[:, 2:], r[:, 2:], rtol=0, atol=tol * max(weights))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_decode_matches_boxcoder(dtype):
    g = torch.Generator().manual_seed(13)
    boxes = random_gts(1, 400, gen=g)[0].to(dtype)
    codes = (torch.randn(400, 8, generator=g) * 2).to(dtype)  # k = 2 codes per box, some clipped
    codes[:5, 2] = 10.0
    codes[5:10, 3] = float("nan")
    clip = math.log(1000.0 / 16)
    ours = rf.decode_boxes(codes, boxes)
    tv = BoxCoder((1.0, 1.0, 1.0, 1.0), clip).decode_single(codes, boxes)
    assert ours.dtype == dtype and ours.shape == codes.shape
    rtol = {torch.float32: 3e-7, torch.float64: 1e-15, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(ours, tv, rtol=rtol, atol=1e-3 if dtype.itemsize == 2 else 1e-4, equal_nan=True)
    # with dw = dh = 0, exp(0) = 1 exactly: bitwise
    z = codes.clone()
    z[:, 2::4] = 0
    z[:, 3::4] = 0
    assert_bitwise(rf.decode_boxes(z, boxes), BoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(z, boxes))


def test_decode_batched_and_weights():
    g = torch.Generator().manual_seed(14)
    anchors = random_gts(1, 50, gen=g)[0]
    codes = torch.randn(3, 50, 4, generator=g)
    w = (10.0, 10.0, 5.0, 5.0)
    ours = rf.decode_boxes(codes, anchors, w)
    torch.testing.assert_close(ours, ref.decode_boxes(codes, anchors.expand(3, 50, 4), w), rtol=3e-7, atol=1e-4)
    per_img = rf.decode_boxes(codes, anchors.expand(3, 50, 4).contiguous(), w)
    assert torch.equal(ours, per_img)
    assert torch.equal(ours[1], rf.decode_boxes(codes[1], anchors, w))
    enc = rf.encode_boxes(random_gts(3, 50, gen=g), anchors, w)  # proposals shared over B
    assert enc.shape == (3, 50, 4)


def test_decode_gradcheck():
    g = torch.Generator().manual_seed(15)
    boxes = random_gts(2, 6, gen=g, dtype=torch.float64)
    codes = torch.randn(2, 6, 8, generator=g, dtype=torch.float64)
    codes[0, 0, 2] = 5.0  # clipped: zero gradient there
    codes.requires_grad_(True)
    w = (10.0, 10.0, 5.0, 5.0)
    assert torch.autograd.gradcheck(lambda c: rf.decode_boxes(c, boxes, w, 0.5), (codes,))
    c2 = codes[1].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: rf.decode_boxes(c, boxes[1]), (c2,))
    # the backward matches autograd through the reference
    c3 = codes.detach().clone().requires_grad_(True)
    c4 = codes.detach().clone().requires_grad_(True)
    gout = torch.randn(2, 6, 8, dtype=torch.float64, generator=g)
    rf.decode_boxes(c3, boxes, w, 0.5).backward(gout)
    ref.decode_boxes(c4, boxes, w, 0.5).backward(gout)
    torch.testing.assert_close(c3.grad, c4.grad)
    with pytest.raises(NotImplementedError, match="boxes"):
        rf.decode_boxes(codes, boxes.clone().requires_grad_(True)).sum().backward()


def test_encode_decode_bad_inputs():
    with pytest.raises(RuntimeError, match="same shape|shape of reference_boxes"):
        rf.encode_boxes(torch.rand(5, 4), torch.rand(6, 4))
    with pytest.raises(RuntimeError, match=r"\[N, 4k\]"):
        rf.decode_boxes(torch.rand(5, 3), torch.rand(5, 4))
    with pytest.raises(RuntimeError, match="boxes"):
        rf.decode_boxes(torch.rand(5, 4), torch.rand(6, 4))
    with pytest.raises(RuntimeError, match="4 weights"):
        rf.decode_boxes(torch.rand(5, 4), torch.rand(5, 4), (1.0, 1.0))


# ------------------------------------------------------------------ grid_anchors


@pytest.mark.parametrize("hw", [(640, 640), (800, 1088), (800, 832)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_grid_anchors_matches_torchvision(hw, dtype):
    h, w = hw
    feats = [torch.zeros(1, 1, math.ceil(h / s), math.ceil(w / s), dtype=dtype) for s in (8, 16, 32, 64, 128)]
    if hw == (800, 832):
        feats[-1] = torch.zeros(1, 1, 13, 13, dtype=dtype)  # stride 800 // 13 = 61, not 64
    img = ImageList(torch.zeros(2, 3, h, w), [(h, w), (h - 10, w - 30)])
    tv = TVAnchorGenerator(SIZES, RATIOS)(img, feats)
    cells = [ref.cell_anchors(s, r, dtype) for s, r in zip(SIZES, RATIOS)]
    grids = [tuple(f.shape[-2:]) for f in feats]
    strides = [(h // g[0], w // g[1]) for g in grids]
    ours = rf.grid_anchors(cells, grids, strides)
    assert ours.dtype == dtype
    assert_bitwise(ours, tv[0])
    assert_bitwise(ours, ref.grid_anchors(cells, grids, strides))


def test_grid_anchors_bad_inputs():
    cells = torch.zeros(9, 4)
    with pytest.raises(RuntimeError, match="length 2"):
        torch.ops.retina_fast.grid_anchors(cells, [9], [10], [8, 8])
    with pytest.raises(RuntimeError, match="sum"):
        torch.ops.retina_fast.grid_anchors(cells, [8], [10, 10], [8, 8])


# ------------------------------------------------------------------ opcheck / compile


def _opcheck_cases():
    g = torch.Generator().manual_seed(16)
    anchors = retinanet_anchors(128, 128)
    gt = random_gts(2, 5, size=128, gen=g)
    counts = torch.tensor([5, 2])
    matches = rf.match_anchors(anchors, gt, counts)
    labels = torch.randint(0, 5, (2, 5), generator=g)
    codes = torch.randn(2, 20, 4, generator=g, dtype=torch.float64, requires_grad=True)
    boxes = random_gts(1, 20, gen=g, dtype=torch.float64)[0]
    return [
        ("box_iou", (gt[0], anchors)),
        ("grid_anchors", (torch.zeros(6, 4), [3, 3], [4, 4, 2, 2], [8, 8, 16, 16])),
        ("match_anchors", (anchors, gt, counts, 0.5, 0.4, True, True)),
        ("gather_targets", (matches, anchors, gt, labels, [1.0, 1.0, 1.0, 1.0])),
        ("encode_boxes", (gt[0], anchors[:5], [1.0, 1.0, 2.0, 2.0])),
        ("decode_boxes", (codes, boxes, [1.0, 1.0, 1.0, 1.0], 4.0)),
        ("decode_boxes_backward", (torch.randn(2, 20, 4, dtype=torch.float64), codes.detach(), boxes,
                                   [1.0, 1.0, 1.0, 1.0], 4.0)),
    ]


@pytest.mark.parametrize("name,args", _opcheck_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.retina_fast, name).default, args)


def test_compile_fullgraph(anchors640):
    g = torch.Generator().manual_seed(17)
    gt = random_gts(2, 8, gen=g)
    labels = torch.randint(0, 10, (2, 8), generator=g)
    counts = torch.tensor([8, 3])
    codes = torch.randn(2, anchors640.shape[0], 4, generator=g) * 0.1

    def f(anchors, gt, labels, counts, codes):
        t = rf.matched_targets(anchors, gt, labels, counts, check_counts=False)
        boxes = rf.decode_boxes(codes, anchors)
        return t.labels, t.regression_targets, boxes, rf.box_iou(gt[0], anchors[:100])

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(cf(anchors640, gt, labels, counts, codes), f(anchors640, gt, labels, counts, codes)):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ CUDA vs CPU


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_box_iou_bitwise(dtype):
    g = torch.Generator().manual_seed(20)
    b1 = torch.cat([random_gts(1, 300, gen=g)[0], degenerate_boxes()]).to(dtype)
    b2 = torch.cat([random_gts(1, 700, gen=g)[0], degenerate_boxes()]).to(dtype)
    assert_bitwise(rf.box_iou(b1.to(CUDA), b2.to(CUDA)).cpu(), rf.box_iou(b1, b2))
    assert_bitwise(rf.box_iou(b1.to(CUDA), b2.to(CUDA)).cpu(), torchvision.ops.box_iou(b1, b2))


@requires_cuda
@pytest.mark.parametrize("quirk", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cuda_match_equals_cpu(quirk, dtype):
    g = torch.Generator().manual_seed(21)
    # The CPU emulator of the CUDA kernels (EMULATED_CUDA) runs a warp collective per thread and
    # gt: 192 px there (6,921 anchors, 28 blocks) instead of 640 px (76,725).
    size = 192 if EMULATED_CUDA else 640
    anchors = retinanet_anchors(size, size).to(dtype)
    B, M = 5, 300  # M > one shared-memory tile of gts
    gt = random_gts(B, M, gen=g).to(dtype)
    gt[2, 3] = torch.tensor([5000.0, 5000.0, 5100.0, 5100.0])  # overlaps nothing: quirk
    gt[3, 0] = torch.tensor([10.0, 10.0, 10.0, 10.0])          # zero area
    gt[3, 1] = gt[3, 2]                                        # duplicate
    counts = torch.tensor([300, 0, 17, 260, 1])
    gt = with_garbage(gt, counts)
    cpu = rf.match_anchors(anchors, gt, counts, zero_iou_quirk=quirk)
    cuda = rf.match_anchors(anchors.to(CUDA), gt.to(CUDA), counts.to(CUDA), zero_iou_quirk=quirk)
    assert torch.equal(cuda.cpu(), cpu)
    for allow in (False, True):
        for hl in ((0.5, 0.4), (0.6, 0.6)):
            assert torch.equal(
                rf.match_anchors(anchors.to(CUDA), gt.to(CUDA), counts.to(CUDA), *hl, allow, quirk).cpu(),
                rf.match_anchors(anchors, gt, counts, *hl, allow, quirk))
    if quirk and dtype == torch.float32:
        assert torch.equal(cpu[:3], tv_match(anchors, gt[:3], counts[:3]))


@requires_cuda
def test_cuda_large_A_and_targets():
    g = torch.Generator().manual_seed(22)
    A = 20_000 if EMULATED_CUDA else 200_000  # the CPU emulator: 79 blocks of anchors, not 782
    xy = torch.rand(A, 2, generator=g) * 1300
    anchors = torch.cat([xy, xy + torch.rand(A, 2, generator=g) * 300 + 8], 1)
    gt = random_gts(3, 100, size=1300, gen=g)
    labels = torch.randint(0, 91, (3, 100), generator=g)
    counts = torch.tensor([100, 50, 0])
    cpu = rf.matched_targets(anchors, gt, labels, counts)
    cuda = rf.matched_targets(anchors.to(CUDA), gt.to(CUDA), labels.to(CUDA), counts.to(CUDA))
    assert torch.equal(cuda.matches.cpu(), cpu.matches) and torch.equal(cuda.labels.cpu(), cpu.labels)
    torch.testing.assert_close(cuda.regression_targets.cpu(), cpu.regression_targets, rtol=0, atol=1e-6)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cuda_encode_and_anchors(dtype):
    # decode (values and gradient) is tested against a float64 reference on both devices in
    # tests/ops/test_cuda_paths.py::test_decode_against_float64_reference
    g = torch.Generator().manual_seed(23)
    gt = random_gts(1, 1000, gen=g)[0].to(dtype)
    an = random_gts(1, 1000, gen=g)[0].to(dtype)
    eps = torch.finfo(dtype).eps
    exp = rf.encode_boxes(gt, an)
    torch.testing.assert_close(rf.encode_boxes(gt.to(CUDA), an.to(CUDA)).cpu(), exp, rtol=4 * eps,
                               atol=4 * eps * exp.abs().max().item())
    cells = [ref.cell_anchors(s, r, dtype) for s, r in zip(SIZES, RATIOS)]
    grids = [(100, 136), (50, 68), (25, 34), (13, 17), (7, 9)]
    strides = [(800 // a, 1088 // b) for a, b in grids]
    assert_bitwise(rf.grid_anchors([c.to(CUDA) for c in cells], grids, strides).cpu(),
                   rf.grid_anchors(cells, grids, strides))


@requires_gpu
def test_cuda_bad_inputs():
    a = torch.rand(10, 4, device="cuda")
    gt = torch.rand(2, 3, 4, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        rf.match_anchors(a, gt.cpu(), torch.tensor([1, 1]))
    with pytest.raises(RuntimeError, match="same device"):
        rf.match_anchors(a, gt, torch.tensor([1, 1]))
    with pytest.raises(RuntimeError, match=r"gt_counts\[b\] in \[0, M\]"):
        rf.match_anchors(a, gt, torch.tensor([4, 1], device="cuda"))
    with pytest.raises(RuntimeError, match="same device"):
        rf.box_iou(a, a.cpu())
    # unchecked counts are clamped on the device: no out-of-bounds read
    out = rf.match_anchors(a, gt, torch.tensor([7, -1], device="cuda"), check_counts=False)
    assert torch.equal(out[1].cpu(), torch.full((10,), -1))
    assert torch.equal(out[0].cpu(), rf.match_anchors(a.cpu(), gt.cpu(), torch.tensor([3, 0]))[0])
