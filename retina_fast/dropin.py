"""retina_fast's kernels under other detectors' code, one line each.

* ``patch_torchvision_ops()`` / ``unpatch_torchvision_ops()``: our ``nms``, ``batched_nms``,
  ``box_iou`` and ``sigmoid_focal_loss`` under ``torchvision.ops`` (and ``torchvision.ops.boxes``,
  ``torchvision.ops.focal_loss`` and the detection modules that imported the focal loss by
  name), where torchvision's whole detection zoo (Faster/Mask/Keypoint R-CNN, SSD, SSDlite,
  FCOS, RetinaNet) looks them up at call time. Reversible; ``with patch_torchvision_ops(): ...``
  patches for a block.
* ``patch_effdet(loss)`` / ``unpatch_effdet(loss)``: an effdet ``DetectionLoss`` (or a
  ``DetBenchTrain`` holding one) computes its classification loss with the fused labels-form
  focal loss (``sigmoid_focal_loss_labels``, label smoothing included) instead of a one-hot one.
* ``patch_ultralytics()`` / ``unpatch_ultralytics()``: ``ultralytics.utils.nms.non_max_suppression``
  becomes :func:`retina_fast.ops.multiclass_nms` (batched, exact per-class NMS), which
  ultralytics' predictors and validators call through the module attribute.

None of this imports ultralytics (AGPL) or effdet: the patch helpers work on the module or
object the user already has.
"""

import sys
import types
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from retina_fast.ops.boxes import box_iou as _box_iou
from retina_fast.ops.focal_loss import sigmoid_focal_loss as _sigmoid_focal_loss
from retina_fast.ops.focal_loss import sigmoid_focal_loss_labels as _sigmoid_focal_loss_labels
from retina_fast.ops.multiclass_nms import multiclass_nms
from retina_fast.ops.nms import batched_nms as _batched_nms
from retina_fast.ops.nms import nms as _nms

__all__ = [
    "patch_torchvision_ops",
    "unpatch_torchvision_ops",
    "torchvision_ops_patched",
    "torchvision_ops_are_patched",
    "patch_effdet",
    "unpatch_effdet",
    "patch_ultralytics",
    "unpatch_ultralytics",
]

# ------------------------------------------------------------------------------ torchvision.ops

# (module name, attribute) -> our function. The detection modules bind sigmoid_focal_loss by
# name at import (``from ...ops import sigmoid_focal_loss``), so their globals are patched too;
# everything else is looked up as ``box_ops.<name>`` at call time.
_TV_TARGETS = [
    ("torchvision.ops", "nms", _nms),
    ("torchvision.ops", "batched_nms", _batched_nms),
    ("torchvision.ops", "box_iou", _box_iou),
    ("torchvision.ops", "sigmoid_focal_loss", _sigmoid_focal_loss),
    ("torchvision.ops.boxes", "nms", _nms),
    ("torchvision.ops.boxes", "batched_nms", _batched_nms),
    ("torchvision.ops.boxes", "box_iou", _box_iou),
    ("torchvision.ops.focal_loss", "sigmoid_focal_loss", _sigmoid_focal_loss),
    ("torchvision.models.detection.retinanet", "sigmoid_focal_loss", _sigmoid_focal_loss),
    ("torchvision.models.detection.fcos", "sigmoid_focal_loss", _sigmoid_focal_loss),
]

_tv_originals: Optional[Dict[Tuple[str, str], Any]] = None


class torchvision_ops_patched:
    """What :func:`patch_torchvision_ops` returns: a context manager that undoes the patch on
    exit (unless the ops were already patched when it was made)."""

    def __init__(self, was_patched: bool):
        self._was_patched = was_patched

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self._was_patched:
            unpatch_torchvision_ops()
        return False


