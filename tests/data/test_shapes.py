import json
import os

import numpy as np
import pytest
from PIL import Image

from retina_fast.data import ShapesConfig, ShapesStream, render_indexed, write_shapes_coco


def _read_split(d):
    with open(os.path.join(d, "instances.json")) as f:
        coco = json.load(f)
    pixels = [np.asarray(Image.open(os.path.join(d, "images", im["file_name"]))) for im in coco["images"]]
    return coco, pixels


def test_generator_is_deterministic(tmp_path):
    a = write_shapes_coco(str(tmp_path / "a"), {"train": 6, "val": 4}, seed=3)
    b = write_shapes_coco(str(tmp_path / "b"), {"train": 6, "val": 4}, seed=3)
    c = write_shapes_coco(str(tmp_path / "c"), {"train": 6}, seed=4)
    for split in ("train", "val"):
        ca, pa = _read_split(a[split])
        cb, pb = _read_split(b[split])
        assert ca["annotations"] == cb["annotations"]
        assert all(np.array_equal(x, y) for x, y in zip(pa, pb))
    cc, pc = _read_split(c["train"])
    ca, pa = _read_split(a["train"])
    assert not all(np.array_equal(x, y) for x, y in zip(pa, pc))
    # train and val of one seed are different images
    _, pv = _read_split(a["val"])
    assert not np.array_equal(pa[0], pv[0])


def test_generated_dataset_is_valid_coco(tmp_path):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO

    d = write_shapes_coco(str(tmp_path), {"val": 120}, seed=0)["val"]
    coco = COCO(os.path.join(d, "instances.json"))
    assert sorted(coco.getCatIds()) == [1, 2, 3]
    assert len(coco.getImgIds()) == 120
    counts, sizes, cats = [], [], set()
    for img_id in coco.getImgIds():
        info = coco.loadImgs(img_id)[0]
        im = Image.open(os.path.join(d, "images", info["file_name"]))
        assert im.size == (info["width"], info["height"]) == (160, 160)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        counts.append(len(anns))
        for a in anns:
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 160 and y + h <= 160 and w > 0 and h > 0
            assert a["area"] == pytest.approx(w * h)
            sizes.append(max(w, h))
            cats.add(a["category_id"])
    assert cats == {1, 2, 3}
    assert 0 in counts and max(counts) <= 6            # some empty images, at most 6 objects
    assert min(sizes) < 16 and max(sizes) > 64          # small and large objects


def test_boxes_are_tight_around_drawn_shapes():
    # Render on a flat background would need a different renderer; instead check a shape's box
    # against the pixels that changed when the same image is re-rendered without objects.
    cfg = ShapesConfig(empty_fraction=0.0, min_objects=1, max_objects=1)
    import retina_fast.data.shapes as S

    for i in range(5):
        img, boxes, _ = render_indexed(11, "train", i, cfg)
        bg = S._background(S._rng_for(11, "train", i), cfg.size).astype(np.uint8)
        changed = np.argwhere(np.any(img != bg, axis=-1))
        (y1, x1), (y2, x2) = changed.min(0), changed.max(0)
        bx1, by1, bx2, by2 = boxes[0]
        # inclusive pixel extent [x1, x2] ↔ box [x1, x2 + 1)
        assert abs(x1 - bx1) <= 1 and abs(y1 - by1) <= 1
        assert abs(x2 + 1 - bx2) <= 1 and abs(y2 + 1 - by2) <= 1


def test_stream_is_deterministic_per_epoch_and_index():
    s = ShapesStream(4, seed=5)
    a, ta = s[(0, 1)]
    b, tb = s[(0, 1)]
    c, _ = s[(1, 1)]
    assert a.dtype.is_floating_point is False and a.shape == (3, 160, 160)
    assert (a == b).all() and (ta["boxes"] == tb["boxes"]).all()
    assert not (a == c).all()
    assert ta["labels"].min() >= 0 and ta["labels"].max() <= 2
