"""retina_fast.patch_torchvision_ops(): torchvision's whole detection zoo on our nms,
batched_nms, box_iou and sigmoid_focal_loss gives torchvision's own results.

Every builder of the issue, random weights (weights=None, weights_backbone=None: nothing is
downloaded), 2 small images, score thresholds at 0 so that NMS has every candidate to work on
(random weights score ~1/num_classes, under the default thresholds), eval detections patched vs
unpatched as multisets (per image, sorted by label, score and box, every field within float32
rounding) and training losses (same RNG seed for the samplers) within 1e-5 relative.
"""

import copy

import pytest
import torch
import torchvision
from torchvision.models import detection as D
from torchvision.ops import boxes as box_ops

import retina_fast
import retina_fast.ops as R
from retina_fast.dropin import torchvision_ops_are_patched

RCNN = dict(min_size=160, max_size=224, box_score_thresh=0.0, rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
            rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150, box_batch_size_per_image=128,
            box_detections_per_img=50)
BUILDERS = {
    "fasterrcnn_resnet50_fpn": (D.fasterrcnn_resnet50_fpn, RCNN),
    "fasterrcnn_resnet50_fpn_v2": (D.fasterrcnn_resnet50_fpn_v2, RCNN),
    "fasterrcnn_mobilenet_v3_large_fpn": (D.fasterrcnn_mobilenet_v3_large_fpn, RCNN),
    "maskrcnn_resnet50_fpn": (D.maskrcnn_resnet50_fpn, RCNN),
    "keypointrcnn_resnet50_fpn": (D.keypointrcnn_resnet50_fpn, dict(RCNN, num_classes=2)),
    "ssd300_vgg16": (D.ssd300_vgg16, dict(score_thresh=0.0, topk_candidates=100)),
    "ssdlite320_mobilenet_v3_large": (D.ssdlite320_mobilenet_v3_large, dict(score_thresh=0.0, topk_candidates=100)),
    "fcos_resnet50_fpn": (D.fcos_resnet50_fpn, dict(min_size=160, max_size=224, score_thresh=0.0)),
    "retinanet_resnet50_fpn": (D.retinanet_resnet50_fpn, dict(min_size=160, max_size=224, score_thresh=0.0)),
    "retinanet_resnet50_fpn_v2": (D.retinanet_resnet50_fpn_v2, dict(min_size=160, max_size=224, score_thresh=0.0)),
}


@pytest.fixture(autouse=True)
def _unpatched():
    retina_fast.unpatch_torchvision_ops()
    yield
    retina_fast.unpatch_torchvision_ops()


def images_and_targets(name, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [(3, 240, 300), (3, 200, 256)]
    images = [torch.rand(s, generator=g) for s in sizes]
    num_classes = 2 if name.startswith("keypoint") else 91
    targets = []
    for _, h, w in sizes:
        n = 3
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3]) + 16
        boxes = torch.cat([xy, xy + wh], 1)
        t = {"boxes": boxes, "labels": torch.randint(1, num_classes, (n,), generator=g)}
        if name.startswith("maskrcnn"):
            masks = torch.zeros(n, h, w, dtype=torch.uint8)
            for i, b in enumerate(boxes.round().long()):
                masks[i, b[1]:b[3], b[0]:b[2]] = 1
            t["masks"] = masks
        if name.startswith("keypoint"):
            kx = boxes[:, None, 0] + torch.rand(n, 17, generator=g) * (boxes[:, None, 2] - boxes[:, None, 0])
            ky = boxes[:, None, 1] + torch.rand(n, 17, generator=g) * (boxes[:, None, 3] - boxes[:, None, 1])
            t["keypoints"] = torch.stack([kx, ky, torch.ones(n, 17)], -1)
        targets.append(t)
    return images, targets


def _sorted(det):
    """Detections of one image in a canonical order: label, score (descending), box."""
    keys = [det["boxes"][:, i] for i in (3, 2, 1, 0)] + [-det["scores"].double(), det["labels"].double()]
    order = torch.arange(det["scores"].numel())
    for k in keys:  # least significant first, stable sorts: a lexicographic order
        order = order[torch.sort(k[order], stable=True).indices]
    return {k: v[order] for k, v in det.items()}


def assert_same_detections(ours, theirs):
    assert len(ours) == len(theirs)
    for b, (o, t) in enumerate(zip(ours, theirs)):
        assert o.keys() == t.keys()
        assert o["scores"].shape == t["scores"].shape, f"image {b}: {o['scores'].shape} vs {t['scores'].shape}"
        o, t = _sorted(o), _sorted(t)
        for k in o:
            torch.testing.assert_close(o[k], t[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"image {b} {k}: {m}")


def _build(name):
    fn, kwargs = BUILDERS[name]
    torch.manual_seed(0)
    return fn(weights=None, weights_backbone=None, **kwargs)


def _batch_statistics(model):
    """BatchNorm layers normalise with the batch's statistics, in eval mode too: with random
    weights their running statistics (mean 0, variance 1) make MobileNetV3's features collapse,
    and every score of SSDlite / Faster R-CNN MobileNet then ties, which would test nothing but
    the (unspecified) tie order. Frozen BatchNorm (ResNet backbones) is not affected."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train()
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUILDERS))
def test_zoo_equal_patched_and_unpatched(name):
    model = _build(name)
    images, targets = images_and_targets(name)
    # eval
    _batch_statistics(model.eval())
    with torch.no_grad():
        theirs = model(images)
        with retina_fast.patch_torchvision_ops():
            assert torchvision_ops_are_patched()
            ours = model(images)
    assert not torchvision_ops_are_patched()
    assert sum(d["scores"].numel() for d in theirs) > 0, "nothing detected: the test would prove nothing"
    for d in theirs:  # not a test of the tie order (see _batch_statistics)
        assert torch.unique(d["scores"]).numel() > 0.9 * d["scores"].numel()
    assert_same_detections(ours, theirs)
    # training losses: a copy each (BatchNorm running statistics), same seed for the samplers
    train_a, train_b = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    torch.manual_seed(1)
    loss_theirs = train_a(images, copy.deepcopy(targets))
    retina_fast.patch_torchvision_ops()
    torch.manual_seed(1)
    loss_ours = train_b(images, copy.deepcopy(targets))
    retina_fast.unpatch_torchvision_ops()
    assert loss_ours.keys() == loss_theirs.keys()
    for k in loss_theirs:
        torch.testing.assert_close(loss_ours[k], loss_theirs[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def _retina_fast_ops_called(fn):
    with torch.autograd.profiler.profile() as prof:
        fn()
    return {e.name for e in prof.function_events if e.name.startswith("retina_fast::")}


def test_switch_reaches_models_built_before_it():
    """A model built before the switch calls our kernels once it is on, and not after."""
    model = D.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, box_score_thresh=0.0).eval()
    images, _ = images_and_targets("fasterrcnn")
    with torch.no_grad():
        assert _retina_fast_ops_called(lambda: model(images)) == set()
        with retina_fast.patch_torchvision_ops():
            assert "retina_fast::batched_nms" in _retina_fast_ops_called(lambda: model(images))
        assert _retina_fast_ops_called(lambda: model(images)) == set()


def test_switch_sets_and_restores_every_name():
    from torchvision.models.detection import fcos, retinanet
    from torchvision.ops import focal_loss

    names = [(torchvision.ops, "nms"), (torchvision.ops, "batched_nms"), (torchvision.ops, "box_iou"),
             (torchvision.ops, "sigmoid_focal_loss"), (box_ops, "nms"), (box_ops, "batched_nms"), (box_ops, "box_iou"),
             (focal_loss, "sigmoid_focal_loss"), (retinanet, "sigmoid_focal_loss"), (fcos, "sigmoid_focal_loss")]
    before = [getattr(m, a) for m, a in names]
    ours = {"nms": R.nms, "batched_nms": R.batched_nms, "box_iou": R.box_iou, "sigmoid_focal_loss": R.sigmoid_focal_loss}
    handle = retina_fast.patch_torchvision_ops()
    assert [getattr(m, a) for m, a in names] == [ours[a] for _, a in names]
    with retina_fast.patch_torchvision_ops():  # nested: already on, so its exit leaves it on
        pass
    assert torchvision_ops_are_patched()
    with handle:  # the first handle's exit turns it off
        pass
    assert [getattr(m, a) for m, a in names] == before
    retina_fast.unpatch_torchvision_ops()  # no-op
    assert [getattr(m, a) for m, a in names] == before
    # an exception inside the block still restores torchvision's ops
    with pytest.raises(RuntimeError):
        with retina_fast.patch_torchvision_ops():
            raise RuntimeError("boom")
    assert [getattr(m, a) for m, a in names] == before


def test_patched_ops_keep_torchvision_semantics_on_bad_input():
    """The swapped-in ops refuse what torchvision's refuse, with a clear error."""
    with retina_fast.patch_torchvision_ops():
        with pytest.raises((RuntimeError, ValueError), match="boxes"):
            torchvision.ops.nms(torch.zeros(3, 5), torch.zeros(3), 0.5)
        with pytest.raises((RuntimeError, ValueError)):
            box_ops.batched_nms(torch.zeros(3, 4), torch.zeros(2), torch.zeros(3, dtype=torch.long), 0.5)
        with pytest.raises(ValueError, match="reduction"):
            torchvision.ops.sigmoid_focal_loss(torch.zeros(3), torch.zeros(3), reduction="avg")
        # torchvision's tests call batched_nms on empty input with None for the rest
        assert box_ops.batched_nms(torch.empty((0,)), None, None, None).shape == (0,)


_SCRIPT_RUN = r"""
import sys, torch, retina_fast
from tests.models.test_dropin_torchvision_zoo import D, _batch_statistics, images_and_targets
patched, out = sys.argv[1] == "1", sys.argv[2]
torch.manual_seed(0)  # the same random weights in both processes
model = _batch_statistics(D.fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None,
                                                                  box_score_thresh=0.0).eval())
if patched:
    retina_fast.patch_torchvision_ops()
scripted = torch.jit.script(model)
retina_fast.unpatch_torchvision_ops()
images, _ = images_and_targets("fasterrcnn")
with torch.no_grad():
    _, det = scripted(images)
torch.save({"det": det, "graph_has_ours": "retina_fast::batched_nms" in str(scripted.rpn.inlined_graph)}, out)
"""


def test_torchscript_while_patched(tmp_path):
    """torch.jit.script of a detection model while the switch is on compiles our ops into it and
    gives what the model scripted without the switch gives. Each in a fresh process:
    TorchScript compiles a class once per process and caches it, so the switch's state at the
    first scripting of, say, RegionProposalNetwork is what every later scripted model of that
    class in the process gets (and a scripted model keeps its ops after unpatching)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = {}
    for flag in ("0", "1"):
        out = str(tmp_path / f"det{flag}.pt")
        p = subprocess.run([sys.executable, "-c", _SCRIPT_RUN, flag, out], cwd=root, env=env, capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        res[flag] = torch.load(out, weights_only=True)
    assert res["1"]["graph_has_ours"] and not res["0"]["graph_has_ours"]
    assert_same_detections(res["1"]["det"], res["0"]["det"])
