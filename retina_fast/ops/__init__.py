"""Public op API. Where torchvision has the same function, ours takes the same signature and
gives the same result, so ``from retina_fast.ops import X`` can replace
``from torchvision.ops import X``."""

from retina_fast.ops.boxes import (
    MatchedTargets,
    box_iou,
    decode_boxes,
    encode_boxes,
    grid_anchors,
    match_anchors,
    matched_box_loss,
    matched_targets,
)
from retina_fast.ops.focal_loss import sigmoid_focal_loss, sigmoid_focal_loss_labels
from retina_fast.ops.multiclass_nms import multiclass_nms
from retina_fast.ops.nms import (
    batched_nms,
    batched_nms_multi,
    nms,
    postprocess_detections,
    postprocess_detections_padded,
)

__all__ = [
    "box_iou",
    "grid_anchors",
    "match_anchors",
    "matched_targets",
    "MatchedTargets",
    "matched_box_loss",
    "encode_boxes",
    "decode_boxes",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_labels",
    "nms",
    "batched_nms",
    "batched_nms_multi",
    "postprocess_detections",
    "postprocess_detections_padded",
    "multiclass_nms",
]
