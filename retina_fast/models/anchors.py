"""Anchor generator: torchvision's ``AnchorGenerator`` with every level's grid made by one
kernel (``retina_fast.ops.grid_anchors``) and the result cached per
(image size, feature sizes, dtype, device)."""

from collections import OrderedDict
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

from retina_fast.ops.boxes import grid_anchors

__all__ = ["AnchorGenerator", "retinanet_anchor_generator"]


class AnchorGenerator(nn.Module):
    """Same constructor, attributes and ``forward`` result as
    ``torchvision.models.detection.anchor_utils.AnchorGenerator``.

    Args:
        sizes (Tuple[Tuple[int]]): anchor sizes per feature map.
        aspect_ratios (Tuple[Tuple[float]]): ratios ``h / w`` per feature map.
        cache_size: how many distinct (image size, feature sizes, dtype, device) grids to keep.

    ``forward(image_list, feature_maps)`` returns a list with one Tensor[A, 4] per image, in
    the feature maps' dtype and on their device; every entry is the *same* cached tensor
    (torchvision builds a copy per image): treat it as read-only.
    """

    def __init__(
        self,
        sizes=((128, 256, 512),),
        aspect_ratios=((0.5, 1.0, 2.0),),
        cache_size: int = 16,
    ):
        super().__init__()
        if not isinstance(sizes[0], (list, tuple)):
            sizes = tuple((s,) for s in sizes)
        if not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = (aspect_ratios,) * len(sizes)
        if len(sizes) != len(aspect_ratios):
            raise ValueError(
                f"AnchorGenerator: expected one tuple of aspect ratios per tuple of sizes, got "
                f"{len(sizes)} sizes and {len(aspect_ratios)} aspect ratios"
            )
        if any(not (float(v) > 0) for s in sizes for v in s):
            raise ValueError(f"AnchorGenerator: expected positive sizes, got {sizes}")
        if any(not (0 < float(v) < float("inf")) for a in aspect_ratios for v in a):
            raise ValueError(f"AnchorGenerator: expected positive finite aspect_ratios, got {aspect_ratios}")
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        self.cell_anchors = [self.generate_anchors(s, a) for s, a in zip(sizes, aspect_ratios)]
        self.cache_size = cache_size
        self._cache: "OrderedDict[tuple, Tensor]" = OrderedDict()

    @staticmethod
    def generate_anchors(
        scales: Sequence[int],
        aspect_ratios: Sequence[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device = torch.device("cpu"),
    ) -> Tensor:
        """Zero-centred anchors ``round([-w, -h, w, h] / 2)``, ratio-major then scale, with
        ``h = sqrt(r) * s`` and ``w = s / sqrt(r)`` (torchvision's arithmetic)."""
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        aspect_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(aspect_ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        base_anchors = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
        return base_anchors.round()

    def num_anchors_per_location(self) -> List[int]:
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios)]

    def grid(
        self,
        image_size: Tuple[int, int],
        grid_sizes: Sequence[Tuple[int, int]],
        dtype: torch.dtype,
        device: torch.device,
    ) -> Tensor:
        """Tensor[A, 4]: the anchors of one (padded) image of ``image_size`` (h, w) for feature
        maps of ``grid_sizes`` (h, w each); strides are ``image_size // grid_size``."""
        image_size = (int(image_size[0]), int(image_size[1]))
        grid_sizes = tuple((int(g[0]), int(g[1])) for g in grid_sizes)
        if len(grid_sizes) != len(self.cell_anchors):
            raise ValueError(
                f"AnchorGenerator: expected {len(self.cell_anchors)} feature maps (one per tuple of "
                f"sizes), got {len(grid_sizes)}"
            )
        key = (image_size, grid_sizes, dtype, torch.device(device))
        compiling = torch.compiler.is_compiling()
        if not compiling:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        strides = [(image_size[0] // g[0], image_size[1] // g[1]) for g in grid_sizes]
        cells = [c.to(dtype=dtype, device=device) for c in self.cell_anchors]
        anchors = grid_anchors(cells, grid_sizes, strides)
        if not compiling and self.cache_size > 0:
            self._cache[key] = anchors
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return anchors

    def forward(self, image_list, feature_maps: List[Tensor]) -> List[Tensor]:
        grid_sizes = [tuple(f.shape[-2:]) for f in feature_maps]
        image_size = tuple(image_list.tensors.shape[-2:])
        anchors = self.grid(image_size, grid_sizes, feature_maps[0].dtype, feature_maps[0].device)
        return [anchors for _ in range(len(image_list.image_sizes))]


def retinanet_anchor_generator() -> AnchorGenerator:
    """RetinaNet's anchors (torchvision ``_default_anchorgen``): sizes ``int(s * 2**(k/3))``,
    k = 0, 1, 2, for s in 32..512, ratios 0.5, 1, 2 on 5 levels."""
    sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in [32, 64, 128, 256, 512])
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
