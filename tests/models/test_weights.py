"""torchvision's weights in our builders: ``weights=`` (an enum from the torch hub cache, its
name, a path, a state_dict), ``weights_backbone=``, ``num_classes=``, the v1 eps fix, the class
head re-initialised for fine-tuning, torchvision's COCO label space. Stand-in weights: randomly
initialised torchvision models saved to files (tests/tv_weights.py); nothing is downloaded."""

import os

import pytest
import torch
from torchvision.models import ResNet50_Weights, resnet50
from torchvision.ops.misc import FrozenBatchNorm2d

from retina_fast.models import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2, retinanet_resnet_fpn
from retina_fast.models import weights as rw
from tests.models.test_retinanet_parity import _same_detections
from tests.tv_weights import SIZE, HubCache, fake_coco_state_dict, read_images, tv_builder, tv_enum, write_images


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A torch hub cache holding stand-ins for both COCO RetinaNets and the ImageNet ResNet-50."""
    root = tmp_path_factory.mktemp("hub")
    with HubCache(root) as h:
        h.sd = {v: fake_coco_state_dict(v) for v in ("v1", "v2")}
        h.files = {v: h.put(tv_enum(v), h.sd[v]) for v in ("v1", "v2")}
        torch.manual_seed(5)
        h.resnet = resnet50(weights=None).state_dict()
        h.resnet_file = h.put(ResNet50_Weights.IMAGENET1K_V1, h.resnet)
        names = write_images(root / "images")
        h.images = read_images(root / "images", names)
        yield h


def _detect(model, images):
    model.eval()
    with torch.no_grad():
        return model(images)


def _frozen_eps(model):
    return {m.eps for m in model.modules() if isinstance(m, FrozenBatchNorm2d)}


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_weights_enum_from_the_hub_cache_gives_torchvision_detections(hub, variant):
    # torchvision's own builder reads the same cached file (its load_state_dict_from_url finds
    # it there and downloads nothing); so does ours.
    tv = tv_builder(variant)(weights=tv_enum(variant), **SIZE)
    build = retinanet_resnet50_fpn_v2 if variant == "v2" else retinanet_resnet50_fpn
    ours = build(weights=tv_enum(variant), **SIZE)
    assert ours.num_classes == 91 and list(ours.state_dict()) == list(tv.state_dict())
    assert _frozen_eps(ours) == _frozen_eps(tv) == ({0.0} if variant == "v1" else set())
    det_tv, det_ours = _detect(tv, hub.images[:2]), _detect(ours, hub.images[:2])
    assert all(len(d["scores"]) > 50 for d in det_tv)
    _same_detections(det_ours, det_tv, fused=True)  # the CPU eval forward: folded and fused
    ours.fast_inference = False
    _same_detections(_detect(ours, hub.images[:2]), det_tv)


def test_every_form_of_weights_loads_the_same_with_the_eps_fix(hub):
    sd = hub.sd["v1"]
    models = {
        "path": retinanet_resnet50_fpn(weights=hub.files["v1"], **SIZE),
        "name": retinanet_resnet50_fpn(weights="DEFAULT", **SIZE),
        "state_dict": retinanet_resnet50_fpn(weights=sd, **SIZE),
        "weights_path (older keyword)": retinanet_resnet_fpn(50, "v1", weights_path=hub.files["v1"], **SIZE),
    }
    for name, m in models.items():
        got = m.state_dict()
        assert all(torch.equal(got[k], v) for k, v in sd.items() if k in got), name
        assert _frozen_eps(m) == {0.0}, name  # torchvision's fix for its v1 COCO weights
        assert not m.backbone.body.layer1[0].conv1.weight.requires_grad  # 3 trainable stages
        assert m.backbone.body.layer2[0].conv1.weight.requires_grad
    # the eps matters for these weights: without the fix the detections differ
    ref = _detect(models["path"], hub.images[:1])[0]
    no_fix = _detect(retinanet_resnet50_fpn(weights=hub.files["v1"], bn_eps=1e-5, **SIZE), hub.images[:1])[0]
    assert _frozen_eps(models["path"]) == {0.0}
    assert not torch.allclose(ref["scores"][:20], no_fix["scores"][:20], atol=1e-3)


def test_missing_cache_file_says_where_to_put_it(tmp_path):
    with HubCache(tmp_path):
        with pytest.raises(rw.WeightsError) as e:
            retinanet_resnet50_fpn(weights=tv_enum("v1"))
        want = os.path.join(str(tmp_path), "checkpoints", "retinanet_resnet50_fpn_coco-eeacb38b.pth")
        assert want in str(e.value) and "nothing is downloaded" in str(e.value)
        assert "https://download.pytorch.org/models/retinanet_resnet50_fpn_coco-eeacb38b.pth" in str(e.value)
        with pytest.raises(rw.WeightsError, match="resnet50-0676ba61.pth"):
            retinanet_resnet50_fpn(weights_backbone=ResNet50_Weights.IMAGENET1K_V1)


def test_wrong_weights_are_clear_errors(hub, tmp_path):
    with pytest.raises(rw.WeightsError, match="are retinanet_resnet50_fpn_v2 weights"):
        retinanet_resnet50_fpn(weights=tv_enum("v2"))
    with pytest.raises(rw.WeightsError, match="holds retinanet_resnet50_fpn_v2 weights"):
        retinanet_resnet50_fpn(weights=hub.files["v2"])
    with pytest.raises(rw.WeightsError, match="num_classes=5 but .* has 91 classes"):
        retinanet_resnet50_fpn(weights=hub.files["v1"], num_classes=5)
    with pytest.raises(ValueError, match="give weights or weights_path"):
        retinanet_resnet50_fpn(weights=hub.files["v1"], weights_path=hub.files["v1"])
    with pytest.raises(rw.WeightsError, match="neither a file nor a RetinaNet_ResNet50_FPN_Weights name"):
        retinanet_resnet50_fpn(weights="COCO_V9")
    with pytest.raises(rw.WeightsError, match="weights not found"):
        retinanet_resnet50_fpn(weights=str(tmp_path / "none.pth"))
    torch.save({"backbone.body.conv1.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(rw.WeightsError, match="not a torchvision RetinaNet state_dict"):
        retinanet_resnet50_fpn(weights=str(tmp_path / "other.pth"))


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_weights_backbone_like_torchvision(hub, variant):
    tv = tv_builder(variant)(weights=None, weights_backbone=ResNet50_Weights.IMAGENET1K_V1, **SIZE)
    for wb in (ResNet50_Weights.IMAGENET1K_V1, hub.resnet_file):
        ours = retinanet_resnet50_fpn(variant, weights_backbone=wb, **SIZE)
        t, o = tv.backbone.body.state_dict(), ours.backbone.body.state_dict()
        assert list(o) == list(t) and all(torch.equal(o[k], t[k]) for k in t)
        assert all(torch.equal(o[k], hub.resnet[k]) for k in o if k in hub.resnet)
        # torchvision's layout for trained weights: v1 freezes its body's BatchNorm, both
        # train the last 3 stages; eps stays 1e-5 (the fix is for the COCO v1 weights only)
        assert _frozen_eps(ours) == _frozen_eps(tv) == ({1e-5} if variant == "v1" else set())
        grads = lambda m: [p.requires_grad for p in m.backbone.body.parameters()]  # noqa: E731
        assert grads(ours) == grads(tv)


def test_fine_tuning_reinitialises_a_class_head_of_another_size(hub):
    sd = hub.sd["v1"]
    torch.manual_seed(0)
    model = retinanet_resnet50_fpn(num_classes=3, is_trained=True, bn_eps=0.0, **SIZE)
    fresh = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(rw.CLASS_LOGITS)}
    with pytest.raises(rw.WeightsError, match="does not fit .*size mismatch for head.classification_head.cls_logits"):
        rw.load_weights(model, sd, "coco.pth")
    msg = rw.load_weights(model, sd, "coco.pth", reinit_class_head=True)
    assert msg == ("class head re-initialised (head.classification_head.cls_logits): coco.pth has 91 classes, "
                   "this model 3")
    got = model.state_dict()
    for k, v in got.items():
        if k.startswith(rw.CLASS_LOGITS):
            assert torch.equal(v, fresh[k])
        elif k in sd:
            assert torch.equal(v, sd[k]), k
    assert rw.load_weights(model, {k: v for k, v in got.items()}, "same.pth", reinit_class_head=True) is None


def test_state_dict_from_unwraps_the_usual_containers(tmp_path):
    sd = {"a.weight": torch.ones(2), "b.bias": torch.zeros(1)}
    for obj in (sd, {"model": sd, "epoch": 3}, {"state_dict": sd}, {"format": rw.CHECKPOINT_FORMAT, "model": sd},
                {f"module.{k}": v for k, v in sd.items()}):
        assert rw.state_dict_from(obj, fmt_tag=rw.CHECKPOINT_FORMAT).keys() == sd.keys()
    for bad in ([1, 2], {"model": [1]}, {}):
        with pytest.raises(rw.WeightsError, match="holds no state_dict"):
            rw.state_dict_from(bad, "x.pth")


def test_label_mapping():
    coco = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
    assert rw.label_mapping(coco, 91) == ([1, 3, 18], "name")
    renumbered = [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}, {"id": 3, "name": "dog"}]
    assert rw.label_mapping(renumbered, 91) == ([1, 3, 18], "name")
    assert rw.label_mapping(renumbered, 91, "id") == ([1, 2, 3], "id")
    custom = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]
    assert rw.label_mapping(custom, 91) == ([1, 2], "id")
    assert rw.label_mapping(custom, 3) == ([1, 2], "id")  # a torchvision-style fine-tune: label = id
    with pytest.raises(rw.WeightsError, match="not COCO category names"):
        rw.label_mapping(custom, 91, "name")
    with pytest.raises(rw.WeightsError, match=r"category ids \[5\] are out of range"):
        rw.label_mapping([{"id": 5, "name": "circle"}], 3)
    assert rw.COCO_CATEGORIES == tv_enum("v1").meta["categories"]


def test_v2_builder_has_torchvision_signature():
    import inspect

    from torchvision.models.detection import retinanet_resnet50_fpn_v2 as tv_v2

    ours, theirs = inspect.signature(retinanet_resnet50_fpn_v2), inspect.signature(tv_v2)
    assert list(ours.parameters) == list(theirs.parameters)
    assert all(p.kind == theirs.parameters[n].kind for n, p in ours.parameters.items())
