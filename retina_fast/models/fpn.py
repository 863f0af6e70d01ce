"""Feature pyramid (Lin et al. 2017) with torchvision's parameter names and arithmetic.

``FeaturePyramidNetwork`` and ``LastLevelP6P7`` hold the same modules under the same names as
``torchvision.ops.FeaturePyramidNetwork`` / ``LastLevelP6P7`` (``inner_blocks.i.0``,
``layer_blocks.i.0``, ``p6``, ``p7``), initialise them the same way and compute the same
result, so torchvision checkpoints load with ``strict=True``.
"""

from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FeaturePyramidNetwork", "LastLevelP6P7", "LastLevelMaxPool"]


def _conv_block(c_in: int, c_out: int, k: int, norm_layer: Optional[Callable[..., nn.Module]]) -> nn.Sequential:
    # torchvision's Conv2dNormActivation(activation_layer=None): a Sequential whose [0] is the conv
    # (that index is in the checkpoint keys); the conv has a bias only without a norm.
    layers: List[nn.Module] = [nn.Conv2d(c_in, c_out, k, 1, (k - 1) // 2, bias=norm_layer is None)]
    if norm_layer is not None:
        layers.append(norm_layer(c_out))
    return nn.Sequential(*layers)


class LastLevelP6P7(nn.Module):
    """P6 = conv3x3/2 of P5 (``in_channels == out_channels``, RetinaNet v1) or of C5 (v2);
    P7 = conv3x3/2 of relu(P6)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for m in (self.p6, self.p7):
            nn.init.kaiming_uniform_(m.weight, a=1)
            nn.init.constant_(m.bias, 0)
        self.use_P5 = in_channels == out_channels

    def forward(self, p: List[Tensor], c: List[Tensor], names: List[str]) -> Tuple[List[Tensor], List[str]]:
        x = p[-1] if self.use_P5 else c[-1]
        p6 = self.p6(x)
        p7 = self.p7(F.relu(p6))
        return p + [p6, p7], names + ["p6", "p7"]


class LastLevelMaxPool(nn.Module):
    """torchvision's default extra level: P5 subsampled by 2 (``max_pool2d`` with kernel 1)."""

    def forward(self, p: List[Tensor], c: List[Tensor], names: List[str]) -> Tuple[List[Tensor], List[str]]:
        return p + [F.max_pool2d(p[-1], kernel_size=1, stride=2, padding=0)], names + ["pool"]


class FeaturePyramidNetwork(nn.Module):
    """Top-down pathway with lateral 1x1 convs and 3x3 output convs.

    Args:
        in_channels_list: channels of each input map, highest resolution first.
        out_channels: channels of every output map.
        extra_blocks: optional module ``(p, c, names) -> (p, names)`` adding levels
            (``LastLevelP6P7``, ``LastLevelMaxPool``).
        norm_layer: optional norm after every conv (then the convs have no bias).

    ``forward(OrderedDict[name -> Tensor[B, C_i, H_i, W_i]])`` returns an OrderedDict of
    Tensor[B, out_channels, H_i, W_i] under the same names (plus the extra blocks' names).
    """

    _version = 2

    def __init__(
        self,
        in_channels_list: List[int],
        out_channels: int,
        extra_blocks: Optional[nn.Module] = None,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
    ):
        super().__init__()
        if any(c <= 0 for c in in_channels_list):
            raise ValueError(f"FeaturePyramidNetwork: every input needs channels > 0, got {list(in_channels_list)}")
        self.inner_blocks = nn.ModuleList([_conv_block(c, out_channels, 1, norm_layer) for c in in_channels_list])
        self.layer_blocks = nn.ModuleList(
            [_conv_block(out_channels, out_channels, 3, norm_layer) for _ in in_channels_list]
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        self.extra_blocks = extra_blocks
        self.out_channels = out_channels

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Checkpoints from before torchvision 0.13 name the convs `inner_blocks.i.weight`.
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            for block in ("inner_blocks", "layer_blocks"):
                for i in range(len(self.inner_blocks)):
                    for kind in ("weight", "bias"):
                        old, new = f"{prefix}{block}.{i}.{kind}", f"{prefix}{block}.{i}.0.{kind}"
                        if old in state_dict:
                            state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def forward(self, x: Dict[str, Tensor]) -> "OrderedDict[str, Tensor]":
        names = list(x.keys())
        feats = list(x.values())
        last_inner = self.inner_blocks[-1](feats[-1])
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(feats) - 2, -1, -1):
            lateral = self.inner_blocks[idx](feats[idx])
            top_down = F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
            last_inner = lateral + top_down
            results.insert(0, self.layer_blocks[idx](last_inner))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, feats, names)
        return OrderedDict(zip(names, results))
