"""Our RetinaNet's own contract: checkpoint compatibility (both ways, old key names, frozen BN),
small backbones, autocast, channels_last, empty and degenerate targets, patch/unpatch."""

import copy

import pytest
import torch
import torchvision
from torchvision.models.detection import retinanet_resnet50_fpn as tv_retinanet_v1
from torchvision.models.detection import retinanet_resnet50_fpn_v2 as tv_retinanet_v2
from torchvision.ops.misc import FrozenBatchNorm2d

import retina_fast
from retina_fast.models import RetinaNet, retinanet_resnet50_fpn, retinanet_resnet_fpn
from tests.conftest import devices

SIZE = dict(min_size=96, max_size=128)


def _small(variant="v1", depth=18, num_classes=5, **kw):
    torch.manual_seed(0)
    return retinanet_resnet_fpn(depth, variant, num_classes, **{**SIZE, **kw})


def _batch(device="cpu", empty_all=False):
    g = torch.Generator().manual_seed(0)
    imgs = [torch.rand(3, 90, 120, generator=g), torch.rand(3, 128, 100, generator=g)]
    if empty_all:
        tg = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in imgs]
    else:
        tg = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 5.0, 110.0, 40.0]]), "labels": torch.tensor([1, 4])},
              {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    return [i.to(device) for i in imgs], [{k: v.to(device) for k, v in t.items()} for t in tg]


@pytest.mark.parametrize("variant,tv_builder", [("v1", tv_retinanet_v1), ("v2", tv_retinanet_v2)])
def test_checkpoints_load_both_ways_with_identical_keys_and_shapes(variant, tv_builder, tmp_path):
    tv = tv_builder(weights=None, weights_backbone=None)
    ours = retinanet_resnet50_fpn(variant)
    t_sd, o_sd = tv.state_dict(), ours.state_dict()
    assert list(o_sd) == list(t_sd)
    assert all(o_sd[k].shape == t_sd[k].shape for k in t_sd)
    tv.load_state_dict(o_sd, strict=True)
    assert ours.head.regression_head._loss_type == tv.head.regression_head._loss_type
    # weights_path: a torchvision checkpoint file, loaded strictly; v1 then freezes its body's
    # BatchNorm (torchvision's rule for pretrained weights) and trains 3 stages
    torch.save(t_sd, tmp_path / "tv.pth")
    loaded = retinanet_resnet50_fpn(variant, weights_path=str(tmp_path / "tv.pth"))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, t_sd[k])
    frozen = any(isinstance(m, FrozenBatchNorm2d) for m in loaded.backbone.body.modules())
    assert frozen == (variant == "v1")
    assert not loaded.backbone.body.layer1[0].conv1.weight.requires_grad
    assert loaded.backbone.body.layer2[0].conv1.weight.requires_grad


def test_pre_0_13_key_names_load():
    m = _small()
    sd = m.state_dict()
    old = {}
    for k, v in sd.items():
        for part in ("classification_head.conv.", "regression_head.conv."):
            if part in k:  # conv.i.0.weight -> conv.{2i}.weight (conv, relu, conv, ...)
                head, rest = k.split(part)
                i, _, kind = rest.split(".")
                k = f"{head}{part}{2 * int(i)}.{kind}"
        for part in ("fpn.inner_blocks.", "fpn.layer_blocks."):
            if part in k:  # inner_blocks.i.0.weight -> inner_blocks.i.weight
                head, rest = k.split(part)
                i, _, kind = rest.split(".")
                k = f"{head}{part}{i}.{kind}"
        old[k] = v.clone() + 0.5 if v.is_floating_point() else v
    fresh = _small()
    fresh.load_state_dict(old, strict=True)  # no _metadata: treated as version 1
    for k, v in fresh.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, sd[k] + 0.5), k


@pytest.mark.parametrize("depth", [18, 34])
def test_small_backbones_train_and_detect(depth):
    m = _small(depth=depth, variant="v2")
    imgs, tg = _batch()
    m.train()
    losses = m(imgs, tg)
    assert set(losses) == {"classification", "bbox_regression"}
    (losses["classification"] + losses["bbox_regression"]).backward()
    assert m.head.regression_head.bbox_reg.weight.grad.abs().sum() > 0
    assert m.backbone.body.conv1.weight.grad is not None  # no weights: everything trains
    m.eval()
    with torch.no_grad():
        out = m(imgs)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}
    assert out[1]["boxes"].dtype == torch.float32


def test_a_batch_without_any_box():
    m = _small()
    imgs, tg = _batch(empty_all=True)
    m.train()
    losses = m(imgs, tg)
    assert losses["bbox_regression"].item() == 0.0 and losses["classification"] > 0
    losses["classification"].backward()
    assert torch.isfinite(m.head.classification_head.cls_logits.weight.grad).all()


def test_degenerate_boxes_and_missing_targets_fail_like_torchvision():
    m = _small()
    imgs, tg = _batch()
    tg[1] = {"boxes": torch.tensor([[5.0, 5.0, 5.0, 20.0]]), "labels": torch.tensor([0])}
    m.train()
    with pytest.raises(AssertionError, match="All bounding boxes should have positive height and width.*index 1"):
        m(imgs, tg)
    with pytest.raises(AssertionError, match="targets should not be none"):
        m(imgs)
    with pytest.raises(AssertionError, match=r"of shape \[N, 4\]"):
        m(imgs, [{"boxes": torch.zeros(4), "labels": torch.zeros(1, dtype=torch.int64)}] * 2)


@pytest.mark.parametrize("device", devices())
def test_channels_last_gives_the_same_results(device):
    m = _small("v2").to(device)
    cl = copy.deepcopy(m).to(memory_format=torch.channels_last)
    imgs, tg = _batch(device)
    m.train(), cl.train()
    a, b = m(imgs, tg), cl(imgs, tg)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    m.eval(), cl.eval()
    with torch.no_grad():
        da, db = m(imgs), cl(imgs)
    for x, y in zip(da, db):
        torch.testing.assert_close(y["scores"][:20], x["scores"][:20], rtol=0, atol=1e-4)


