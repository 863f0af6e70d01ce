"""COCOeval (bbox) through pycocotools or faster-coco-eval, and what we read out of it.

Backends (``--coco-backend``):

* ``pycocotools``: the reference implementation.
* ``faster``: `faster-coco-eval <https://pypi.org/project/faster-coco-eval/>`_, pycocotools'
  algorithm with the per-image matching and the accumulation in C++. An optional package: the
  stats and the precision array equal pycocotools' (``tests/engine/test_coco_backends.py``
  compares them on the test sets) and it is several times faster on large sets
  (``benchmarks/bench_cocoeval.py``).
* ``auto`` (default): ``faster`` when it is installed, else ``pycocotools``.

:func:`run_cocoeval` returns the 12 standard numbers and COCOeval's precision array
``[T=10 IoU thresholds, R=101 recall levels, K classes, A=4 areas (all, small, medium, large),
M=3 maxDets (1, 10, 100)]`` (``-1`` where a class has no ground truth), from which
:func:`per_class_table` reads AP, AP50, AP75 and AP by object size for each class, and
:func:`plot_pr_curves` in :mod:`retina_fast.engine.plots` draws one precision-recall panel per
class.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass

import numpy as np

from retina_fast.data.errors import RetinaFastError

BACKENDS = ("auto", "pycocotools", "faster")
STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
AREA_LABELS = ("all", "small", "medium", "large")
AREA_RANGES = {"small": (0, 32 ** 2), "medium": (32 ** 2, 96 ** 2), "large": (96 ** 2, 1e10)}
_SUMMARY_ROWS = [  # pycocotools' summarize() layout: (stat, IoU, area, maxDets)
    ("AP", "0.50:0.95", "all", 100), ("AP", "0.50", "all", 100), ("AP", "0.75", "all", 100),
    ("AP", "0.50:0.95", "small", 100), ("AP", "0.50:0.95", "medium", 100),
    ("AP", "0.50:0.95", "large", 100), ("AR", "0.50:0.95", "all", 1),
    ("AR", "0.50:0.95", "all", 10), ("AR", "0.50:0.95", "all", 100),
    ("AR", "0.50:0.95", "small", 100), ("AR", "0.50:0.95", "medium", 100),
    ("AR", "0.50:0.95", "large", 100),
]
_PACKAGES = {"pycocotools": ("pycocotools", "pycocotools"), "faster": ("faster_coco_eval", "faster-coco-eval")}


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def resolve_backend(name: str = "auto") -> str:
    """``pycocotools`` or ``faster``; a backend that is not installed is a one-line error."""
    if name not in BACKENDS:
        raise RetinaFastError(f"unknown COCOeval backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        for candidate in ("faster", "pycocotools"):
            if _importable(_PACKAGES[candidate][0]):
                return candidate
        raise RetinaFastError("evaluation needs pycocotools: pip install pycocotools "
                              "(or faster-coco-eval)")
    module, package = _PACKAGES[name]
    if not _importable(module):
        raise RetinaFastError(f"--coco-backend {name} needs the {package} package: pip install {package}")
    return name


@dataclass
class CocoEvalResult:
    backend: str
    stats: list            # the 12 numbers, in STAT_NAMES order
    precision: np.ndarray  # [T, R, K, A, M]
    iou_thrs: np.ndarray   # [T]
    rec_thrs: np.ndarray   # [R]
    cat_ids: list          # [K], sorted


def _results_coco(coco_cls, coco_gt, results):
    """The detections as the backend's COCO object (both loadRes add keys in place: copies)."""
    if results:
        return coco_gt.loadRes([dict(r) for r in results])
    # pycocotools' loadRes cannot take an empty list; an empty result set is still evaluable.
    res = coco_cls()
    res.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                   "categories": list(coco_gt.dataset["categories"])}
    res.createIndex()
    return res


def run_cocoeval(gt, results: list, image_ids=None, backend: str = "auto") -> CocoEvalResult:
    """COCOeval(bbox) of ``results`` (COCO results format) against ``gt``: a COCO instances
    dict or a pycocotools ``COCO``. ``image_ids`` restricts the images (default: all)."""
    backend = resolve_backend(backend)
    gt_dict = gt if isinstance(gt, dict) else gt.dataset
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        if backend == "faster":
            from faster_coco_eval import COCO, COCOeval_faster

            coco_gt = COCO(gt_dict)
            ev = COCOeval_faster(coco_gt, _results_coco(COCO, coco_gt, results), "bbox",
                                 print_function=lambda *a, **k: None)
        else:
            from pycocotools.coco import COCO
            from pycocotools.cocoeval import COCOeval

            if isinstance(gt, COCO):
                coco_gt = gt
            else:
                coco_gt = COCO()
                coco_gt.dataset = gt_dict
                coco_gt.createIndex()
            ev = COCOeval(coco_gt, _results_coco(COCO, coco_gt, results), "bbox")
        if image_ids is not None:
            ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return CocoEvalResult(backend=backend, stats=[float(v) for v in ev.stats[:12]],
                          precision=np.asarray(ev.eval["precision"]),
                          iou_thrs=np.asarray(ev.params.iouThrs), rec_thrs=np.asarray(ev.params.recThrs),
                          cat_ids=[int(c) for c in ev.params.catIds])


