"""One line to put retina_fast's kernels under an existing torchvision RetinaNet.

``retina_fast.patch_torchvision(model)`` swaps, in place, a
``torchvision.models.detection.RetinaNet``'s anchor generator, matching + loss
(``compute_loss``) and post-processing (``postprocess_detections``) for ours. Weights, modules,
``state_dict`` and the forward contract are untouched; ``unpatch_torchvision`` restores the
originals.
"""

from contextlib import contextmanager
from typing import Dict, List, Tuple

import torch
from torch import Tensor

from retina_fast.models.anchors import AnchorGenerator
from retina_fast.models.loss import RetinaNetLoss, pack_targets
from retina_fast.ops.nms import postprocess_detections

__all__ = ["patch_torchvision", "unpatch_torchvision", "patched_torchvision"]

_ATTR = "_retina_fast_originals"


def _whole(parts: List[Tensor], dim: int) -> Tensor:
    # torchvision splits the head outputs (and anchors) per level with Tensor.split: the pieces
    # are views of one tensor, so take that tensor back instead of concatenating copies.
    base = parts[0]._base
    if base is not None and all(p._base is base for p in parts):
        shape = list(parts[0].shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        if list(base.shape) == shape and parts[0].data_ptr() == base.data_ptr():
            return base
    return torch.cat(parts, dim)


def patch_torchvision(model):
    """Patch ``model`` (a torchvision RetinaNet) in place and return it.

    Same losses and detections as before (up to float summation order and exact score ties,
    which torchvision's CPU sort leaves unordered); the anchor generator keeps its sizes and
    aspect ratios.
    """
    from torchvision.models.detection import RetinaNet as TVRetinaNet

    if not isinstance(model, TVRetinaNet):
        raise TypeError(f"patch_torchvision expects a torchvision.models.detection.RetinaNet, got {type(model)}")
    if hasattr(model, _ATTR):
        return model
    matcher = model.proposal_matcher
    coder = model.head.regression_head.box_coder
    originals = {"anchor_generator": model.anchor_generator}
    for name in ("compute_loss", "postprocess_detections"):
        if name in model.__dict__:
            originals[name] = model.__dict__[name]
    ag = model.anchor_generator
    model.anchor_generator = AnchorGenerator(ag.sizes, ag.aspect_ratios)
    loss = RetinaNetLoss(matcher.high_threshold, matcher.low_threshold, matcher.allow_low_quality_matches,
                         box_coder_weights=coder.weights, bbox_xform_clip=coder.bbox_xform_clip)

    def compute_loss(targets: List[Dict[str, Tensor]], head_outputs: Dict[str, Tensor], anchors: List[Tensor]):
        cls_logits = head_outputs["cls_logits"]
        packed = pack_targets(targets, cls_logits.device)
        box_loss = getattr(model.head.regression_head, "_loss_type", "l1")
        return loss(cls_logits, head_outputs["bbox_regression"], anchors[0], packed, box_loss)

    def postprocess(head_outputs: Dict[str, List[Tensor]], anchors: List[List[Tensor]],
                    image_shapes: List[Tuple[int, int]]):
        cls_logits = _whole(head_outputs["cls_logits"], 1)
        bbox_regression = _whole(head_outputs["bbox_regression"], 1)
        a = _whole(anchors[0], 0)
        counts = [int(t.shape[0]) for t in anchors[0]]
        return postprocess_detections(cls_logits, bbox_regression, a, image_shapes, counts, model.score_thresh,
                                      model.topk_candidates, model.nms_thresh, model.detections_per_img)

    model.compute_loss = compute_loss
    model.postprocess_detections = postprocess
    setattr(model, _ATTR, originals)
    return model


def unpatch_torchvision(model):
    """Undo :func:`patch_torchvision` (no-op on an unpatched model); returns the model."""
    originals = model.__dict__.pop(_ATTR, None)
    if originals is None:
        return model
    model.anchor_generator = originals.pop("anchor_generator")
    for name in ("compute_loss", "postprocess_detections"):
        model.__dict__.pop(name, None)
        if name in originals:
            model.__dict__[name] = originals[name]
    return model


@contextmanager
def patched_torchvision(model):
    """``with patched_torchvision(model): ...`` patches for the block only."""
    was = hasattr(model, _ATTR)
    patch_torchvision(model)
    try:
        yield model
    finally:
        if not was:
            unpatch_torchvision(model)
