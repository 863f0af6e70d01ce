"""ResNet + FPN backbones with torchvision's module names (``body.*``, ``fpn.*``).

``BackboneWithFPN`` is torchvision's (``torchvision.models.detection.backbone_utils``): an
``IntermediateLayerGetter`` over the body, then torchvision's FPN; with ``extra_blocks=None``
it adds torchvision's default max-pool level. :func:`resnet_fpn_backbone` is ours because it
does what torchvision's ``_resnet_fpn_extractor`` does not: the FPN width is a parameter
(torchvision fixes 256; the CPU-sized ResNet-18/34 models and ``fpn_channels`` use others), the
extra levels default to RetinaNet's P6/P7 from P5 (v1) or C5 (v2) rather than the max-pool
level, and it builds the ResNet itself (``weights=None``: nothing is ever downloaded) with the
given norm layer. With ``fpn_channels=256`` the result is module for module, key for key and
value for value torchvision's extractor (tests/models/test_fpn.py).
"""

from collections import OrderedDict
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.misc import FrozenBatchNorm2d

from retina_fast.models.fpn import LastLevelMaxPool, LastLevelP6P7, guard_tiny_maps

__all__ = ["BackboneWithFPN", "resnet_fpn_backbone", "conv_frozen_bn", "fold_frozen_bn_in_training"]

_RESNETS = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50, 101: resnet.resnet101}


