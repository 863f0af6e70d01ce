"""End-to-end parity with torchvision (the acceptance of the model): torchvision's
``retinanet_resnet50_fpn(_v2)(weights=None, weights_backbone=None)`` built with a fixed seed,
its state_dict loaded into ours with ``strict=True``; same images, same targets:

* training losses within 1e-5 relative (batch 1; batch 4 of different sizes with an image
  without boxes), gradients of the head's parameters within 1e-4 relative;
* eval detections: same labels, scores within 1e-5, boxes within 1e-4 relative;
* a torchvision model patched with ``retina_fast.patch_torchvision`` gives the same losses
  and detections as before patching.

Small images (min_size 128, max_size 192 on both models) keep this CPU-fast.
"""

import copy

import pytest
import torch
from torchvision.models.detection import retinanet_resnet50_fpn as tv_retinanet_v1
from torchvision.models.detection import retinanet_resnet50_fpn_v2 as tv_retinanet_v2

import retina_fast
from retina_fast.models import retinanet_resnet50_fpn
from tests.conftest import devices
from tests.detections import assert_same_detections

SIZE = dict(min_size=128, max_size=192)
TV_BUILDERS = {"v1": tv_retinanet_v1, "v2": tv_retinanet_v2}
MIXED = [(120, 150), (128, 128), (100, 160), (140, 120)]  # padded together: different sizes in one batch


def _boxes(g, n, h, w):
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
    wh = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5]) + 6
    return torch.cat([xy, (xy + wh).minimum(torch.tensor([float(w), float(h)]))], 1)


def _data(device):
    g = torch.Generator().manual_seed(1)
    mixed = [torch.rand(3, h, w, generator=g) for h, w in MIXED]
    counts = [3, 0, 5, 1]  # image 1 has no boxes
    targets = [{"boxes": _boxes(g, n, h, w), "labels": torch.randint(0, 91, (n,), generator=g)}
               for n, (h, w) in zip(counts, MIXED)]
    same = [torch.rand(3, 128, 160, generator=g) for _ in range(4)]  # no padding: no tied scores
    mv = lambda ts: [{k: v.to(device) for k, v in t.items()} for t in ts]  # noqa: E731
    return [x.to(device) for x in mixed], mv(targets), [x.to(device) for x in same]


def _losses(model, images, targets, grads=True):
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grads):
        out = model(images, copy.deepcopy(targets))
    if not grads:
        return {k: v.detach() for k, v in out.items()}, None
    (out["classification"] + out["bbox_regression"]).backward()
    return {k: v.detach() for k, v in out.items()}, {k: p.grad.detach().clone() for k, p in model.head.named_parameters()}


def _detect(model, images):
    model.eval()
    with torch.no_grad():
        return model(images)


@pytest.fixture(scope="module", params=[(v, d) for v in ("v1", "v2") for d in devices()], ids=lambda p: f"{p[0]}-{p[1]}")
def runs(request):
    variant, device = request.param
    torch.manual_seed(0)
    tv = TV_BUILDERS[variant](weights=None, weights_backbone=None, **SIZE)
    with torch.no_grad():
        # Random weights give every score ~0.01 (< score_thresh) and tiny box codes: spread
        # them so that post-processing has real work (hundreds of candidates, NMS, clipping).
        tv.head.classification_head.cls_logits.bias.normal_(-2.0, 0.5)
        # (v2's GroupNorm head already feeds unit-variance features; more would saturate the
        # sigmoid into exactly tied float32 scores)
        tv.head.classification_head.cls_logits.weight.mul_(10 if variant == "v1" else 1)
        tv.head.regression_head.bbox_reg.weight.mul_(10)
    # The tests take gradients of the head only: stop the backward pass there (CPU time).
    tv.backbone.requires_grad_(False)
    ours = retinanet_resnet50_fpn(variant, **SIZE)
    ours.load_state_dict(tv.state_dict(), strict=True)
    ours.backbone.requires_grad_(False)
    patched = retina_fast.patch_torchvision(copy.deepcopy(tv))
    tv, ours, patched = tv.to(device), ours.to(device), patched.to(device)
    mixed, targets, same = _data(device)
    r = {"variant": variant, "device": torch.device(device).type}
    for name, m in (("tv", tv), ("ours", ours), ("patched", patched)):
        r[name, "b4"] = _losses(m, mixed, targets)
        r[name, "b1"] = _losses(m, mixed[:1], targets[:1], grads=name != "patched")
        r[name, "det4"] = _detect(m, same)
        r[name, "det1"] = _detect(m, same[:1])
        if name != "patched":
            r[name, "det_mixed"] = _detect(m, mixed)
    # Our eval forward on the CPU runs the folded, fused copy by default (fast_inference);
    # with it off, the modules as torchvision has them: the exact comparison.
    ours.fast_inference = False
    for which, images in (("det4", same), ("det1", same[:1]), ("det_mixed", mixed)):
        r["ours_exact", which] = _detect(ours, images)
    ours.fast_inference = True
    return r


