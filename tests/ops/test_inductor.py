"""torch.compile with the default (inductor) backend on the CPU, fullgraph, for every op
(matched_box_loss included): the fake kernels, autograd registrations and schemas must hold up
in a real compiled graph, where the other compile tests only use the eager/aot_eager backends.
Each compiled function mixes our ops with ordinary aten ops (which inductor fuses into
generated C++) and is compared with eager. The eval model under inductor:
tests/models/test_compile_inductor.py."""

import pytest
import torch

import retina_fast.ops as rf

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _boxes(n, g, size=400.0):
    c = torch.rand(n, 2, generator=g) * size
    wh = torch.exp(torch.randn(n, 2, generator=g) * 0.5 + 3.0)
    return torch.cat([c - wh / 2, c + wh / 2], 1)


def _compiled(f):
    return torch.compile(f, fullgraph=True)  # backend="inductor", the default


def test_inductor_focal_losses_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 9, generator=g) * 3
    t = torch.rand(64, 9, generator=g)
    lab = torch.randint(-2, 9, (64,), generator=g)
    w = torch.rand(64, generator=g)

    def f(x, t, lab, w):
        dense = rf.sigmoid_focal_loss(x * 1.5, t, alpha=0.3, gamma=1.5, reduction="none").sum(1)
        labels = rf.sigmoid_focal_loss_labels(x, lab, reduction="sum", weights=w, label_smoothing=0.1)
        return dense.mean() + labels / 4.0

    cf = _compiled(f)
    xc, tc = x.clone().requires_grad_(), t.clone().requires_grad_()
    xe, te = x.clone().requires_grad_(), t.clone().requires_grad_()
    got, want = cf(xc, tc, lab, w), f(xe, te, lab, w)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    gc, ge = torch.autograd.grad(got, (xc, tc)), torch.autograd.grad(want, (xe, te))
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_inductor_box_ops_and_decode_backward():
    g = torch.Generator().manual_seed(1)
    anchors = _boxes(500, g)
    gt = torch.stack([_boxes(6, g), _boxes(6, g)])
    labels = torch.randint(0, 5, (2, 6), generator=g)
    counts = torch.tensor([6, 2])
    codes = torch.randn(2, 500, 4, generator=g) * 0.2
    cells = [torch.tensor([[-8.0, -8.0, 8.0, 8.0], [-16.0, -8.0, 16.0, 8.0]]), torch.tensor([[-32.0, -32.0, 32.0, 32.0]])]

    def f(anchors, gt, labels, counts, codes):
        iou = rf.box_iou(gt[0] + 0.5, anchors)
        m = rf.match_anchors(anchors, gt, counts, check_counts=False)
        t = rf.matched_targets(anchors, gt, labels, counts, check_counts=False)
        enc = rf.encode_boxes(gt[0], anchors[:6])
        dec = rf.decode_boxes(codes * 2.0, anchors)
        grid = rf.grid_anchors(cells, [[5, 7], [3, 4]], [[8, 8], [16, 16]])
        return iou.amax(0), m, t.labels, t.regression_targets, enc, dec.relu().sum(), grid

    cf = _compiled(f)
    cc, ce = codes.clone().requires_grad_(), codes.clone().requires_grad_()
    got, want = cf(anchors, gt, labels, counts, cc), f(anchors, gt, labels, counts, ce)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    (ga,), (gb,) = torch.autograd.grad(got[5], cc), torch.autograd.grad(want[5], ce)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-6)


def test_inductor_nms_ops():
    g = torch.Generator().manual_seed(2)
    b = _boxes(800, g)
    s = torch.rand(800, generator=g)
    idx = torch.randint(0, 6, (800,), generator=g)
    img = torch.randint(0, 3, (800,), generator=g)

    def f(b, s, idx, img):
        keep = rf.nms(b, s * 2.0, 0.5)
        bkeep = rf.batched_nms(b + 1.0, s, idx, 0.5)
        mkeep, counts = rf.batched_nms_multi(b, s, idx, img, 3, 0.5, 50)
        return keep, bkeep, mkeep, counts

    cf = _compiled(f)
    for a, e in zip(cf(b, s, idx, img), f(b, s, idx, img)):
        assert torch.equal(a, e)


def test_inductor_postprocess_padded():
    g = torch.Generator().manual_seed(3)
    levels = [400, 100]
    logits = torch.randn(2, 500, 7, generator=g) * 2 - 2
    reg = torch.randn(2, 500, 4, generator=g) * 0.2
    anchors = _boxes(500, g)
    sizes = torch.tensor([[400, 380], [300, 400]])

    def f(logits, reg, anchors, sizes):
        return rf.postprocess_detections_padded(logits * 1.0, reg, anchors, sizes, levels, 0.05, 100, 0.5, 40)

    cf = _compiled(f)
    got, want = cf(logits, reg, anchors, sizes), f(logits, reg, anchors, sizes)
    assert int(want[3].sum()) > 0
    for a, e in zip(got, want):
        assert torch.equal(a, e)


def test_inductor_matched_box_loss_forward_and_backward():
    """matched_box_loss (gathered L1 / smooth L1 / GIoU) inside an inductor graph: the box
    loss's matches come from match_anchors in the same graph, the codes are scaled by an aten op
    inductor fuses; forward and gradient equal eager's."""
    g = torch.Generator().manual_seed(4)
    anchors = _boxes(600, g)
    gt = torch.stack([_boxes(5, g), _boxes(5, g)])
    counts = torch.tensor([5, 3])
    codes = torch.randn(2, 600, 4, generator=g) * 0.2
    w = torch.rand(2, generator=g) + 0.5

    def f(codes, anchors, gt, counts, w):
        m = rf.match_anchors(anchors, gt, counts, check_counts=False)
        return [rf.matched_box_loss(codes * 1.5, anchors, m, gt, w, loss) for loss in ("l1", "smooth_l1", "giou")]

    cf = _compiled(f)
    cc, ce = codes.clone().requires_grad_(), codes.clone().requires_grad_()
    got, want = cf(cc, anchors, gt, counts, w), f(ce, anchors, gt, counts, w)
    assert all(float(v) > 0 for v in want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    (ga,), (gb,) = torch.autograd.grad(sum(got), cc), torch.autograd.grad(sum(want), ce)
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-7)
