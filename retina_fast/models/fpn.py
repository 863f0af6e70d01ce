"""Feature pyramid: torchvision's modules, re-exported.

``FeaturePyramidNetwork``, ``LastLevelP6P7`` and ``LastLevelMaxPool`` are
``torchvision.ops.feature_pyramid_network``'s own classes: the FPN has no kernel of ours inside
(lateral 1x1 convs, nearest upsampling, 3x3 output convs), and torchvision's modules give the
keys (``inner_blocks.i.0``, ``layer_blocks.i.0``, ``p6``, ``p7``), the initialisation, the
arithmetic and the pre-0.13 key renaming that RetinaNet checkpoints need. This module keeps
the ``retina_fast.models.fpn`` names importable.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7,
)

__all__ = ["FeaturePyramidNetwork", "LastLevelP6P7", "LastLevelMaxPool", "ExtraFPNBlock", "guard_tiny_maps"]


class _TinyMapSafeConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same keys, same float32 results) that computes a strided
    convolution of a 1x1 map in float32 under CPU autocast.

    oneDNN's bfloat16 backward of a 3x3 stride-2 convolution whose input is 1x1 returns NaN in
    the weight gradient about one call in ten (PyTorch 2.14.1, oneDNN 3.12, AVX-512-BF16 CPU;
    float32 and larger maps are fine): the P6 -> P7 block of an input of 64 px or less. That
    map is one pixel: float32 costs nothing there."""

    def forward(self, x):
        if (x.device.type == "cpu" and x.shape[-1] * x.shape[-2] == 1 and max(self.stride) > 1
                and torch.is_autocast_enabled("cpu")):
            dtype = torch.get_autocast_dtype("cpu")
            with torch.autocast("cpu", enabled=False):
                return F.conv2d(x.float(), self.weight.float(), None if self.bias is None else self.bias.float(),
                                self.stride, self.padding, self.dilation, self.groups).to(dtype)
        return super().forward(x)


def guard_tiny_maps(block: nn.Module) -> nn.Module:
    """``block`` (an extra-levels block: P6/P7) with its strided convolutions made
    :class:`_TinyMapSafeConv2d` in place (their class only: parameters, keys and
    initialisation unchanged)."""
    for m in block.modules():
        if type(m) is nn.Conv2d and max(m.stride) > 1:
            m.__class__ = _TinyMapSafeConv2d
    return block
