"""The one place where models are built: ``build_model(name, num_classes, **kw)``.

Every model here follows torchvision's detection contract:
``model(images: list[Tensor[3, H, W] float in [0, 1]], targets)`` → ``{"classification",
"bbox_regression"}`` losses in train mode, ``model(images)`` → ``[{"boxes", "scores",
"labels"}]`` in eval mode, and ``model.transform`` resizes (min/max size), normalises and pads.

The detector is :class:`retina_fast.models.RetinaNet` (anchors, matching, focal and box losses
and post-processing on retina_fast's kernels; torchvision's module names, so checkpoints of the
earlier torchvision-based builders load unchanged). Crowd boxes (``target["iscrowd"]``) are
never matched, and background anchors mostly inside one are ignored (see
:class:`retina_fast.models.RetinaNet`). Checkpoints record ``name``, ``num_classes`` and the
keyword arguments, and are rebuilt through this function.

Names:

* ``shapes-small``: the CPU demo model, ~1.8 M parameters. A plain conv backbone (5 stages of
  2 x [conv3x3-BN-ReLU], the first with stride 2; widths 32/48/96/160/256), a 64-channel FPN on
  P2-P5 (stride 4 matters for 8-12 px objects), a 2-conv GroupNorm head, 3 anchors per location
  (ratio 1, scales 2^0, 2^(1/3), 2^(2/3), base 8 * 2^level for P2..P5 = 8, 16, 32, 64 px),
  GIoU box loss, input 160 px (``min_size = max_size = 160``).
* ``resnet18-fpn``: ResNet-18 (BatchNorm, trained from scratch), 256-channel FPN P3-P7,
  torchvision's 4-conv head; torchvision's anchors and transform (``min_size`` 800 unless given).
* ``resnet50-fpn``: torchvision's ``retinanet_resnet50_fpn`` (v1) without pretrained weights.
* ``retinanet_resnet50_fpn``, ``retinanet_resnet50_fpn_v2``: torchvision's two RetinaNets, for
  torchvision's weights (``train --init-from FILE``, ``--backbone-weights FILE``; ``eval`` /
  ``predict --weights FILE``). Options ``is_trained`` (torchvision's layout for trained
  weights: v1's body ``FrozenBatchNorm2d``, 3 trainable stages; set by ``train`` when it loads
  weights), ``trainable_backbone_layers``, ``bn_eps`` (0.0 for v1 COCO weights).

Keyword arguments (all optional): ``min_size`` (int or tuple for multi-scale training),
``max_size``, ``norm`` (``"bn"`` or ``"gn"`` for the shapes-small backbone; ``gn`` makes
per-image results independent of batch composition, which the DDP gradient test relies on),
``widths``, ``fpn_channels``, ``head_convs``, ``box_loss`` (``"giou"`` or ``"l1"``),
``score_thresh``, ``nms_thresh``, ``detections_per_img``, ``topk_candidates``.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from retina_fast.data.errors import RetinaFastError
from retina_fast.models import AnchorGenerator, FeaturePyramidNetwork, RetinaNet, RetinaNetHead
from retina_fast.models import weights as rw
from retina_fast.models.backbone import resnet_fpn_backbone
from retina_fast.models.retinanet import retinanet_resnet_fpn

TORCHVISION_ARCHS = {"retinanet_resnet50_fpn": "v1", "retinanet_resnet50_fpn_v2": "v2"}
MODEL_NAMES = ("shapes-small", "resnet18-fpn", "resnet34-fpn", "resnet50-fpn") + tuple(TORCHVISION_ARCHS)

# Anchors whose match is background but which lie at least this much inside a crowd box
# (intersection / anchor area) are ignored (-2) instead of trained as background.
CROWD_IOA_THRESH = 0.5

# Our RetinaNet handles crowd boxes itself; the name stays for code that checks for it.
CrowdAwareRetinaNet = RetinaNet
_detector_class = RetinaNet


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    raise ValueError(f"norm must be 'bn' or 'gn', not {kind!r}")


class PlainConvFPNBackbone(nn.Module):
    """Stages of 2 x [conv3x3, norm, ReLU] (first conv strided), FPN over the last four stages.

    Returns an ``OrderedDict`` of ``fpn_channels``-wide maps at strides 4, 8, 16, 32 (P2-P5)."""

    def __init__(self, widths=(32, 48, 96, 160, 256), fpn_channels: int = 64, norm: str = "bn",
                 fpn_from: int = 1):
        super().__init__()
        stages, c_in = [], 3
        for w in widths:
            stages.append(nn.Sequential(
                nn.Conv2d(c_in, w, 3, 2, 1, bias=False), _norm(norm, w), nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, 1, 1, bias=False), _norm(norm, w), nn.ReLU(inplace=True),
            ))
            c_in = w
        self.stages = nn.ModuleList(stages)
        self.fpn_from = fpn_from
        self.fpn = FeaturePyramidNetwork(list(widths[fpn_from:]), fpn_channels)
        self.out_channels = fpn_channels

    def forward(self, x):
        feats = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= self.fpn_from:
                feats[f"p{i + 1}"] = x
        return self.fpn(feats)


def _post_kw(kw):
    return {k: kw.pop(k) for k in ("score_thresh", "nms_thresh", "detections_per_img",
                                   "topk_candidates") if k in kw}


def build_shapes_small(num_classes: int, min_size=160, max_size=None, norm="bn",
                       widths=(32, 48, 96, 160, 256), fpn_channels=64, head_convs=2,
                       box_loss="giou", **kw):
    post = _post_kw(kw)
    if kw:
        raise TypeError(f"unknown option(s) for shapes-small: {sorted(kw)}")
    backbone = PlainConvFPNBackbone(tuple(widths), fpn_channels, norm)
    n_levels = len(widths) - 1
    sizes = tuple(tuple(int(8 * 2 ** lvl * 2 ** (k / 3)) for k in range(3)) for lvl in range(n_levels))
    anchor_gen = AnchorGenerator(sizes, ((1.0,),) * n_levels)
    head = RetinaNetHead(fpn_channels, anchor_gen.num_anchors_per_location()[0], num_classes,
                         norm_layer=partial(nn.GroupNorm, min(32, fpn_channels // 4)), num_convs=head_convs)
    if max_size is None:
        max_size = max(min_size) if isinstance(min_size, (tuple, list)) else min_size
    return _detector_class(backbone, num_classes, min_size=min_size, max_size=max_size,
                           anchor_generator=anchor_gen, head=head, box_loss=box_loss,
                           crowd_ioa_thresh=CROWD_IOA_THRESH, **post)


def build_resnet_fpn(depth: int, num_classes: int, min_size=800, max_size=1333, box_loss="l1",
                     **kw):
    post = _post_kw(kw)
    if kw:
        raise TypeError(f"unknown option(s) for resnet{depth}-fpn: {sorted(kw)}")
    # From scratch: plain BatchNorm (FrozenBatchNorm only makes sense with pretrained weights),
    # every stage trainable, P6 from P5 (torchvision's retinanet_resnet50_fpn).
    backbone = resnet_fpn_backbone(depth, trainable_layers=5, returned_layers=[2, 3, 4],
                                   norm_layer=nn.BatchNorm2d, p6_from="p5")
    return _detector_class(backbone, num_classes, min_size=min_size, max_size=max_size,
                           box_loss=box_loss, crowd_ioa_thresh=CROWD_IOA_THRESH, **post)


def build_torchvision_arch(variant: str, num_classes: int, min_size=800, max_size=1333, is_trained=False,
                           trainable_backbone_layers=None, bn_eps=None, **kw):
    post = _post_kw(kw)
    if kw:
        raise TypeError(f"unknown option(s) for {_arch_name(variant)}: {sorted(kw)}")
    return retinanet_resnet_fpn(50, variant, num_classes, is_trained=is_trained,
                                trainable_backbone_layers=trainable_backbone_layers, bn_eps=bn_eps,
                                min_size=min_size, max_size=max_size, crowd_ioa_thresh=CROWD_IOA_THRESH, **post)


def _arch_name(variant: str) -> str:
    return next(k for k, v in TORCHVISION_ARCHS.items() if v == variant)


def build_model(name: str, num_classes: int, **kw) -> nn.Module:
    """Build detector ``name`` (one of :data:`MODEL_NAMES`) for ``num_classes`` classes
    (labels ``0..num_classes-1``, no background class). See the module docstring."""
    if num_classes < 1:
        raise ValueError("num_classes must be at least 1")
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items()}
    if name == "shapes-small":
        return build_shapes_small(num_classes, **kw)
    if name == "resnet18-fpn":
        return build_resnet_fpn(18, num_classes, **kw)
    if name == "resnet34-fpn":
        return build_resnet_fpn(34, num_classes, **kw)
    if name == "resnet50-fpn":
        return build_resnet_fpn(50, num_classes, **kw)
    if name in TORCHVISION_ARCHS:
        return build_torchvision_arch(TORCHVISION_ARCHS[name], num_classes, **kw)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def param_groups(model: nn.Module, weight_decay: float):
    """Two optimizer groups: weight decay on conv/linear weights, none on norms and biases."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------- weights from files
