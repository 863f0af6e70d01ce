"""Model building blocks (torchvision-compatible detection modules)."""

from retina_fast.models.anchors import AnchorGenerator, retinanet_anchor_generator

__all__ = ["AnchorGenerator", "retinanet_anchor_generator"]
