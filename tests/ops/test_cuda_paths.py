"""CUDA paths that the per-op test files do not reach: every one compares the CUDA kernel with
the CPU kernel (or a float64 reference), on the inputs that take the path.

All tests carry the ``cuda`` marker. Without a GPU they run emulated with
``RETINA_FAST_TEST_CUDA=cpu`` (CUDA is then "cpu", see tests/conftest.py), which proves the
tests themselves run; ``requires_gpu`` tests need the real device.
"""

import math

import pytest
import torch
import torchvision

import retina_fast.ops as rf
from retina_fast.ops import _reference as ref
from tests.conftest import CUDA, EMULATED_CUDA, HAS_CUDA, cuda_param, requires_cuda, requires_gpu
from tests.ops.test_boxes import assert_bitwise, random_gts, retinanet_anchors
from tests.ops.test_nms import _head_case, clustered_boxes, rand_boxes, unique_scores

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INF, NAN = float("inf"), float("nan")


def _ulp_tol(dtype, scale, ulps):
    return ulps * torch.finfo(dtype).eps * scale


# ------------------------------------------------------------------------------ focal loss


@requires_cuda
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("form", ["dense", "labels", "labels_weights"])
def test_cuda_float64_grad_of_reduced_loss(reduction, form):
    """The upstream gradient of a reduced loss stays float64 for float64 logits (it was cast to
    float32 on CUDA): (loss * 0.1).backward() agrees with the CPU to 1e-12."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(301, 7, generator=g, dtype=torch.float64) * 3
    t = (torch.rand(301, 7, generator=g) < 0.2).double()
    lab = torch.randint(-2, 7, (301,), generator=g)
    w = torch.rand(301, generator=g, dtype=torch.float64)

    def run(dev):
        xx = x.to(dev, copy=True).requires_grad_()  # a fresh leaf on each device
        if form == "dense":
            loss = rf.sigmoid_focal_loss(xx, t.to(dev), reduction=reduction)
        else:
            loss = rf.sigmoid_focal_loss_labels(xx, lab.to(dev), reduction=reduction,
                                                weights=w.to(dev) if form == "labels_weights" else None)
        (loss * 0.1).backward()
        return loss.detach().cpu(), xx.grad.cpu()

    lc, gc = run("cpu")
    lg, gg = run(CUDA)
    torch.testing.assert_close(lg, lc, rtol=1e-12, atol=0)
    torch.testing.assert_close(gg, gc, rtol=1e-12, atol=1e-300)


def _offset_view(n, k, offset, dtype, seed):
    """[n, k] views at `offset` elements into a flat buffer: a storage offset that is not a
    multiple of 4 elements leaves the data unaligned for 4-wide loads."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n * k + offset, generator=g, dtype=torch.float64) * 4
    t = (torch.rand(n * k + offset, generator=g) < 0.1).double()
    return x.to(dtype)[offset:].view(n, k), t.to(dtype)[offset:].view(n, k)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1024, 80), (1023, 80), (5, 3), (1, 1)])
@pytest.mark.parametrize("offset", [0, 1, 2, 3])
def test_cuda_dense_vector_body_and_tail(dtype, shape, offset):
    """The dense kernels' 4-wide path with its scalar tail (numel % 4 != 0) and the scalar
    fallback for misaligned storage, every dtype, forward and backward, every reduction."""
    n, k = shape
    x, t = _offset_view(n, k, offset, dtype, seed=n + offset)
    exact = ref.sigmoid_focal_loss(x.double(), t.double())
    scale = exact.abs().max().item() + 1e-3
    ulps = 4 if dtype in (torch.float32, torch.float64) else 2
    for reduction in ("none", "mean", "sum"):
        out = {}
        for dev in ("cpu", CUDA):
            xx = x.to(dev, copy=True).requires_grad_()  # a fresh leaf on each device
            loss = rf.sigmoid_focal_loss(xx, t.to(dev), reduction=reduction)
            # the same upstream gradient on both devices (each device's rand_like draws its own)
            up = (torch.rand(loss.shape, generator=torch.Generator().manual_seed(7), dtype=loss.dtype) + 0.5).to(dev)
            (grad,) = torch.autograd.grad((loss * up).sum(), xx)
            out[dev] = (loss.detach().float().cpu(), grad.float().cpu())
        red_scale = scale * (n * k if reduction == "sum" else 1)
        atol = _ulp_tol(dtype, red_scale, ulps) + (1e-6 * red_scale if dtype == torch.float32 else 0)
        torch.testing.assert_close(out[CUDA][0], out["cpu"][0], rtol=0, atol=atol)
        gscale = out["cpu"][1].abs().max().item() + 1e-6
        torch.testing.assert_close(out[CUDA][1], out["cpu"][1], rtol=0,
                                   atol=_ulp_tol(dtype, gscale, ulps) + (1e-6 * gscale if dtype == torch.float32 else 0))


@pytest.mark.parametrize("device", ["cpu", cuda_param()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_infinite_logits_match_torchvision(device, dtype):
    """At +-inf and NaN logits both forms give torchvision's values (NaN at -inf, inf at +inf
    with target 0, NaN with target 1) and NaN gradients, on every device: the labels form was
    NaN on CUDA and inf on the CPU at (+inf, background)."""
    vals = torch.tensor([-INF, INF, NAN, -100.0, 100.0, 0.0, -3.0, 3.0], dtype=dtype)
    K = len(vals)
    x = vals.repeat(K + 2, 1)                          # every logit in every column
    labels = torch.tensor(list(range(K)) + [-1, -2])   # each column foreground once, bg, ignored
    onehot = ref.labels_to_targets(labels, K, dtype)
    valid = labels != -2
    # torchvision on the non-ignored rows
    xt = x[valid].clone().requires_grad_()
    tv = torchvision.ops.sigmoid_focal_loss(xt, onehot[valid], reduction="none")
    (tv_grad,) = torch.autograd.grad(tv.sum(), xt)
    for form in ("labels", "dense"):
        xx = x.to(device).requires_grad_()
        if form == "labels":
            ours = rf.sigmoid_focal_loss_labels(xx, labels.to(device), reduction="none")
        else:
            ours = rf.sigmoid_focal_loss(xx, onehot.to(device), reduction="none")
        (grad,) = torch.autograd.grad(ours.sum(), xx)
        ours, grad = ours.detach().cpu()[valid], grad.cpu()[valid]
        torch.testing.assert_close(ours, tv.detach(), equal_nan=True, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, tv_grad, equal_nan=True, rtol=1e-5, atol=1e-6)


@requires_gpu
def test_cuda_labels_loss_past_2_31_elements():
    """More than 2^31 elements, with a distinct value in every row past index 2^31: a dropped or
    wrapped tail would change them (the old test used constant inputs)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip("needs ~40 GB free")
    k = 91
    n = 2**31 // k + 1000
    x = torch.full((n, k), -2.0, device="cuda", dtype=torch.float16)
    lab = torch.full((n,), -1, device="cuda")
    first = 2**31 // k + 1  # every element of this row and after is past 2^31
    g = torch.Generator().manual_seed(5)
    tail_x = (torch.randn(n - first, k, generator=g) * 3).half()
    tail_lab = torch.randint(-2, k, (n - first,), generator=g)
    x[first:] = tail_x.cuda()
    lab[first:] = tail_lab.cuda()
    out = rf.sigmoid_focal_loss_labels(x, lab, reduction="none")
    expect = rf.sigmoid_focal_loss_labels(tail_x, tail_lab, reduction="none")
    torch.testing.assert_close(out[first:].cpu(), expect, rtol=2e-3, atol=1e-4)
    del out
    s = rf.sigmoid_focal_loss_labels(x, lab, reduction="sum")
    head = (first * k) * ref.sigmoid_focal_loss(torch.tensor(-2.0, dtype=torch.float64),
                                                torch.tensor(0.0, dtype=torch.float64)).item()
    total = head + rf.sigmoid_focal_loss_labels(tail_x.float(), tail_lab, reduction="sum").item()
    assert math.isclose(s.item(), total, rel_tol=1e-4)
    xg = x.requires_grad_()
    (grad,) = torch.autograd.grad(rf.sigmoid_focal_loss_labels(xg, lab, reduction="sum"), xg)
    tg = tail_x.clone().requires_grad_()
    (eg,) = torch.autograd.grad(rf.sigmoid_focal_loss_labels(tg, tail_lab, reduction="sum"), tg)
    torch.testing.assert_close(grad[first:].cpu(), eg, rtol=2e-3, atol=1e-5)


@requires_gpu
def test_cuda_dense_loss_past_2_31_elements():
    """The dense form over more than 2^31 float32 elements (a float32 sum, which half would
    overflow), with random logits and soft targets in every element past index 2^31 (constant
    before it): a dropped, wrapped or int32-indexed tail changes the tail's values, the sum and
    the tail's gradients."""
    free, _ = torch.cuda.mem_get_info()
    if free < 48 * 2**30:
        pytest.skip("needs ~48 GB free")
    n = 2**31 + 4099  # odd: a vector tail too
    first = 2**31
    x = torch.full((n,), -2.0, device="cuda")
    t = torch.zeros(n, device="cuda")
    g = torch.Generator().manual_seed(6)
    tail_x = torch.randn(n - first, generator=g) * 3
    tail_t = torch.rand(n - first, generator=g)
    x[first:], t[first:] = tail_x.cuda(), tail_t.cuda()
    out = rf.sigmoid_focal_loss(x, t, reduction="none")
    torch.testing.assert_close(out[first:].cpu(), rf.sigmoid_focal_loss(tail_x, tail_t, reduction="none"),
                               rtol=1e-5, atol=1e-7)
    assert bool((out[:first:2**20] == out[0]).all())  # the constant head, sampled
    del out
    s = rf.sigmoid_focal_loss(x, t, reduction="sum")
    head = first * ref.sigmoid_focal_loss(torch.tensor(-2.0, dtype=torch.float64),
                                          torch.tensor(0.0, dtype=torch.float64)).item()
    total = head + rf.sigmoid_focal_loss(tail_x.double(), tail_t.double(), reduction="sum").item()
    assert math.isclose(s.item(), total, rel_tol=1e-5)
    xg = x.requires_grad_()
    (grad,) = torch.autograd.grad(rf.sigmoid_focal_loss(xg, t, reduction="sum"), xg)
    tg = tail_x.clone().requires_grad_()
    (eg,) = torch.autograd.grad(rf.sigmoid_focal_loss(tg, tail_t, reduction="sum"), tg)
    torch.testing.assert_close(grad[first:].cpu(), eg, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ box coder


def _coder_case(dtype, B=2, N=700, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    boxes = random_gts(1, N, gen=g)[0]
    boxes[:5] = torch.tensor([[0.0, 0.0, 512.0, 511.0]] * 5)  # near 0, ~500 px wide: exp's ulps show
    codes = torch.randn(B, N, 4 * k, generator=g) * 0.5
    codes[0, :10, 2::4] = 6.0  # above the log(1000/16) clip: no gradient there
    return codes.to(dtype), boxes.to(dtype)


@pytest.mark.parametrize("device", ["cpu", cuda_param()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shared", [True, False])
def test_decode_against_float64_reference(device, dtype, shared):
    """decode_boxes on each device against a float64 reference, with a tolerance in ulps of the
    output's scale (CUDA's expf may differ from glibc's by 2 ulp, so CUDA-vs-CPU at a fixed
    rtol was the wrong test), and its gradient with a random upstream gradient (a .sum()
    backward never checks the exp branch)."""
    codes, boxes = _coder_case(dtype)
    bx = boxes if shared else boxes.expand(codes.shape[0], -1, -1).contiguous()
    exact = ref.decode_boxes(codes.double(), bx.double())
    ours = rf.decode_boxes(codes.to(device), bx.to(device)).cpu()
    assert ours.dtype == dtype and ours.shape == codes.shape
    # every intermediate is ~ the box coordinates: error ~ a few ulps of the row's magnitude
    scale = exact.abs().reshape(*exact.shape[:-1], -1, 4).amax(-1, keepdim=True).expand(
        *exact.shape[:-1], exact.shape[-1] // 4, 4).reshape(exact.shape) + 1.0
    err = (ours.double() - exact).abs()
    tv_err = (ref.decode_boxes(codes, bx).double() - exact).abs()  # torch's own rounding
    bound = torch.maximum(8 * torch.finfo(dtype).eps * scale, 2 * tv_err)
    assert bool((err <= bound).all()), (err / scale).max().item()
    # gradient: float64 autograd through the reference
    up = torch.randn(codes.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    c64 = codes.double().requires_grad_()
    (g_exact,) = torch.autograd.grad((ref.decode_boxes(c64, bx.double()) * up).sum(), c64)
    cc = codes.to(device).requires_grad_()
    (g,) = torch.autograd.grad((rf.decode_boxes(cc, bx.to(device)) * up.to(device, dtype)).sum(), cc)
    g = g.cpu().double()
    assert torch.equal(g[0, :10, 2::4], torch.zeros_like(g[0, :10, 2::4]))  # clipped: no gradient
    gscale = g_exact.abs().max().item()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(g, g_exact, rtol=tol, atol=tol * gscale)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_encode_shared_proposals_and_decode_batched(dtype):
    g = torch.Generator().manual_seed(3)
    gt = random_gts(3, 500, gen=g).to(dtype)          # [B, N, 4]
    anchors = random_gts(1, 500, gen=g)[0].to(dtype)  # [N, 4] shared
    cpu = rf.encode_boxes(gt, anchors)
    cuda = rf.encode_boxes(gt.to(CUDA), anchors.to(CUDA)).cpu()
    exact = ref.encode_boxes(gt.double(), anchors.double().expand(3, -1, -1))
    scale = exact.abs().max().item()
    # encode rounds every op to the dtype on both devices; log may differ by an ulp
    torch.testing.assert_close(cuda, cpu, rtol=4 * torch.finfo(dtype).eps, atol=4 * torch.finfo(dtype).eps * scale)
    codes = torch.randn(3, 500, 4, generator=g).to(dtype)
    per_image = random_gts(3, 500, gen=g).to(dtype)  # [B, N, 4] boxes
    out = rf.decode_boxes(codes.to(CUDA), per_image.to(CUDA)).cpu()
    exp = rf.decode_boxes(codes, per_image)
    scale = exp.abs().max().item() + 1
    torch.testing.assert_close(out, exp, rtol=0, atol=8 * torch.finfo(dtype).eps * scale)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_grid_anchors_with_empty_level(dtype):
    cells = [ref.cell_anchors((32, 40, 50), (0.5, 1.0, 2.0), dtype), ref.cell_anchors((64,), (1.0,), dtype),
             ref.cell_anchors((128, 160), (1.0,), dtype)]
    grids = [(10, 13), (0, 7), (3, 4)]  # the middle level is empty
    strides = [(8, 8), (16, 16), (32, 32)]
    cpu = rf.grid_anchors(cells, grids, strides)
    assert cpu.shape[0] == 10 * 13 * 9 + 3 * 4 * 2
    assert_bitwise(rf.grid_anchors([c.to(CUDA) for c in cells], grids, strides).cpu(), cpu)
    assert_bitwise(cpu, ref.grid_anchors(cells, grids, strides))


# ------------------------------------------------------------------------------ matching


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cuda_match_with_nonfinite_gts(dtype):
    """NaN / inf gt boxes *inside* the counts (not only in padding), every dtype: the CUDA
    matcher's skip test must treat them as irregular, exactly as the CPU does."""
    g = torch.Generator().manual_seed(4)
    anchors = retinanet_anchors(320, 320).to(dtype)
    gt = random_gts(3, 12, size=320, gen=g)
    gt[0, 2] = torch.tensor([NAN, 10.0, 50.0, 60.0])
    gt[0, 5] = torch.tensor([-INF, -INF, INF, INF])
    gt[1, 0] = torch.tensor([10.0, 10.0, INF, 40.0])
    gt[1, 1] = torch.tensor([30.0, 30.0, 30.0, 30.0])
    gt[2, 3] = torch.tensor([1e30, -1e30, 3e38, 3e38])
    gt = gt.to(dtype)
    counts = torch.tensor([12, 7, 4])
    for quirk in (True, False):
        for allow in (True, False):
            cpu = rf.match_anchors(anchors, gt, counts, 0.5, 0.4, allow, quirk)
            cuda = rf.match_anchors(anchors.to(CUDA), gt.to(CUDA), counts.to(CUDA), 0.5, 0.4, allow, quirk).cpu()
            assert torch.equal(cuda, cpu), (quirk, allow)
    assert torch.equal(rf.match_anchors(anchors.float(), gt.float(), counts),
                       ref.match_anchors(anchors.float(), gt.float(), counts))


@requires_cuda
def test_cuda_match_more_than_65535_images():
    """Images run along gridDim.y in a grid-stride loop: B > 65,535 works (it was an error).
    On the CPU emulator the device's gridDim.y limit is lowered to 5 (65,537 images are 16.8M
    emulated threads there): 13 images then take the same grid-stride path."""
    B = 13 if EMULATED_CUDA else 65_537
    if EMULATED_CUDA:
        prev = torch.ops.retina_fast_simt._simt_set_max_grid(5)
        try:
            _match_many_images(B)
        finally:
            torch.ops.retina_fast_simt._simt_set_max_grid(prev)
    else:
        _match_many_images(B)


def _match_many_images(B):
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0], [20.0, 20.0, 40.0, 40.0]])
    base = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [18.0, 18.0, 40.0, 41.0]]])
    gt = base.repeat(B, 1, 1)
    gt[B - 1] = torch.tensor([[20.0, 20.0, 40.0, 40.0], [0.0, 0.0, 1.0, 1.0]])
    counts = torch.full((B,), 2)
    counts[7] = 0
    cpu = rf.match_anchors(anchors, gt, counts)
    cuda = rf.match_anchors(anchors.to(CUDA), gt.to(CUDA), counts.to(CUDA)).cpu()
    assert torch.equal(cuda, cpu)
    assert cpu[7].tolist() == [-1, -1, -1] and cpu[B - 1, 2].item() == 0


# Out-of-range labels, counts and matches: tests/ops/test_cuda_bad_values.py (both devices).


# ------------------------------------------------------------------------------ nms


@requires_cuda
@pytest.mark.parametrize("box_dtype,score_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16),
                                                   (torch.float16, torch.float64), (torch.bfloat16, torch.float32),
                                                   (torch.float64, torch.bfloat16)])
def test_cuda_nms_reduced_and_mixed_dtypes(box_dtype, score_dtype):
    b = clustered_boxes(3000, seed=5).to(box_dtype)
    s = unique_scores(3000, seed=5).to(score_dtype)  # ties after rounding: lower index first
    i = torch.randint(0, 30, (3000,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(rf.nms(b.to(CUDA), s.to(CUDA), 0.5).cpu(), rf.nms(b, s, 0.5))
    assert torch.equal(rf.batched_nms(b.to(CUDA), s.to(CUDA), i.to(CUDA), 0.5).cpu(), rf.batched_nms(b, s, i, 0.5))


@requires_cuda
def test_cuda_batched_nms_multi_edge_cases():
    b, s = clustered_boxes(500, seed=6), unique_scores(500, seed=6)
    i = torch.randint(0, 7, (500,), generator=torch.Generator().manual_seed(6))
    img = torch.randint(0, 3, (500,), generator=torch.Generator().manual_seed(7))
    for dev in ("cpu", CUDA):
        args = [t.to(dev) for t in (b, s, i)]
        bad = img.clone()
        bad[123] = 3
        with pytest.raises(RuntimeError, match=r"expected every image id in \[0, 3\), got image_ids\[123\] = 3"):
            rf.batched_nms_multi(*args, bad.to(dev), 3, 0.5)
        bad[123] = -1
        with pytest.raises(RuntimeError, match=r"got image_ids\[123\] = -1"):
            rf.batched_nms_multi(*args, bad.to(dev), 3, 0.5, max_per_image=10)
        with pytest.raises(RuntimeError, match=r"expected every image id in \[0, 0\)"):
            rf.batched_nms_multi(*args, img.to(dev), 0, 0.5)
        keep, counts = rf.batched_nms_multi(args[0][:0], args[1][:0], args[2][:0], img.to(dev)[:0], 0, 0.5)
        assert keep.shape == (0, 0) and counts.shape == (0,)
        keep, counts = rf.batched_nms_multi(*args, img.to(dev), 3, 0.5, max_per_image=0)
        assert keep.shape == (3, 0) and counts.tolist() == [0, 0, 0]
    got = rf.batched_nms_multi(b.to(CUDA), s.to(CUDA), i.to(CUDA), img.to(CUDA), 3, 0.5, 7)
    exp = rf.batched_nms_multi(b, s, i, img, 3, 0.5, 7)
    assert torch.equal(got[0].cpu(), exp[0]) and torch.equal(got[1].cpu(), exp[1])


@requires_cuda
def test_cuda_many_small_segments_memory():
    """The mask scales with sum(segment size^2), not n^2: at n = 300,000 over 3 images x 1,000
    classes the old full triangle took ~5.6 GB; the per-segment masks take a few MB. Also an
    INT64_MAX class (the old "invalid" sentinel) suppresses like any other."""
    n = 300_000 if HAS_CUDA else 20_000
    g = torch.Generator().manual_seed(8)
    b = rand_boxes(n, seed=8)
    s = unique_scores(n, seed=8)
    i = torch.randint(0, 1000, (n,), generator=g)
    i[:50] = torch.iinfo(torch.int64).max
    b[:50] = torch.tensor([10.0, 10.0, 60.0, 60.0])  # identical boxes: one of them survives
    img = torch.randint(0, 3, (n,), generator=g)
    if HAS_CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    got = rf.batched_nms_multi(b.to(CUDA), s.to(CUDA), i.to(CUDA), img.to(CUDA), 3, 0.5)
    if HAS_CUDA:
        peak = torch.cuda.max_memory_allocated() - before
        assert peak < 400 * 2**20, f"{peak / 2**20:.0f} MB"
    exp = rf.batched_nms_multi(b, s, i, img, 3, 0.5)
    assert torch.equal(got[0].cpu(), exp[0]) and torch.equal(got[1].cpu(), exp[1])
    kept_sentinel = sum(int(((exp[0][r] >= 0) & (exp[0][r] < 50)).sum()) for r in range(3))
    assert kept_sentinel == len(set(img[:50].tolist()))


@requires_cuda
@pytest.mark.parametrize("limit", [0, 32 * 1024])
def test_cuda_scan_block_and_global_paths(limit):
    """Groups above 2048 boxes take the block scan; with the shared-memory budget set to 0 its
    removed bits go to global scratch (the path for > 262,144 boxes), here on small inputs."""
    old = torch.ops.retina_fast._nms_scan_shared_limit(limit)
    try:
        b = clustered_boxes(9000, seed=9, objects=400)
        s = unique_scores(9000, seed=9)
        i = torch.randint(0, 2, (9000,), generator=torch.Generator().manual_seed(9))  # 2 groups > 2048
        img = torch.zeros(9000, dtype=torch.long)
        img[::3] = 1
        assert torch.equal(rf.nms(b.to(CUDA), s.to(CUDA), 0.5).cpu(), rf.nms(b, s, 0.5))
        got = rf.batched_nms_multi(b.to(CUDA), s.to(CUDA), i.to(CUDA), img.to(CUDA), 2, 0.5)
        exp = rf.batched_nms_multi(b, s, i, img, 2, 0.5)
        assert torch.equal(got[0].cpu(), exp[0]) and torch.equal(got[1].cpu(), exp[1])
        logits, reg, anchors, sizes = _head_case(2, [3000, 900], 3, seed=9, trained_like=False)
        got = rf.postprocess_detections(logits.to(CUDA), reg.to(CUDA), anchors.to(CUDA), sizes, [3000, 900],
                                        topk_candidates=1500)
        exp = rf.postprocess_detections(logits, reg, anchors, sizes, [3000, 900], topk_candidates=1500)
        assert_dets_match(got, exp)
    finally:
        torch.ops.retina_fast._nms_scan_shared_limit(old)
    assert torch.ops.retina_fast._nms_scan_shared_limit(-1) == old


@requires_gpu
def test_cuda_scan_past_262144_boxes():
    """One segment of 270,000 boxes: the real global-memory scan (4,219 words of removed bits)."""
    n = 270_000
    b = clustered_boxes(n, seed=10, objects=300)
    s = unique_scores(n, seed=10)
    assert torch.equal(rf.nms(b.cuda(), s.cuda(), 0.5).cpu(), rf.nms(b, s, 0.5))


# ------------------------------------------------------------------------------ post-processing


def _iou(a, b):
    return torchvision.ops.box_iou(a.double().reshape(-1, 4), b.double().reshape(-1, 4))


def assert_dets_match(ours, theirs, thr=0.5, frac=0.01, score_ulps=4):
    """Detections equal up to rounding: same count per image and, for each detection, one of the
    same label with a score within `score_ulps` ulps and a box within a few ulps of it. Up to
    `frac` of an image's detections (+1 when frac > 0) may be unmatched on either side if each
    overlaps a same-label detection of the other side with IoU >= thr - 0.01: an NMS decision
    flipped by an IoU at the threshold, or one that follows from it."""
    assert len(ours) == len(theirs)
    for o, t in zip(ours, theirs):
        o = {k: v.detach().cpu() for k, v in o.items()}
        t = {k: v.detach().cpu() for k, v in t.items()}
        n_o, n_t = len(o["scores"]), len(t["scores"])
        dtype = t["scores"].dtype
        eps = torch.finfo(dtype).eps
        if n_o == 0 and n_t == 0:
            continue
        so, st = o["scores"].double(), t["scores"].double()
        same_label = o["labels"][:, None] == t["labels"][None, :]
        close_score = (so[:, None] - st[None, :]).abs() <= score_ulps * eps * st.abs().clamp_min(1e-30)[None, :]
        bscale = t["boxes"].double().abs().amax(-1)[None, :] + 1
        close_box = ((o["boxes"].double()[:, None] - t["boxes"].double()[None, :]).abs().amax(-1)
                     <= 4 * torch.finfo(t["boxes"].dtype).eps * bscale)
        cand = same_label & close_score & close_box
        used = torch.zeros(n_t, dtype=torch.bool)
        unmatched_o = []
        for r in range(n_o):
            cols = torch.nonzero(cand[r] & ~used).flatten()
            if len(cols):
                used[cols[0]] = True
            else:
                unmatched_o.append(r)
        unmatched_t = torch.nonzero(~used).flatten().tolist()
        allowed = int(frac * max(n_o, n_t)) + 1 if frac > 0 else 0
        assert len(unmatched_o) <= allowed and len(unmatched_t) <= allowed, (n_o, n_t, unmatched_o, unmatched_t)
        for rows, mine, other in ((unmatched_o, o, t), (unmatched_t, t, o)):
            for r in rows:
                lab = mine["labels"][r]
                peers = other["boxes"][other["labels"] == lab]
                assert len(peers) and _iou(mine["boxes"][r], peers).max() >= thr - 0.01, "an unexplained detection"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_image_anchors", [False, True])
def test_cuda_postprocess_dtypes_match_cpu(dtype, per_image_anchors):
    levels = [2000, 500, 120]
    logits, reg, anchors, sizes = _head_case(3, levels, 20, seed=11, dtype=dtype)
    anchors = anchors.to(dtype)
    if per_image_anchors:
        anchors = torch.stack([anchors + 3 * b for b in range(3)])
    got = rf.postprocess_detections(logits.to(CUDA), reg.to(CUDA), anchors.to(CUDA), sizes, levels)
    exp = rf.postprocess_detections(logits, reg, anchors, sizes, levels)
    assert sum(len(d["scores"]) for d in exp) > 30
    assert_dets_match(got, exp)


@requires_cuda
def test_cuda_postprocess_float64_topk_ranks_in_float64():
    """Logits above ~17 are all 1.0f in float32: CUDA ranked them by index. In float64 the
    top-k must pick the truly largest scores."""
    K, A = 2, 400
    logits = torch.full((1, A, K), -10.0, dtype=torch.float64)
    logits[0, :, 0] = torch.linspace(17.0, 30.0, A, dtype=torch.float64)  # distinct in float64
    reg = torch.zeros(1, A, 4, dtype=torch.float64)
    c = torch.arange(A, dtype=torch.float64)[:, None] * 50
    anchors = torch.cat([c, c, c + 20, c + 20], 1)  # disjoint: NMS keeps all
    kw = dict(topk_candidates=10, detections_per_img=10)
    for dev in ("cpu", CUDA):
        out = rf.postprocess_detections(logits.to(dev), reg.to(dev), anchors.to(dev), [(40, 20000)], [A], **kw)[0]
        kept_anchor = (out["boxes"][:, 0] / 50).round().long().cpu()
        assert kept_anchor.tolist() == list(range(A - 1, A - 11, -1)), dev


@pytest.mark.parametrize("device", ["cpu", cuda_param()])
def test_postprocess_negative_threshold_keeps_minus_inf_logits(device):
    """score_thresh < 0: sigmoid(-inf) = 0 passes, as in torchvision (the CPU dropped it)."""
    levels = [50, 20]
    A, K = sum(levels), 3
    logits = torch.full((2, A, K), -INF)
    logits[0, 3, 1] = 2.0
    logits[1, 60, 2] = NAN  # never a candidate
    reg = torch.zeros(2, A, 4)
    c = torch.arange(A, dtype=torch.float32)[:, None] * 30
    anchors = torch.cat([c, torch.zeros_like(c), c + 20, torch.full_like(c, 20)], 1)  # disjoint
    sizes = [(100, 3000)] * 2
    kw = dict(score_thresh=-0.1, detections_per_img=500)
    out = rf.postprocess_detections(logits.to(device), reg.to(device), anchors.to(device), sizes, levels, **kw)
    exp = ref.postprocess_detections(logits, reg, anchors, sizes, levels, **kw)
    assert_dets_match(out, exp, frac=0.0)
    assert [len(d["scores"]) for d in out] == [A * K, A * K - 1]  # nothing overlaps: every non-NaN logit
    assert (out[0]["scores"] == 0).sum().item() == A * K - 1
    tv = _torchvision_postprocess(logits, reg, anchors, sizes, levels, **kw)
    assert [len(d["scores"]) for d in tv] == [len(d["scores"]) for d in out]


def _torchvision_postprocess(logits, reg, anchors, sizes, levels, **kw):
    from torchvision.models.detection import retinanet_resnet50_fpn

    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None).eval()
    for k, v in kw.items():  # score_thresh, nms_thresh, topk_candidates, detections_per_img
        setattr(model, k, v)
    head = {"cls_logits": list(logits.split(levels, 1)), "bbox_regression": list(reg.split(levels, 1))}
    anc = anchors if anchors.dim() == 3 else anchors.expand(logits.shape[0], -1, -1)
    with torch.no_grad():
        return model.postprocess_detections(head, [list(a.split(levels)) for a in anc], sizes)


@requires_cuda
def test_cuda_postprocess_edge_parameters():
    levels = [600, 0, 150]  # an empty level
    logits, reg, anchors, sizes = _head_case(2, levels, 5, seed=13, trained_like=False)
    logits[0, :40] = NAN
    logits[0, 40:80] = INF
    logits[1, 100:140] = -INF
    for kw in [dict(), dict(score_thresh=-0.5), dict(score_thresh=1.0), dict(score_thresh=1.5),
               dict(topk_candidates=0), dict(detections_per_img=0), dict(topk_candidates=7),
               dict(nms_thresh=-1.0), dict(nms_thresh=1.0)]:
        got = rf.postprocess_detections(logits.to(CUDA), reg.to(CUDA), anchors.to(CUDA), sizes, levels, **kw)
        exp = rf.postprocess_detections(logits, reg, anchors, sizes, levels, **kw)
        assert_dets_match(got, exp)
        padded = rf.postprocess_detections_padded(logits.to(CUDA), reg.to(CUDA), anchors.to(CUDA), sizes, levels, **kw)
        D = kw.get("detections_per_img", 300)
        assert padded[0].shape == (2, D, 4) and padded[3].shape == (2,)


@requires_cuda
def test_cuda_postprocess_more_than_65535_images():
    # Every grid of the post-processing is 1-D (grid-stride, or one block per image along x).
    # On the CPU emulator 65,537 images are 16.8M emulated threads in the last kernel alone:
    # 301 images run the same code there.
    B, levels = (301 if EMULATED_CUDA else 65_537), [4, 1]
    logits = torch.full((B, 5, 2), -5.0)
    logits[:, 0, 1] = 3.0
    logits[:, 1, 0] = 2.0
    logits[B - 1, 4, 0] = 4.0
    reg = torch.zeros(B, 5, 4)
    anchors = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [40, 40, 50, 50], [60, 60, 70, 70], [0, 0, 100, 100]])
    sizes = torch.full((B, 2), 100)
    got = rf.postprocess_detections_padded(logits.to(CUDA), reg.to(CUDA), anchors.to(CUDA), sizes.to(CUDA), levels)
    exp = rf.postprocess_detections_padded(logits, reg, anchors, sizes, levels)
    for j, (a, e) in enumerate(zip(got, exp)):
        if j == 1:  # scores: torch's sigmoid differs between devices by an ulp at most
            torch.testing.assert_close(a.cpu(), e, rtol=2.5e-7, atol=0)
        else:
            assert torch.equal(a.cpu(), e)
    assert exp[3][0].item() == 2 and exp[3][B - 1].item() == 3


