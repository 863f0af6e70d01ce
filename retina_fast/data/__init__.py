"""Data: COCO-format datasets, the synthetic shapes generator, transforms, sampling, collate.

Imports only ``torch``/``torchvision``/Pillow/numpy (and pycocotools lazily, for evaluation).
"""

from retina_fast.data.errors import DatasetError, RetinaFastError
from retina_fast.data.coco import CocoDetection, load_coco_json
from retina_fast.data.shapes import (
    CATEGORIES as SHAPES_CATEGORIES, ShapesConfig, ShapesStream, render_indexed,
    render_shapes_image, write_shapes_coco,
)
from retina_fast.data.transforms import (
    Compose, RandomHorizontalFlip, RandomResize, Resize, ToFloat, eval_transforms,
    train_transforms,
)
from retina_fast.data.loader import EpochSampler, collate_detection, make_loader

__all__ = [
    "DatasetError", "RetinaFastError", "CocoDetection", "load_coco_json", "SHAPES_CATEGORIES",
    "ShapesConfig", "ShapesStream", "render_indexed", "render_shapes_image", "write_shapes_coco",
    "Compose", "RandomHorizontalFlip", "RandomResize", "Resize", "ToFloat", "eval_transforms",
    "train_transforms", "EpochSampler", "collate_detection", "make_loader",
]
