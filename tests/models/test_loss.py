"""The batched RetinaNet loss against torchvision's per-image loss, on random head outputs
(no backbone: fast), and its edge cases: empty targets, crowd boxes (against the former Python
implementation), degenerate boxes."""

from types import SimpleNamespace

import pytest
import torch
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.retinanet import RetinaNet as TVRetinaNet
from torchvision.models.detection.retinanet import RetinaNetHead as TVHead

import retina_fast.ops as ops
from retina_fast.models import RetinaNetLoss, pack_targets, retinanet_anchor_generator
from retina_fast.models.loss import check_degenerate_boxes
from retina_fast.ops import _reference as ref
from tests.conftest import cuda_param, devices

K = 7
H, W = 128, 160


def _anchors(device):
    grids = [(H // s, W // s) for s in (8, 16, 32, 64, 128)]
    grids = [(max(1, h), max(1, w)) for h, w in grids]
    return retinanet_anchor_generator().grid((H, W), grids, torch.float32, device)


def _boxes(g, n, scale=1.0):
    xy = torch.rand(n, 2, generator=g) * torch.tensor([W * 0.8, H * 0.8])
    wh = (torch.rand(n, 2, generator=g) * torch.tensor([W * 0.6, H * 0.6]) + 4) * scale
    return torch.cat([xy, xy + wh], 1)


def _targets(g, counts, device):
    return [{"boxes": _boxes(g, n).to(device), "labels": torch.randint(0, K, (n,), generator=g).to(device)}
            for n in counts]


def _tv_loss(targets, cls, reg, anchors, box_loss):
    head = TVHead(8, 9, K)
    head.regression_head._loss_type = box_loss
    fake = SimpleNamespace(proposal_matcher=det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True), head=head)
    return TVRetinaNet.compute_loss(fake, targets, {"cls_logits": cls, "bbox_regression": reg},
                                    [anchors] * len(targets))


def _grads(losses, inputs):
    return torch.autograd.grad(losses["classification"] + losses["bbox_regression"], inputs)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("box_loss", ["l1", "smooth_l1", "giou", "diou", "ciou"])
@pytest.mark.parametrize("counts", [[3], [0], [4, 0, 1, 7], [0, 0]])
def test_loss_and_gradients_match_torchvision(device, box_loss, counts):
    g = torch.Generator().manual_seed(len(counts) * 10 + sum(counts))
    anchors = _anchors(device)
    A, B = anchors.shape[0], len(counts)
    targets = _targets(g, counts, device)
    cls = (torch.randn(B, A, K, generator=g) * 2 - 3).to(device).requires_grad_()
    reg = (torch.randn(B, A, 4, generator=g) * 0.3).to(device).requires_grad_()

    tv = _tv_loss(targets, cls, reg, anchors, box_loss)
    ours = RetinaNetLoss()(cls, reg, anchors, pack_targets(targets, device), box_loss)
    for k in ("classification", "bbox_regression"):
        torch.testing.assert_close(ours[k], tv[k].to(ours[k].dtype), rtol=1e-5, atol=1e-7)
    if sum(counts) == 0:
        assert ours["bbox_regression"].item() == 0.0
    for go, gt in zip(_grads(ours, (cls, reg)), _grads(tv, (cls, reg))):
        torch.testing.assert_close(go, gt, rtol=1e-4, atol=1e-4 * gt.abs().max().item() + 1e-12)


def test_crowd_boxes_are_never_matched_and_ignore_the_background_inside():
    anchors = _anchors("cpu")
    boxes = torch.tensor([[2.0, 2.0, 30.0, 30.0], [60.0, 40.0, 150.0, 120.0], [40.0, 10.0, 70.0, 60.0]])
    labels = torch.tensor([0, 1, 2])
    crowd_t = [{"boxes": boxes, "labels": labels, "iscrowd": torch.tensor([0, 1, 0])},
               {"boxes": boxes[:0], "labels": labels[:0], "iscrowd": torch.zeros(0, dtype=torch.int64)}]
    packed = pack_targets(crowd_t, torch.device("cpu"))
    assert packed.counts.tolist() == [3, 0]
    # boxes keep their order (no reordering copy); the crowd box is flagged
    assert packed.boxes[0, :3].tolist() == boxes.tolist()
    assert packed.crowd.tolist() == [[False, True, False], [False, False, False]]
    mt = RetinaNetLoss().match(anchors, packed)
    assert not (mt.matches == 1).any()  # the crowd row is never matched
    clean = pack_targets([{"boxes": boxes[[0, 2]], "labels": labels[[0, 2]]}, crowd_t[1]], torch.device("cpu"))
    ref = RetinaNetLoss().match(anchors, clean)
    # matches into the non-crowd boxes are unchanged, the crowd box is matched by nobody
    assert torch.equal(mt.matches >= 0, ref.matches >= 0)
    assert torch.equal(mt.labels[mt.labels >= 0], ref.labels[ref.labels >= 0])
    a = anchors
    inside = (a[:, 0] >= 60) & (a[:, 1] >= 40) & (a[:, 2] <= 150) & (a[:, 3] <= 120)
    assert inside.any()
    # background anchors inside the crowd box are ignored; without the crowd box some were background
    assert ((mt.labels[0][inside] == -2) | (mt.labels[0][inside] >= 0)).all()
    assert (ref.labels[0][inside] == -1).any()
    assert not (mt.labels[0][inside] == -1).any()
    # the image without boxes is untouched
    assert (mt.labels[1] == -1).all()
    # the loss ignores them: equal to the loss of the clean targets with those anchors at -2
    cls = torch.randn(2, a.shape[0], K)
    reg = torch.randn(2, a.shape[0], 4) * 0.1
    l_crowd = RetinaNetLoss()(cls, reg, anchors, packed)
    l_clean = RetinaNetLoss()(cls, reg, anchors, clean)
    assert l_crowd["classification"] < l_clean["classification"]
    torch.testing.assert_close(l_crowd["bbox_regression"], l_clean["bbox_regression"])


def _former_crowd_labels(targets, anchors, thresh=0.5):
    """The loss's crowd handling before issue 11, kept as the reference: crowd boxes moved
    behind the others (a sort and gathers in pack_targets), matched without them, then
    _crowd_ignore's [B, A, M, 2] / [B, A, M] tensors (retina_fast.ops._reference.crowd_ignore
    is that function). Returns (labels, matched gt boxes [B, A, 4] on the foreground)."""
    B = len(targets)
    n = [int(t["boxes"].shape[0]) for t in targets]
    M = max([1] + n)
    boxes = torch.zeros(B, M, 4)
    labels = torch.zeros(B, M, dtype=torch.int64)
    counts = torch.zeros(B, dtype=torch.int64)
    for b, t in enumerate(targets):
        c = t.get("iscrowd", torch.zeros(n[b], dtype=torch.int64)) != 0
        order = torch.cat([torch.where(~c)[0], torch.where(c)[0]])
        boxes[b, :n[b]] = t["boxes"][order]
        labels[b, :n[b]] = t["labels"][order]
        counts[b] = int((~c).sum())
    all_counts = torch.tensor(n)
    lab, _, matches = ops.matched_targets(anchors, boxes, labels, counts)
    idx = torch.arange(M)[None, :]
    crowd_rows = (idx >= counts[:, None]) & (idx < all_counts[:, None])
    matches = ref.crowd_ignore(matches, anchors, boxes, all_counts, crowd_rows, thresh)
    lab = torch.where(matches == -2, torch.full_like(lab, -2), lab)
    gt = boxes.gather(1, matches.clamp(min=0)[..., None].expand(B, anchors.shape[0], 4))
    return lab, gt


@pytest.mark.parametrize("device", ["cpu", cuda_param()])
@pytest.mark.parametrize("thresh", [0.5, 0.25])
def test_crowd_labels_equal_the_former_python_version(device, thresh):
    g = torch.Generator().manual_seed(7)
    anchors = _anchors("cpu")
    targets = []
    for k, n in enumerate([6, 5, 3, 0, 4]):
        t = {"boxes": _boxes(g, n, scale=1.0 + k % 2), "labels": torch.randint(0, K, (n,), generator=g)}
        if k != 4:  # one image without iscrowd: the batch has crowd boxes all the same
            t["iscrowd"] = (torch.rand(n, generator=g) < 0.4).to(torch.int64)
        targets.append(t)
    targets[2]["iscrowd"][:] = 1  # crowd boxes only
    targets[0]["iscrowd"][0] = 1  # the first box a crowd one
    exp_labels, exp_gt = _former_crowd_labels(targets, anchors, thresh)
    dev = torch.device(device)
    packed = pack_targets([{k: v.to(dev) for k, v in t.items()} for t in targets], dev)
    mt = RetinaNetLoss(crowd_ioa_thresh=thresh).match(anchors.to(dev), packed)
    assert torch.equal(mt.labels.cpu(), exp_labels)
    fg = exp_labels >= 0
    gt = packed.boxes.cpu().gather(1, mt.matches.cpu().clamp(min=0)[..., None].expand(*mt.matches.shape, 4))
    assert torch.equal(gt[fg], exp_gt[fg])
    assert (exp_labels == -2).sum() > (RetinaNetLoss().match(anchors, pack_targets(
        [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets], torch.device("cpu"))).labels == -2).sum()


def test_all_zero_iscrowd_is_the_plain_path():
    g = torch.Generator().manual_seed(3)
    t = _targets(g, [3, 2], "cpu")
    plain = pack_targets(t, torch.device("cpu"))
    for x in t:
        x["iscrowd"] = torch.zeros(len(x["labels"]), dtype=torch.int64)
    flagged = pack_targets(t, torch.device("cpu"))
    assert flagged.crowd is None
    assert torch.equal(plain.boxes, flagged.boxes) and torch.equal(plain.counts, flagged.counts)


def test_degenerate_boxes_fail_like_torchvision():
    t = [{"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([1])},
         {"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0], [3.0, 4.0, 3.0, 9.0]]), "labels": torch.tensor([1, 2])}]
    with pytest.raises(AssertionError, match=r"positive height and width.*\[3\.0, 4\.0, 3\.0, 9\.0\].*index 1"):
        check_degenerate_boxes(pack_targets(t, torch.device("cpu")), t)
    check_degenerate_boxes(pack_targets(t[:1], torch.device("cpu")), t[:1])  # fine


def test_unknown_box_loss_is_an_error():
    anchors = _anchors("cpu")
    with pytest.raises(ValueError, match="Unsupported loss"):
        RetinaNetLoss()(torch.zeros(1, anchors.shape[0], K), torch.zeros(1, anchors.shape[0], 4), anchors,
                        pack_targets([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}],
                                     torch.device("cpu")), "l2")
