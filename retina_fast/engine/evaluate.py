"""COCO bbox evaluation (COCOeval through pycocotools or faster-coco-eval).

``evaluate(model, dataset, out_dir)`` runs the model over a :class:`CocoDetection` (images as
they are; the model resizes them itself and returns boxes in original pixels), writes
``detections.json`` (COCO results format: ``image_id``, ``category_id``, ``bbox`` ``[x, y, w,
h]``, ``score``), ``metrics.json`` (the 12 standard numbers by name, the printed summary, and
``per_class``: AP, AP50, AP75, APs, APm, APl and ground-truth counts of each class),
``per_class.csv`` and ``pr_curves.png`` (a precision-recall panel per class), prints the
summary and the per-class table, and returns the metrics dict. The COCOeval backend is chosen
by :func:`retina_fast.engine.coco_backends.resolve_backend`.

``settings`` (a :class:`~retina_fast.engine.precision.RunSettings`; None: float32, NCHW, the
model as given) runs a copy of the model made by
:func:`retina_fast.models.fuse.prepare_for_inference` (BatchNorms folded, weights in the
precision and memory format) under ``settings.autocast()``; detections are float32 either
way, and ``metrics.json`` then says which settings ran (``"precision"``).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import time

import torch

from retina_fast.data.loader import EpochSampler, make_loader
from retina_fast.engine.coco_backends import (
    STAT_NAMES, per_class_table, per_class_text, run_cocoeval, summary_text,
)
from retina_fast.engine.logging_utils import Progress

__all__ = ["STAT_NAMES", "coco_evaluate", "coco_results", "detect_dataset", "evaluate", "inference_model"]

log = logging.getLogger("retina_fast")


def inference_model(model, settings=None):
    """``model`` itself for ``settings`` None (float32, NCHW: as given), else the copy of
    :func:`retina_fast.models.fuse.prepare_for_inference` (once: a model it made is kept)."""
    done = getattr(model, "_rf_inference_prepared", None)
    if settings is None:
        return model
    if done is not None:
        if (done["precision"], done["channels_last"]) != (settings.precision, settings.channels_last):
            raise ValueError(f"the model was prepared for {done['precision']}"
                             f"{', channels_last' if done['channels_last'] else ''}, not for {settings.describe()}")
        return model
    from retina_fast.models.fuse import prepare_for_inference

    return prepare_for_inference(model, settings)


def log_first_batch(model, seconds: float) -> None:
    """Where the model's backbone and head were given to ``torch.compile`` (``--compile``),
    the first batch is when they compile: say how long it took."""
    if getattr(model, "_rf_compiled", False):
        log.info("torch.compile: the first batch, compiling the backbone and head, took %.1f s", seconds)


def coco_results(det: dict, image_id, label_to_cat_id=None) -> list:
    """One image's detections (``boxes`` xyxy, ``scores``, ``labels``) in COCO results format:
    ``bbox`` as ``[x, y, w, h]`` (2 decimals), ``score`` (5 decimals), ``category_id`` mapped
    from the contiguous label (the label itself without a mapping)."""
    boxes = det["boxes"].float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    out = []
    for b, s, lab in zip(xywh, det["scores"].float().cpu().tolist(), det["labels"].cpu().tolist()):
        out.append({"image_id": image_id,
                    "category_id": label_to_cat_id[int(lab)] if label_to_cat_id is not None else int(lab),
                    "bbox": [round(v, 2) for v in b], "score": round(float(s), 5)})
    return out


@torch.no_grad()
def detect_dataset(model, dataset, device="cpu", batch_size: int = 8, workers: int = 0,
                   progress: str = "none", settings=None) -> list:
    """Run ``model`` over ``dataset`` and return detections in COCO results format.
    ``progress``: ``auto``/``bar``/``lines``/``none`` (lines about every tenth of the set);
    ``settings``: see the module docstring."""
    model = inference_model(model, settings)
    model.eval()
    autocast = settings.autocast if settings is not None else contextlib.nullcontext
    sampler = EpochSampler(len(dataset), shuffle=False)
    loader = make_loader(dataset, batch_size, sampler, num_workers=workers, drop_last=False)
    n_batches = len(loader)
    bar = Progress(progress, len(dataset), "[eval]", noun="images",
                   every=batch_size * max(1, round(n_batches / 10)))
    results, seen = [], 0
    try:
        for images, targets in loader:
            t0 = time.perf_counter()
            with autocast():
                outs = model([im.to(device) for im in images])
            if not seen:
                log_first_batch(model, time.perf_counter() - t0)
            for out, t in zip(outs, targets):
                results += coco_results(out, t["image_id"], dataset.label_to_cat_id)
            seen += len(images)
            bar.update(seen, force_line=seen == len(images) or seen == len(dataset))
    finally:
        bar.close()
    return results


def _metrics(res, gt: dict, image_ids, no_detections: bool) -> dict:
    out = {k: float(v) for k, v in zip(STAT_NAMES, res.stats)}
    out["summary"] = summary_text(res.stats) + ("\n(no detections)" if no_detections else "")
    out["per_class"] = per_class_table(res, gt, image_ids)
    out["coco_backend"] = res.backend
    return out


def coco_evaluate(coco_gt, results: list, image_ids=None, backend: str = "auto") -> dict:
    """COCOeval(bbox) of ``results`` against ``coco_gt`` (a COCO instances dict or a
    pycocotools ``COCO``).

    Returns ``{"AP": ..., ..., "ARl": ..., "summary": "<the 12 printed lines>", "per_class":
    [...], "coco_backend": ...}``. With no detections at all every AP is 0 (-1 where the
    ground truth has nothing to find, as COCOeval says)."""
    gt = coco_gt if isinstance(coco_gt, dict) else coco_gt.dataset
    return _metrics(run_cocoeval(coco_gt, results, image_ids, backend), gt, image_ids, not results)


def evaluate(model, dataset, out_dir: str | None = None, device="cpu", batch_size: int = 8,
             workers: int = 0, verbose: bool = True, progress: str = "none",
             coco_backend: str = "auto", settings=None) -> dict:
    model = inference_model(model, settings)
    results = detect_dataset(model, dataset, device, batch_size, workers, progress=progress, settings=settings)
    image_ids = [im["id"] for im in dataset.images]
    res = run_cocoeval(dataset.dataset, results, image_ids, coco_backend)
    metrics = _metrics(res, dataset.dataset, image_ids, not results)
    metrics["num_images"] = len(dataset)
    metrics["num_detections"] = len(results)
    if settings is not None:
        metrics["precision"] = dict(getattr(model, "_rf_inference_prepared", None) or settings.as_dict())
    if verbose:
        print(metrics["summary"], flush=True)
        print(per_class_text(metrics["per_class"], metrics), flush=True)
    if out_dir:
        from retina_fast.engine.plots import plot_pr_curves

        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "detections.json"), "w") as f:
            json.dump(results, f)
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        with open(os.path.join(out_dir, "per_class.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(metrics["per_class"][0]))
            w.writeheader()
            w.writerows(metrics["per_class"])
        plot_pr_curves(res, [r["name"] for r in metrics["per_class"]],
                       os.path.join(out_dir, "pr_curves.png"))
    return metrics
