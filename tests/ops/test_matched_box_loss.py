"""matched_box_loss: RetinaNet's box loss (L1 / smooth L1 on encoded targets, GIoU on decoded
boxes) gathered and computed in one pass over the foreground anchors. Against torchvision's
per-image formula (retina_fast.ops._reference.matched_box_loss), gradcheck in float64,
opcheck, torch.compile, bad input, thread-count independence, CUDA vs CPU."""

import pytest
import torch
import torchvision

import retina_fast.ops as rf
from retina_fast.ops import _reference as ref
from tests.conftest import CUDA, requires_cuda
from tests.ops.test_boxes import random_gts, retinanet_anchors

LOSSES = [("l1", 1.0), ("smooth_l1", 1.0), ("smooth_l1", 0.05), ("smooth_l1", 0.0), ("giou", 1.0)]


def case(seed=0, dtype=torch.float32, size=256, B=3, M=12, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    box_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    anchors = retinanet_anchors(size, size).to(box_dtype)
    gt = random_gts(B, M, size=size, gen=g).to(box_dtype)
    counts = torch.tensor([M, min(5, M), 0][:B] + [M] * max(0, B - 3))
    matches = rf.match_anchors(anchors, gt, counts)
    codes = (torch.randn(B, anchors.shape[0], 4, generator=g, dtype=torch.float64) * scale).to(dtype)
    w = torch.rand(B, generator=g, dtype=torch.float64) + 0.5
    return codes, anchors, matches, gt, w


@pytest.mark.parametrize("loss,beta", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torchvision_formula(loss, beta, dtype):
    codes, anchors, matches, gt, w = case(0, dtype)
    assert (matches >= 0).sum() > 50
    x1 = codes.clone().requires_grad_()
    x2 = codes.clone().requires_grad_()
    ours = rf.matched_box_loss(x1, anchors, matches, gt, w, loss, beta=beta)
    exp = ref.matched_box_loss(x2, anchors, matches, gt, w, loss, beta=beta)
    assert ours.dtype == dtype and ours.shape == ()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ours, exp.to(dtype), rtol=tol, atol=0)
    (g1,) = torch.autograd.grad(ours * 1.5, x1)
    (g2,) = torch.autograd.grad(exp * 1.5, x2)
    assert g1.dtype == dtype
    torch.testing.assert_close(g1, g2, rtol=tol, atol=tol * g2.abs().max().item())
    assert (g1[matches < 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_codes_computed_in_float32(dtype):
    codes, anchors, matches, gt, w = case(1, dtype)
    for loss in ("l1", "giou"):
        x = codes.clone().requires_grad_()
        ours = rf.matched_box_loss(x, anchors, matches, gt, w, loss)
        assert ours.dtype == torch.float32
        exp = ref.matched_box_loss(codes.float(), anchors, matches, gt, w, loss)  # the codes' values, in float32
        torch.testing.assert_close(ours, exp, rtol=1e-5, atol=0)
        (g,) = torch.autograd.grad(ours, x)
        assert g.dtype == dtype


@pytest.mark.parametrize("loss,beta", LOSSES)
def test_gradcheck_float64(loss, beta):
    codes, anchors, matches, gt, w = case(2, torch.float64, size=128, B=2, M=4)
    fg = matches >= 0
    assert fg.sum() > 5
    # keep the few foreground anchors, and a handful of background ones
    keep = torch.where(fg.any(0))[0][:24]
    keep = torch.cat([keep, torch.where(~fg.any(0))[0][:4]])
    x = codes[:, keep].clone().requires_grad_()
    m = matches[:, keep]
    a = anchors[keep].double()
    assert torch.autograd.gradcheck(lambda xx: rf.matched_box_loss(xx, a, m, gt.double(), w, loss, beta=beta), (x,))


def test_giou_ties_split_the_gradient_as_torch():
    """A predicted box that shares coordinates with its gt: torch.maximum/minimum give half the
    gradient to each side at a tie; the kernel's hand-written backward does the same."""
    anchors = torch.tensor([[10.0, 10.0, 50.0, 40.0], [0.0, 0.0, 30.0, 30.0]], dtype=torch.float64)
    gt = torch.tensor([[[10.0, 10.0, 50.0, 40.0], [5.0, 0.0, 30.0, 20.0]]], dtype=torch.float64)
    matches = torch.tensor([[0, 1]])
    codes = torch.zeros(1, 2, 4, dtype=torch.float64, requires_grad=True)  # decoded box = the anchor
    w = torch.ones(1, dtype=torch.float64)
    ours = rf.matched_box_loss(codes, anchors, matches, gt, w, "giou")
    (g1,) = torch.autograd.grad(ours, codes)
    c2 = codes.detach().clone().requires_grad_()
    pred = torchvision.models.detection._utils.BoxCoder((1.0, 1.0, 1.0, 1.0)).decode_single(c2[0], anchors)
    exp = torchvision.ops.generalized_box_iou_loss(pred, gt[0], reduction="sum")
    (g2,) = torch.autograd.grad(exp, c2)
    torch.testing.assert_close(ours, exp)
    torch.testing.assert_close(g1, g2)


def test_background_codes_are_never_read():
    codes, anchors, matches, gt, w = case(3)
    bad = codes.clone()
    bad[matches < 0] = float("nan")
    for loss in ("l1", "smooth_l1", "giou"):
        x = bad.clone().requires_grad_()
        out = rf.matched_box_loss(x, anchors, matches, gt, w, loss)
        assert torch.equal(out, rf.matched_box_loss(codes, anchors, matches, gt, w, loss))
        (g,) = torch.autograd.grad(out, x)
        assert torch.isfinite(g).all()


def test_empty_and_no_foreground():
    codes, anchors, matches, gt, w = case(4)
    none = torch.full_like(matches, -1)
    x = codes.clone().requires_grad_()
    out = rf.matched_box_loss(x, anchors, none, gt, w)
    assert out.item() == 0.0
    (g,) = torch.autograd.grad(out, x)
    assert (g == 0).all()
    z = rf.matched_box_loss(codes[:0], anchors, matches[:0], gt[:0], w[:0])
    assert z.item() == 0.0


def test_thread_count_independent():
    codes, anchors, matches, gt, w = case(5, B=6, size=512)
    n = torch.get_num_threads()
    outs = []
    try:
        for t in (1, max(2, n)):
            torch.set_num_threads(t)
            x = codes.clone().requires_grad_()
            for loss in ("l1", "giou"):
                v = rf.matched_box_loss(x, anchors, matches, gt, w, loss)
                outs.append((t, v, torch.autograd.grad(v, x)[0]))
        assert torch.get_num_threads() > 1
    finally:
        torch.set_num_threads(n)
    for (_, v1, g1), (_, v2, g2) in zip(outs[:2], outs[2:]):
        assert torch.equal(v1, v2) and torch.equal(g1, g2)


def test_bad_inputs():
    codes, anchors, matches, gt, w = case(6)
    with pytest.raises(ValueError, match="expected loss"):
        rf.matched_box_loss(codes, anchors, matches, gt, w, "diou")
    bad = matches.clone()
    bad[0, 3] = gt.shape[1]
    with pytest.raises(RuntimeError, match=r"matches in \[0, M\)"):
        rf.matched_box_loss(codes, anchors, bad, gt, w)
    bad[0, 3] = -3
    with pytest.raises(RuntimeError, match=r"matches in \[0, M\)"):
        rf.matched_box_loss(codes, anchors, bad, gt, w)
    with pytest.raises(RuntimeError, match=r"anchors of shape \[A, 4\]"):
        rf.matched_box_loss(codes, anchors[:-1], matches, gt, w)
    with pytest.raises(RuntimeError, match=r"image_weights of shape \[B\]"):
        rf.matched_box_loss(codes, anchors, matches, gt, w[:1])
    with pytest.raises(RuntimeError, match="matches of dtype int64"):
        rf.matched_box_loss(codes, anchors, matches.int(), gt, w)
    with pytest.raises(RuntimeError, match="loss_type"):
        torch.ops.retina_fast.matched_box_loss(codes, anchors, matches, gt, w, 3, [1.0] * 4, 4.0, 1.0, 1e-7)
    with pytest.raises(NotImplementedError, match="gt_boxes"):
        rf.matched_box_loss(codes, anchors, matches, gt.clone().requires_grad_(), w).backward()


def test_opcheck():
    codes, anchors, matches, gt, w = case(7, torch.float64, size=128, B=2, M=4)
    x = codes.clone().requires_grad_()
    for loss_type in (0, 1, 2):
        args = (x, anchors, matches, gt, w, loss_type, [1.0, 1.0, 1.0, 1.0], 4.0, 0.5, 1e-7)
        torch.library.opcheck(torch.ops.retina_fast.matched_box_loss.default, args)
        torch.library.opcheck(torch.ops.retina_fast.matched_box_loss_backward.default,
                              (torch.tensor(1.5, dtype=torch.float64),) + tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))


def test_compile_fullgraph():
    codes, anchors, matches, gt, w = case(8)
    x = codes.clone().requires_grad_()

    def f(x, a, m, g, w):
        return rf.matched_box_loss(x, a, m, g, w, "giou")

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    v1 = cf(x, anchors, matches, gt, w)
    v2 = f(x, anchors, matches, gt, w)
    assert torch.equal(v1, v2)
    assert torch.equal(torch.autograd.grad(v1, x)[0], torch.autograd.grad(v2, x)[0])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_cuda_equals_cpu(dtype):
    codes, anchors, matches, gt, w = case(9, dtype, size=640, B=4, M=40)
    for loss, beta in LOSSES:
        xc = codes.clone().requires_grad_()
        xg = codes.to(CUDA).requires_grad_()
        cpu = rf.matched_box_loss(xc, anchors, matches, gt, w, loss, beta=beta)
        cuda = rf.matched_box_loss(xg, anchors.to(CUDA), matches.to(CUDA), gt.to(CUDA), w.to(CUDA), loss, beta=beta)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(cuda.cpu(), cpu, rtol=tol, atol=0)
        (gc,) = torch.autograd.grad(cpu * 2, xc)
        (gg,) = torch.autograd.grad(cuda * 2, xg)
        torch.testing.assert_close(gg.cpu(), gc, rtol=tol, atol=tol * gc.abs().max().item())
