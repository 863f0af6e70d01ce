"""Prediction on image files: detections drawn onto the images (PNG/JPEG), a JSON of what was
drawn, and every detection in COCO results format."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from retina_fast.data.errors import RetinaFastError

log = logging.getLogger("retina_fast")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def collect_images(inputs) -> list:
    """Expand files and folders into a sorted list of image paths; missing paths are an error."""
    paths = []
    for p in inputs:
        if os.path.isdir(p):
            paths += sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTS))
        elif os.path.isfile(p):
            paths.append(p)
        else:
            raise RetinaFastError(f"no such image or folder: {p}")
    if not paths:
        raise RetinaFastError(f"no images found in {', '.join(map(str, inputs))}")
    return paths


def draw_detections(image: torch.Tensor, det: dict, class_names, score_thresh: float = 0.3,
                    min_side: int = 480) -> torch.Tensor:
    """Draw boxes with ``"<class> <score>"`` labels; small images are first upscaled (nearest)
    so that the labels stay legible. ``image`` is ``uint8 [3, H, W]``; returns the same kind."""
    from torchvision.utils import draw_bounding_boxes

    keep = det["scores"] >= score_thresh
    boxes, scores, labels = det["boxes"][keep].float(), det["scores"][keep], det["labels"][keep]
    h, w = image.shape[-2:]
    scale = max(1, int(min_side // max(1, min(h, w))))
    if scale > 1:
        image = image.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
        boxes = boxes * scale
    if boxes.numel() == 0:
        return image
    names = [f"{class_names[int(l)] if int(l) < len(class_names) else int(l)} {float(s):.2f}"
             for l, s in zip(labels, scores)]
    colors = [_PALETTE[int(l) % len(_PALETTE)] for l in labels]
    return draw_bounding_boxes(image, boxes, labels=names, colors=colors, width=2)


def read_image(path: str) -> torch.Tensor:
    """``uint8 [3, H, W]`` RGB, turned upright by the EXIF orientation tag when it has one
    (phone photos are stored sideways with a tag that says so); 8-bit RGB whatever the file
    holds (grayscale, RGBA, 16-bit, CMYK: see :func:`retina_fast.data.coco.read_image`)."""
    from retina_fast.data.coco import read_image as _read_rgb

    arr, _ = _read_rgb(path)
    if not arr.flags.writeable:  # PIL's read-only buffer: torch.from_numpy would warn
        arr = arr.copy()
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def image_ids_for(paths) -> list:
    """COCO ``image_id`` of each input: the file names when all of them are distinct numbers
    (COCO's own files: ``000000397133.jpg`` -> 397133), else the 1-based positions."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(paths) + 1))


def set_input_size(model, min_size: int | None = None, max_size: int | None = None) -> None:
    """Resize inputs to ``min_size`` (shorter side) and at most ``max_size`` (longer side).
    ``min_size`` alone scales the model's ``max_size`` by the same factor, keeping its limit
    on elongated images (shapes-small's 160/160 becomes 320/320 for ``min_size=320``)."""
    t = model.transform
    if min_size and not max_size:
        max_size = round(t.max_size * min_size / t.min_size[-1])
    if min_size:
        t.min_size = (int(min_size),)
    if max_size:
        t.max_size = int(max_size)


@torch.no_grad()
def predict_images(model, paths, out_dir: str, class_names, device="cpu", score_thresh=0.3,
                   image_format: str | None = None, label_to_cat_id=None, batch_size: int = 1,
                   settings=None) -> list:
    """Detect on the images, ``batch_size`` at a time, and save ``<out_dir>/<name>.<png|jpg>``
    with boxes drawn, ``<out_dir>/predictions.json`` (per image: file, ``image_id``, boxes
    ``xyxy`` in pixels, scores, labels, class names; detections at or above ``score_thresh``)
    and ``<out_dir>/coco_results.json`` (every detection the model returns, COCO results
    format, ``bbox`` as ``[x, y, w, h]``; ids from :func:`image_ids_for`). Images are read
    upright (EXIF orientation applied); unreadable ones are skipped with a warning.
    ``settings`` (a :class:`~retina_fast.engine.precision.RunSettings`; None: float32, the
    model as given): a copy prepared by :func:`retina_fast.models.fuse.prepare_for_inference`
    runs under ``settings.autocast()``; detections are float32 either way."""
    import contextlib
    import time

    from retina_fast.engine.evaluate import coco_results, inference_model, log_first_batch

    os.makedirs(out_dir, exist_ok=True)
    model = inference_model(model, settings)
    model.eval()
    autocast = settings.autocast if settings is not None else contextlib.nullcontext
    records, results, first = [], [], True
    image_ids = image_ids_for(paths)
    for start in range(0, len(paths), max(1, int(batch_size))):
        batch = []
        for i in range(start, min(start + max(1, int(batch_size)), len(paths))):
            try:
                batch.append((i, paths[i], read_image(paths[i])))
            except (OSError, UnidentifiedImageError, ValueError) as e:
                log.warning("skipping unreadable image %s (%s)", paths[i], str(e).splitlines()[0][:120])
        if not batch:
            continue
        t0 = time.perf_counter()
        with autocast():
            dets = model([img.float().div(255).to(device) for _, _, img in batch])
        if first:
            log_first_batch(model, time.perf_counter() - t0)
            first = False
        for (i, path, img), det in zip(batch, dets):
            det = {k: v.cpu() for k, v in det.items()}
            image_id = image_ids[i]
            results += coco_results(det, image_id, label_to_cat_id)
            records.append(_save_drawn(img, det, path, image_id, out_dir, class_names,
                                       score_thresh, image_format, label_to_cat_id))
    with open(os.path.join(out_dir, "predictions.json"), "w") as f:
        json.dump({"score_thresh": score_thresh, "images": records}, f, indent=1)
    with open(os.path.join(out_dir, "coco_results.json"), "w") as f:
        json.dump(results, f)
    return records


def _save_drawn(img, det, path, image_id, out_dir, class_names, score_thresh, image_format,
                label_to_cat_id) -> dict:
    drawn = draw_detections(img, det, class_names, score_thresh)
    stem, ext = os.path.splitext(os.path.basename(path))
    fmt = image_format or ("jpg" if ext.lower() in (".jpg", ".jpeg") else "png")
    out_path = os.path.join(out_dir, f"{stem}.{fmt}")
    Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(out_path)
    keep = det["scores"] >= score_thresh
    labels = det["labels"][keep].tolist()
    rec = {
        "file": path, "output": out_path, "image_id": image_id,
        "width": int(img.shape[-1]), "height": int(img.shape[-2]),
        "boxes": [[round(v, 2) for v in b] for b in det["boxes"][keep].tolist()],
        "scores": [round(s, 4) for s in det["scores"][keep].tolist()],
        "labels": labels,
        "class_names": [class_names[l] if l < len(class_names) else str(l) for l in labels],
    }
    if label_to_cat_id is not None:
        rec["category_ids"] = [label_to_cat_id[l] for l in labels]
    return rec