# (torchvision's state_dicts, ImageNet ResNets, our checkpoints), for eval/predict --weights and
# train --init-from / --backbone-weights. Every problem is a one-line RetinaFastError.


def _weights_state(path: str, what: str = "weights") -> dict:
    from retina_fast.engine.checkpoint import safe_load

    try:
        return rw.state_dict_from(safe_load(path, what), path, rw.CHECKPOINT_FORMAT)
    except rw.WeightsError as e:
        raise RetinaFastError(str(e)) from None


def model_from_weights(path: str, arch: str = "auto", device="cpu", bn_eps=None, **kw):
    """torchvision's RetinaNet (``arch``: ``retinanet_resnet50_fpn``, ``..._v2`` or ``auto``,
    told by the file) with the state_dict file ``path`` loaded strictly, in eval mode; its
    number of classes is the file's (91 for torchvision's COCO weights: labels are COCO category
    ids). v1 weights get torchvision's eps fix (``bn_eps``, default 0.0). Returns
    ``(model, info)``, info ``{"arch", "num_classes", "bn_eps"}``."""
    from retina_fast.engine.checkpoint import safe_load

    obj = safe_load(path, "weights")
    if isinstance(obj, dict) and obj.get("format") == rw.CHECKPOINT_FORMAT:
        raise RetinaFastError(f"{path} is a retina_fast checkpoint: pass it with --checkpoint, not --weights")
    try:
        sd = rw.state_dict_from(obj, path)
        info = rw.describe_retinanet(sd, path)
        found = _arch_name(info["variant"])
        if arch not in ("auto", found):
            if arch not in TORCHVISION_ARCHS:
                raise rw.WeightsError(f"--arch must be auto or one of {', '.join(TORCHVISION_ARCHS)}, not {arch!r}")
            raise rw.WeightsError(f"{path} holds {found} weights, not {arch}'s "
                                  f"({'P6 from C5, GroupNorm head' if info['variant'] == 'v2' else 'P6 from P5'})")
        model = retinanet_resnet_fpn(50, info["variant"], weights=sd, bn_eps=bn_eps, **kw)
    except rw.WeightsError as e:
        raise RetinaFastError(str(e).replace("the given state_dict", path)) from None
    eps = next((m.eps for m in model.modules() if isinstance(m, FrozenBatchNorm2d)), None)
    return model.to(device).eval(), {"arch": found, "num_classes": info["num_classes"], "bn_eps": eps}


