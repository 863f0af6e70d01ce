"""COCO bbox evaluation with pycocotools' ``COCOeval``.

``evaluate(model, dataset, out_dir)`` runs the model over a :class:`CocoDetection` (images as
they are; the model resizes them itself and returns boxes in original pixels), writes
``detections.json`` (COCO results format: ``image_id``, ``category_id``, ``bbox`` ``[x, y, w,
h]``, ``score``) and ``metrics.json`` (the 12 standard numbers by name, plus the printed
summary), prints the summary and returns the metrics dict.
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import torch

from retina_fast.data.errors import RetinaFastError
from retina_fast.data.loader import EpochSampler, make_loader

_SUMMARY_ROWS = [  # pycocotools' summarize() layout, for the no-detection case
    ("AP", "IoU=0.50:0.95", "all", 100), ("AP", "IoU=0.50     ", "all", 100),
    ("AP", "IoU=0.75     ", "all", 100), ("AP", "IoU=0.50:0.95", "small", 100),
    ("AP", "IoU=0.50:0.95", "medium", 100), ("AP", "IoU=0.50:0.95", "large", 100),
    ("AR", "IoU=0.50:0.95", "all", 1), ("AR", "IoU=0.50:0.95", "all", 10),
    ("AR", "IoU=0.50:0.95", "all", 100), ("AR", "IoU=0.50:0.95", "small", 100),
    ("AR", "IoU=0.50:0.95", "medium", 100), ("AR", "IoU=0.50:0.95", "large", 100),
]
STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]


@torch.no_grad()
def detect_dataset(model, dataset, device="cpu", batch_size: int = 8, workers: int = 0) -> list:
    """Run ``model`` over ``dataset`` and return detections in COCO results format."""
    model.eval()
    sampler = EpochSampler(len(dataset), shuffle=False)
    loader = make_loader(dataset, batch_size, sampler, num_workers=workers, drop_last=False)
    results = []
    for images, targets in loader:
        outs = model([im.to(device) for im in images])
        for out, t in zip(outs, targets):
            boxes = out["boxes"].float().cpu()
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
            for b, s, lab in zip(xywh, out["scores"].float().cpu().tolist(), out["labels"].cpu().tolist()):
                results.append({"image_id": t["image_id"],
                                "category_id": dataset.label_to_cat_id[int(lab)],
                                "bbox": [round(v, 2) for v in b], "score": round(float(s), 5)})
    return results


def coco_evaluate(coco_gt, results: list, image_ids=None) -> dict:
    """COCOeval(bbox) of ``results`` against ``coco_gt`` (a pycocotools COCO).

    Returns ``{"AP": ..., ..., "ARl": ..., "summary": "<the 12 printed lines>"}``. No detections
    at all gives zeros (pycocotools cannot load an empty result list)."""
    try:
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise RetinaFastError("evaluation needs pycocotools: pip install pycocotools") from None
    if not results:
        lines = [f" {'Average Precision' if n.startswith('AP') else 'Average Recall   '}  "
                 f"({n[:2]}) @[ {iou} | area={area:>6s} | maxDets={md:>3d} ] = 0.000"
                 for n, iou, area, md in _SUMMARY_ROWS]
        return {**dict(zip(STAT_NAMES, [0.0] * 12)),
                "summary": "\n".join(lines + ["(no detections: every AP and AR is 0)"])}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds keys in place
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        ev.summarize()
    out = {k: float(v) for k, v in zip(STAT_NAMES, ev.stats)}
    out["summary"] = summary.getvalue().rstrip()
    return out


def evaluate(model, dataset, out_dir: str | None = None, device="cpu", batch_size: int = 8,
             workers: int = 0, verbose: bool = True) -> dict:
    results = detect_dataset(model, dataset, device, batch_size, workers)
    metrics = coco_evaluate(dataset.coco_api(), results, [im["id"] for im in dataset.images])
    metrics["num_images"] = len(dataset)
    metrics["num_detections"] = len(results)
    if verbose:
        print(metrics["summary"], flush=True)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "detections.json"), "w") as f:
            json.dump(results, f)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics
