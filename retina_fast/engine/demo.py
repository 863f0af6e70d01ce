"""``retina-fast demo``: shapes data → train a small RetinaNet → COCO evaluation → results folder.

Results folder (default ``retina_fast_demo/``)::

    data/val/{images/,instances.json}   the generated validation split (COCO format)
    train/checkpoint.pt, history.json   the trained model (usable with eval / predict)
    metrics.json, detections.json       COCOeval bbox: the 12 numbers, detections (COCO results)
    loss_curve.png                      training loss (total, classification, box) and lr
    predictions/*.png, predictions.json the first val images with detections drawn
    summary.json                        mAP, timings, device, threads, settings

Training images are rendered on the fly in DataLoader workers (never the same image twice).
A second demo run into the same folder replaces the first one's results (its checkpoint included).
Training is time-budgeted: the cosine schedule is fitted to ``time_budget`` seconds from the
measured speed, so the run ends on time on a slow or busy machine (with a lower mAP).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time

import torch

from retina_fast.data import (
    SHAPES_CATEGORIES, CocoDetection, ShapesConfig, ShapesStream, eval_transforms,
    train_transforms, write_shapes_coco,
)
from retina_fast.engine import memory
from retina_fast.engine import precision as rprec
from retina_fast.engine.evaluate import evaluate, inference_model
from retina_fast.engine.plots import plot_loss_curve
from retina_fast.engine.predict import predict_images
from retina_fast.engine.train import TrainConfig, check_writable_dir, resolve_device, train

log = logging.getLogger("retina_fast")

# Seconds of training by device when --time-budget is not given. CPU: the whole demo must fit in
# 5 minutes on an idle 2-core machine: ~5 s start-up and validation data, ~5 s evaluation and
# pictures (bfloat16, folded), 240 s of training (0.870 mAP at 83 img/s on the 2-core
# AVX-512-BF16 EPYC, 248 s in all), the rest a margin for a slower machine.
DEFAULT_BUDGET = {"cpu": 240.0, "cuda": 75.0}


def run_demo(out_dir: str = "retina_fast_demo", time_budget: float | None = None,
             device: str = "auto", seed: int = 0, val_images: int = 200, batch_size: int = 16,
             lr: float = 2e-3, workers: int | None = None, amp: bool = False,
             num_predictions: int = 8, max_iters: int | None = None, progress: str = "auto",
             extra_info: dict | None = None, precision: str = "auto",
             channels_last: bool | None = None) -> dict:
    t_start = time.perf_counter()
    check_writable_dir(out_dir)
    dev = resolve_device(device)
    budget = DEFAULT_BUDGET.get(dev.type, DEFAULT_BUDGET["cpu"]) if time_budget is None else float(time_budget)
    if workers is None:
        ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        workers = 2 if dev.type == "cpu" else max(2, min(8, (ncpu or 2) - 2))
    cfg_shapes = ShapesConfig()

    print(f"[demo] writing {val_images} validation images to {out_dir}/data/val", flush=True)
    t = time.perf_counter()
    write_shapes_coco(os.path.join(out_dir, "data"), {"val": val_images}, seed=seed + 1000, cfg=cfg_shapes)
    t_data = time.perf_counter() - t

    train_set = ShapesStream(images_per_epoch=batch_size * 50, seed=seed, cfg=cfg_shapes,
                             transforms=train_transforms(hflip=0.5, to_float=False))
    cfg = TrainConfig(
        out_dir=os.path.join(out_dir, "train"), model="shapes-small", model_kwargs={},
        epochs=10 ** 6, batch_size=batch_size, workers=workers, optimizer="adamw", lr=lr,
        weight_decay=0.05, schedule="cosine", warmup_iters=100, clip_grad=10.0, amp=amp,
        precision=precision, channels_last=channels_last,
        device=str(dev), seed=seed, time_budget=budget, max_iters=max_iters, log_every=50,
        progress=progress, overwrite=True,  # a demo run replaces the previous demo's results
    )
    settings = rprec.resolve(precision, channels_last, dev, amp=amp)
    print(f"[demo] training shapes-small on {dev} for {budget:.0f} s "
          f"(batch {batch_size}, {torch.get_num_threads()} threads, {workers} data workers; "
          f"{settings.describe()})", flush=True)
    result = train(cfg, train_set, SHAPES_CATEGORIES)

    print("[demo] evaluating on the validation split", flush=True)
    t = time.perf_counter()
    val = CocoDetection(os.path.join(out_dir, "data", "val", "instances.json"),
                        os.path.join(out_dir, "data", "val", "images"), transforms=eval_transforms())
    model = result.model.eval()
    infer_model = inference_model(model, settings)  # folded, in the run's precision: prepared once
    metrics = evaluate(infer_model, val, out_dir, device=dev, batch_size=16, progress=progress, settings=settings)
    t_eval = time.perf_counter() - t

    plot_loss_curve(result.history, os.path.join(out_dir, "loss_curve.png"),
                    title=f"shapes-small, {result.iterations} iterations, {result.train_seconds:.0f} s")
    paths = [os.path.join(val.image_dir, im["file_name"]) for im in val.images[:num_predictions]]
    predict_images(infer_model, paths, os.path.join(out_dir, "predictions"), val.class_names, device=dev,
                   score_thresh=0.4, label_to_cat_id=val.label_to_cat_id, settings=settings)

    total = time.perf_counter() - t_start
    summary = {
        "mAP": metrics["AP"], "AP50": metrics["AP50"], "AP75": metrics["AP75"],
        "APs": metrics["APs"], "APm": metrics["APm"], "APl": metrics["APl"],
        "iterations": result.iterations, "images_seen": result.images_seen,
        "train_seconds": round(result.train_seconds, 1),
        "train_img_per_s": round(result.images_seen / max(result.train_seconds, 1e-9), 1),
        # end to end (above), and without the time the loop waited for the data workers (the
        # workers' share of the cores is in both: compute alone is benchmarks/demo_pipeline.py)
        "img_per_s_without_data_wait": round(
            result.images_seen / max(result.train_seconds - result.data_wait_seconds, 1e-9), 1),
        "data_wait_seconds": round(result.data_wait_seconds, 1),
        "precision": settings.precision, "channels_last": settings.channels_last,
        "precision_reason": settings.reason, "cpu_features": rprec.cpu_features() if dev.type == "cpu" else None,
        "data_seconds": round(t_data, 1), "eval_seconds": round(t_eval, 1),
        "total_seconds": round(total, 1), "time_budget": budget, "stopped_by": result.stopped_by,
        "device": str(dev), "torch_threads": torch.get_num_threads(), "workers": workers,
        "batch_size": batch_size, "lr": lr, "amp": amp, "seed": seed, "val_images": val_images,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default: active)"),
        "malloc": memory.describe(),
        "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__, "python": platform.python_version(),
        **(extra_info or {}),
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"[demo] mAP@[.5:.95] = {metrics['AP']:.3f} (AP50 {metrics['AP50']:.3f}) after "
          f"{result.iterations} iterations / {result.train_seconds:.0f} s of training; "
          f"total {total:.0f} s. Results in {out_dir}/", flush=True)
    return summary
