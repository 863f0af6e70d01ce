"""The FPN, its extra levels and BackboneWithFPN are torchvision's own modules; our
resnet_fpn_backbone equals torchvision's extractor where both apply and adds what it lacks
(the FPN width, RetinaNet's P6/P7 by default). The end-to-end parity with torchvision's
RetinaNet (tests/models/test_retinanet_parity.py) runs through these modules."""

import pytest
import torch
import torchvision
from torchvision.models import resnet18, resnet50
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops.misc import FrozenBatchNorm2d

import retina_fast.models as rm
from retina_fast.models.backbone import resnet_fpn_backbone


def test_the_modules_are_torchvisions():
    assert rm.FeaturePyramidNetwork is torchvision.ops.FeaturePyramidNetwork
    assert rm.LastLevelP6P7 is torchvision.ops.feature_pyramid_network.LastLevelP6P7
    assert rm.LastLevelMaxPool is torchvision.ops.feature_pyramid_network.LastLevelMaxPool
    assert rm.BackboneWithFPN is torchvision.models.detection.backbone_utils.BackboneWithFPN


@pytest.mark.parametrize("depth, builder, extra", [
    (50, resnet50, "p5"), (18, resnet18, "pool"),
])
def test_resnet_fpn_backbone_is_torchvisions_extractor(depth, builder, extra):
    torch.manual_seed(0)
    tv_extra = (torchvision.ops.feature_pyramid_network.LastLevelP6P7(256, 256) if extra == "p5"
                else torchvision.ops.feature_pyramid_network.LastLevelMaxPool())
    tv = _resnet_fpn_extractor(builder(weights=None, norm_layer=FrozenBatchNorm2d), 3, [2, 3, 4], tv_extra)
    ours = resnet_fpn_backbone(depth, 3, [2, 3, 4], norm_layer=FrozenBatchNorm2d, p6_from=extra)
    t, o = tv.state_dict(), ours.state_dict()
    assert list(o) == list(t) and all(o[k].shape == t[k].shape for k in t)
    ours.load_state_dict(t, strict=True)
    assert [p.requires_grad for p in ours.parameters()] == [p.requires_grad for p in tv.parameters()]
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        a, b = tv.eval()(x), ours.eval()(x)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_what_torchvisions_extractor_lacks():
    # an FPN width other than 256, and P6 from C5 (RetinaNet v2)
    m = resnet_fpn_backbone(18, 5, fpn_channels=64, p6_from="c5")
    assert m.out_channels == 64 and m.fpn.extra_blocks.p6.in_channels == 512 and not m.fpn.extra_blocks.use_P5
    with torch.no_grad():
        out = m.eval()(torch.rand(1, 3, 128, 128))
    assert list(out) == ["0", "1", "2", "p6", "p7"] and all(v.shape[1] == 64 for v in out.values())
    with pytest.raises(ValueError, match="p6_from"):
        resnet_fpn_backbone(18, p6_from="p4")


def test_p7_of_a_one_pixel_p6_has_finite_gradients_under_bf16_autocast():
    # oneDNN's bf16 backward of a 3x3 stride-2 conv on a 1x1 map gives NaN weight gradients
    # about one call in ten (channels_last; PyTorch 2.14.1 on an AVX-512-BF16 CPU): the P6 -> P7
    # conv of a 64 px input. Our backbone computes that conv in float32 (guard_tiny_maps).
    from retina_fast.models.fpn import _TinyMapSafeConv2d

    torch.manual_seed(0)
    m = resnet_fpn_backbone(18, 5, fpn_channels=256, p6_from="p5")
    assert type(m.fpn.extra_blocks.p7) is _TinyMapSafeConv2d and type(m.fpn.extra_blocks.p6) is _TinyMapSafeConv2d
    m = m.to(memory_format=torch.channels_last)
    p7 = m.fpn.extra_blocks
    # Unguarded, 14 of these 200 trials had NaN gradients here (the kernel reads memory it did
    # not write: freed NaN-filled buffers make that visible), so 200 clean ones are a test.
    for trial in range(200):
        junk = [torch.full((n,), float("nan"), dtype=dt) for n in (256 * 256 * 9, 4096, 65536)
                for dt in (torch.float32, torch.bfloat16)]
        del junk
        p5 = torch.randn(2, 256, 2, 2).to(memory_format=torch.channels_last).requires_grad_()
        p7.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs, names = p7([p5], [p5], ["p5"])
        assert outs[-1].shape[-2:] == (1, 1) and outs[-1].dtype == torch.bfloat16
        sum(o.float().sum() for o in outs).backward()
        for name, p in p7.named_parameters():
            assert torch.isfinite(p.grad).all(), (trial, name)
    # float32: the same arithmetic as nn.Conv2d
    x = torch.randn(1, 256, 1, 1)
    torch.testing.assert_close(p7.p7(x), torch.nn.functional.conv2d(x, p7.p7.weight, p7.p7.bias, 2, 1), rtol=0, atol=0)
