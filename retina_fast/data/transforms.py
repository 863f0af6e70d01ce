"""Detection transforms on ``(image, target)`` pairs.

``image`` is a ``[C, H, W]`` tensor (uint8 or float); ``target["boxes"]`` is ``float[n, 4]``
``(x1, y1, x2, y2)`` in pixels. Every transform is called as ``t(image, target, generator)``:
randomness comes from the ``torch.Generator`` passed in, which the datasets seed per sample
(from seed, epoch, index), so augmentation is the same whatever the worker count and a resumed
run repeats it exactly.

The model resizes its inputs itself (``model.transform``: min/max size, normalisation, padding
to a multiple of 32), so the data side needs no resize for training; :class:`Resize` and
:class:`RandomResize` are here to shrink large images early (less to decode-and-ship between
processes) or to pre-scale for prediction. Multi-scale *training* is set on the model transform
(a tuple ``min_size``), because the model would otherwise resize a data-side scale back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target, generator=None):
        for t in self.transforms:
            image, target = t(image, target, generator)
        return image, target

    def __repr__(self):
        return f"Compose({self.transforms})"


class ToFloat:
    """uint8 ``[0, 255]`` → float32 ``[0, 1]`` (what the model expects)."""

    def __call__(self, image, target, generator=None):
        if image.dtype == torch.uint8:
            image = image.float().div_(255.0)
        return image, target

    def __repr__(self):
        return "ToFloat()"


class RandomHorizontalFlip:
    """Flip with probability ``p``: ``x1' = W - x2``, ``x2' = W - x1``."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target, generator=None):
        if torch.rand((), generator=generator).item() < self.p:
            image = image.flip(-1)
            w = image.shape[-1]
            boxes = target["boxes"]
            if boxes.numel():
                boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
            target = dict(target, boxes=boxes)
        return image, target

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


def _resize_scale(h: int, w: int, min_size: float, max_size: float) -> float:
    # Same rule as torchvision's GeneralizedRCNNTransform: shorter side to min_size unless the
    # longer side would pass max_size.
    return min(min_size / min(h, w), max_size / max(h, w))


def resize_image_and_boxes(image, target, min_size: float, max_size: float):
    h, w = image.shape[-2:]
    scale = _resize_scale(h, w, min_size, max_size)
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    if (nh, nw) == (h, w):
        return image, target
    dtype = image.dtype
    x = image.float()[None]
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)[0]
    if dtype == torch.uint8:
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    boxes = target["boxes"]
    if boxes.numel():
        ratio = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=boxes.dtype)
        boxes = boxes * ratio
    return x, dict(target, boxes=boxes)


class Resize:
    """Resize so the shorter side is ``min_size`` and the longer at most ``max_size``; boxes
    scaled by the same per-axis factors."""

    def __init__(self, min_size: int, max_size: int | None = None):
        self.min_size = min_size
        self.max_size = max_size if max_size is not None else math.inf

    def __call__(self, image, target, generator=None):
        return resize_image_and_boxes(image, target, self.min_size, self.max_size)

    def __repr__(self):
        return f"Resize({self.min_size}, {self.max_size})"


class RandomResize:
    """Multi-scale: a shorter side drawn uniformly from ``min_sizes`` per sample."""

    def __init__(self, min_sizes, max_size: int | None = None):
        self.min_sizes = list(min_sizes)
        self.max_size = max_size if max_size is not None else math.inf

    def __call__(self, image, target, generator=None):
        i = int(torch.randint(len(self.min_sizes), (), generator=generator))
        return resize_image_and_boxes(image, target, self.min_sizes[i], self.max_size)

    def __repr__(self):
        return f"RandomResize({self.min_sizes}, {self.max_size})"


def train_transforms(hflip: float = 0.5, min_sizes=None, max_size=None, to_float: bool = True):
    """The default training pipeline: optional data-side (multi-scale) resize, flip, to float.

    ``to_float=False`` leaves uint8 images uint8: a quarter of the bytes between the loader's
    workers and the training process, and no conversion on the workers' cores. The trainer
    converts them (``x / 255`` in float32 on the training device, the same values as
    :class:`ToFloat`)."""
    ts = []
    if min_sizes:
        ts.append(RandomResize(min_sizes, max_size))
    if hflip > 0:
        ts.append(RandomHorizontalFlip(hflip))
    if to_float:
        ts.append(ToFloat())
    return Compose(ts)


def eval_transforms():
    return Compose([ToFloat()])
