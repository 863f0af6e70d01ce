"""Engine: model construction (one factory), training loop, COCO evaluation, prediction, demo.

Imports ``retina_fast.data`` (and, through :mod:`retina_fast.engine.model_factory`, the model).
"""

from retina_fast.engine.model_factory import MODEL_NAMES, build_model
from retina_fast.engine.train import NonFiniteLossError, TrainConfig, TrainResult, train
from retina_fast.engine.evaluate import STAT_NAMES, coco_evaluate, detect_dataset, evaluate
from retina_fast.engine.predict import draw_detections, predict_images
from retina_fast.engine.checkpoint import load_checkpoint, model_from_checkpoint

__all__ = [
    "MODEL_NAMES", "build_model", "NonFiniteLossError", "TrainConfig", "TrainResult", "train",
    "STAT_NAMES", "coco_evaluate", "detect_dataset", "evaluate", "draw_detections",
    "predict_images", "load_checkpoint", "model_from_checkpoint",
]
