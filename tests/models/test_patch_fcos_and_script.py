"""``retina_fast.patch_torchvision`` on torchvision's FCOS (same losses, gradients and
detections as before patching, as tests/models/test_retinanet_parity.py checks for RetinaNet),
and TorchScript of patched RetinaNet and FCOS models: the scripted eval forward gives the
patched eager detections (and survives save/load), a scripted patched FCOS trains with the same
losses, a scripted patched RetinaNet refuses training with a clear error (see retina_fast/patch.py
for why), and unpatching restores torchvision's classes."""

import copy
import io

import pytest
import torch
from torchvision.models.detection import fcos_resnet50_fpn, retinanet_resnet50_fpn

import retina_fast
from retina_fast.patch import PatchedAnchorGenerator, RetinaFastFCOS, RetinaFastFCOSHead, RetinaFastRetinaNet
from tests.models.test_retinanet_parity import MIXED, _boxes, _rel_close, _same_detections

SIZE = dict(min_size=128, max_size=192)


def _spread(model):
    # random weights give FCOS scores ~0.07 (< score_thresh 0.2) and tiny box codes: spread
    # them so that post-processing has candidates, NMS work and clipping
    with torch.no_grad():
        cls = model.head.classification_head.cls_logits
        cls.bias.normal_(0.0, 1.0)
        cls.weight.mul_(10)
        if hasattr(model.head.regression_head, "bbox_ctrness"):
            model.head.regression_head.bbox_ctrness.bias.fill_(2.0)
        model.head.regression_head.bbox_reg.weight.mul_(10)
    return model


def _data():
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, h, w, generator=g) for h, w in MIXED]
    counts = [3, 0, 5, 1]  # image 1 has no boxes
    targets = [{"boxes": _boxes(g, n, h, w), "labels": torch.randint(0, 91, (n,), generator=g)}
               for n, (h, w) in zip(counts, MIXED)]
    same = [torch.rand(3, 128, 160, generator=g) for _ in range(3)]
    return images, targets, same


def _losses_and_grads(model, images, targets):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(images, copy.deepcopy(targets))
    sum(out.values()).backward()
    return ({k: v.detach() for k, v in out.items()},
            {k: p.grad.detach().clone() for k, p in model.head.named_parameters() if p.grad is not None})


@pytest.fixture(scope="module")
def fcos_models():
    torch.manual_seed(0)
    tv = _spread(fcos_resnet50_fpn(weights=None, weights_backbone=None, **SIZE))
    tv.backbone.requires_grad_(False)  # gradients of the head only (CPU time)
    patched = retina_fast.patch_torchvision(copy.deepcopy(tv))
    return tv, patched


def test_fcos_patch_swaps_classes_and_keeps_the_state_dict(fcos_models):
    tv, patched = fcos_models
    assert type(patched) is RetinaFastFCOS and type(patched.head) is RetinaFastFCOSHead
    assert isinstance(patched.anchor_generator, PatchedAnchorGenerator)
    assert patched.state_dict().keys() == tv.state_dict().keys()
    images, _, _ = _data()
    tv = copy.deepcopy(tv).eval()  # (a train-mode forward would move the shared BatchNorm statistics)
    with torch.no_grad():
        iml, _ = tv.transform(images)
        feats = list(tv.backbone(iml.tensors).values())
        for a, b in zip(tv.anchor_generator(iml, feats), patched.anchor_generator(iml, feats)):
            assert torch.equal(a, b)


def test_fcos_patched_losses_and_gradients_equal_torchvision(fcos_models):
    tv, patched = fcos_models
    images, targets, _ = _data()
    (l_tv, g_tv), (l_pt, g_pt) = _losses_and_grads(tv, images, targets), _losses_and_grads(patched, images, targets)
    assert l_tv.keys() == l_pt.keys() == {"classification", "bbox_regression", "bbox_ctrness"}
    for k in l_tv:
        _rel_close(l_pt[k], l_tv[k], 1e-5)
    assert l_pt["classification"] > 0 and l_pt["bbox_regression"] > 0
    assert g_tv.keys() == g_pt.keys()
    for k in g_tv:
        _rel_close(g_pt[k], g_tv[k], 1e-4)


def test_fcos_patched_detections_equal_torchvision(fcos_models):
    tv, patched = fcos_models
    _, _, same = _data()
    with torch.no_grad():
        d_tv, d_pt = tv.eval()(same), patched.eval()(same)
    assert sum(len(d["boxes"]) for d in d_tv) > 50  # real post-processing work
    _same_detections(d_pt, d_tv)
    with torch.no_grad():  # one image alone: the batched NMS does not mix images
        _same_detections(patched(same[1:2]), d_tv[1:2])


def test_fcos_unpatch_restores_torchvision(fcos_models):
    tv, _ = fcos_models
    m = retina_fast.patch_torchvision(copy.deepcopy(tv))
    retina_fast.unpatch_torchvision(m)
    assert type(m) is type(tv) and type(m.head) is type(tv.head)
    assert type(m.anchor_generator) is type(tv.anchor_generator)
    assert not hasattr(m, "_retina_fast_state")


def test_patched_models_pickle_and_deepcopy(fcos_models):
    _, patched = fcos_models
    buf = io.BytesIO()
    torch.save(patched, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)  # our own object, in-process
    assert type(again) is RetinaFastFCOS
    assert type(copy.deepcopy(patched)) is RetinaFastFCOS


def _scripted_equals_eager(model, images):
    model.eval()
    scripted = torch.jit.script(model)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    with torch.no_grad():
        eager = model(images)
        for s in (scripted, loaded):
            losses, dets = s(images)  # TorchScript's detection models return (losses, detections)
            assert len(dets) == len(eager)
            for d, e in zip(dets, eager):
                assert d.keys() == e.keys()
                for k in e:
                    assert torch.equal(d[k], e[k]), k
    return scripted, eager


def test_fcos_patched_scripts_whole(fcos_models):
    _, patched = fcos_models
    images, targets, same = _data()
    scripted, eager = _scripted_equals_eager(patched, same[:2])
    assert sum(len(d["boxes"]) for d in eager) > 50
    scripted.train()
    losses, _ = scripted(images, copy.deepcopy(targets))
    patched.train()
    with torch.no_grad():
        expected = patched(images, copy.deepcopy(targets))
    for k in expected:
        _rel_close(losses[k].detach(), expected[k], 1e-6)


def test_retinanet_patched_scripts_for_inference():
    torch.manual_seed(0)
    tv = retinanet_resnet50_fpn(weights=None, weights_backbone=None, **SIZE)
    with torch.no_grad():
        tv.head.classification_head.cls_logits.bias.normal_(-2.0, 0.5)
        tv.head.classification_head.cls_logits.weight.mul_(10)
        tv.head.regression_head.bbox_reg.weight.mul_(10)
    patched = retina_fast.patch_torchvision(copy.deepcopy(tv))
    assert type(patched) is RetinaFastRetinaNet
    _, _, same = _data()
    scripted, eager = _scripted_equals_eager(patched, same[:2])
    assert sum(len(d["boxes"]) for d in eager) > 50
    # the training loss is the one @torch.jit.unused method (retina_fast/patch.py says why)
    images, targets, _ = _data()
    scripted.train()
    images, targets = images[:1], targets[:1]
    with pytest.raises(Exception, match="compute_loss(.|\n)*annotated to be ignored"):
        scripted(images, targets)
    # unpatched again, torchvision's own model scripts as before
    retina_fast.unpatch_torchvision(patched)
    torch.jit.script(patched)
