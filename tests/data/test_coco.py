import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from retina_fast.data import CocoDetection, DatasetError, write_shapes_coco


def _make(tmp_path, anns, cats=None, images=None, n_files=2, size=(40, 30)):
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    w, h = size
    for i in range(n_files):
        arr = np.full((h, w, 3), 10 * i, np.uint8)
        Image.fromarray(arr).save(img_dir / f"{i}.png")
    data = {
        "images": images if images is not None else
        [{"id": 100 + i, "file_name": f"{i}.png", "width": w, "height": h} for i in range(n_files)],
        "annotations": anns,
        "categories": cats if cats is not None else [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}],
    }
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(data))
    return str(ann), str(img_dir)


def test_boxes_labels_crowd_and_category_mapping(tmp_path):
    anns = [
        {"id": 1, "image_id": 100, "category_id": 7, "bbox": [1, 2, 10, 5], "iscrowd": 0},
        {"id": 2, "image_id": 100, "category_id": 3, "bbox": [5, 5, 4, 4], "iscrowd": 1},
    ]
    ds = CocoDetection(*_make(tmp_path, anns))
    assert len(ds) == 2 and ds.num_classes == 2
    # contiguous labels in category-id order: 3 -> 0, 7 -> 1
    assert ds.cat_id_to_label == {3: 0, 7: 1} and ds.label_to_cat_id == {0: 3, 1: 7}
    assert ds.class_names == ["a", "b"]
    img, t = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 30, 40)
    assert t["boxes"].tolist() == [[1, 2, 11, 7], [5, 5, 9, 9]]
    assert t["labels"].tolist() == [1, 0]
    assert t["iscrowd"].tolist() == [0, 1]
    assert t["image_id"] == 100
    img, t = ds[(3, 1)]  # (epoch, index) keys work too; image 101 has no boxes
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)


def test_boxes_outside_the_image_are_clipped_or_dropped(tmp_path, caplog):
    anns = [
        {"id": 1, "image_id": 100, "category_id": 7, "bbox": [30, 20, 20, 20]},   # overshoots
        {"id": 2, "image_id": 100, "category_id": 7, "bbox": [50, 50, 5, 5]},     # fully outside
    ]
    with caplog.at_level(logging.WARNING, logger="retina_fast"):
        ds = CocoDetection(*_make(tmp_path, anns))
    assert "clipped" in caplog.text
    _, t = ds[0]
    assert t["boxes"].tolist() == [[30, 20, 40, 30]]


@pytest.mark.parametrize("case,needle", [
    ("bad_json", "not valid JSON"),
    ("not_coco", "not a COCO instances file"),
    ("unknown_cat", "category_id 99"),
    ("unknown_image", "image_id 5"),
    ("bad_bbox", "bbox"),
    ("no_images", "no usable images"),
    ("missing_file", "annotation file not found"),
])
def test_bad_annotation_files_raise_one_line_errors(tmp_path, case, needle):
    good = {"id": 1, "image_id": 100, "category_id": 7, "bbox": [1, 1, 3, 3]}
    if case == "bad_json":
        ann, imgs = _make(tmp_path, [good])
        open(ann, "w").write('{"images": [')
    elif case == "not_coco":
        ann, imgs = _make(tmp_path, [good])
        open(ann, "w").write("[1, 2]")
    elif case == "unknown_cat":
        ann, imgs = _make(tmp_path, [dict(good, category_id=99)])
    elif case == "unknown_image":
        ann, imgs = _make(tmp_path, [dict(good, image_id=5)])
    elif case == "bad_bbox":
        ann, imgs = _make(tmp_path, [dict(good, bbox=[1, 1, -3, 3])])
    elif case == "no_images":
        ann, imgs = _make(tmp_path, [], images=[])
    else:
        ann, imgs = str(tmp_path / "nope.json"), str(tmp_path)
    with pytest.raises(DatasetError) as e:
        CocoDetection(ann, imgs)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_missing_and_corrupt_images_are_skipped_with_a_warning(tmp_path, caplog):
    anns = [{"id": 1, "image_id": 101, "category_id": 3, "bbox": [1, 1, 3, 3]},
            {"id": 2, "image_id": 102, "category_id": 3, "bbox": [2, 2, 3, 3]}]
    ann, imgs = _make(tmp_path, anns, n_files=3)
    os.remove(os.path.join(imgs, "0.png"))                     # missing file
    open(os.path.join(imgs, "1.png"), "wb").write(b"not a png")  # corrupt file
    with caplog.at_level(logging.WARNING, logger="retina_fast"):
        ds = CocoDetection(ann, imgs)
        assert len(ds) == 2 and "missing" in caplog.text
        img, t = ds[0]                                          # 1.png is corrupt → 2.png used
    assert "skipping unreadable image" in caplog.text
    assert t["image_id"] == 102 and t["boxes"].tolist() == [[2, 2, 5, 5]]
    assert img.shape == (3, 30, 40)


def test_reads_generated_shapes_with_pycocotools(tmp_path):
    pytest.importorskip("pycocotools")
    d = write_shapes_coco(str(tmp_path), {"val": 5}, seed=1)["val"]
    ds = CocoDetection(os.path.join(d, "instances.json"), os.path.join(d, "images"))
    coco = ds.coco_api()
    for i in range(len(ds)):
        _, t = ds[i]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=t["image_id"]))
        want = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                for a in anns]
        assert t["boxes"].tolist() == want
        assert [ds.label_to_cat_id[l] for l in t["labels"].tolist()] == [a["category_id"] for a in anns]
