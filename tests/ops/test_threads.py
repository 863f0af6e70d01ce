"""Every CPU kernel gives the same bits whatever the thread count, and the multithreaded run
really ran on more than one thread (tests/thread_probe.py: CPU time per thread from /proc).

Covered: the dense focal loss (reduced forward, backward, the backward with target gradients),
the labels form (reduced forward and backward), box_iou, match_anchors + gathered targets,
nms, batched_nms, batched_nms_multi and the fused post-processing (results only: its internals
are another kernel's business).
"""

import time

import pytest
import torch

import retina_fast.ops as rf
from tests.thread_probe import busy_threads

THREADS = 2  # at least two, whatever the machine has: the point is that the work is split


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _boxes(n, g, size=800.0):
    c = torch.rand(n, 2, generator=g) * size
    wh = torch.exp(torch.randn(n, 2, generator=g) * 0.6 + 3.5)
    return torch.cat([c - wh / 2, c + wh / 2], 1)


def _dense():
    g = _gen(1)
    x = torch.randn(2000, 1000, generator=g) * 3
    t = (torch.rand(2000, 1000, generator=g) < 0.01).float()
    return x, t


def case_dense_forward():
    x, t = _dense()
    return lambda: [rf.sigmoid_focal_loss(x, t, reduction="sum"), rf.sigmoid_focal_loss(x, t, reduction="mean")]


def case_dense_backward():
    x, t = _dense()
    up = torch.rand(x.shape, generator=_gen(2))

    def run():
        xx = x.clone().requires_grad_()
        (g1,) = torch.autograd.grad(rf.sigmoid_focal_loss(xx, t, reduction="sum"), xx)
        (g2,) = torch.autograd.grad((rf.sigmoid_focal_loss(xx, t) * up).sum(), xx)
        return [g1, g2]

    return run


def case_dense_backward_with_targets():
    x, t = _dense()
    soft = t * 0.8 + 0.1

    def run():
        xx, tt = x.clone().requires_grad_(), soft.clone().requires_grad_()
        return list(torch.autograd.grad(rf.sigmoid_focal_loss(xx, tt, reduction="mean"), (xx, tt)))

    return run


def case_labels_forward_backward():
    g = _gen(3)
    x = torch.randn(100_000, 20, generator=g) * 2 - 3
    lab = torch.randint(-2, 20, (100_000,), generator=g)
    w = torch.rand(100_000, generator=g)

    def run():
        xx = x.clone().requires_grad_()
        s = rf.sigmoid_focal_loss_labels(xx, lab, reduction="sum", weights=w, label_smoothing=0.1)
        (gr,) = torch.autograd.grad(s, xx)
        return [s, gr, rf.sigmoid_focal_loss_labels(x, lab, reduction="mean")]

    return run


def case_box_iou():
    g = _gen(4)
    a, b = _boxes(300, g), _boxes(20_000, g)
    return lambda: [rf.box_iou(a, b)]


def case_matching():
    g = _gen(5)
    anchors = _boxes(40_000, g)
    gt = torch.stack([_boxes(30, g) for _ in range(4)])
    counts = torch.tensor([30, 12, 0, 30])
    labels = torch.randint(0, 80, (4, 30), generator=g)
    return lambda: list(rf.matched_targets(anchors, gt, labels, counts))


def case_nms():
    g = _gen(6)
    b = _boxes(30_000, g)
    s = torch.rand(30_000, generator=g)
    idx = torch.randint(0, 80, (30_000,), generator=g)
    img = torch.randint(0, 4, (30_000,), generator=g)
    return lambda: [rf.nms(b[:3000], s[:3000], 0.5), rf.batched_nms(b, s, idx, 0.5),
                    *rf.batched_nms_multi(b, s, idx, img, 4, 0.5, 300)]


def case_postprocess():
    g = _gen(7)
    B, levels, K = 4, [12_000, 3000, 750], 80
    A = sum(levels)
    logits = torch.randn(B, A, K, generator=g) * 1.5 - 4.0
    reg = torch.randn(B, A, 4, generator=g) * 0.2
    anchors = _boxes(A, g)
    sizes = [(800, 800)] * B
    return lambda: list(rf.postprocess_detections_padded(logits, reg, anchors, sizes, levels))


CASES = {name[5:]: f for name, f in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_bits_on_one_and_several_threads(name, threads):
    run = CASES[name]()
    torch.set_num_threads(1)
    one = run()
    torch.set_num_threads(THREADS)
    assert torch.get_num_threads() == THREADS
    several = run()
    assert len(one) == len(several)
    for a, b in zip(one, several):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), name
    # the several-thread run really used more than one thread (and the 1-thread one did not)
    assert busy_threads(run) >= 2, f"{name}: the kernels ran on one thread only"
    torch.set_num_threads(1)
    # the OpenMP workers of the run above spin-wait for a while after its last parallel region
    # (CPU time on their threads, more of it on a slow machine): let them go idle first
    time.sleep(1.0)
    assert busy_threads(run, min_cpu_s=0.15) == 1, f"{name}: work on other threads with one thread set"