def resnet_fpn_backbone(
    depth: int = 50,
    trainable_layers: int = 5,
    returned_layers: Optional[List[int]] = None,
    extra_blocks: Optional[nn.Module] = None,
    norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
    fpn_channels: int = 256,
    p6_from: str = "p5",
) -> BackboneWithFPN:
    """torchvision's ``_resnet_fpn_extractor(resnetN(weights=None, norm_layer), ...)`` with a
    configurable FPN width and RetinaNet's extra levels.

    Args:
        depth: 18, 34, 50 or 101.
        trainable_layers: stages left trainable, counted from the top (0..5; 5 also trains
            ``bn1``); the others get ``requires_grad=False``, as in torchvision.
        returned_layers: ResNet stages (1..4) fed to the FPN; default ``[2, 3, 4]`` (C3-C5).
        extra_blocks: extra FPN levels; default ``LastLevelP6P7`` from P5 (``p6_from="p5"``,
            RetinaNet v1) or from C5 (``p6_from="c5"``, v2), or ``LastLevelMaxPool``
            (``p6_from="pool"``).
        norm_layer: the body's norm (``FrozenBatchNorm2d`` for pretrained weights).
        fpn_channels: FPN width (256 in torchvision).
    """
    if depth not in _RESNETS:
        raise ValueError(f"resnet_fpn_backbone: depth must be one of {sorted(_RESNETS)}, got {depth}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"Trainable layers should be in the range [0,5], got {trainable_layers}")
    body = _RESNETS[depth](weights=None, norm_layer=norm_layer)
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for name, p in body.named_parameters():
        if all(not name.startswith(layer) for layer in layers_to_train):
            p.requires_grad_(False)
    returned_layers = list(returned_layers or [2, 3, 4])
    if min(returned_layers) <= 0 or max(returned_layers) >= 5:
        raise ValueError(f"Each returned layer should be in the range [1,4]. Got {returned_layers}")
    return_layers = {f"layer{k}": str(v) for v, k in enumerate(returned_layers)}
    c2 = body.inplanes // 8  # layer1's output width (64 for ResNet-18/34, 256 for ResNet-50)
    in_channels_list = [c2 * 2 ** (i - 1) for i in returned_layers]
    if extra_blocks is None:
        if p6_from == "p5":
            extra_blocks = LastLevelP6P7(fpn_channels, fpn_channels)
        elif p6_from == "c5":
            extra_blocks = LastLevelP6P7(in_channels_list[-1], fpn_channels)
        elif p6_from == "pool":
            extra_blocks = LastLevelMaxPool()
        else:
            raise ValueError(f"p6_from must be 'p5', 'c5' or 'pool', got {p6_from!r}")
    backbone = BackboneWithFPN(body, return_layers, in_channels_list, fpn_channels, guard_tiny_maps(extra_blocks))
    fold_frozen_bn_in_training(backbone.body)
    return backbone


# ---------------------------------------------------------------------------------------------
# FrozenBatchNorm2d folded into its convolution in training.


def conv_frozen_bn(conv: nn.Conv2d, bn: FrozenBatchNorm2d, x: Tensor) -> Tensor:
    """``bn(conv(x))`` for a ``FrozenBatchNorm2d`` (an affine map with fixed statistics)
    computed as one convolution: ``conv2d(x, W * s, beta - mean * s (+ b * s))`` with
    ``s = gamma / sqrt(var + eps)``. The same function, and the same gradients for ``W`` (the
    product's backward is ``s * dW'``, on the weight, not the feature map).

    torchvision's ``FrozenBatchNorm2d`` computes ``x * scale + bias`` over the whole map, forward
    and backward; under bfloat16 autocast its float32 ``scale`` also promotes the map to float32,
    so every block's ReLU, add and the next convolution's input cast run on float32 maps."""
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    shift = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    w = conv.weight * scale.reshape(-1, 1, 1, 1)
    return F.conv2d(x, w, shift, conv.stride, conv.padding, conv.dilation, conv.groups)


def _conv_bn(conv: nn.Module, bn: nn.Module, x: Tensor, training: bool) -> Tensor:
    if training and type(bn) is FrozenBatchNorm2d and type(conv) is nn.Conv2d and conv.padding_mode == "zeros":
        return conv_frozen_bn(conv, bn, x)
    return bn(conv(x))


class _FoldingBottleneck(resnet.Bottleneck):
    """torchvision's ``Bottleneck`` (same parameters, keys, eval arithmetic) whose training
    forward folds ``FrozenBatchNorm2d`` into the convolutions (:func:`conv_frozen_bn`)."""

    def forward(self, x: Tensor) -> Tensor:
        t = self.training
        out = self.relu(_conv_bn(self.conv1, self.bn1, x, t))
        out = self.relu(_conv_bn(self.conv2, self.bn2, out, t))
        out = _conv_bn(self.conv3, self.bn3, out, t)
        identity = x if self.downsample is None else _downsample(self.downsample, x, t)
        out += identity
        return self.relu(out)


class _FoldingBasicBlock(resnet.BasicBlock):
    """torchvision's ``BasicBlock`` with the training forward of :class:`_FoldingBottleneck`."""

    def forward(self, x: Tensor) -> Tensor:
        t = self.training
        out = self.relu(_conv_bn(self.conv1, self.bn1, x, t))
        out = _conv_bn(self.conv2, self.bn2, out, t)
        identity = x if self.downsample is None else _downsample(self.downsample, x, t)
        out += identity
        return self.relu(out)


def _downsample(ds: nn.Module, x: Tensor, training: bool) -> Tensor:
    if isinstance(ds, nn.Sequential) and len(ds) == 2:
        return _conv_bn(ds[0], ds[1], x, training)
    return ds(x)


class _FoldingBody(IntermediateLayerGetter):
    """torchvision's ``IntermediateLayerGetter`` whose training forward folds a
    ``FrozenBatchNorm2d`` that follows a convolution (the stem's ``conv1`` / ``bn1``)."""

    def forward(self, x: Tensor):
        out = OrderedDict()
        items = list(self.items())
        i = 0
        while i < len(items):
            name, module = items[i]
            if (self.training and i + 1 < len(items) and type(items[i + 1][1]) is FrozenBatchNorm2d
                    and type(module) is nn.Conv2d and name not in self.return_layers):
                x = _conv_bn(module, items[i + 1][1], x, True)
                i += 1
                name = items[i][0]
            else:
                x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
            i += 1
        return out


_FOLDING = {resnet.Bottleneck: _FoldingBottleneck, resnet.BasicBlock: _FoldingBasicBlock,
            IntermediateLayerGetter: _FoldingBody}


def fold_frozen_bn_in_training(body: nn.Module) -> nn.Module:
    """Give ``body`` (a ResNet's ``IntermediateLayerGetter``) and its blocks the training forward
    that folds ``FrozenBatchNorm2d`` into the convolutions, in place: their class only (a
    subclass of torchvision's with the same parameters, keys and eval forward). A model with
    ``BatchNorm2d`` (batch statistics in training) computes exactly as before."""
    for m in body.modules():
        cls = _FOLDING.get(type(m))
        if cls is not None:
            m.__class__ = cls
    return body
