"""One line to put retina_fast's kernels under an existing torchvision RetinaNet or FCOS.

``retina_fast.patch_torchvision(model)`` swaps, in place:

* ``torchvision.models.detection.RetinaNet``: the anchor generator, the matching + loss
  (``compute_loss``: batched matching, the fused focal loss, the box loss) and the
  post-processing (``postprocess_detections``: the fused kernel);
* ``torchvision.models.detection.FCOS``: the anchor generator, the classification loss (the
  fused labels-form focal loss in place of a one-hot ``sigmoid_focal_loss``; FCOS's own
  centre-sampling matching, GIoU and centerness losses are kept as torchvision computes them)
  and the NMS of the post-processing (one ``batched_nms_multi`` call for the batch in place of a
  ``batched_nms`` per image; FCOS's score, top-k, decoding and clipping are torchvision's,
  batched over the images).

Weights, modules, ``state_dict`` and the forward contract are untouched;
``unpatch_torchvision`` restores the originals. The patched methods live on a subclass of the
model's class (the instance's ``__class__`` is swapped), so ``copy.deepcopy``, ``torch.save``
of a plain RetinaNet/FCOS and ``torch.jit.script`` see them.

TorchScript: a patched model scripts, and the scripted model's eval forward (anchors,
head, post-processing) runs our kernels. The one thing not scripted is RetinaNet's training
loss: it packs the targets with Python code TorchScript cannot compile (``pad_sequence`` over a
list of dicts, NamedTuples, generator expressions), so it is ``@torch.jit.unused`` and a
scripted patched RetinaNet raises if called in training mode. A patched FCOS scripts whole,
training loss included.
"""

from contextlib import contextmanager
from typing import Dict, List, Tuple

import torch
from torch import Tensor
from torchvision.models.detection import FCOS as TVFCOS
from torchvision.models.detection import RetinaNet as TVRetinaNet
from torchvision.models.detection.fcos import FCOSHead as TVFCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import generalized_box_iou_loss

from retina_fast.models.anchors import AnchorGenerator
from retina_fast.models.loss import RetinaNetLoss, pack_targets
from retina_fast.ops.boxes import grid_anchors
from retina_fast.ops.focal_loss import sigmoid_focal_loss_labels
from retina_fast.ops.nms import batched_nms_multi, postprocess_detections

__all__ = ["patch_torchvision", "unpatch_torchvision", "patched_torchvision"]

_ATTR = "_retina_fast_originals"
_STATE = "_retina_fast_state"


def _whole(parts: List[Tensor], dim: int) -> Tensor:
    # torchvision splits the head outputs (and anchors) per level with Tensor.split: the pieces
    # are views of one tensor, so take that tensor back instead of concatenating copies.
    if not torch.jit.is_scripting():
        base = parts[0]._base
        if base is not None and all(p._base is base for p in parts):
            shape = list(parts[0].shape)
            shape[dim] = sum(p.shape[dim] for p in parts)
            if list(base.shape) == shape and parts[0].data_ptr() == base.data_ptr():
                return base
    return torch.cat(parts, dim)


