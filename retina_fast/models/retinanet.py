"""RetinaNet (Lin et al. 2017) with torchvision's parameter names, forward contract and
transform, whose anchors, matching, losses and post-processing run on retina_fast's kernels.

``retinanet_resnet50_fpn(variant="v1")`` has the keys and shapes of torchvision's
``retinanet_resnet50_fpn`` (and ``"v2"`` of ``retinanet_resnet50_fpn_v2``), so a torchvision
state_dict loads with ``strict=True`` and gives the same losses and detections.
"""

import warnings
from collections import OrderedDict
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.misc import FrozenBatchNorm2d

from retina_fast.models import weights as rw
from retina_fast.models.anchors import AnchorGenerator, retinanet_anchor_generator
from retina_fast.models.backbone import resnet_fpn_backbone
from retina_fast.models.fuse import drop_fast_eval, fast_eval_parts
from retina_fast.models.head import RetinaNetHead
from retina_fast.models.loss import (
    BOX_LOSSES, InputError, PackedTargets, RetinaNetLoss, _check_target, check_degenerate_boxes,
    pack_targets,
)
from retina_fast.ops.nms import postprocess_detections_padded

__all__ = ["RetinaNet", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "retinanet_resnet_fpn"]


class RetinaNet(nn.Module):
    """RetinaNet = ``backbone`` (features) + ``head`` + ``anchor_generator`` + loss +
    post-processing, with torchvision's ``RetinaNet`` constructor arguments and behaviour.

    Args:
        backbone: module returning an OrderedDict (or one Tensor) of feature maps with
            ``backbone.out_channels`` channels each, highest resolution first.
        num_classes: K (no background class: labels are in ``[0, K)``).
        min_size, max_size, image_mean, image_std, **kwargs: torchvision's
            ``GeneralizedRCNNTransform`` (resize, normalise, pad to a multiple of 32).
        anchor_generator: :class:`retina_fast.models.AnchorGenerator` (default: RetinaNet's
            9 anchors per location on 5 levels).
        head: :class:`retina_fast.models.RetinaNetHead` (default: 4 convs per branch, no norm).
            The box loss is ``head.regression_head._loss_type`` (``"l1"`` by default), as in
            torchvision.
        score_thresh, nms_thresh, detections_per_img, topk_candidates: post-processing.
        fg_iou_thresh, bg_iou_thresh: the matcher's thresholds.
        box_loss: sets ``head.regression_head._loss_type`` when given.
        crowd_ioa_thresh: targets may carry ``iscrowd``; crowd boxes are never matched and
            background anchors at least this much inside one (intersection over anchor area)
            are ignored.
        zero_iou_quirk: torchvision's matcher behaviour for gts that overlap no anchor
            (see :func:`retina_fast.ops.match_anchors`); True for parity.

    ``forward(images, targets=None)``: ``images`` a list of Tensor[3, H, W] in [0, 1] (sizes
    may differ); in training, ``targets`` a list of dicts with ``boxes`` (float[n, 4],
    ``x1 y1 x2 y2`` in pixels), ``labels`` (int64[n]) and optionally ``iscrowd``, and the
    result is ``{"classification", "bbox_regression"}``; in eval a list of dicts ``boxes``,
    ``scores``, ``labels`` in the original image coordinates.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, min_size=800, max_size=1333,
                 image_mean: Optional[List[float]] = None, image_std: Optional[List[float]] = None,
                 anchor_generator: Optional[AnchorGenerator] = None, head: Optional[RetinaNetHead] = None,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 300,
                 fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4, topk_candidates: int = 1000,
                 box_loss: Optional[str] = None, crowd_ioa_thresh: float = 0.5, zero_iou_quirk: bool = True,
                 **kwargs: Any):
        super().__init__()
        if not hasattr(backbone, "out_channels"):
            raise ValueError(
                "backbone should contain an attribute out_channels specifying the number of output channels "
                "(assumed to be the same for all the levels)"
            )
        self.backbone = backbone
        if anchor_generator is None:
            anchor_generator = retinanet_anchor_generator()
        if not isinstance(anchor_generator, AnchorGenerator):
            raise TypeError(
                f"anchor_generator should be a retina_fast.models.AnchorGenerator, got {type(anchor_generator)}"
            )
        self.anchor_generator = anchor_generator
        if head is None:
            head = RetinaNetHead(backbone.out_channels, anchor_generator.num_anchors_per_location()[0], num_classes)
        self.head = head
        if box_loss is not None:
            if box_loss not in BOX_LOSSES:
                raise ValueError(f"box_loss must be one of {', '.join(BOX_LOSSES)}, got {box_loss!r}")
            self.head.regression_head._loss_type = box_loss
        self.loss = RetinaNetLoss(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True,
                                  zero_iou_quirk=zero_iou_quirk, crowd_ioa_thresh=crowd_ioa_thresh)
        if image_mean is None:
            image_mean = [0.485, 0.456, 0.406]
        if image_std is None:
            image_std = [0.229, 0.224, 0.225]
        self.transform = GeneralizedRCNNTransform(min_size, max_size, image_mean, image_std, **kwargs)
        self.num_classes = num_classes
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates

    #: eval forwards on the CPU run a cached copy of the backbone and head with the BatchNorms
    #: folded and each convolution fused with its ReLU and residual add (oneDNN): see
    #: :func:`retina_fast.models.fuse.fast_eval_parts`. False: the modules as they are
    #: (torchvision's arithmetic, bit for bit).
    fast_inference: bool = True

    def train(self, mode: bool = True):
        if mode:
            drop_fast_eval(self)
        return super().train(mode)

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state.pop("_rf_fast_eval", None)
        return state

    # ---------------------------------------------------------------- pieces

    @property
    def box_loss(self) -> str:
        return getattr(self.head.regression_head, "_loss_type", "l1")

    def anchors(self, image_size: Tuple[int, int], features: List[Tensor]) -> Tensor:
        """Tensor[A, 4] (float32, cached) shared by every image of the padded batch.

        Always float32: under bfloat16 autocast, anchors in the features' dtype would round
        coordinates above 256 (torchvision's do)."""
        return self.anchor_generator.grid(image_size, [tuple(f.shape[-2:]) for f in features], torch.float32,
                                          features[0].device)

    def compute_loss(self, targets: List[Dict[str, Tensor]], head_outputs: Dict[str, Tensor], anchors,
                     packed=None) -> Dict[str, Tensor]:
        """The whole batch's losses; ``anchors`` Tensor[A, 4] (or torchvision's per-image list)."""
        if isinstance(anchors, (list, tuple)):
            anchors = anchors[0]
        cls_logits = head_outputs["cls_logits"]
        if packed is None:
            packed = pack_targets(targets, cls_logits.device)
        return self.loss(cls_logits, head_outputs["bbox_regression"], anchors, packed, self.box_loss)

    def postprocess_detections(self, head_outputs: Dict[str, Tensor], anchors: Tensor,
                               image_sizes: List[Tuple[int, int]], num_anchors_per_level: List[int]
                               ) -> List[Dict[str, Tensor]]:
        """Detections in the transformed (resized) image coordinates, one dict per image."""
        boxes, scores, labels, counts = self.postprocess_padded(head_outputs, anchors, image_sizes,
                                                                num_anchors_per_level)
        return _split(boxes, scores, labels, counts)

    def postprocess_padded(self, head_outputs: Dict[str, Tensor], anchors: Tensor,
                           image_sizes: List[Tuple[int, int]], num_anchors_per_level: List[int]
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`postprocess_detections` padded to ``detections_per_img`` rows (static shapes,
        no host read): ``boxes [B, D, 4], scores [B, D], labels [B, D], counts [B]``."""
        cls_logits, bbox_regression = head_outputs["cls_logits"], head_outputs["bbox_regression"]
        if bbox_regression.dtype != cls_logits.dtype:
            # mixed dtypes (a custom head): never round the codes to half precision
            if cls_logits.dtype in (torch.float16, torch.bfloat16):
                cls_logits = cls_logits.float()
            bbox_regression = bbox_regression.to(cls_logits.dtype)
        # upcast: under autocast the kernel reads the float16/bfloat16 head outputs as float32
        # (exact) and scores, thresholds and decodes in float32, as on .float() copies, without
        # making them (decoding in half would round box coordinates above 1024 / 256 for bfloat16).
        return postprocess_detections_padded(cls_logits, bbox_regression, anchors, image_sizes,
                                             num_anchors_per_level, self.score_thresh, self.topk_candidates,
                                             self.nms_thresh, self.detections_per_img, upcast=True)

    # ---------------------------------------------------------------- forward

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None):
        # Bad input is an InputError (a ValueError, and the AssertionError / TypeError that
        # torchvision raises for the same input) naming what is wrong, never a crash or an
        # empty result (tests/robustness: the bad-input matrix).
        if len(images) == 0:
            raise InputError("images: expected a non-empty list of Tensor[C, H, W]")
        if self.training:
            return self._forward(images, targets)
        # The one host read of the eval path (how many detections each image has), here in the
        # outermost frame: torch.compile breaks the graph once, torch.export makes its sizes
        # unbacked symbols. forward_padded has none.
        return _split(*self._forward(images, None))

    def forward_padded(self, images: List[Tensor]) -> Dict[str, Tensor]:
        """Eval-mode detections padded to ``detections_per_img`` rows, with static shapes and
        no host synchronisation (one graph under ``torch.compile(fullgraph=True)``; a static
        program for ``torch.export``/AOTInductor/TensorRT): ``{"boxes": [B, D, 4], "scores":
        [B, D], "labels": [B, D] (-1 past the end), "counts": [B]}`` in original image
        coordinates; image ``b``'s detections are the first ``counts[b]`` rows, the same as
        ``forward``'s."""
        torch._assert(not self.training, "forward_padded is for eval mode")
        boxes, scores, labels, counts = self._forward(images, None)
        return {"boxes": boxes, "scores": scores, "labels": labels, "counts": counts}

    def check_inputs(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]]
                     ) -> List[Tuple[int, int]]:
        """The host-side checks of ``forward``'s input (an :class:`InputError` naming what is
        wrong); returns the images' original (h, w). In training every target is checked too
        (the boxes' values are checked after the transform, by ``check_degenerate_boxes``)."""
        if len(images) == 0:
            raise InputError("images: expected a non-empty list of Tensor[C, H, W]")
        if self.training:
            if targets is None:
                raise InputError("targets should not be none when in training mode")
            if len(targets) != len(images):
                raise InputError(f"targets: expected one dict per image, got {len(targets)} targets for "
                                 f"{len(images)} images")
            for i, target in enumerate(targets):
                _check_target(i, target)
        channels = len(self.transform.image_mean)
        original_image_sizes: List[Tuple[int, int]] = []
        for i, img in enumerate(images):
            if img.dim() != 3:
                raise InputError(f"images[{i}]: expected a Tensor[C, H, W], got shape {list(img.shape)}")
            if img.shape[0] != channels:
                raise InputError(f"images[{i}]: expected {channels} channels (the normalisation's "
                                 f"image_mean), got shape {list(img.shape)}")
            if not img.is_floating_point():
                raise InputError(f"images[{i}]: Expected input images to be of floating type (in range [0, 1]), "
                                 f"but found type {img.dtype} instead")
            if img.shape[-1] == 0 or img.shape[-2] == 0:
                raise InputError(f"images[{i}]: an empty image, shape {list(img.shape)}")
            val = img.shape[-2:]
            original_image_sizes.append((val[0], val[1]))
        return original_image_sizes

    def forward_train_padded(self, images: Tensor, boxes: Tensor, labels: Tensor, counts: Tensor,
                             crowd: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Training losses from an already transformed, padded batch, with static shapes and no
        host synchronisation: one graph under ``torch.compile(fullgraph=True)`` (forward and
        loss; the backward is AOTAutograd's), what a CUDA-graph capture needs.

        Args:
            images (Tensor[B, C, H, W]): normalised and padded as ``self.transform`` does (H, W
                multiples of its ``size_divisible``).
            boxes (Tensor[B, M, 4] float): ``x1 y1 x2 y2`` in the transformed images' pixels;
                rows at and past ``counts[b]`` are ignored whatever they hold.
            labels (Tensor[B, M] int64): classes in ``[0, K)`` (padding rows ignored).
            counts (Tensor[B] int64): valid rows per image, in ``[0, M]``.
            crowd (Tensor[B, M] bool, optional): crowd rows (``iscrowd``). An all-False mask
                gives the losses of ``None``, so a batch builder can always pass one (one graph).

        Returns ``forward(images, targets)``'s ``{"classification", "bbox_regression"}`` for the
        same batch. Nothing is validated here (that would read the device): build the batch
        with :func:`retina_fast.engine.train_step.pad_batch`, which runs ``forward``'s checks
        and transform on the host side.
        """
        features = self.backbone(images)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        features = list(features.values())
        head_outputs = self.head(features)
        anchors = self.anchors((images.shape[-2], images.shape[-1]), features)
        return self.compute_loss([], head_outputs, anchors, PackedTargets(boxes, labels, counts, crowd))

    def _forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]]):
        original_image_sizes = self.check_inputs(images, targets)

        images, targets = self.transform(images, targets)
        packed = None
        if self.training:
            packed = pack_targets(targets, images.tensors.device)
            check_degenerate_boxes(packed, targets, self.num_classes)

        backbone, head = self.backbone, self.head
        if not self.training:
            backbone, head = fast_eval_parts(self, images.tensors) or (backbone, head)
        features = backbone(images.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        features = list(features.values())
        head_outputs = head(features)

        if self.training:
            anchors = self.anchors(tuple(images.tensors.shape[-2:]), features)
            return self.compute_loss(targets, head_outputs, anchors, packed)
        return self.detections_from_head(head_outputs, [(f.shape[-2], f.shape[-1]) for f in features],
                                         (images.tensors.shape[-2], images.tensors.shape[-1]), images.image_sizes,
                                         original_image_sizes)

    def detections_from_head(self, head_outputs: Dict[str, Tensor], feature_sizes: List[Tuple[int, int]],
                             batch_size_hw: Tuple[int, int], image_sizes: List[Tuple[int, int]],
                             original_image_sizes: List[Tuple[int, int]]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Padded detections in original image coordinates from the head's outputs: anchors
        for the padded batch (``batch_size_hw``) and its feature maps (``feature_sizes``),
        post-processing, boxes scaled back. What eval does after the head; also the tail of an
        exported head-only model (:class:`retina_fast.export.OnnxRetinaNet`)."""
        anchors = self.anchor_generator.grid(batch_size_hw, feature_sizes, torch.float32,
                                             head_outputs["cls_logits"].device)
        A = head_outputs["cls_logits"].shape[1] // sum(h * w for h, w in feature_sizes)
        num_anchors_per_level = [h * w * A for h, w in feature_sizes]
        boxes, scores, labels, counts = self.postprocess_padded(head_outputs, anchors, image_sizes,
                                                                num_anchors_per_level)
        return _to_original_sizes(boxes, image_sizes, original_image_sizes), scores, labels, counts


def _to_original_sizes(boxes: Tensor, sizes: List[Tuple[int, int]], original_sizes: List[Tuple[int, int]]) -> Tensor:
    """``GeneralizedRCNNTransform.postprocess`` on padded boxes [B, D, 4]: each image's boxes
    times (original / resized) size, the ratio in float32 as torchvision computes it (so the
    result is bitwise torchvision's); padding rows (zeros) stay zeros."""
    new = torch.tensor(original_sizes, dtype=torch.float32, device=boxes.device).reshape(-1, 2)
    old = torch.tensor(sizes, dtype=torch.float32, device=boxes.device).reshape(-1, 2)
    ratio = (new / old).flip(1).repeat(1, 2)  # [B, 4]: (w, h, w, h)
    return boxes * ratio[:, None, :]


def _split(boxes: Tensor, scores: Tensor, labels: Tensor, counts: Tensor) -> List[Dict[str, Tensor]]:
    out: List[Dict[str, Tensor]] = []
    for b, n in enumerate(counts.tolist()):
        out.append({"boxes": boxes[b, :n], "scores": scores[b, :n], "labels": labels[b, :n]})
    return out


# -------------------------------------------------------------------- builders


def _validate_trainable_layers(is_trained: bool, trainable: Optional[int], max_value: int, default: int) -> int:
    if not is_trained:
        if trainable is not None:
            warnings.warn(
                "Changing trainable_backbone_layers has no effect if neither pretrained nor pretrained_backbone "
                f"have been set to True, falling back to trainable_backbone_layers={max_value} so that all layers "
                "are trainable"
            )
        return max_value
    trainable = default if trainable is None else trainable
    if not 0 <= trainable <= max_value:
        raise ValueError(f"Trainable backbone layers should be in the range [0,{max_value}], got {trainable} ")
    return trainable


def _variant_name(depth: int, variant: str) -> str:
    return f"retinanet_resnet{depth}_fpn" + ("_v2" if variant == "v2" else "")


def _full_weights(weights, depth: int, variant: str):
    """(state_dict, source, enum member or None) for the ``weights`` argument."""
    from torchvision.models import WeightsEnum
    from torchvision.models.detection import RetinaNet_ResNet50_FPN_V2_Weights, RetinaNet_ResNet50_FPN_Weights

    if isinstance(weights, dict):
        return rw.state_dict_from(weights, "the given state_dict"), "the given state_dict", None
    enum_cls = RetinaNet_ResNet50_FPN_Weights if variant == "v1" else RetinaNet_ResNet50_FPN_V2_Weights
    other = RetinaNet_ResNet50_FPN_V2_Weights if variant == "v1" else RetinaNet_ResNet50_FPN_Weights
    if isinstance(weights, WeightsEnum):
        if depth != 50:
            raise rw.WeightsError(f"{weights} are ResNet-50 weights; this model is ResNet-{depth}")
        if isinstance(weights, other):
            raise rw.WeightsError(f"{weights} are {_variant_name(50, 'v2' if variant == 'v1' else 'v1')} weights; "
                                  f"this is {_variant_name(depth, variant)} (variant={variant!r})")
    path, member = rw.resolve_weights(weights, enum_cls, "weights")
    return rw.state_dict_from(rw.load_file(path, "weights"), path, rw.CHECKPOINT_FORMAT), path, member


def _backbone_weights(weights, depth: int):
    """The ResNet body's state_dict (``fc.*`` dropped) and its source, for ``weights_backbone``."""
    from torchvision.models import resnet

    if isinstance(weights, dict):
        sd, src = rw.state_dict_from(weights, "the given backbone state_dict"), "the given backbone state_dict"
    else:
        enum_cls = getattr(resnet, f"ResNet{depth}_Weights")
        src, _ = rw.resolve_weights(weights, enum_cls, "weights_backbone")
        sd = rw.state_dict_from(rw.load_file(src, "backbone weights"), src)
    return rw.without_classifier(sd), src


def retinanet_resnet_fpn(
    depth: int = 50,
    variant: str = "v1",
    num_classes: Optional[int] = None,
    weights_path: Optional[str] = None,
    backbone_weights_path: Optional[str] = None,
    trainable_backbone_layers: Optional[int] = None,
    frozen_bn: Optional[bool] = None,
    fpn_channels: int = 256,
    *,
    weights=None,
    weights_backbone=None,
    progress: bool = True,
    is_trained: Optional[bool] = None,
    bn_eps: Optional[float] = None,
    **kwargs: Any,
) -> RetinaNet:
    """RetinaNet on a ResNet-``depth`` FPN (P3-P7), built like torchvision's builders.

    Args:
        depth: 18, 34, 50 or 101 (18/34 for CPU-sized work; 50 is torchvision's).
        variant: ``"v1"`` (``retinanet_resnet50_fpn``: P6 from P5, plain head, L1 box loss) or
            ``"v2"`` (``retinanet_resnet50_fpn_v2``: P6 from C5, GroupNorm(32) head, GIoU).
        num_classes: K (default: the weights' number of classes, else 91 for torchvision's COCO
            numbering). With weights whose K differs this is an error, as in torchvision; to
            fine-tune, build with K classes and load with
            :func:`retina_fast.models.weights.load_weights` ``(reinit_class_head=True)``.
        weights: torchvision's keyword. The whole model's weights, loaded with ``strict=True``:
            a ``RetinaNet_ResNet50_FPN_Weights`` / ``RetinaNet_ResNet50_FPN_V2_Weights`` member
            or its name (``"COCO_V1"``, ``"DEFAULT"``), read from the torch hub cache
            (``<torch.hub.get_dir()>/checkpoints/<file name of its url>``, where torchvision keeps
            its downloads; an error names that path when the file is not there; nothing is
            ever downloaded), or the path of a state_dict file (torchvision's, or a
            retina_fast checkpoint), or a state_dict. Read with ``weights_only=True``.
        weights_backbone: torchvision's keyword: the ResNet body's ImageNet weights, a
            ``ResNet{depth}_Weights`` member or name (from the hub cache), a path or a
            state_dict (``fc.*`` is dropped). Ignored when ``weights`` is given (torchvision's
            rule). Unlike torchvision the default is None: nothing is downloaded.
        weights_path, backbone_weights_path: the older names of ``weights`` / ``weights_backbone``
            (paths); give one name or the other.
        progress: accepted for torchvision's signature; nothing is downloaded.
        trainable_backbone_layers: as torchvision (default 3 when trained, else all 5).
        is_trained: build the layout torchvision uses for trained weights (v1's body norm
            ``FrozenBatchNorm2d``, ``trainable_backbone_layers`` default 3) without loading any,
            for weights loaded afterwards; default: whether ``weights`` or ``weights_backbone``
            is given.
        frozen_bn: v1's body norm is ``FrozenBatchNorm2d`` when trained (torchvision's rule),
            else ``BatchNorm2d``; set to force either. (v2 always uses BatchNorm2d.)
        bn_eps: eps of every ``FrozenBatchNorm2d``. Default: 0.0 for v1 with ``weights`` (the
            published v1 COCO weights were trained with eps 0; torchvision's builder sets it
            after loading them, and a v1 state_dict file is taken to be those weights or a
            fine-tune of them), else the module default 1e-5.
        **kwargs: :class:`RetinaNet` arguments (``min_size``, ``score_thresh``...).
    """
    if variant not in ("v1", "v2"):
        raise ValueError(f"variant must be 'v1' or 'v2', got {variant!r}")
    for new, old, new_name, old_name in ((weights, weights_path, "weights", "weights_path"),
                                         (weights_backbone, backbone_weights_path, "weights_backbone",
                                          "backbone_weights_path")):
        if new is not None and old is not None:
            raise ValueError(f"give {new_name} or {old_name}, not both")
    weights = weights if weights is not None else weights_path
    weights_backbone = weights_backbone if weights_backbone is not None else backbone_weights_path
    state = source = None
    if weights is not None:
        weights_backbone = None  # torchvision: the whole model's weights replace the backbone's
        state, source, _ = _full_weights(weights, depth, variant)
        info = rw.describe_retinanet(state, source)
        if info["variant"] != variant:
            raise rw.WeightsError(f"{source} holds {_variant_name(depth, info['variant'])} weights "
                                  f"({'P6 from C5, GroupNorm head' if info['variant'] == 'v2' else 'P6 from P5'}), "
                                  f"not {_variant_name(depth, variant)}'s")
        if num_classes is None:
            num_classes = info["num_classes"]
        elif num_classes != info["num_classes"]:
            raise rw.WeightsError(
                f"num_classes={num_classes} but {source} has {info['num_classes']} classes; to fine-tune, "
                "build with num_classes and load with retina_fast.models.weights.load_weights(model, "
                "state_dict, reinit_class_head=True)")
    if num_classes is None:
        num_classes = 91
    if is_trained is None:
        is_trained = weights is not None or weights_backbone is not None
    trainable = _validate_trainable_layers(is_trained, trainable_backbone_layers, 5, 3)
    if frozen_bn is None:
        frozen_bn = variant == "v1" and is_trained
    norm_layer = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    backbone = resnet_fpn_backbone(depth, trainable, [2, 3, 4], norm_layer=norm_layer, fpn_channels=fpn_channels,
                                   p6_from="p5" if variant == "v1" else "c5")
    if weights_backbone is not None:
        body_state, body_source = _backbone_weights(weights_backbone, depth)
        rw.load_weights(backbone.body, body_state, body_source, what=f"the ResNet-{depth} body")
    anchor_generator = retinanet_anchor_generator()
    if variant == "v2":
        head = RetinaNetHead(fpn_channels, anchor_generator.num_anchors_per_location()[0], num_classes,
                             norm_layer=partial(nn.GroupNorm, 32))
        head.regression_head._loss_type = "giou"
    else:
        head = RetinaNetHead(fpn_channels, anchor_generator.num_anchors_per_location()[0], num_classes)
    model = RetinaNet(backbone, num_classes, anchor_generator=anchor_generator, head=head, **kwargs)
    if state is not None:
        rw.load_weights(model, state, source, what=_variant_name(depth, variant))
    if bn_eps is None and state is not None and variant == "v1":
        bn_eps = 0.0
    if bn_eps is not None:
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.eps = float(bn_eps)
    return model


def retinanet_resnet50_fpn(variant: str = "v1", num_classes: Optional[int] = None,
                           weights_path: Optional[str] = None, *, weights=None, progress: bool = True,
                           weights_backbone=None, trainable_backbone_layers: Optional[int] = None,
                           **kwargs: Any) -> RetinaNet:
    """torchvision's ``retinanet_resnet50_fpn`` (``variant="v1"``) or
    ``retinanet_resnet50_fpn_v2`` (``"v2"``) on our kernels, with torchvision's keywords
    (``weights=``, ``weights_backbone=``, ``num_classes=``, ``trainable_backbone_layers=``);
    see :func:`retinanet_resnet_fpn`. The BatchNorm eps fix of the v1 COCO weights is applied
    as torchvision's builder does."""
    return retinanet_resnet_fpn(50, variant, num_classes, weights_path, weights=weights, progress=progress,
                                weights_backbone=weights_backbone,
                                trainable_backbone_layers=trainable_backbone_layers, **kwargs)


def retinanet_resnet50_fpn_v2(*, weights=None, progress: bool = True, num_classes: Optional[int] = None,
                              weights_backbone=None, trainable_backbone_layers: Optional[int] = None,
                              **kwargs: Any) -> RetinaNet:
    """torchvision's ``retinanet_resnet50_fpn_v2`` signature: ``retinanet_resnet50_fpn("v2", ...)``."""
    return retinanet_resnet_fpn(50, "v2", num_classes, weights=weights, progress=progress,
                                weights_backbone=weights_backbone,
                                trainable_backbone_layers=trainable_backbone_layers, **kwargs)