@requires_cuda
@pytest.mark.parametrize("B", [1, 8])
def test_cuda_postprocess_matches_cpu_and_torchvision(B):
    """Against our CPU kernel (same detections up to rounding) and against torchvision's CUDA
    post-processing, whose batched_nms shifts boxes by class (the coordinate trick, up to
    20,000 boxes): IoUs at the threshold can flip there, so only up to such flips."""
    levels = [9000, 2250, 576]
    logits, reg, anchors, sizes = _head_case(B, levels, 91, seed=B)
    got = rf.postprocess_detections(logits.to(CUDA), reg.to(CUDA), anchors.to(CUDA), sizes, levels)
    cpu = rf.postprocess_detections(logits, reg, anchors, sizes, levels)
    assert sum(len(d["scores"]) for d in cpu) > 50 * B
    assert_dets_match(got, cpu)
    tv = _torchvision_postprocess(logits.to(CUDA), reg.to(CUDA), anchors.to(CUDA), sizes, levels)
    assert_dets_match(got, tv, frac=0.02)


# ------------------------------------------------------------------------------ streams and devices


def _every_op(dev):
    """One call of every op on `dev`, returning CPU copies of the results."""
    g = torch.Generator().manual_seed(14)
    x = torch.randn(300, 9, generator=g).to(dev).requires_grad_()
    t = (torch.rand(300, 9, generator=g) < 0.2).float().to(dev)
    lab = torch.randint(-2, 9, (300,), generator=g).to(dev)
    out = []
    loss = rf.sigmoid_focal_loss(x, t, reduction="sum") + rf.sigmoid_focal_loss_labels(x, lab)
    out += [loss.detach(), torch.autograd.grad(loss, x)[0]]
    anchors = retinanet_anchors(256, 256).to(dev)
    gt = random_gts(2, 9, size=256, gen=g).to(dev)
    counts = torch.tensor([9, 4], device=dev)
    mt = rf.matched_targets(anchors, gt, torch.randint(0, 5, (2, 9), generator=g).to(dev), counts)
    out += [rf.box_iou(gt[0], anchors), mt.labels, mt.regression_targets, mt.matches]
    codes = torch.randn(2, anchors.shape[0], 4, generator=g).to(dev).requires_grad_()
    dec = rf.decode_boxes(codes, anchors)
    out += [dec.detach(), torch.autograd.grad(dec.sum(), codes)[0], rf.encode_boxes(gt, gt.flip(1))]
    cells = [ref.cell_anchors((32,), (0.5, 1.0), device=dev)]
    out += [rf.grid_anchors(cells, [(5, 6)], [(8, 8)])]
    b = clustered_boxes(800, seed=14).to(dev)
    s = unique_scores(800, seed=14).to(dev)
    i = torch.randint(0, 5, (800,), generator=g).to(dev)
    img = torch.randint(0, 2, (800,), generator=g).to(dev)
    out += [rf.nms(b, s, 0.5), rf.batched_nms(b, s, i, 0.5), *rf.batched_nms_multi(b, s, i, img, 2, 0.5)]
    logits, reg, anc, sizes = _head_case(2, [300, 80], 4, seed=14)
    out += list(rf.postprocess_detections_padded(logits.to(dev), reg.to(dev), anc.to(dev), sizes, [300, 80]))
    return [o.detach().cpu() for o in out]