def pretrained_kwargs(name: str, kwargs: dict, init_from=None, backbone_weights=None) -> dict:
    """``kwargs`` with torchvision's layout for trained weights when ``train`` loads some into a
    ``retinanet_resnet50_fpn[_v2]``: ``is_trained`` (v1's body FrozenBatchNorm2d, 3 trainable
    stages) and, for v1 weights from ``init_from``, ``bn_eps=0.0`` (torchvision's COCO v1 fix).
    Recorded in the checkpoint, so the model is rebuilt the same way."""
    kwargs = dict(kwargs)
    if name in TORCHVISION_ARCHS and (init_from or backbone_weights):
        kwargs.setdefault("is_trained", True)
        if init_from and TORCHVISION_ARCHS[name] == "v1":
            kwargs.setdefault("bn_eps", 0.0)
    return kwargs


def init_weights(model: nn.Module, name: str, init_from=None, backbone_weights=None) -> list:
    """Load ``backbone_weights`` (a torchvision ResNet state_dict: ``fc.*`` dropped) into
    ``model.backbone.body``, then ``init_from`` (a state_dict file: torchvision's, or a
    retina_fast checkpoint's ``model``) into the whole model; a class layer of another number
    of classes is re-initialised. Returns the messages to show."""
    msgs = []
    try:
        if backbone_weights:
            body = getattr(getattr(model, "backbone", None), "body", None)
            if body is None:
                raise rw.WeightsError(f"--backbone-weights: model {name} has no ResNet body (backbone.body); "
                                      "use a resnet*-fpn or retinanet_resnet50_fpn* model")
            sd = rw.without_classifier(_weights_state(backbone_weights, "backbone weights"))
            rw.load_weights(body, sd, backbone_weights, what=f"the ResNet body of {name}")
            msgs.append(f"backbone (backbone.body) initialised from {backbone_weights}")
        if init_from:
            sd = _weights_state(init_from)
            if name in TORCHVISION_ARCHS and rw.CLASS_LOGITS + "weight" in sd:
                found = _arch_name(rw.describe_retinanet(sd, init_from)["variant"])
                if found != name:
                    raise rw.WeightsError(f"--init-from {init_from} holds {found} weights: train with --model {found}")
            reinit = rw.load_weights(model, sd, init_from, reinit_class_head=True, what=f"model {name}")
            msgs.append(f"initialised {name} from {init_from}")
            if reinit:
                msgs.append(reinit)
    except rw.WeightsError as e:
        raise RetinaFastError(str(e)) from None
    return msgs


