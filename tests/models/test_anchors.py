"""retina_fast.models.AnchorGenerator vs torchvision's AnchorGenerator."""

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import _default_anchorgen

from retina_fast.models import AnchorGenerator, retinanet_anchor_generator
from tests.conftest import devices


def _inputs(h, w, grids, dtype, device, n_images=3):
    img = ImageList(torch.zeros(n_images, 3, h, w, device=device), [(h - 7 * i, w - 3 * i) for i in range(n_images)])
    feats = [torch.zeros(n_images, 2, gh, gw, dtype=dtype, device=device) for gh, gw in grids]
    return img, feats


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("h,w,grids", [
    (640, 640, [(80, 80), (40, 40), (20, 20), (10, 10), (5, 5)]),
    (800, 1216, [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]),  # 800 // 13 = 61
])
def test_retinanet_anchors_match_torchvision(device, dtype, h, w, grids):
    img, feats = _inputs(h, w, grids, dtype, device)
    ours = retinanet_anchor_generator()(img, feats)
    tv = _default_anchorgen()(img, feats)
    assert len(ours) == len(tv) == 3
    for o, t in zip(ours, tv):
        assert o.dtype == t.dtype == dtype and o.device == t.device
        assert torch.equal(o, t)
    assert ours[0].shape[0] == sum(gh * gw * 9 for gh, gw in grids)


def test_custom_sizes_and_cache():
    sizes, ratios = ((16, 32), (64,)), ((0.25, 1.0, 3.0), (1.0, 0.5))
    ag, tvag = AnchorGenerator(sizes, ratios), TVAnchorGenerator(sizes, ratios)
    assert ag.num_anchors_per_location() == tvag.num_anchors_per_location() == [6, 2]
    for c, t in zip(ag.cell_anchors, tvag.cell_anchors):
        assert torch.equal(c, t)
    img, feats = _inputs(96, 128, [(12, 16), (6, 8)], torch.float32, "cpu", 2)
    first = ag(img, feats)
    assert torch.equal(first[0], tvag(img, feats)[0])
    again = ag(img, feats)
    assert again[0] is first[0]  # cached
    img2, feats2 = _inputs(128, 96, [(16, 12), (8, 6)], torch.float32, "cpu", 2)
    other = ag(img2, feats2)
    assert other[0] is not first[0] and torch.equal(other[0], tvag(img2, feats2)[0])
    assert len(AnchorGenerator(sizes, ratios, cache_size=1)._cache) == 0
    with pytest.raises(ValueError, match="feature maps"):
        ag(img, feats[:1])
    assert ag.state_dict() == {} == tvag.state_dict()
