"""Op paths no other test looked at: the padded outputs of ``postprocess_detections_padded``
past each image's count, and ``check_labels=False`` of the labels-form focal loss."""

import pytest
import torch

import retina_fast.ops as rf
from tests.conftest import cuda_param, requires_gpu
from tests.ops.test_nms import _head_case

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", ["cpu", cuda_param()])
@pytest.mark.parametrize("dtype", DTYPES)
def test_postprocess_padded_rows_hold_zero_boxes_zero_scores_label_minus_1(device, dtype):
    levels = [600, 150]
    logits, reg, anchors, sizes = _head_case(4, levels, 6, seed=21)
    logits[2] = -30.0  # image 2: no candidate at all (count 0, every row padded)
    logits, reg, anchors = logits.to(device, dtype), reg.to(device, dtype), anchors.to(device, dtype)
    D = 300
    boxes, scores, labels, counts = rf.postprocess_detections_padded(logits, reg, anchors, sizes, levels,
                                                                     detections_per_img=D)
    assert boxes.shape == (4, D, 4) and scores.shape == (4, D) and labels.shape == (4, D) and counts.shape == (4,)
    assert boxes.dtype == dtype and scores.dtype == dtype and labels.dtype == counts.dtype == torch.int64
    counts = counts.cpu()
    assert counts[2] == 0 and bool(((counts[[0, 1, 3]] > 0) & (counts[[0, 1, 3]] < D)).all()), counts
    for b in range(4):
        n = int(counts[b])
        assert torch.equal(boxes[b, n:].cpu(), torch.zeros(D - n, 4, dtype=dtype))
        assert torch.equal(scores[b, n:].cpu(), torch.zeros(D - n, dtype=dtype))
        assert torch.equal(labels[b, n:].cpu(), torch.full((D - n,), -1, dtype=torch.int64))
        # the valid rows are real detections: positive scores, labels in range, boxes in the image
        assert bool((scores[b, :n] > 0.05).all()) and bool((labels[b, :n] >= 0).all())
        assert bool((labels[b, :n] < 6).all())
    # the list form is the padded form cut at the counts
    listed = rf.postprocess_detections(logits, reg, anchors, sizes, levels, detections_per_img=D)
    for b, d in enumerate(listed):
        n = int(counts[b])
        assert torch.equal(d["boxes"], boxes[b, :n]) and torch.equal(d["scores"], scores[b, :n])
        assert torch.equal(d["labels"], labels[b, :n])


def _labels_case(device, seed=22):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(300, 7, generator=g) * 3).to(device)
    lab = torch.randint(-2, 7, (300,), generator=g).to(device)
    return x, lab


@pytest.mark.parametrize("device", ["cpu", cuda_param()])
def test_check_labels_false_gives_the_same_loss_for_valid_labels(device):
    x, lab = _labels_case(device)
    for red in ("none", "sum", "mean"):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        a = rf.sigmoid_focal_loss_labels(xa, lab, reduction=red)
        b = rf.sigmoid_focal_loss_labels(xb, lab, reduction=red, check_labels=False)
        assert torch.equal(a, b)
        (ga,), (gb,) = torch.autograd.grad(a.sum(), xa), torch.autograd.grad(b.sum(), xb)
        assert torch.equal(ga, gb)


def test_check_labels_false_on_cpu_still_validates():
    # the CPU kernel checks the labels in its own pass whatever check_labels says (no cost there)
    x, lab = _labels_case("cpu")
    for bad in (7, -3):
        lab2 = lab.clone()
        lab2[5] = bad
        with pytest.raises(RuntimeError, match="label"):
            rf.sigmoid_focal_loss_labels(x, lab2, check_labels=False)


@requires_gpu
def test_check_labels_false_on_cuda_skips_the_sync_and_reads_bad_labels_as_background():
    x, lab = _labels_case("cuda")
    bad = lab.clone()
    bad[5], bad[6] = 7, -3
    with pytest.raises(RuntimeError, match="label"):
        rf.sigmoid_focal_loss_labels(x, bad)  # checked (default): one sync, a clear error
    as_background = lab.clone()
    as_background[5], as_background[6] = -1, -1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = rf.sigmoid_focal_loss_labels(x, bad, reduction="none", check_labels=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = rf.sigmoid_focal_loss_labels(x, as_background, reduction="none")
    assert torch.equal(out, expected)