class LabelMappedModel(nn.Module):
    """``model`` (eval) whose labels ``l`` become ``lut[l]``; detections with ``lut[l] < 0``
    (classes the dataset does not have) are dropped. For torchvision-convention weights (labels
    are COCO ids) evaluated on a dataset labelled ``0..K-1``. COCOeval keeps each category's
    top detections separately, so dropping other categories leaves its numbers unchanged."""

    def __init__(self, model: nn.Module, model_label_of: list, num_model_classes: int):
        super().__init__()
        self.model = model
        lut = torch.full((num_model_classes,), -1, dtype=torch.int64)
        lut[torch.tensor(model_label_of, dtype=torch.int64)] = torch.arange(len(model_label_of))
        self.register_buffer("lut", lut, persistent=False)

    @property
    def transform(self):
        return self.model.transform

    def forward(self, images):
        out = []
        for d in self.model(images):
            lab = self.lut[d["labels"]]
            keep = lab >= 0
            out.append({"boxes": d["boxes"][keep], "scores": d["scores"][keep], "labels": lab[keep]})
        return out


def map_to_dataset(model: nn.Module, categories: list, num_model_classes: int, how: str = "auto"):
    """(:class:`LabelMappedModel`, rule used) for a dataset's categories; see
    :func:`retina_fast.models.weights.label_mapping`."""
    try:
        labels, rule = rw.label_mapping(categories, num_model_classes, how)
    except rw.WeightsError as e:
        raise RetinaFastError(str(e)) from None
    return LabelMappedModel(model, labels, num_model_classes), rule