@requires_gpu
def test_cuda_every_op_on_a_side_stream():
    """Every kernel launches on the current stream: on a side stream the results are the same."""
    expected = _every_op("cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        got = _every_op("cuda")
    side.synchronize()
    for a, e in zip(got, expected):
        assert torch.equal(a, e)


@requires_gpu
def test_cuda_every_op_on_an_explicit_device_and_a_second_stream():
    """The device guards and streams on the one GPU that is lent (no second device to guard
    against): every op on "cuda:0" (an explicit index, as a user of several GPUs passes it)
    inside torch.cuda.device(0), on a second stream created for device 0, gives what every op
    on "cuda" on the default stream gives (the two-GPU form of this test could not run on the
    lent machine)."""
    expected = _every_op("cuda")
    torch.cuda.synchronize(0)
    second = torch.cuda.Stream(device=0)
    with torch.cuda.device(0), torch.cuda.stream(second):
        got = _every_op("cuda:0")
        assert torch.cuda.current_stream(0) == second
    second.synchronize()
    assert torch.cuda.current_stream(0) == torch.cuda.default_stream(0)
    for a, e in zip(got, expected):
        assert a.device.type == "cpu" and torch.equal(a, e)


@requires_gpu
def test_cuda_padded_postprocess_has_no_host_sync():
    """The README's "no host sync" claim for the padded post-processing, checked by torch."""
    levels = [2000, 500]
    logits, reg, anchors, sizes = _head_case(2, levels, 20, seed=15)
    args = (logits.cuda(), reg.cuda(), anchors.cuda(), torch.tensor(sizes).cuda(), levels)
    rf.postprocess_detections_padded(*args)  # warm-up: allocations, lazy init
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rf.postprocess_detections_padded(*args)
        for dtype in (torch.float64, torch.float16):
            rf.postprocess_detections_padded(args[0].to(dtype), args[1].to(dtype), *args[2:])
    finally:
        torch.cuda.set_sync_debug_mode("default")
