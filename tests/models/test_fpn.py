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
