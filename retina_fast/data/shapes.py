"""Synthetic "shapes" detection data: circles, squares and triangles on textured backgrounds.

Two ways to use it, from the same renderer:

* :func:`write_shapes_coco` writes a real COCO-format dataset to disk
  (``<root>/<split>/images/*.png`` + ``<root>/<split>/instances.json``), which any COCO tool,
  pycocotools included, can read. It is the demo's validation data and the tests' data.
* :class:`ShapesStream` renders training images on the fly inside DataLoader workers, so a
  training run never sees the same image twice and no disk is needed.

Everything is deterministic from a seed: image ``i`` of a split is rendered from
``SeedSequence([seed, split_code, i])``, independent of worker count or order.

Image content (defaults): ``size`` x ``size`` pixels (160), 1-6 objects whose longer side is
8-128 px (log-uniform, so small objects are common), random colours with a minimum contrast
against the local background, a background of a random colour plus a gradient, noise and one of
a few textures (stripes, checks, blobs), overlaps allowed up to a limit, and about 5% of the
images empty. Boxes are the tight boxes of the drawn shapes, in COCO ``[x, y, w, h]``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]

_SPLIT_CODES = {"train": 1, "val": 2, "test": 3, "stream": 4}


@dataclass(frozen=True)
class ShapesConfig:
    size: int = 160
    min_objects: int = 1
    max_objects: int = 6
    min_object_size: float = 8.0
    max_object_size: float = 128.0
    empty_fraction: float = 0.05
    # A new object may cover at most this fraction of an earlier object's box (and vice versa).
    max_overlap: float = 0.4


def _rng_for(seed: int, split: str, index: int) -> np.random.Generator:
    code = _SPLIT_CODES.get(split, sum(split.encode()) + 10)
    return np.random.default_rng(np.random.SeedSequence([int(seed), code, int(index)]))


@functools.lru_cache(maxsize=4)
def _unit_grid(size: int):
    """(yy, xx), float32 [size, size] in [0, 1): the coordinate grids every background uses."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


