"""More than 2^31 elements on the CPU, each checked against the same op run on chunks that stay
below 2^31: a wrapped 32-bit index would read or write the wrong element (or crash).

The focal-loss and post-processing tests are marked ``bigmem`` (deselected unless ``pytest
--run-bigmem``): the first holds ~9 GB at its peak, the second ~5 GB; each skips when the
machine has less available. The NMS one (more than 2^31 candidate pairs, little memory) runs
by default. match_anchors past 2^31 (B A > 2^31, ~19 GB: its int64 output alone is 17 GB) is
marked bigmem too; the matching of more pairs than one group of its scratch holds (the kernel
matches images in groups of at most 2^24 / A) runs by default."""

import math

import pytest
import torch

import retina_fast.ops as rf

TWO31 = 2 ** 31


def _available_gb():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
    return 0.0


def _need(gb):
    if _available_gb() < gb:
        pytest.skip(f"needs ~{gb} GB of available memory, {_available_gb():.1f} GB available")


@pytest.mark.bigmem
def test_labels_focal_loss_past_2_31_elements():
    """sigmoid_focal_loss_labels on float16 logits [N, K], N K > 2^31 (4.3 GB): 'none', 'sum' and
    the gradient against chunks of rows (each < 2^31 elements) computed by the same op."""
    _need(10.0)
    K = 80
    N = TWO31 // K + 3001  # the last 3001 rows lie past element 2^31
    x = torch.empty(N, K, dtype=torch.float16)
    lab = torch.empty(N, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    rows = 1 << 22
    chunks = [(s, min(N, s + rows)) for s in range(0, N, rows)]
    for s, e in chunks:  # a distinct value in every element: a wrapped index reads another one
        x[s:e] = (torch.randn(e - s, K, generator=g) * 3).half()
        lab[s:e] = torch.randint(-2, K, (e - s,), generator=g)
    assert x.numel() > TWO31

    out = rf.sigmoid_focal_loss_labels(x, lab, reduction="none")
    for s, e in chunks:
        assert torch.equal(out[s:e], rf.sigmoid_focal_loss_labels(x[s:e], lab[s:e], reduction="none")), (s, e)
    del out

    total = rf.sigmoid_focal_loss_labels(x, lab, reduction="sum")
    parts = math.fsum(rf.sigmoid_focal_loss_labels(x[s:e], lab[s:e], reduction="sum").item() for s, e in chunks)
    assert total.dtype == torch.float32 and math.isclose(total.item(), parts, rel_tol=1e-5), (total.item(), parts)

    xg = x.requires_grad_()
    (grad,) = torch.autograd.grad(rf.sigmoid_focal_loss_labels(xg, lab, reduction="sum"), xg)
    x = x.detach()
    for s, e in chunks:
        xs = x[s:e].clone().requires_grad_()
        (gs,) = torch.autograd.grad(rf.sigmoid_focal_loss_labels(xs, lab[s:e], reduction="sum"), xs)
        assert torch.equal(grad[s:e], gs), (s, e)


@pytest.mark.bigmem
def test_postprocess_flat_indices_past_2_31():
    """One image, one level, A K > 2^31 float16 logits: the detections whose flat index
    anchor * K + label lies past 2^31 come back with their own anchor, label and score, as when
    the post-processing runs on a slice of anchors around them."""
    _need(7.0)
    K = 80
    A = TWO31 // K + 5000
    logits = torch.full((1, A, K), -20.0, dtype=torch.float16)  # sigmoid ~2e-9: below 0.05
    hits = [(A - 1, 79), (A - 7, 3), (TWO31 // K + 1, 41), (TWO31 // K - 2, 0), (5, 7)]
    for i, (a, k) in enumerate(hits):
        logits[0, a, k] = 2.0 + 0.25 * i
    reg = torch.zeros(1, A, 4, dtype=torch.float16)
    c = (torch.arange(A, dtype=torch.float32) % 1000)[:, None] * 40  # disjoint neighbours
    anchors = torch.cat([c, c, c + 20, c + 20], 1)
    del c
    out = rf.postprocess_detections(logits, reg, anchors, [(50000, 50000)], [A])[0]
    got = sorted(zip(out["labels"].tolist(), out["scores"].float().tolist(), out["boxes"].float().tolist()))
    exp = []
    for a, k in hits:
        s, e = max(0, a - 1), min(A, a + 2)  # windows of 3 anchors: the hits are >= 3 apart
        d = rf.postprocess_detections(logits[:, s:e], reg[:, s:e], anchors[s:e], [(50000, 50000)], [e - s])[0]
        exp += zip(d["labels"].tolist(), d["scores"].float().tolist(), d["boxes"].float().tolist())
    assert got == sorted(exp) and len(got) == len(hits), (got, sorted(exp))


def test_nms_pairs_past_2_31():
    """N = 70 000 boxes (N^2 / 2 > 2^31 candidate pairs): every box has an exact duplicate with a
    lower score, and the pairs are disjoint, so exactly the higher-scored copy of each survives;
    batched_nms_multi over 2 images of the same boxes gives each image the same answer."""
    n = 35_000
    xy = torch.stack([(torch.arange(n) % 200) * 30.0, (torch.arange(n) // 200) * 30.0], 1)
    base = torch.cat([xy, xy + 20], 1)
    boxes = torch.cat([base, base])  # i and i + n are the same box
    perm = torch.randperm(2 * n, generator=torch.Generator().manual_seed(0))
    scores = torch.empty(2 * n)
    scores[perm] = torch.linspace(0, 1, 2 * n)
    assert (2 * n) ** 2 // 2 > TWO31
    keep = rf.nms(boxes, scores, 0.5)
    winner = torch.where(scores[:n] > scores[n:], torch.arange(n), torch.arange(n) + n)
    assert torch.equal(torch.sort(keep).values, torch.sort(winner).values)
    assert bool((scores[keep][:-1] >= scores[keep][1:]).all())
    kb, counts = rf.batched_nms_multi(torch.cat([boxes, boxes]), torch.cat([scores, scores]),
                                      torch.zeros(4 * n, dtype=torch.long),
                                      torch.cat([torch.zeros(2 * n), torch.ones(2 * n)]).long(), 2, 0.5)
    assert counts.tolist() == [n, n]
    assert torch.equal(kb[0], keep) and torch.equal(kb[1], keep + 2 * n)


def _grid_anchors(A):
    """A disjoint 16 px boxes on a 20 px grid, 2048 a row: every anchor overlaps no other."""
    i = torch.arange(A)
    xy = torch.stack([(i % 2048) * 20.0, (i // 2048) * 20.0], 1)
    return torch.cat([xy, xy + 16], 1)


def _one_gt_per_image(anchors, B, seed):
    """Image b's single gt is anchor p_b itself (IoU 1 there, 0 elsewhere): labels are -1 but a 0
    at p_b, a different place in every image, so a wrapped or mixed-up index shows."""
    A = anchors.shape[0]
    p = (torch.arange(B) * 2053 + seed) % A
    return anchors[p][:, None, :].clone(), torch.ones(B, dtype=torch.long), p


def _check_rows(out, p, s, e):
    exp = torch.full((e - s, out.shape[1]), -1, dtype=torch.long)
    exp[torch.arange(e - s), p[s:e]] = 0
    assert torch.equal(out[s:e], exp), (s, e)


def test_match_anchors_over_several_scratch_groups():
    """B A = 20.5M pairs: more than one group (2^24 pairs) of the kernel's scratch. Every row is
    its own image's answer, and equal to matching the images a few at a time (one group)."""
    A, B = 205_000, 100
    assert B * A > 2 ** 24
    anchors = _grid_anchors(A)
    gts, counts, p = _one_gt_per_image(anchors, B, 11)
    out = rf.match_anchors(anchors, gts, counts)
    for s in range(0, B, 10):
        e = min(B, s + 10)
        _check_rows(out, p, s, e)
        assert torch.equal(out[s:e], rf.match_anchors(anchors, gts[s:e], counts[s:e]))
    # crowd regions and the zero-IoU quirk across group boundaries: a crowd gt covering the
    # first anchors of every image, and one image whose gt overlaps no anchor
    crowd_box = torch.tensor([0.0, 0.0, 100.0, 16.0]).expand(B, 1, 4)
    gts2 = torch.cat([gts, crowd_box], 1)
    gts2[57, 0] = torch.tensor([-50.0, -50.0, -40.0, -40.0])
    crowd = torch.tensor([False, True]).expand(B, 2).contiguous()
    out2 = rf.match_anchors(anchors, gts2, torch.full((B,), 2), gt_crowd=crowd)
    for s in range(0, B, 10):
        e = min(B, s + 10)
        assert torch.equal(out2[s:e], rf.match_anchors(anchors, gts2[s:e], torch.full((e - s,), 2),
                                                       gt_crowd=crowd[s:e])), (s, e)
    assert (out2[57] == 0).all()                        # torchvision's quirk: every anchor fg
    assert p[3] >= 6 and (out2[3, :5] == -2).all() and out2[3, 5] == -1  # inside the crowd box, then not


@pytest.mark.bigmem
def test_match_anchors_past_2_31_pairs():
    """B A > 2^31 (1024 images x 2,097,159 anchors): the int64 labels past element 2^31 are each
    image's own, and equal to matching 64 images at a time."""
    _need(20.0)
    A, B = 2 ** 21 + 7, 1024
    assert B * A > TWO31
    anchors = _grid_anchors(A)
    gts, counts, p = _one_gt_per_image(anchors, B, 5)
    out = rf.match_anchors(anchors, gts, counts)
    assert out.shape == (B, A) and out.dtype == torch.long
    for s in range(0, B, 64):
        e = min(B, s + 64)
        _check_rows(out, p, s, e)
        assert torch.equal(out[s:e], rf.match_anchors(anchors, gts[s:e], counts[s:e])), (s, e)