class PatchedAnchorGenerator(AnchorGenerator):
    """Our :class:`~retina_fast.models.AnchorGenerator` with a forward TorchScript compiles
    (the eager forward caches grids in an OrderedDict, which TorchScript cannot type; scripted,
    every call builds its grid with one kernel)."""

    __jit_ignored_attributes__ = ["_cache"]

    def forward(self, image_list: ImageList, feature_maps: List[Tensor]) -> List[Tensor]:
        if not torch.jit.is_scripting():
            return AnchorGenerator.forward(self, image_list, feature_maps)
        h, w = image_list.tensors.shape[-2], image_list.tensors.shape[-1]
        grid_sizes: List[List[int]] = []
        strides: List[List[int]] = []
        for f in feature_maps:
            grid_sizes.append([f.shape[-2], f.shape[-1]])
            strides.append([h // f.shape[-2], w // f.shape[-1]])
        ref = feature_maps[0]
        cells = [c.to(dtype=ref.dtype, device=ref.device) for c in self.cell_anchors]
        anchors = grid_anchors(cells, grid_sizes, strides)
        return [anchors for _ in range(len(image_list.image_sizes))]


# ------------------------------------------------------------------------------ RetinaNet


class _RetinaNetMethods:
    """The methods a patched torchvision RetinaNet gets (through a subclass)."""

    @torch.jit.unused
    def compute_loss(self, targets: List[Dict[str, Tensor]], head_outputs: Dict[str, Tensor],
                     anchors: List[Tensor]) -> Dict[str, Tensor]:
        loss = getattr(self, _STATE)["loss"]
        cls_logits = head_outputs["cls_logits"]
        packed = pack_targets(targets, cls_logits.device)
        box_loss = getattr(self.head.regression_head, "_loss_type", "l1")
        return loss(cls_logits, head_outputs["bbox_regression"], anchors[0], packed, box_loss)

    def postprocess_detections(self, head_outputs: Dict[str, List[Tensor]], anchors: List[List[Tensor]],
                               image_shapes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        cls_logits = _whole(head_outputs["cls_logits"], 1)
        bbox_regression = _whole(head_outputs["bbox_regression"], 1)
        a = _whole(anchors[0], 0)
        counts = [int(t.shape[0]) for t in anchors[0]]
        return postprocess_detections(cls_logits, bbox_regression, a, image_shapes, counts, self.score_thresh,
                                      self.topk_candidates, self.nms_thresh, self.detections_per_img)


class RetinaFastRetinaNet(_RetinaNetMethods, TVRetinaNet):
    """The class of a patched ``torchvision.models.detection.RetinaNet`` (never built
    directly: :func:`patch_torchvision` swaps an instance's class)."""


# ------------------------------------------------------------------------------ FCOS


class _FCOSHeadMethods:
    """FCOSHead.compute_loss with the classification loss on labels (no one-hot [B, A, K]
    targets): same losses as torchvision's up to float summation order."""

    def compute_loss(self, targets: List[Dict[str, Tensor]], head_outputs: Dict[str, Tensor],
                     anchors: List[Tensor], matched_idxs: List[Tensor]) -> Dict[str, Tensor]:
        cls_logits = head_outputs["cls_logits"]  # [B, A, K]
        bbox_regression = head_outputs["bbox_regression"]  # [B, A, 4]
        bbox_ctrness = head_outputs["bbox_ctrness"]  # [B, A, 1]
        labels_list: List[Tensor] = []
        boxes_list: List[Tensor] = []
        for t, m in zip(targets, matched_idxs):
            if t["labels"].numel() == 0:
                lab = torch.full_like(m, -1)
                gt = t["boxes"].new_zeros((m.shape[0], 4))
            else:
                idx = m.clamp(min=0)
                lab = torch.where(m < 0, torch.full_like(m, -1), t["labels"][idx])
                gt = t["boxes"][idx]
            labels_list.append(lab)
            boxes_list.append(gt)
        labels = torch.stack(labels_list)  # [B, A]: class, -1 background
        gt_boxes = torch.stack(boxes_list)
        anchor_boxes = torch.stack(anchors)
        fg = labels >= 0
        num_fg = max(1, int(fg.sum()))
        B, A, K = cls_logits.shape
        loss_cls = sigmoid_focal_loss_labels(cls_logits.reshape(B * A, K), labels.reshape(-1), reduction="sum")
        pred_boxes = self.box_coder.decode(bbox_regression, anchor_boxes)
        loss_box = generalized_box_iou_loss(pred_boxes[fg], gt_boxes[fg], reduction="sum")
        reg_targets = self.box_coder.encode(anchor_boxes, gt_boxes)
        if reg_targets.shape[0] == 0:
            ctr_targets = reg_targets.new_zeros(reg_targets.shape[:-1])
        else:
            lr, tb = reg_targets[:, :, 0::2], reg_targets[:, :, 1::2]
            ctr_targets = torch.sqrt((lr.min(dim=-1)[0] / lr.max(dim=-1)[0]) * (tb.min(dim=-1)[0] / tb.max(dim=-1)[0]))
        loss_ctr = torch.nn.functional.binary_cross_entropy_with_logits(
            bbox_ctrness.squeeze(2)[fg], ctr_targets[fg], reduction="sum")
        return {
            "classification": loss_cls / num_fg,  # float32 (float64 for float64 logits)
            "bbox_regression": loss_box / num_fg,
            "bbox_ctrness": loss_ctr / num_fg,
        }


class RetinaFastFCOSHead(_FCOSHeadMethods, TVFCOSHead):
    """The class of a patched FCOS's head (see :func:`patch_torchvision`)."""


class _FCOSMethods:
    def postprocess_detections(self, head_outputs: Dict[str, List[Tensor]], anchors: List[List[Tensor]],
                               image_shapes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """torchvision's FCOS post-processing, each level's candidates chosen for all images at
        once (score ``sqrt(sigmoid(cls) * sigmoid(ctrness)) > score_thresh``, the best
        ``topk_candidates``, decoded and clipped), then one batched NMS over every (image,
        class) of the batch keeping ``detections_per_img`` per image."""
        B = len(image_shapes)
        levels = len(head_outputs["cls_logits"])
        sizes = torch.tensor([[s[0], s[1]] for s in image_shapes], dtype=torch.float32).reshape(B, 2)
        all_boxes: List[Tensor] = []
        all_scores: List[Tensor] = []
        all_labels: List[Tensor] = []
        all_valid: List[Tensor] = []
        for level in range(levels):
            logits = head_outputs["cls_logits"][level]  # [B, HWA, K]
            codes = head_outputs["bbox_regression"][level]  # [B, HWA, 4]
            ctr = head_outputs["bbox_ctrness"][level]  # [B, HWA, 1]
            K = logits.shape[-1]
            scores = torch.sqrt(torch.sigmoid(logits) * torch.sigmoid(ctr)).flatten(1)  # [B, HWA * K]
            keep = scores > self.score_thresh
            k = min(self.topk_candidates, scores.shape[1])
            # the best k of the kept scores (torchvision: topk of the kept ones); the others
            # sort last and are dropped below
            ranked = torch.where(keep, scores, torch.full_like(scores, -1.0))
            top, idx = ranked.topk(k, dim=1)
            valid = keep.gather(1, idx)
            anchor_idx = torch.div(idx, K, rounding_mode="floor")
            level_anchors = torch.stack([anchors[b][level] for b in range(B)])  # [B, HWA, 4]
            g = anchor_idx[..., None].expand(B, k, 4)
            boxes = self.box_coder.decode(codes.gather(1, g), level_anchors.gather(1, g))
            hw = sizes.to(device=boxes.device, dtype=boxes.dtype)
            x = torch.minimum(boxes[..., 0::2].clamp(min=0), hw[:, 1, None, None])
            y = torch.minimum(boxes[..., 1::2].clamp(min=0), hw[:, 0, None, None])
            all_boxes.append(torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1))
            all_scores.append(top)
            all_labels.append(idx % K)
            all_valid.append(valid)
        boxes = torch.cat(all_boxes, 1)  # [B, C, 4], C = candidates of every level
        scores = torch.cat(all_scores, 1)
        labels = torch.cat(all_labels, 1)
        valid = torch.cat(all_valid, 1)
        image_ids = torch.arange(B, device=boxes.device)[:, None].expand(labels.shape)
        flat_boxes, flat_scores, flat_labels = boxes[valid], scores[valid], labels[valid]
        keep, counts = batched_nms_multi(flat_boxes, flat_scores, flat_labels, image_ids[valid], B,
                                         self.nms_thresh, self.detections_per_img)
        detections: List[Dict[str, Tensor]] = []
        for b, n in enumerate(torch.jit.annotate(List[int], counts.tolist())):
            kb = keep[b, :n]
            detections.append({"boxes": flat_boxes[kb], "scores": flat_scores[kb], "labels": flat_labels[kb]})
        return detections


class RetinaFastFCOS(_FCOSMethods, TVFCOS):
    """The class of a patched ``torchvision.models.detection.FCOS`` (see
    :func:`patch_torchvision`)."""


# ------------------------------------------------------------------------------ patching

_PATCHED_CLASS = {TVRetinaNet: RetinaFastRetinaNet, TVFCOS: RetinaFastFCOS, TVFCOSHead: RetinaFastFCOSHead}
_METHODS = {TVRetinaNet: _RetinaNetMethods, TVFCOS: _FCOSMethods, TVFCOSHead: _FCOSHeadMethods}
_METHOD_NAMES = ("compute_loss", "postprocess_detections")


def _patched_class(cls, base):
    # A user's subclass of RetinaNet/FCOS gets its own patched subclass (its overrides of other
    # methods stay; this one's methods come first).
    if cls not in _PATCHED_CLASS:
        _PATCHED_CLASS[cls] = type("RetinaFast" + cls.__name__, (_METHODS[base], cls), {"__module__": __name__})
    return _PATCHED_CLASS[cls]


def _swap_class(module, base, originals: dict, key: str) -> None:
    originals[key] = type(module)
    for name in _METHOD_NAMES:  # instance-level overrides would shadow the class's methods
        if name in module.__dict__:
            originals[key + "." + name] = module.__dict__.pop(name)
    module.__class__ = _patched_class(type(module), base)


def patch_torchvision(model):
    """Patch ``model`` (a torchvision RetinaNet or FCOS) in place and return it.

    Same losses and detections as before (up to float summation order and exact score ties,
    which torchvision's CPU sort leaves unordered; for FCOS also torchvision's class-offset
    trick in ``batched_nms``, which rounds boxes at large coordinates, see
    :func:`retina_fast.ops.batched_nms`); the anchor generator keeps its sizes and aspect
    ratios.
    """
    if not isinstance(model, (TVRetinaNet, TVFCOS)):
        raise TypeError(
            f"patch_torchvision expects a torchvision.models.detection.RetinaNet or FCOS, got {type(model)}")
    if hasattr(model, _ATTR):
        return model
    originals = {"anchor_generator": model.anchor_generator}
    ag = model.anchor_generator
    model.anchor_generator = PatchedAnchorGenerator(ag.sizes, ag.aspect_ratios)
    if isinstance(model, TVRetinaNet):
        matcher = model.proposal_matcher
        coder = model.head.regression_head.box_coder
        state = {"loss": RetinaNetLoss(matcher.high_threshold, matcher.low_threshold,
                                       matcher.allow_low_quality_matches, box_coder_weights=coder.weights,
                                       bbox_xform_clip=coder.bbox_xform_clip)}
        _swap_class(model, TVRetinaNet, originals, "model")
    else:
        state = {}
        _swap_class(model, TVFCOS, originals, "model")
        _swap_class(model.head, TVFCOSHead, originals, "head")
    # plain dicts (not submodules): nothing enters state_dict, TorchScript leaves them alone
    object.__setattr__(model, _STATE, state)
    object.__setattr__(model, _ATTR, originals)
    return model


def unpatch_torchvision(model):
    """Undo :func:`patch_torchvision` (no-op on an unpatched model); returns the model."""
    originals = model.__dict__.pop(_ATTR, None)
    if originals is None:
        return model
    model.__dict__.pop(_STATE, None)
    model.anchor_generator = originals.pop("anchor_generator")
    for key, module in (("model", model), ("head", getattr(model, "head", None))):
        if key in originals:
            module.__class__ = originals.pop(key)
            for name in _METHOD_NAMES:
                if key + "." + name in originals:
                    module.__dict__[name] = originals.pop(key + "." + name)
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