@functools.lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    """Standard normal noise, float32 [4 * size, 4 * size, 3], the same in every process (a fixed
    seed): each background adds a window of it at an offset drawn from the image's own
    generator. Drawing 77k normals per 160-px image was 60 % of its rendering."""
    bank = np.random.default_rng(20261205).standard_normal((4 * size, 4 * size, 3), dtype=np.float32)
    bank.flags.writeable = False
    return bank


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A textured background, float32 HxWx3 in [0, 255]: a colour, a linear ramp, one of three
    textures (or none) and noise. float32 throughout, the noise a window of :func:`_noise_bank`:
    the training stream renders one for every image, on the cores that train."""
    base = rng.uniform(30, 225, size=3).astype(np.float32)
    yy, xx = _unit_grid(size)
    angle = rng.uniform(0, 2 * math.pi)
    axis = np.arange(size, dtype=np.float32) / size
    ramp = (np.float32(np.cos(angle)) * axis)[None, :] + (np.float32(np.sin(angle)) * axis)[:, None]
    img = ramp[..., None] * rng.uniform(-60, 60, size=3).astype(np.float32) + base
    kind = rng.integers(0, 4)
    if kind == 1:  # stripes
        period = rng.uniform(4, 24)
        a = rng.uniform(0, math.pi)
        phase = (np.float32(np.cos(a)) * xx + np.float32(np.sin(a)) * yy) * np.float32(2 * math.pi * size / period)
        img += np.sin(phase)[..., None] * rng.uniform(5, 30, size=3).astype(np.float32)
    elif kind == 2:  # checks
        period = int(rng.integers(4, 20))
        c = ((np.arange(size)[:, None] // period + np.arange(size)[None, :] // period) % 2) * 2 - 1
        img += c[..., None].astype(np.float32) * rng.uniform(5, 25, size=3).astype(np.float32)
    elif kind == 3:  # smooth blobs: a coarse random grid upsampled
        g = int(rng.integers(3, 8))
        coarse = rng.normal(0, 1, size=(g, g, 3))
        pil = Image.fromarray(((coarse - coarse.min()) / (np.ptp(coarse) + 1e-6) * 255).astype(np.uint8))
        up = np.asarray(pil.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255 - 0.5
        img += up * np.float32(rng.uniform(20, 60))
    bank = _noise_bank(size)
    oy, ox = (int(v) for v in rng.integers(0, bank.shape[0] - size + 1, size=2))
    img += bank[oy:oy + size, ox:ox + size] * np.float32(rng.uniform(2, 12))
    return np.clip(img, 0, 255, out=img)


def _contrasting_colour(rng: np.random.Generator, bg_mean: np.ndarray) -> tuple:
    for _ in range(20):
        c = rng.uniform(0, 255, size=3)
        if np.abs(c - bg_mean).sum() > 150:
            break
    return tuple(int(v) for v in c)


def _overlap_ok(box, boxes, limit):
    x1, y1, x2, y2 = box
    a = (x2 - x1) * (y2 - y1)
    for bx1, by1, bx2, by2 in boxes:
        iw = min(x2, bx2) - max(x1, bx1)
        ih = min(y2, by2) - max(y1, by1)
        if iw <= 0 or ih <= 0:
            continue
        inter = iw * ih
        b = (bx2 - bx1) * (by2 - by1)
        if inter > limit * a or inter > limit * b:
            return False
    return True


def render_shapes_image(rng: np.random.Generator, cfg: ShapesConfig = ShapesConfig()):
    """Render one image.

    Returns ``(image, boxes, category_ids)``: a uint8 ``[H, W, 3]`` array, a float32 ``[n, 4]``
    array of ``(x1, y1, x2, y2)`` boxes in pixels and an int64 ``[n]`` array of category ids
    (1 circle, 2 square, 3 triangle).
    """
    size = cfg.size
    bg = _background(rng, size)
    img = Image.fromarray(bg.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    n = 0 if rng.uniform() < cfg.empty_fraction else int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    boxes, cats = [], []
    max_side = min(cfg.max_object_size, size)
    for _ in range(n):
        for _attempt in range(30):
            s = float(np.exp(rng.uniform(math.log(cfg.min_object_size), math.log(max_side))))
            cat = int(rng.integers(1, 4))
            x1 = float(rng.uniform(0, size - s))
            y1 = float(rng.uniform(0, size - s))
            if cat == 1:  # circle
                box = (round(x1), round(y1), round(x1 + s), round(y1 + s))
            elif cat == 2:  # square
                box = (round(x1), round(y1), round(x1 + s), round(y1 + s))
            else:  # triangle, apex up or down; height = width = s
                box = (round(x1), round(y1), round(x1 + s), round(y1 + s))
            if box[2] - box[0] < 4 or box[3] - box[1] < 4:
                continue
            if _overlap_ok(box, boxes, cfg.max_overlap):
                break
        else:
            continue
        bx1, by1, bx2, by2 = box
        local = bg[by1:by2, bx1:bx2].reshape(-1, 3).mean(0)
        colour = _contrasting_colour(rng, local)
        # PIL's shape corners are inclusive: the last drawn pixel is x2 - 1.
        if cat == 1:
            draw.ellipse([bx1, by1, bx2 - 1, by2 - 1], fill=colour)
        elif cat == 2:
            draw.rectangle([bx1, by1, bx2 - 1, by2 - 1], fill=colour)
        else:
            if rng.uniform() < 0.5:
                pts = [((bx1 + bx2 - 1) / 2, by1), (bx1, by2 - 1), (bx2 - 1, by2 - 1)]
            else:
                pts = [(bx1, by1), (bx2 - 1, by1), ((bx1 + bx2 - 1) / 2, by2 - 1)]
            draw.polygon(pts, fill=colour)
        boxes.append(box)
        cats.append(cat)
    boxes_arr = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return np.array(img), boxes_arr, np.asarray(cats, dtype=np.int64)


def render_indexed(seed: int, split: str, index: int, cfg: ShapesConfig = ShapesConfig()):
    """Image ``index`` of ``split`` for ``seed``: always the same, wherever it is rendered."""
    return render_shapes_image(_rng_for(seed, split, index), cfg)


def write_shapes_coco(root: str, splits: dict | None = None, seed: int = 0,
                      cfg: ShapesConfig = ShapesConfig(), image_format: str = "png") -> dict:
    """Write a COCO-format shapes dataset under ``root`` and return ``{split: split_dir}``.

    ``splits`` maps split name to image count (default ``{"train": 1000, "val": 200}``). Each
    split folder holds ``images/`` and ``instances.json``. Existing files are overwritten; the
    result depends only on ``seed``, ``cfg`` and the counts.
    """
    splits = {"train": 1000, "val": 200} if splits is None else splits
    out = {}
    for split, count in splits.items():
        split_dir = os.path.join(root, split)
        img_dir = os.path.join(split_dir, "images")
        os.makedirs(img_dir, exist_ok=True)
        images, annotations = [], []
        ann_id = 1
        for i in range(int(count)):
            arr, boxes, cats = render_indexed(seed, split, i, cfg)
            fname = f"{split}_{i:06d}.{image_format}"
            Image.fromarray(arr).save(os.path.join(img_dir, fname))
            image_id = i + 1
            images.append({"id": image_id, "file_name": fname, "width": cfg.size, "height": cfg.size})
            for b, c in zip(boxes.tolist(), cats.tolist()):
                w, h = b[2] - b[0], b[3] - b[1]
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": int(c),
                    "bbox": [b[0], b[1], w, h], "area": float(w * h), "iscrowd": 0,
                })
                ann_id += 1
        coco = {
            "info": {"description": "retina_fast synthetic shapes", "version": "1.0",
                     "seed": seed, "split": split, "config": asdict(cfg)},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": CATEGORIES,
        }
        tmp = os.path.join(split_dir, "instances.json.tmp")
        with open(tmp, "w") as f:
            json.dump(coco, f)
        os.replace(tmp, os.path.join(split_dir, "instances.json"))
        out[split] = split_dir
    return out


class ShapesStream:
    """Map-style dataset of freshly rendered training images.

    ``dataset[key]`` with ``key = (epoch, i)`` (what :class:`~retina_fast.data.EpochSampler`
    yields) or a plain ``int`` renders image ``(epoch, i)`` of the stream; ``len()`` is the
    number of images per epoch. Output is ``(image uint8 HWC numpy, target dict)`` fed through
    ``transforms`` like :class:`~retina_fast.data.CocoDetection`, so the same transforms and
    collate apply. Labels are contiguous (category id - 1).
    """

    categories = CATEGORIES

    def __init__(self, images_per_epoch: int, seed: int = 0, cfg: ShapesConfig = ShapesConfig(),
                 transforms=None):
        if images_per_epoch <= 0:
            raise ValueError("images_per_epoch must be positive")
        self.images_per_epoch = int(images_per_epoch)
        self.seed = int(seed)
        self.cfg = cfg
        self.transforms = transforms
        self.cat_ids = [c["id"] for c in CATEGORIES]
        self.class_names = [c["name"] for c in CATEGORIES]

    def __len__(self):
        return self.images_per_epoch

    def __getitem__(self, key):
        import torch

        epoch, i = key if isinstance(key, tuple) else (0, key)
        index = int(epoch) * self.images_per_epoch + int(i)
        arr, boxes, cats = render_indexed(self.seed, "stream", index, self.cfg)
        image = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(cats - 1),
            "iscrowd": torch.zeros(len(cats), dtype=torch.int64),
            "image_id": index,
            "orig_size": (self.cfg.size, self.cfg.size),
        }
        if self.transforms is not None:
            g = torch.Generator().manual_seed(_sample_seed(self.seed, epoch, i))
            image, target = self.transforms(image, target, g)
        return image, target


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed for random augmentation, independent of worker layout."""
    ss = np.random.SeedSequence([int(seed), int(epoch), int(index), 7])
    return int(ss.generate_state(1, dtype=np.uint64)[0] & 0x7FFFFFFFFFFFFFFF)