def summary_text(stats) -> str:
    """The 12 lines pycocotools' ``summarize()`` prints, for any backend."""
    lines = []
    for v, (kind, iou, area, md) in zip(stats, _SUMMARY_ROWS):
        title = "Average Precision" if kind == "AP" else "Average Recall"
        lines.append(f" {title:<18} ({kind}) @[ IoU={iou:<9} | area={area:>6s} | maxDets={md:>3d} ] = {v:0.3f}")
    return "\n".join(lines)


def _mean_valid(a: np.ndarray) -> float:
    a = a[a > -1]
    return float(a.mean()) if a.size else math.nan


def per_class_table(res: CocoEvalResult, gt: dict, image_ids=None) -> list:
    """One row per category: ``{"id", "name", "AP", "AP50", "AP75", "APs", "APm", "APl",
    "num_gt"}`` (``None`` where the class has no ground truth in that range), plus
    ``num_gt_small/medium/large``. Same means as pycocotools' summary, taken per class."""
    names = {c["id"]: str(c.get("name", c["id"])) for c in gt["categories"]}
    t50 = int(np.argmin(np.abs(res.iou_thrs - 0.5)))
    t75 = int(np.argmin(np.abs(res.iou_thrs - 0.75)))
    counts = gt_counts(gt, image_ids)
    rows = []
    for k, cid in enumerate(res.cat_ids):
        p = res.precision[:, :, k, :, -1]  # [T, R, A] at maxDets 100
        row = {"id": cid, "name": names.get(cid, str(cid)),
               "AP": _mean_valid(p[:, :, 0]), "AP50": _mean_valid(p[t50, :, 0]),
               "AP75": _mean_valid(p[t75, :, 0]),
               **{f"AP{a[0]}": _mean_valid(p[:, :, i + 1]) for i, a in enumerate(AREA_LABELS[1:])}}
        row = {k2: (None if isinstance(v, float) and math.isnan(v) else v) for k2, v in row.items()}
        c = counts.get(cid, {})
        row["num_gt"] = sum(c.values())
        row.update({f"num_gt_{a}": c.get(a, 0) for a in AREA_RANGES})
        rows.append(row)
    return rows


def gt_counts(gt: dict, image_ids=None) -> dict:
    """``{category_id: {"small": n, "medium": n, "large": n}}`` of the non-crowd boxes
    (COCOeval's area ranges, on the annotation's ``area``)."""
    keep = None if image_ids is None else set(image_ids)
    out = {}
    for a in gt.get("annotations", []):
        if a.get("iscrowd", 0) or (keep is not None and a["image_id"] not in keep):
            continue
        area = a.get("area", a["bbox"][2] * a["bbox"][3])
        size = next(s for s, (lo, hi) in AREA_RANGES.items() if area < hi or s == "large")
        d = out.setdefault(a["category_id"], {s: 0 for s in AREA_RANGES})
        d[size] += 1
    return out


def per_class_text(rows: list, stats: dict) -> str:
    """The per-class table and the AP-by-size line, as printed by ``eval``."""
    def f(v):
        return "    -" if v is None else f"{v:5.3f}"

    width = max([len("class")] + [len(r["name"]) for r in rows])
    head = f"{'class':<{width}}    AP   AP50   AP75    APs    APm    APl    #gt"
    lines = ["Per class (IoU=0.50:0.95 unless named, maxDets=100):", "  " + head]
    for r in rows:
        lines.append(f"  {r['name']:<{width}}  {f(r['AP'])}  {f(r['AP50'])}  {f(r['AP75'])}  "
                     f"{f(r['APs'])}  {f(r['APm'])}  {f(r['APl'])}  {r['num_gt']:5d}")
    n = {s: sum(r[f"num_gt_{s}"] for r in rows) for s in AREA_RANGES}
    sizes = ", ".join(f"{s} {f(stats['AP' + s[0]] if stats['AP' + s[0]] > -1 else None).strip()} ({n[s]} gt)"
                      for s in AREA_RANGES)
    lines.append(f"AP by object size: {sizes}")
    return "\n".join(lines)