# float16 convolutions on CPU are emulated (minutes): float16 runs on CUDA only.
@pytest.mark.parametrize("device,dtype", [("cpu", torch.bfloat16)]
                         + [(d, t) for d in devices() if d != "cpu" for t in (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_autocast(device, dtype, variant):
    m = _small(variant, fpn_channels=64, min_size=64, max_size=64).to(device)
    m.backbone.body.requires_grad_(False)  # bfloat16 conv backward is slow on CPUs without bf16 units
    imgs, tg = _batch(device)
    m.train()
    ref = m(imgs, tg)
    with torch.autocast(device_type=device, dtype=dtype):
        amp = m(imgs, tg)
    for k in ref:
        assert amp[k].dtype == torch.float32 and torch.isfinite(amp[k])
        # half-precision convs: a few percent (bfloat16 has 8 bits of mantissa)
        torch.testing.assert_close(amp[k], ref[k], rtol=5e-2, atol=1e-3)
    (amp["classification"] + amp["bbox_regression"]).backward()
    assert torch.isfinite(m.head.classification_head.cls_logits.weight.grad).all()
    m.eval()
    m.score_thresh = 0.005  # random weights: every score is ~0.01
    with torch.no_grad():
        ref = m(imgs)
        with torch.autocast(device_type=device, dtype=dtype):
            out = m(imgs)
    assert out[0]["boxes"].dtype == torch.float32 and out[0]["scores"].dtype == torch.float32
    assert len(out[0]["scores"]) > 0
    torch.testing.assert_close(out[0]["scores"][:10], ref[0]["scores"][:10], rtol=5e-2, atol=0)


def test_custom_parts_and_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        retinanet_resnet_fpn(18, "v3")
    with pytest.raises(ValueError, match="out_channels"):
        RetinaNet(torch.nn.Identity(), 3)
    m = _small(box_loss="smooth_l1")
    assert m.box_loss == "smooth_l1"
    with pytest.raises(ValueError, match="box_loss"):
        _small(box_loss="l2")


def test_patch_and_unpatch_torchvision():
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator

    tv = tv_retinanet_v1(weights=None, weights_backbone=None, **SIZE)
    sd = {k: v.clone() for k, v in tv.state_dict().items()}
    retina_fast.patch_torchvision(tv)
    assert isinstance(tv.anchor_generator, retina_fast.models.AnchorGenerator)
    assert retina_fast.patch_torchvision(tv) is tv  # idempotent
    assert tv.state_dict().keys() == sd.keys()
    cls = type(tv)
    assert cls.__name__ == "RetinaFastRetinaNet" and isinstance(tv, torchvision.models.detection.RetinaNet)
    retina_fast.unpatch_torchvision(tv)
    assert isinstance(tv.anchor_generator, TVAnchorGenerator)
    assert type(tv).__name__ == "RetinaNet"
    assert "compute_loss" not in tv.__dict__ and "postprocess_detections" not in tv.__dict__
    with retina_fast.patched_torchvision(tv):
        assert type(tv) is cls
    assert type(tv).__name__ == "RetinaNet"
    # an instance-level override (which would shadow the patched class's method) is set aside
    # while patched and restored after
    own = lambda *a: None  # noqa: E731
    tv.postprocess_detections = own
    with retina_fast.patched_torchvision(tv):
        assert "postprocess_detections" not in tv.__dict__
    assert tv.postprocess_detections is own
    with pytest.raises(TypeError, match="torchvision"):
        retina_fast.patch_torchvision(_small())


class _LargeOutputs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that writes a new tensor (not a view of an input) of at least ``numel``
    elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel \
                    and t.untyped_storage().data_ptr() not in inputs:
                self.seen.append((str(func), t.dtype, tuple(t.shape)))
        return out


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_kernels_take_bfloat16_channels_last_head_outputs_without_a_copy(variant):
    """The head's bfloat16 outputs (channels_last convolutions, under autocast) go into the
    losses, their backward and the post-processing as they are: no op after the head makes a
    tensor the size of the [B, A, K] logits, except the logits' gradient (bfloat16, written once
    by the focal loss's backward). The kernels compute in float32 inside: the losses are those of
    float32 copies, the detections those of float32 copies bit for bit."""
    bf16 = torch.bfloat16
    m = _small(variant, num_classes=7).to(memory_format=torch.channels_last)
    imgs, tg = _batch()
    m.train()
    with torch.autocast("cpu", dtype=bf16):
        il, targets = m.transform(imgs, tg)
        feats = list(m.backbone(il.tensors.contiguous(memory_format=torch.channels_last)).values())
        assert feats[0].is_contiguous(memory_format=torch.channels_last)
        head = m.head(feats)
    cls, reg = head["cls_logits"], head["bbox_regression"]
    assert cls.dtype == reg.dtype == bf16 and cls.requires_grad
    anchors = m.anchors(tuple(il.tensors.shape[-2:]), feats)

    spy = _LargeOutputs(cls.numel())
    with torch.autocast("cpu", dtype=bf16), spy:
        losses = m.compute_loss(targets, head, anchors)
        g_cls, g_reg = torch.autograd.grad(losses["classification"] + losses["bbox_regression"], [cls, reg])
    assert [dtype for _, dtype, _ in spy.seen] == [bf16], spy.seen  # the gradient
    assert g_cls.dtype == g_reg.dtype == bf16
    ref = m.compute_loss(targets, {"cls_logits": cls.detach().float(), "bbox_regression": reg.detach().float()},
                         anchors)
    for k in ref:
        assert losses[k].dtype == torch.float32
        torch.testing.assert_close(losses[k], ref[k], rtol=1e-5, atol=1e-7)

    m.eval()
    m.score_thresh = 0.005  # random weights: every score is ~0.01
    head = {k: v.detach() for k, v in head.items()}
    sizes = [tuple(f.shape[-2:]) for f in feats]
    tail = (sizes, tuple(il.tensors.shape[-2:]), il.image_sizes, [tuple(i.shape[-2:]) for i in imgs])
    spy = _LargeOutputs(cls.numel())
    with spy:
        got = m.detections_from_head(head, *tail)
    assert spy.seen == []
    exp = m.detections_from_head({k: v.float() for k, v in head.items()}, *tail)
    assert got[1].dtype == torch.float32 and int(got[3].min()) > 0
    for a, b in zip(got, exp):
        assert torch.equal(a, b)
    # a head with bfloat16 logits and float32 codes: the codes are not rounded to bfloat16
    codes = head["bbox_regression"].float() + 1e-3 * torch.randn(head["bbox_regression"].shape)
    mixed = m.detections_from_head({"cls_logits": head["cls_logits"], "bbox_regression": codes}, *tail)
    exp = m.detections_from_head({"cls_logits": head["cls_logits"].float(), "bbox_regression": codes}, *tail)
    for a, b in zip(mixed, exp):
        assert torch.equal(a, b)
