"""Datasets from the wild: each case gets a clear error or the documented fix (see the
docstring of retina_fast/data/coco.py)."""

import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from retina_fast.data import CocoDetection, DatasetError

CATS = [{"id": 1, "name": "a"}, {"id": 7, "name": "b"}]


def _write(tmp_path, images, anns, files=None):
    """images: [(id, file_name, w, h)]; files: {file_name: PIL image or bytes} (default: RGB
    images of the listed sizes)."""
    d = tmp_path / "images"
    d.mkdir(exist_ok=True)
    for i, name, w, h in images:
        content = (files or {}).get(name, Image.new("RGB", (w, h), (10 * i % 255, 80, 160)))
        if content is None:
            continue  # a missing file
        if isinstance(content, bytes):
            (d / name).write_bytes(content)
        else:
            content.save(d / name)
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": [{"id": i, "file_name": n, "width": w, "height": h} for i, n, w, h in images],
                               "annotations": anns, "categories": CATS}))
    return str(ann), str(d)


def _ann(i, image_id, bbox, cat=1):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox}


def test_missing_image_files_are_dropped_with_a_warning(tmp_path, caplog):
    ann, d = _write(tmp_path, [(1, "a.png", 20, 10), (2, "b.png", 20, 10)], [_ann(1, 1, [1, 1, 4, 4])],
                    files={"b.png": None})
    with caplog.at_level(logging.WARNING, logger="retina_fast"):
        ds = CocoDetection(ann, d)
    assert len(ds) == 1 and ds.images[0]["file_name"] == "a.png" and "missing" in caplog.text
    (tmp_path / "none").mkdir()
    ann, d = _write(tmp_path / "none", [(1, "a.png", 20, 10)], [], files={"a.png": None})
    with pytest.raises(DatasetError, match="no usable images"):
        CocoDetection(ann, d)


def test_zero_area_boxes_are_dropped_and_negative_ones_refused(tmp_path, caplog):
    ann, d = _write(tmp_path, [(1, "a.png", 40, 30)], [_ann(1, 1, [5, 5, 0, 10]), _ann(2, 1, [5, 5, 10, 0]),
                                                       _ann(3, 1, [2, 3, 4, 5])])
    with caplog.at_level(logging.WARNING, logger="retina_fast"):
        ds = CocoDetection(ann, d)
    assert ds[0][1]["boxes"].tolist() == [[2, 3, 6, 8]] and "dropped" in caplog.text
    ann, d = _write(tmp_path, [(1, "a.png", 40, 30)], [_ann(1, 1, [5, 5, -3, 10])])
    with pytest.raises(DatasetError, match=r"annotation 1 has bbox \[5, 5, -3, 10\].*width, height >= 0"):
        CocoDetection(ann, d)
    ann, d = _write(tmp_path, [(1, "a.png", 40, 30)], [_ann(1, 1, [5, float("nan"), 3, 10])])
    with pytest.raises(DatasetError, match="bbox"):
        CocoDetection(ann, d)


def test_boxes_outside_the_image_are_clipped_or_dropped(tmp_path, caplog):
    ann, d = _write(tmp_path, [(1, "a.png", 40, 30)], [_ann(1, 1, [-10, -5, 20, 15]), _ann(2, 1, [35, 20, 30, 30]),
                                                       _ann(3, 1, [50, 40, 5, 5])])
    with caplog.at_level(logging.WARNING, logger="retina_fast"):
        ds = CocoDetection(ann, d)
    assert ds[0][1]["boxes"].tolist() == [[0, 0, 10, 10], [35, 20, 40, 30]]
    assert "clipped" in caplog.text and "dropped" in caplog.text
    # the JSON says 400 x 300 but the file is 40 x 30: clipped to the real image
    (tmp_path / "x").mkdir()
    ann, d = _write(tmp_path / "x", [(1, "a.png", 400, 300)],
                    [_ann(1, 1, [30, 20, 100, 100])], files={"a.png": Image.new("RGB", (40, 30))})
    assert CocoDetection(ann, d)[0][1]["boxes"].tolist() == [[30, 20, 40, 30]]


def test_unknown_category_ids_are_refused(tmp_path):
    ann, d = _write(tmp_path, [(1, "a.png", 40, 30)], [_ann(1, 1, [1, 1, 5, 5], cat=3)])
    with pytest.raises(DatasetError, match=r"annotation 1 has category_id 3, not one of the categories \[1, 7\]"):
        CocoDetection(ann, d)


def test_images_without_annotations_are_kept_and_train(tmp_path):
    ann, d = _write(tmp_path, [(1, "a.png", 64, 64), (2, "b.png", 64, 64)], [_ann(1, 1, [5, 5, 20, 20], cat=7)])
    ds = CocoDetection(ann, d)
    assert len(ds) == 2
    t = ds[1][1]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    assert len(CocoDetection(ann, d, skip_empty=True)) == 1  # or left out, on request
    from retina_fast.engine import build_model

    torch.manual_seed(0)
    m = build_model("shapes-small", 2, widths=[8, 8, 16, 16, 16], fpn_channels=16, min_size=64).train()
    losses = m([ds[1][0].float() / 255], [t])
    assert all(bool(torch.isfinite(v)) for v in losses.values())


