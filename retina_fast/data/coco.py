"""COCO-format detection dataset.

``CocoDetection(ann_file, image_dir)`` reads a COCO ``instances`` JSON (images, annotations,
categories) and yields ``(image, target)`` with

* ``image``: ``uint8 [3, H, W]`` (RGB, decoded with Pillow), or whatever ``transforms`` make of it;
* ``target["boxes"]``: ``float32 [n, 4]`` ``(x1, y1, x2, y2)`` pixels, converted from COCO's
  ``[x, y, w, h]`` and clipped to the image;
* ``target["labels"]``: ``int64 [n]`` contiguous labels ``0..K-1`` (categories sorted by id;
  ``label_to_cat_id`` / ``cat_id_to_label`` map back and forth, for evaluation);
* ``target["iscrowd"]``: ``int64 [n]``. Crowd boxes are *kept* and flagged: the model must not
  learn them as objects nor punish detections on them. The training model (see
  ``retina_fast.engine.model_factory``) turns anchors whose match is background but which lie
  mostly inside a crowd box into ignored anchors (matched ``-2``, like detectron2), and never
  matches an anchor to a crowd box. COCOeval handles crowd regions itself at evaluation.
* ``target["image_id"]`` (the COCO image id) and ``target["orig_size"]`` ``(H, W)``.

Bad input is reported, not crashed on: a missing or non-JSON annotation file, a file that is not
a COCO instances file, an annotation whose ``category_id`` is not among the categories, whose
``image_id`` is unknown or whose ``bbox`` is not four numbers with ``w, h >= 0`` raise a
one-line :class:`DatasetError`. Boxes reaching outside the image are clipped (with one summary
warning); boxes with no area left are dropped. Image files that are missing are dropped at
load with a warning; a file that fails to decode during training is skipped with a warning and
the next image is used in its place (so every batch keeps its size, which DDP needs). No usable
image at all is a :class:`DatasetError`.

Images from the wild are decoded to 8-bit RGB whatever they hold (:func:`read_image`):
grayscale (``L``) and palette images are expanded, RGBA/LA drop their alpha channel (as
torchvision's ``ImageReadMode.RGB`` does), CMYK JPEGs are converted by Pillow, 16-bit (and
32-bit integer) grayscale PNGs are scaled to 8 bits (``v / 257``, so 65535 is 255; a plain
``convert("RGB")`` saturates them to white), and the EXIF orientation is applied, so the image
is the one a browser or an annotation tool shows. Exception: when the annotation file's
``width``/``height`` match the stored (unrotated) pixels and not the rotated ones, the
annotations were made on the stored pixels and the orientation is ignored (one warning). A
truncated file fails to decode and is skipped like any unreadable image.

pycocotools is not needed to read a dataset (only to evaluate); :meth:`coco_api` builds a
``pycocotools.coco.COCO`` over the same, already validated, dictionary.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from retina_fast.data.errors import DatasetError
from retina_fast.data.shapes import _sample_seed

log = logging.getLogger("retina_fast")

_MAX_REPLACEMENTS = 16


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_coco_json(ann_file: str) -> dict:
    """Read and validate a COCO instances file; every problem is a one-line DatasetError."""
    if not os.path.isfile(ann_file):
        raise DatasetError(f"annotation file not found: {ann_file}")
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"annotation file {ann_file} is not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read annotation file {ann_file}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list):
        raise DatasetError(f"{ann_file} is not a COCO instances file: it needs 'images' and "
                           "'categories' lists (and usually 'annotations')")
    anns = data.setdefault("annotations", [])
    if not isinstance(anns, list):
        raise DatasetError(f"{ann_file}: 'annotations' must be a list")
    if not data["categories"]:
        raise DatasetError(f"{ann_file}: no categories")
    cat_ids = set()
    for c in data["categories"]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int):
            raise DatasetError(f"{ann_file}: category entry without an integer 'id': {str(c)[:80]}")
        cat_ids.add(c["id"])
    img_ids = set()
    for im in data["images"]:
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise DatasetError(f"{ann_file}: image entry without 'id' and 'file_name': {str(im)[:80]}")
        img_ids.add(im["id"])
    for i, a in enumerate(anns):
        aid = a.get("id", f"#{i}") if isinstance(a, dict) else f"#{i}"
        if not isinstance(a, dict):
            raise DatasetError(f"{ann_file}: annotation {aid} is not an object")
        if a.get("category_id") not in cat_ids:
            raise DatasetError(f"{ann_file}: annotation {aid} has category_id {a.get('category_id')!r}, "
                               f"not one of the categories {sorted(cat_ids)}")
        if a.get("image_id") not in img_ids:
            raise DatasetError(f"{ann_file}: annotation {aid} refers to image_id "
                               f"{a.get('image_id')!r}, which is not in 'images'")
        b = a.get("bbox")
        if not (isinstance(b, list) and len(b) == 4 and all(_is_number(v) for v in b)) \
                or b[2] < 0 or b[3] < 0:
            raise DatasetError(f"{ann_file}: annotation {aid} has bbox {b!r}; expected "
                               "[x, y, width, height] with width, height >= 0")
        a.setdefault("iscrowd", 0)
        a.setdefault("area", float(b[2] * b[3]))
        a.setdefault("id", i + 1)
    return data


_EXIF_ORIENTATION = 0x0112


def _to_rgb(im: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] of a decoded Pillow image of any mode (see the module docstring)."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.int64)
        a = ((np.clip(a, 0, 65535) + 128) // 257).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if im.mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
        return np.repeat(np.clip(np.rint(a), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


def read_image(path: str, expected_size=None):
    """Decode ``path`` to ``(uint8 [H, W, 3] RGB, exif_ignored)``: EXIF orientation applied unless
    ``expected_size`` ``(w, h)`` matches the stored pixels but not the rotated ones (then
    ``exif_ignored`` is True). Raises OSError/ValueError for an unreadable or truncated file."""
    with Image.open(path) as im:
        im.load()  # decode now: a truncated file fails here, not later
        raw = im.size
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        ignored = False
        if orientation not in (None, 1):
            upright = ImageOps.exif_transpose(im)
            if expected_size is not None and tuple(expected_size) == raw and upright.size != raw:
                ignored = True
            else:
                im = upright
        return _to_rgb(im), ignored


class CocoDetection:
    """A COCO-format dataset; see the module docstring for the target format and checks.

    ``dataset[i]`` or ``dataset[(epoch, i)]``: the epoch (given by
    :class:`~retina_fast.data.EpochSampler`) only seeds the random transforms, so a sample's
    augmentation depends on ``(seed, epoch, i)`` alone.
    """

    def __init__(self, ann_file: str, image_dir: str, transforms=None, seed: int = 0,
                 skip_empty: bool = False, check_files: bool = True):
        self.ann_file = ann_file
        self.image_dir = image_dir
        self.transforms = transforms
        self.seed = int(seed)
        if not os.path.isdir(image_dir):
            raise DatasetError(f"image folder not found: {image_dir}")
        data = load_coco_json(ann_file)
        self.dataset = data
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.categories = cats
        self.cat_ids = [c["id"] for c in cats]
        self.class_names = [str(c.get("name", c["id"])) for c in cats]
        self.cat_id_to_label = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.label_to_cat_id = dict(enumerate(self.cat_ids))

        per_image = {im["id"]: [] for im in data["images"]}
        for a in data["annotations"]:
            per_image[a["image_id"]].append(a)
        images = data["images"]
        if check_files:
            missing = [im for im in images if not os.path.isfile(os.path.join(image_dir, im["file_name"]))]
            if missing:
                log.warning("%d of %d images listed in %s are missing from %s (first: %s); "
                            "they are skipped", len(missing), len(images), ann_file, image_dir,
                            missing[0]["file_name"])
                gone = {id(m) for m in missing}
                images = [im for im in images if id(im) not in gone]
        if skip_empty:
            images = [im for im in images if any(not a["iscrowd"] for a in per_image[im["id"]])]
        if not images:
            raise DatasetError(f"no usable images in {ann_file} (image folder {image_dir})")
        self.images = images

        n_clipped = n_dropped = 0
        self._targets = []
        for im in images:
            anns = per_image[im["id"]]
            w, h = im.get("width"), im.get("height")
            boxes, labels, crowd, area = [], [], [], []
            for a in anns:
                x, y, bw, bh = a["bbox"]
                x1, y1, x2, y2 = x, y, x + bw, y + bh
                if _is_number(w) and _is_number(h):
                    cx1, cy1 = min(max(x1, 0.0), w), min(max(y1, 0.0), h)
                    cx2, cy2 = min(max(x2, 0.0), w), min(max(y2, 0.0), h)
                    if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
                        # Sub-pixel overshoot is common in real annotations; not worth a warning.
                        if max(abs(cx1 - x1), abs(cy1 - y1), abs(cx2 - x2), abs(cy2 - y2)) > 1.0:
                            n_clipped += 1
                        x1, y1, x2, y2 = cx1, cy1, cx2, cy2
                if x2 - x1 <= 0 or y2 - y1 <= 0:
                    n_dropped += 1
                    continue
                boxes.append((x1, y1, x2, y2))
                labels.append(self.cat_id_to_label[a["category_id"]])
                crowd.append(int(bool(a["iscrowd"])))
                area.append(float(a["area"]))
            self._targets.append((
                np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                np.asarray(labels, dtype=np.int64),
                np.asarray(crowd, dtype=np.int64),
                np.asarray(area, dtype=np.float32),
            ))
        if n_clipped or n_dropped:
            log.warning("%s: %d boxes reach outside their image and were clipped, %d boxes with "
                        "no area inside the image were dropped", ann_file, n_clipped, n_dropped)

    def __len__(self):
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def coco_api(self):
        """A pycocotools ``COCO`` over this (validated) annotation dictionary."""
        try:
            from pycocotools.coco import COCO
        except ImportError:
            raise DatasetError("evaluation needs pycocotools: pip install pycocotools") from None
        coco = COCO()
        coco.dataset = self.dataset
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return coco

    def _load_image(self, idx: int) -> torch.Tensor:
        info = self.images[idx]
        path = os.path.join(self.image_dir, info["file_name"])
        w, h = info.get("width"), info.get("height")
        arr, ignored = read_image(path, (w, h) if _is_number(w) and _is_number(h) else None)
        if ignored and not getattr(self, "_warned_exif", False):
            self._warned_exif = True
            log.warning("%s: its width/height in %s match the stored pixels, not the EXIF-rotated "
                        "image; its EXIF orientation (and that of any such image) is ignored",
                        path, self.ann_file)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def get_target(self, idx: int) -> dict:
        boxes, labels, crowd, area = self._targets[idx]
        im = self.images[idx]
        return {
            "boxes": torch.from_numpy(boxes.copy()),
            "labels": torch.from_numpy(labels.copy()),
            "iscrowd": torch.from_numpy(crowd.copy()),
            "area": torch.from_numpy(area.copy()),
            "image_id": im["id"],
            "orig_size": (im.get("height"), im.get("width")),
        }

    def __getitem__(self, key):
        epoch, idx = key if isinstance(key, tuple) else (0, key)
        idx = int(idx)
        for attempt in range(_MAX_REPLACEMENTS):
            j = (idx + attempt) % len(self)
            try:
                image = self._load_image(j)
                break
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
                log.warning("skipping unreadable image %s (%s)",
                            os.path.join(self.image_dir, self.images[j]["file_name"]),
                            str(e).splitlines()[0][:120] if str(e) else type(e).__name__)
        else:
            raise DatasetError(f"{_MAX_REPLACEMENTS} consecutive images in {self.image_dir} could "
                               "not be read; is the image folder right?")
        target = self.get_target(j)
        h, w = image.shape[-2:]
        target["orig_size"] = (h, w)
        if target["boxes"].numel():
            # Images whose size differs from the JSON's width/height: clip to the real size.
            b = target["boxes"]
            b[:, 0::2].clamp_(0, w)
            b[:, 1::2].clamp_(0, h)
            keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            if not bool(keep.all()):
                for k in ("boxes", "labels", "iscrowd", "area"):
                    target[k] = target[k][keep]
        if self.transforms is not None:
            g = torch.Generator().manual_seed(_sample_seed(self.seed, epoch, idx))
            image, target = self.transforms(image, target, g)
        return image, target
