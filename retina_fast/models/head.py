"""RetinaNet's classification and box-regression subnets, with torchvision's module names
(``classification_head.conv.i.0``, ``cls_logits``, ``regression_head.conv.i.0``, ``bbox_reg``),
initialisation and output layout."""

import math
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

__all__ = ["RetinaNetHead", "RetinaNetClassificationHead", "RetinaNetRegressionHead"]


def _v1_to_v2_weights(state_dict, prefix: str) -> None:
    # torchvision < 0.13 checkpoints (the published COCO v1 weights among them) name the tower
    # `conv.0, conv.2, ...` (conv, relu, conv, ...): rename to `conv.i.0`.
    for i in range(4):
        for kind in ("weight", "bias"):
            old, new = f"{prefix}conv.{2 * i}.{kind}", f"{prefix}conv.{i}.0.{kind}"
            if old in state_dict:
                state_dict[new] = state_dict.pop(old)


def _tower(channels: int, num_convs: int, norm_layer: Optional[Callable[..., nn.Module]]) -> nn.Sequential:
    # torchvision's Conv2dNormActivation: conv3x3 (bias only without norm), norm, ReLU.
    blocks = []
    for _ in range(num_convs):
        layers: List[nn.Module] = [nn.Conv2d(channels, channels, 3, 1, 1, bias=norm_layer is None)]
        if norm_layer is not None:
            layers.append(norm_layer(channels))
        layers.append(nn.ReLU(inplace=True))
        blocks.append(nn.Sequential(*layers))
    tower = nn.Sequential(*blocks)
    for m in tower.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
    return tower


def _flatten_level(x: Tensor, last: int) -> Tensor:
    # [N, A*last, H, W] -> [N, H*W*A, last]: anchors ordered y, x, anchor as the anchor grid is.
    # For a channels_last map the view/permute is free and the reshape is a no-op.
    N, _, H, W = x.shape
    return x.view(N, -1, last, H, W).permute(0, 3, 4, 1, 2).reshape(N, -1, last)


class _VersionedHead(nn.Module):
    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            _v1_to_v2_weights(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class RetinaNetClassificationHead(_VersionedHead):
    """``num_convs`` conv3x3(+norm)+ReLU, then ``cls_logits`` (A*K channels, bias set so the
    initial foreground probability is ``prior_probability``).

    ``forward(list of Tensor[N, C, H_l, W_l])`` -> Tensor[N, sum_l H_l*W_l*A, K]."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, prior_probability: float = 0.01,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, num_convs: int = 4):
        super().__init__()
        self.conv = _tower(in_channels, num_convs, norm_layer)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, 3, 1, 1)
        nn.init.normal_(self.cls_logits.weight, std=0.01)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_probability) / prior_probability))
        self.num_classes = num_classes
        self.num_anchors = num_anchors

    def forward(self, x: List[Tensor]) -> Tensor:
        return torch.cat([_flatten_level(self.cls_logits(self.conv(f)), self.num_classes) for f in x], dim=1)


class RetinaNetRegressionHead(_VersionedHead):
    """``num_convs`` conv3x3(+norm)+ReLU, then ``bbox_reg`` (A*4 channels, box codes).

    ``forward(list of Tensor[N, C, H_l, W_l])`` -> Tensor[N, sum_l H_l*W_l*A, 4].
    ``_loss_type`` (``"l1"``, ``"smooth_l1"``, ``"giou"``, ``"diou"``, ``"ciou"``) is read by
    the model's loss, as torchvision's head reads it."""

    def __init__(self, in_channels: int, num_anchors: int, norm_layer: Optional[Callable[..., nn.Module]] = None,
                 num_convs: int = 4):
        super().__init__()
        self.conv = _tower(in_channels, num_convs, norm_layer)
        self.bbox_reg = nn.Conv2d(in_channels, num_anchors * 4, 3, 1, 1)
        nn.init.normal_(self.bbox_reg.weight, std=0.01)
        nn.init.zeros_(self.bbox_reg.bias)
        self._loss_type = "l1"

    def forward(self, x: List[Tensor]) -> Tensor:
        return torch.cat([_flatten_level(self.bbox_reg(self.conv(f)), 4) for f in x], dim=1)


class RetinaNetHead(nn.Module):
    """Both subnets; ``forward(features)`` -> ``{"cls_logits": [N, A_total, K],
    "bbox_regression": [N, A_total, 4]}`` (torchvision's layout)."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, num_convs: int = 4,
                 prior_probability: float = 0.01):
        super().__init__()
        self.classification_head = RetinaNetClassificationHead(
            in_channels, num_anchors, num_classes, prior_probability, norm_layer, num_convs)
        self.regression_head = RetinaNetRegressionHead(in_channels, num_anchors, norm_layer, num_convs)

    def forward(self, x: List[Tensor]) -> Dict[str, Tensor]:
        return {"cls_logits": self.classification_head(x), "bbox_regression": self.regression_head(x)}