def _rel_close(a, b, rtol):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item() + 1e-12)


def _same_detections(ours, tv, fused=False):
    """Exactly tied scores (float32 sigmoids of nearby logits; in a zero-padded batch, identical
    receptive fields) are ordered arbitrarily by torchvision's unstable CPU sort, ours by
    index: every detection is compared, as multisets per image and label (tests/detections.py).
    ``fused``: ours ran the folded, fused eval copy (BatchNorms folded into the weights,
    oneDNN's fused ReLU/add), float32 rounded in another order: the head's outputs agree to
    ~1e-6 of their scale (tests/models/test_fuse.py holds both paths to float64), but these
    random weights (box codes scaled by 10) give boxes up to exp(4.135) = 62 anchors wide
    before clipping, thousands of px, where 4e-6 is 0.1 px: box_atol 0.25 px."""
    if fused:
        assert_same_detections(ours, tv, score_atol=2e-5, box_atol=0.25, box_rtol=1e-3)
    else:
        assert_same_detections(ours, tv, score_atol=1e-5, box_atol=1e-4, box_rtol=1e-4)


@pytest.mark.parametrize("batch", ["b1", "b4"])
def test_training_losses_match(runs, batch):
    (tv, _), (ours, _) = runs["tv", batch], runs["ours", batch]
    assert tv["classification"] > 0 and tv["bbox_regression"] > 0
    for k in ("classification", "bbox_regression"):
        _rel_close(ours[k], tv[k], 1e-5)


@pytest.mark.parametrize("batch", ["b1", "b4"])
def test_head_gradients_match(runs, batch):
    (_, g_tv), (_, g_ours) = runs["tv", batch], runs["ours", batch]
    assert g_tv.keys() == g_ours.keys() and len(g_tv) >= 10
    for k in g_tv:
        assert g_tv[k].abs().max() > 0, k
        _rel_close(g_ours[k], g_tv[k], 1e-4)


@pytest.mark.parametrize("fast", ["fast", "exact"])
@pytest.mark.parametrize("which", ["det1", "det4"])
def test_eval_detections_match(runs, which, fast):
    tv, ours = runs["tv", which], runs["ours" if fast == "fast" else "ours_exact", which]
    assert all(len(d["scores"]) > 50 for d in tv)  # the post-processing had something to do
    _same_detections(ours, tv, fused=fast == "fast" and runs["device"] == "cpu")


@pytest.mark.parametrize("fast", ["fast", "exact"])
def test_eval_detections_match_on_images_of_different_sizes(runs, fast):
    tv, ours = runs["tv", "det_mixed"], runs["ours" if fast == "fast" else "ours_exact", "det_mixed"]
    for d, (h, w) in zip(ours, MIXED):  # mapped back to each original image
        assert d["boxes"][:, 2].max() <= w and d["boxes"][:, 3].max() <= h
    _same_detections(ours, tv, fused=fast == "fast" and runs["device"] == "cpu")


@pytest.mark.parametrize("batch", ["b1", "b4"])
def test_patched_torchvision_gives_the_same_losses_and_gradients(runs, batch):
    (tv, g_tv), (pt, g_pt) = runs["tv", batch], runs["patched", batch]
    for k in ("classification", "bbox_regression"):
        _rel_close(pt[k], tv[k], 1e-5)
    for k in g_tv if g_pt is not None else ():  # gradients taken on batch 4
        _rel_close(g_pt[k], g_tv[k], 1e-4)


@pytest.mark.parametrize("which", ["det1", "det4"])
def test_patched_torchvision_gives_the_same_detections(runs, which):
    _same_detections(runs["patched", which], runs["tv", which])
