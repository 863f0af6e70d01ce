"""Tiny models and data so engine tests run in seconds on 2 CPU cores."""

from retina_fast.data import SHAPES_CATEGORIES, ShapesConfig, ShapesStream, train_transforms
from retina_fast.engine import TrainConfig

TINY_MODEL = {"widths": [8, 8, 16, 16, 16], "fpn_channels": 16, "min_size": 64}
TINY_SHAPES = ShapesConfig(size=64, min_object_size=8, max_object_size=48, empty_fraction=0.0)


def tiny_stream(n=8, seed=0, hflip=0.5):
    return ShapesStream(n, seed=seed, cfg=TINY_SHAPES, transforms=train_transforms(hflip=hflip))


def tiny_config(out_dir, **kw):
    base = dict(out_dir=str(out_dir), model="shapes-small", model_kwargs=dict(TINY_MODEL),
                epochs=2, batch_size=4, workers=0, lr=5e-3, warmup_iters=2, device="cpu",
                log_every=1000, progress="none")
    base.update(kw)
    return TrainConfig(**base)


CATEGORIES = SHAPES_CATEGORIES


def synthetic_coco(n_images: int, n_classes: int = 80, seed: int = 0, dets_per_image: int = 100,
                   size=(640, 480)):
    """A COCO-like ground truth and detections for it, for evaluating COCOeval itself.

    Ground truth: 1-15 boxes per image (7 on average, like COCO), sizes log-uniform from 4 to
    400 px so that all of COCOeval's area ranges fill, 3% crowd boxes, category ids 1..K with
    gaps (ids 2k+1). Detections: every box found with a random jitter (IoU from ~0.3 to 1), a
    quarter of them twice, 10% with the wrong class, then false positives up to
    ``dets_per_image``; scores random, higher for the better matches."""
    import numpy as np

    rng = np.random.default_rng(seed)
    w, h = size
    cat_ids = [2 * k + 1 for k in range(n_classes)]
    images, anns, dets = [], [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"{i:06d}.jpg", "width": w, "height": h})
        boxes = []
        for _ in range(int(rng.integers(1, 16))):
            bw, bh = np.exp(rng.uniform(np.log(4), np.log(400), 2))
            x, y = rng.uniform(0, w - min(bw, w - 1)), rng.uniform(0, h - min(bh, h - 1))
            bw, bh = min(bw, w - x), min(bh, h - y)
            cat = int(rng.choice(cat_ids))
            crowd = int(rng.uniform() < 0.03)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat,
                         "bbox": [float(x), float(y), float(bw), float(bh)],
                         "area": float(bw * bh), "iscrowd": crowd})
            boxes.append((x, y, bw, bh, cat))
        found = []
        for x, y, bw, bh, cat in boxes:
            for _ in range(2 if rng.uniform() < 0.25 else 1):
                j = rng.normal(0, rng.uniform(0.02, 0.25), 4)
                b = [x + j[0] * bw, y + j[1] * bh, bw * np.exp(j[2]), bh * np.exp(j[3])]
                c = int(rng.choice(cat_ids)) if rng.uniform() < 0.1 else cat
                found.append((b, c, float(np.clip(1 - np.abs(j).mean() * 3 + rng.normal(0, 0.1), 0.01, 1))))
        while len(found) < dets_per_image:
            bw, bh = np.exp(rng.uniform(np.log(4), np.log(300), 2))
            found.append(([rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh],
                          int(rng.choice(cat_ids)), float(rng.uniform(0.01, 0.6))))
        for b, c, s in found[:dets_per_image]:
            dets.append({"image_id": i, "category_id": c, "bbox": [round(float(v), 2) for v in b],
                         "score": round(s, 5)})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": c, "name": f"class{c}"} for c in cat_ids]}
    return gt, dets