def patch_torchvision_ops() -> torchvision_ops_patched:
    """Put retina_fast's ``nms``, ``batched_nms``, ``box_iou`` and ``sigmoid_focal_loss`` under
    ``torchvision.ops`` for every torchvision detection model, built before or after the call.

    Same results as torchvision's (see :mod:`retina_fast.ops`): ``box_iou`` bitwise equal;
    NMS equal up to the order of exactly tied scores (torchvision's CPU sort is unstable) and
    except where torchvision's ``batched_nms`` class-offset trick rounds boxes (it shifts boxes
    by ``class * (max coordinate + 1)``; ours never compares boxes of different classes);
    the focal loss within a few float32 ulps (ours is the more accurate, see
    :func:`retina_fast.ops.sigmoid_focal_loss`).

    One thing is bound earlier than call time: ``RegionProposalNetwork`` and ``RoIHeads`` keep
    ``self.box_similarity = box_ops.box_iou`` from their constructor, so an RPN built before
    the patch keeps torchvision's ``box_iou`` for its anchor matching (bitwise the same
    result), and one built while patched keeps ours after :func:`unpatch_torchvision_ops`.

    TorchScript: ``torch.jit.script`` of a model while the ops are patched compiles ours into
    it, and the scripted model keeps them after :func:`unpatch_torchvision_ops`. TorchScript
    compiles each class once per process and caches it, so the switch's state at the first
    scripting of a torchvision detection class (``RegionProposalNetwork``, ``RoIHeads``, ...)
    decides for every model of that class scripted later in the process.

    Idempotent. Returns a context manager: ``with retina_fast.patch_torchvision_ops(): ...``
    restores torchvision's ops at the end of the block.
    """
    global _tv_originals
    if _tv_originals is not None:
        return torchvision_ops_patched(True)
    import importlib

    originals: Dict[Tuple[str, str], Any] = {}
    for mod_name, attr, ours in _TV_TARGETS:
        mod = importlib.import_module(mod_name)
        originals[(mod_name, attr)] = getattr(mod, attr)
        setattr(mod, attr, ours)
    _tv_originals = originals
    return torchvision_ops_patched(False)


def unpatch_torchvision_ops() -> None:
    """Restore torchvision's own ops (a no-op when they are not patched)."""
    global _tv_originals
    if _tv_originals is None:
        return
    for (mod_name, attr), fn in _tv_originals.items():
        setattr(sys.modules[mod_name], attr, fn)
    _tv_originals = None


def torchvision_ops_are_patched() -> bool:
    return _tv_originals is not None


# ------------------------------------------------------------------------------ effdet

_EFFDET_ATTRS = ("num_classes", "alpha", "gamma", "delta", "box_loss_weight", "label_smoothing", "legacy_focal")


def _effdet_loss_module(obj):
    # A DetBenchTrain keeps its DetectionLoss as .loss_fn.
    if all(hasattr(obj, a) for a in _EFFDET_ATTRS) and isinstance(obj, torch.nn.Module):
        return obj
    inner = getattr(obj, "loss_fn", None)
    if isinstance(inner, torch.nn.Module) and all(hasattr(inner, a) for a in _EFFDET_ATTRS):
        return inner
    raise TypeError(
        "patch_effdet: expected an effdet DetectionLoss (or a DetBenchTrain holding one as .loss_fn) with "
        f"attributes {', '.join(_EFFDET_ATTRS)}, got {type(obj).__name__}")


