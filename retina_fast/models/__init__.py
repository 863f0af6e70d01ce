"""Model building blocks (torchvision-compatible detection modules) and RetinaNet."""

from retina_fast.models.anchors import AnchorGenerator, retinanet_anchor_generator
from retina_fast.models.backbone import BackboneWithFPN, resnet_fpn_backbone
from retina_fast.models.fpn import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7
from retina_fast.models.head import RetinaNetClassificationHead, RetinaNetHead, RetinaNetRegressionHead
from retina_fast.models.loss import RetinaNetLoss, pack_targets
from retina_fast.models.retinanet import RetinaNet, retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2, retinanet_resnet_fpn

__all__ = [
    "AnchorGenerator",
    "retinanet_anchor_generator",
    "BackboneWithFPN",
    "resnet_fpn_backbone",
    "FeaturePyramidNetwork",
    "LastLevelMaxPool",
    "LastLevelP6P7",
    "RetinaNetHead",
    "RetinaNetClassificationHead",
    "RetinaNetRegressionHead",
    "RetinaNetLoss",
    "pack_targets",
    "RetinaNet",
    "retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn_v2",
    "retinanet_resnet_fpn",
]
