"""Feature pyramid: torchvision's modules, re-exported.

``FeaturePyramidNetwork``, ``LastLevelP6P7`` and ``LastLevelMaxPool`` are
``torchvision.ops.feature_pyramid_network``'s own classes: the FPN has no kernel of ours inside
(lateral 1x1 convs, nearest upsampling, 3x3 output convs), and torchvision's modules give the
keys (``inner_blocks.i.0``, ``layer_blocks.i.0``, ``p6``, ``p7``), the initialisation, the
arithmetic and the pre-0.13 key renaming that RetinaNet checkpoints need. This module keeps
the ``retina_fast.models.fpn`` names importable.
"""

from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7,
)

__all__ = ["FeaturePyramidNetwork", "LastLevelP6P7", "LastLevelMaxPool", "ExtraFPNBlock"]
