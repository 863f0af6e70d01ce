"""Stand-ins for torchvision's published weights (nothing can be downloaded): randomly
initialised torchvision models, made to behave like trained ones where a test needs it, saved
as plain state_dict files; a torch hub cache holding them under the published file names; a
small COCO-format dataset whose ground truth comes from a model's own detections (so that
COCOeval's numbers are neither 0 nor 1)."""

import json
import os

import numpy as np
import torch
from PIL import Image

SIZE = dict(min_size=128, max_size=192)
IMAGE_SIZES = [(120, 150), (128, 128), (100, 160), (140, 120)]


def tv_builder(variant):
    from torchvision.models.detection import retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2

    return retinanet_resnet50_fpn if variant == "v1" else retinanet_resnet50_fpn_v2


def tv_enum(variant):
    from torchvision.models.detection import RetinaNet_ResNet50_FPN_V2_Weights, RetinaNet_ResNet50_FPN_Weights

    return (RetinaNet_ResNet50_FPN_Weights if variant == "v1" else RetinaNet_ResNet50_FPN_V2_Weights).COCO_V1


def fake_coco_state_dict(variant, seed=0, num_classes=91):
    """torchvision's RetinaNet (``weights=None``) with random weights, changed so that
    post-processing has work (scores above 0.05, box codes that move boxes) and so that the
    BatchNorm eps matters (running variances ~1e-4, the scale compensating): v1 COCO weights
    loaded with eps 1e-5 instead of 0 then give other detections."""
    torch.manual_seed(seed)
    tv = tv_builder(variant)(weights=None, weights_backbone=None, num_classes=num_classes)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        tv.head.classification_head.cls_logits.bias.normal_(-2.0, 0.5, generator=g)
        tv.head.classification_head.cls_logits.weight.mul_(10 if variant == "v1" else 1)
        tv.head.regression_head.bbox_reg.weight.mul_(10)
        for m in tv.backbone.body.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                var = torch.empty(m.num_features).uniform_(5e-5, 2e-4, generator=g)
                m.running_var.copy_(var)
                m.running_mean.normal_(0, 0.01, generator=g)
                m.weight.copy_(var.sqrt())
    return tv.state_dict()


def save(sd, path):
    torch.save(sd, path)
    return str(path)


class HubCache:
    """``torch.hub``'s directory pointed at ``root`` (torchvision looks there before it
    downloads); ``put(enum, state_dict)`` stores a file where torchvision would cache it."""

    def __init__(self, root):
        self.root = str(root)
        self._old = None

    def __enter__(self):
        self._old = torch.hub._hub_dir
        torch.hub.set_dir(self.root)
        return self

    def __exit__(self, *exc):
        torch.hub._hub_dir = self._old

    def path(self, enum):
        from retina_fast.models.weights import hub_cache_file

        return hub_cache_file(enum)

    def put(self, enum, sd):
        p = self.path(enum)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        torch.save(sd, p)
        return p


def write_images(folder, sizes=IMAGE_SIZES, seed=0):
    """PNG images of smooth random colour fields (uint8); returns the file names."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i, (h, w) in enumerate(sizes):
        small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        names.append(f"{i + 1:06d}.png")
        img.save(os.path.join(folder, names[-1]))
    return names


def read_images(folder, names):
    return [torch.from_numpy(np.array(Image.open(os.path.join(folder, n)).convert("RGB"))).permute(2, 0, 1)
            .float().div(255) for n in names]


def coco_from_detections(dets, names, sizes, seed=0, renumber=False, per_image=6):
    """A COCO instances dict whose boxes are jittered copies of some of ``dets`` (a model's
    detections on the images ``names``), with COCO names; category ids are the model's labels,
    or 1..K in label order when ``renumber``. Returns (dict, {model label: category id})."""
    from retina_fast.models.weights import COCO_CATEGORIES

    rng = np.random.default_rng(seed)
    picks = []
    for d in dets:
        wh = (d["boxes"][:, 2:] - d["boxes"][:, :2]).min(1).values
        ok = [i for i, lab in enumerate(d["labels"].tolist())
              if COCO_CATEGORIES[lab] not in ("N/A", "__background__") and wh[i] >= 8]
        picks.append(ok[:2 * per_image:2])  # the top detections, every other one
    labels = sorted({int(dets[i]["labels"][j]) for i, p in enumerate(picks) for j in p})
    cat_of = {lab: (k + 1 if renumber else lab) for k, lab in enumerate(labels)}
    images, anns = [], []
    for i, (name, (h, w), d, p) in enumerate(zip(names, sizes, dets, picks)):
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        for j in p:
            x1, y1, x2, y2 = d["boxes"][j].tolist()
            bw, bh = max(x2 - x1, 2.0), max(y2 - y1, 2.0)
            jit = rng.normal(0, 0.04, 4)
            box = [x1 + jit[0] * bw, y1 + jit[1] * bh, bw * np.exp(jit[2]), bh * np.exp(jit[3])]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat_of[int(d["labels"][j])],
                         "bbox": [round(float(v), 2) for v in box], "area": float(box[2] * box[3]), "iscrowd": 0})
    cats = [{"id": cat_of[lab], "name": COCO_CATEGORIES[lab]} for lab in labels]
    return {"images": images, "annotations": anns, "categories": cats}, cat_of


def write_split(folder, coco, sizes=IMAGE_SIZES, seed=0):
    write_images(os.path.join(folder, "images"), sizes, seed)
    with open(os.path.join(folder, "instances.json"), "w") as f:
        json.dump(coco, f)
    return str(folder)


def results_of(dets, cat_of):
    """COCO results of per-image detections, labels mapped through ``cat_of`` (others dropped),
    rounded as retina_fast writes them."""
    out = []
    for i, d in enumerate(dets):
        for b, s, lab in zip(d["boxes"].tolist(), d["scores"].tolist(), d["labels"].tolist()):
            if lab in cat_of:
                out.append({"image_id": i + 1, "category_id": cat_of[lab], "score": round(float(s), 5),
                            "bbox": [round(v, 2) for v in (b[0], b[1], b[2] - b[0], b[3] - b[1])]})
    return out


def pycocotools_stats(coco, results):
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = coco
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(v) for v in ev.stats]
