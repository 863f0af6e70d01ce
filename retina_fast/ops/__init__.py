"""Public op API. Where torchvision has the same function, ours takes the same signature and
gives the same result, so ``from retina_fast.ops import X`` can replace
``from torchvision.ops import X``."""

from retina_fast.ops.focal_loss import sigmoid_focal_loss, sigmoid_focal_loss_labels
from retina_fast.ops.nms import (
    batched_nms,
    batched_nms_multi,
    nms,
    postprocess_detections,
    postprocess_detections_padded,
)

__all__ = [
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_labels",
    "nms",
    "batched_nms",
    "batched_nms_multi",
    "postprocess_detections",
    "postprocess_detections_padded",
]