def _rgb_of(ds, i=0):
    return ds[i][0].permute(1, 2, 0).numpy()


def test_image_modes_are_decoded_to_8_bit_rgb(tmp_path):
    w, h = 24, 16
    g16 = (np.arange(w * h).reshape(h, w) * 170).astype(np.uint16)  # 0 .. 65110
    rgba = Image.new("RGBA", (w, h), (200, 100, 50, 0))
    files = {"gray.png": Image.new("L", (w, h), 77), "rgba.png": rgba, "g16.png": Image.fromarray(g16),
             "cmyk.jpg": Image.new("CMYK", (w, h), (0, 255, 255, 0)), "pal.png": Image.new("P", (w, h), 3)}
    names = list(files)
    ann, d = _write(tmp_path, [(i + 1, n, w, h) for i, n in enumerate(names)], [], files=files)
    assert Image.open(os.path.join(d, "g16.png")).mode.startswith("I")
    ds = CocoDetection(ann, d)
    out = {n: _rgb_of(ds, i) for i, n in enumerate(names)}
    for n, a in out.items():
        assert a.shape == (h, w, 3) and a.dtype == np.uint8, n
    assert (out["gray.png"] == 77).all()
    assert (out["rgba.png"] == [200, 100, 50]).all()  # alpha dropped, colour kept
    exp16 = ((g16.astype(np.int64) + 128) // 257).astype(np.uint8)
    assert (out["g16.png"][..., 0] == exp16).all() and (out["g16.png"][..., 1] == exp16).all()
    assert len(np.unique(out["g16.png"])) > 100  # not saturated to white, as convert("RGB") does
    r, gb = out["cmyk.jpg"][..., 0].astype(int), out["cmyk.jpg"][..., 1:].astype(int)
    assert (r > 200).all() and (gb < 60).all()  # CMYK (0, 1, 1, 0) is red
    assert len({tuple(v) for v in out["pal.png"].reshape(-1, 3)}) == 1


def _exif_rotated_jpeg(path, w, h):
    """A w x h JPEG stored sideways (h x w pixels) with EXIF orientation 6 (rotate 90 CW to view):
    the viewer sees a red left half."""
    upright = np.zeros((h, w, 3), np.uint8)
    upright[:, : w // 2] = (255, 0, 0)
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif, quality=95)


def test_exif_rotated_images_are_read_upright(tmp_path, caplog):
    w, h = 40, 24
    d = tmp_path / "images"
    d.mkdir()
    _exif_rotated_jpeg(d / "r.jpg", w, h)
    assert Image.open(d / "r.jpg").size == (h, w)
    ann, _ = _write(tmp_path, [(1, "r.jpg", w, h)], [_ann(1, 1, [0, 0, 20, 24])], files={"r.jpg": None})
    img, t = CocoDetection(ann, str(d))[0]
    assert img.shape == (3, h, w)  # upright, as the JSON's width/height say
    assert img[0, :, :18].float().mean() > 200 and img[0, :, 22:].float().mean() < 50
    assert t["boxes"].tolist() == [[0, 0, 20, 24]]
    # the annotation file says the stored size: the annotations were made on the stored pixels
    ann, _ = _write(tmp_path, [(1, "r.jpg", h, w)], [_ann(1, 1, [0, 0, 10, 30])], files={"r.jpg": None})
    with caplog.at_level(logging.WARNING, logger="retina_fast"):
        img, t = CocoDetection(ann, str(d))[0]
    assert img.shape == (3, w, h) and "EXIF orientation" in caplog.text


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_truncated_image_is_skipped_with_a_warning(tmp_path, caplog, fmt):
    import io

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, format="PNG" if fmt == "png" else "JPEG")
    data = buf.getvalue()
    ann, d = _write(tmp_path, [(1, f"cut.{fmt}", 64, 64), (2, "ok.png", 64, 64)],
                    [_ann(1, 1, [1, 1, 5, 5]), _ann(2, 2, [2, 2, 6, 6])], files={f"cut.{fmt}": data[: len(data) // 2]})
    ds = CocoDetection(ann, d)
    with caplog.at_level(logging.WARNING, logger="retina_fast"):
        img, t = ds[0]
    assert "skipping unreadable image" in caplog.text and "cut" in caplog.text
    assert t["image_id"] == 2 and img.shape == (3, 64, 64)
    # every image unreadable: a clear error, not an endless loop
    ann, d = _write(tmp_path, [(1, f"cut.{fmt}", 64, 64)], [], files={f"cut.{fmt}": data[: len(data) // 2]})
    with pytest.raises(DatasetError, match="could not be read"):
        CocoDetection(ann, d)[0]