def _effdet_forward(self, cls_outputs: List[Tensor], box_outputs: List[Tensor], cls_targets: List[Tensor],
                    box_targets: List[Tensor], num_positives: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """effdet's ``loss_fn`` with the classification loss on labels: per level the logits
    ``[B, A*K, H, W]`` are laid out as ``[B*H*W*A, K]`` rows (effdet's own permute and view) and
    the targets ``[B, H, W, A]`` (class, -1 background, -2 ignored) are their labels."""
    box_loss_fn = self._retina_fast_box_loss
    K = int(self.num_classes)
    normalizer = (num_positives.sum() + 1.0).float()
    smoothing = 0.0 if self.legacy_focal else float(self.label_smoothing)
    cls_losses: List[Tensor] = []
    box_losses: List[Tensor] = []
    for logits, codes, labels, box_t in zip(cls_outputs, box_outputs, cls_targets, box_targets):
        if logits.shape[1] != labels.shape[-1] * K:
            raise ValueError(
                f"patch_effdet: level logits {tuple(logits.shape)} do not hold num_classes={K} scores for each "
                f"of the {labels.shape[-1]} anchors of targets {tuple(labels.shape)}")
        rows = logits.permute(0, 2, 3, 1).reshape(-1, K)
        cls_losses.append(_sigmoid_focal_loss_labels(
            rows, labels.reshape(-1).long(), float(self.alpha), float(self.gamma), reduction="sum",
            normalizer=normalizer, label_smoothing=smoothing))
        box_losses.append(box_loss_fn(codes.permute(0, 2, 3, 1).float(), box_t, normalizer, delta=self.delta))
    cls_loss = torch.stack(cls_losses).sum()
    box_loss = torch.stack(box_losses).sum()
    return cls_loss + self.box_loss_weight * box_loss, cls_loss, box_loss


def patch_effdet(loss):
    """Make an effdet ``DetectionLoss`` (or the ``DetBenchTrain`` holding it as ``.loss_fn``)
    compute its focal loss with retina_fast's fused labels-form kernel; returns ``loss``.

    Same ``(total, class, box)`` losses and gradients as effdet's within float32 rounding, for
    both of effdet's focal losses: the "new" one with its ``label_smoothing`` (as ours defines
    it: only the cross-entropy sees the smoothed targets) and ``legacy_focal`` (no smoothing).
    The box loss is effdet's own ``_box_loss``. No ``[.., K]`` one-hot targets are built. Labels
    must lie in ``[-2, num_classes)`` (effdet's anchor labeler gives these); anything else is
    an error, where effdet's ``one_hot`` would fail (``>= num_classes``) or treat it as
    background (``< -2``). The instance's ``forward`` is replaced (not its class), so
    :func:`unpatch_effdet` restores it exactly; a scripted loss cannot be patched.
    """
    target = _effdet_loss_module(loss)
    if isinstance(target, torch.jit.ScriptModule):
        raise TypeError("patch_effdet: cannot patch a scripted DetectionLoss; patch it before torch.jit.script")
    if "_retina_fast_box_loss" in target.__dict__:
        return loss
    mod = sys.modules.get(type(target).__module__)
    box_loss_fn = getattr(mod, "_box_loss", None)
    if box_loss_fn is None:
        raise TypeError(f"patch_effdet: {type(target).__module__} has no _box_loss (not effdet's loss module?)")
    object.__setattr__(target, "_retina_fast_box_loss", box_loss_fn)
    object.__setattr__(target, "forward", types.MethodType(_effdet_forward, target))
    return loss


def unpatch_effdet(loss):
    """Undo :func:`patch_effdet` (a no-op on an unpatched loss); returns ``loss``."""
    target = _effdet_loss_module(loss)
    if target.__dict__.pop("_retina_fast_box_loss", None) is not None:
        target.__dict__.pop("forward", None)
    return loss


# ------------------------------------------------------------------------------ ultralytics

_ULTRA_MODULE = "ultralytics.utils.nms"


def _ultralytics_module(module):
    if module is None:
        module = sys.modules.get(_ULTRA_MODULE)
        if module is None:
            raise ImportError(
                "patch_ultralytics: import ultralytics first (retina_fast never imports it), or pass the module: "
                "patch_ultralytics(ultralytics.utils.nms)")
    if not callable(getattr(module, "non_max_suppression", None)):
        raise TypeError(f"patch_ultralytics: expected ultralytics.utils.nms (a module with non_max_suppression), got {module!r}")
    return module


def patch_ultralytics(module=None):
    """Route ``ultralytics.utils.nms.non_max_suppression`` through
    :func:`retina_fast.ops.multiclass_nms`; returns the module.

    ``module`` defaults to the already imported ``ultralytics.utils.nms``. ultralytics'
    predictors and validators call ``nms.non_max_suppression(...)`` through the module, so the
    swap reaches them. The replacement takes ultralytics' full signature; rotated boxes (OBB),
    end-to-end outputs (``end2end``, or a last dimension of 6, which ultralytics reads as one)
    go to ultralytics' own function, and ``max_time_img`` / ``max_wh`` are not needed (no time
    limit, no class offset). Reversible with :func:`unpatch_ultralytics`.
    """
    module = _ultralytics_module(module)
    if getattr(module, "_retina_fast_original_nms", None) is not None:
        return module
    original = module.non_max_suppression

    def non_max_suppression(prediction, conf_thres: float = 0.25, iou_thres: float = 0.45, classes=None,
                            agnostic: bool = False, multi_label: bool = False, max_det: int = 300, nc: int = 0,
                            max_time_img: float = 0.05, max_nms: int = 30000, max_wh: int = 7680,
                            rotated: bool = False, end2end: bool = False, return_idxs: bool = False):
        pred = prediction[0] if isinstance(prediction, (list, tuple)) else prediction
        if rotated or end2end or not isinstance(pred, Tensor) or pred.dim() != 3 or pred.shape[-1] == 6:
            return original(prediction, conf_thres, iou_thres, classes, agnostic, multi_label, max_det, nc,
                            max_time_img, max_nms, max_wh, rotated, end2end, return_idxs)
        return multiclass_nms(pred, conf_thres, iou_thres, classes, agnostic, multi_label, max_det, nc, max_nms,
                              return_idxs=return_idxs)

    non_max_suppression.__doc__ = ("retina_fast.ops.multiclass_nms behind ultralytics' signature "
                                   "(installed by retina_fast.patch_ultralytics).")
    non_max_suppression.__wrapped__ = original
    module._retina_fast_original_nms = original
    module.non_max_suppression = non_max_suppression
    return module


def unpatch_ultralytics(module=None):
    """Restore ultralytics' own ``non_max_suppression`` (a no-op when not patched)."""
    module = _ultralytics_module(module)
    original = getattr(module, "_retina_fast_original_nms", None)
    if original is not None:
        module.non_max_suppression = original
        del module._retina_fast_original_nms
    return module
