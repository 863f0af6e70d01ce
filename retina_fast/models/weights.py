"""Weights files for the models: safe loading, torchvision's weights enums (from the torch hub
cache, never downloaded), what a RetinaNet state_dict holds, loading with a re-initialised class
head, and torchvision's COCO label space.

* :func:`load_file`: ``torch.load(weights_only=True)``: tensors, plain containers and the
  globals in ``allow`` only; anything else (a pickled class, a function call: what a crafted
  file uses to run code) is refused *before* it is built, with a one-line :class:`WeightsError`.
* :func:`resolve_weights`: a path, a torchvision weights enum member or its name
  (``"COCO_V1"``, ``"DEFAULT"``) -> the file to read. An enum is read from where torchvision's
  ``load_state_dict_from_url`` caches it (``<torch.hub.get_dir()>/checkpoints/<file name>``);
  when it is not there the error names that path.
* :func:`state_dict_from`: the state_dict inside a loaded object (a plain state_dict, a
  retina_fast checkpoint, ``{"model": ...}`` as torchvision's reference scripts save,
  ``{"state_dict": ...}``; a ``module.`` prefix from DDP is dropped).
* :func:`describe_retinanet`: variant (``v1``: P6 from P5; ``v2``: P6 from C5, GroupNorm
  head), number of classes and anchors of a RetinaNet state_dict.
* :func:`load_weights`: ``load_state_dict`` with one-line errors; optionally drops a class
  layer (``cls_logits``) whose number of classes differs, leaving the model's fresh one.
* :data:`COCO_CATEGORIES` and :func:`label_mapping`: torchvision's detection models label
  with the 91 COCO category ids (0 is ``__background__``, unused ids are ``N/A``); mapping a
  dataset's categories to them, by name or by id.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

__all__ = [
    "WeightsError", "COCO_CATEGORIES", "load_file", "resolve_weights", "hub_cache_file",
    "state_dict_from", "describe_retinanet", "load_weights", "label_mapping", "CLASS_LOGITS",
    "CHECKPOINT_FORMAT", "with_metadata", "without_classifier",
]

# torchvision's detection category names (torchvision.models._meta._COCO_CATEGORIES): index =
# COCO category id = label of torchvision's COCO-trained detectors.
COCO_CATEGORIES: List[str] = [
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird",
    "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack",
    "umbrella", "N/A", "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet",
    "N/A", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
]
_UNUSED = {"__background__", "N/A"}

CLASS_LOGITS = "head.classification_head.cls_logits."
# The tag of the trainer's checkpoints (retina_fast.engine.checkpoint.FORMAT): their "model"
# entry is a state_dict.
CHECKPOINT_FORMAT = "retina_fast.checkpoint/1"


class WeightsError(ValueError):
    """A weights file or argument that cannot be used; the message is one line."""


# ------------------------------------------------------------------------------ safe loading


def _why_refused(message: str) -> Tuple[bool, str]:
    """(refused, reason) from a weights-only torch.load error: refused is True when the file asks
    for something beyond tensors and plain containers, False when it is not a pickle at all."""
    detail = message.split("WeightsUnpickler error:", 1)[-1].strip()
    m = re.search(r"GLOBAL (\S+) (?:was not an allowed global|whose module)", detail)
    if m:
        return True, f"it holds the Python object {m.group(1)}, not only tensors and plain containers"
    m = re.search(r"Unsupported operand (\d+)", detail)
    if m:
        return False, f"not a file torch.save wrote (unsupported pickle opcode {m.group(1)})"
    first = next((ln.strip() for ln in detail.splitlines() if ln.strip()), "")
    return True, f"it asks for more than tensors and plain containers ({first[:160]})"


def load_file(path, what: str = "weights", map_location="cpu", allow: Sequence = ()):
    """``torch.load(path, weights_only=True)`` with a one-line :class:`WeightsError` for a
    missing, unreadable or refused file. ``allow``: extra globals, allowed for this load only."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{what} not found: {path}")
    try:
        if allow:
            with torch.serialization.safe_globals(list(allow)):
                return torch.load(path, map_location=map_location, weights_only=True)
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refused, reason = _why_refused(str(e))
        if refused:
            raise WeightsError(
                f"refusing to load {what} {path}: {reason}; unpickling it could run code, so "
                "nothing of it was run (for a whole pickled model, save its state_dict() instead)"
            ) from None
        raise WeightsError(f"cannot read {what} {path}: {reason}") from None
    except Exception as e:  # torch raises many types for a corrupt or truncated file
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise WeightsError(f"cannot read {what} {path}: {first}") from None


# ------------------------------------------------------------------- torchvision weights enums


def hub_cache_file(weights) -> str:
    """Where torchvision's ``load_state_dict_from_url`` keeps ``weights`` (an enum member)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))


def _looks_like_path(s: str) -> bool:
    return os.sep in s or "/" in s or os.path.splitext(s)[1].lower() in (".pt", ".pth", ".bin", ".ckpt", ".tar")


def resolve_weights(weights, enum_cls, what: str = "weights"):
    """``(path, enum member or None)`` for ``weights``: ``None``, a path (str or PathLike), a
    member of ``enum_cls`` (a torchvision ``WeightsEnum``) or its name. An enum member is read
    from the torch hub cache; nothing is ever downloaded."""
    from torchvision.models import WeightsEnum

    if weights is None:
        return None, None
    if isinstance(weights, os.PathLike) or (isinstance(weights, str) and (
            os.path.exists(weights) or _looks_like_path(weights))):
        return os.fspath(weights), None
    if isinstance(weights, str):
        try:
            member = enum_cls.verify(weights)
        except (KeyError, ValueError, TypeError):
            names = ", ".join(m.name for m in enum_cls) + ", DEFAULT"
            raise WeightsError(f"{what}={weights!r} is neither a file nor a {enum_cls.__name__} "
                               f"name ({names})") from None
    elif isinstance(weights, WeightsEnum):
        if not isinstance(weights, enum_cls):
            raise WeightsError(f"{what}={weights} is not a {enum_cls.__name__} member (expected one "
                               f"of {', '.join(str(m) for m in enum_cls)})")
        member = weights
    else:
        raise WeightsError(f"{what} must be a path, a {enum_cls.__name__} member or its name, "
                           f"not {type(weights).__name__}")
    path = hub_cache_file(member)
    if not os.path.isfile(path):
        raise WeightsError(f"{what}={member} is not in the torch hub cache and nothing is downloaded: "
                           f"put the file {member.url} at {path} (or pass the path of a state_dict file)")
    return path, member


# ------------------------------------------------------------------------------ state dicts


def state_dict_from(obj, path: str = "the file", fmt_tag: Optional[str] = None) -> Dict[str, Tensor]:
    """The state_dict in ``obj``; see the module docstring. ``fmt_tag``: our checkpoint's tag."""
    if isinstance(obj, dict) and fmt_tag is not None and obj.get("format") == fmt_tag:
        obj = obj.get("model")
    elif isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise WeightsError(f"{path} holds no state_dict (a mapping of names to tensors; got "
                           f"{type(obj).__name__})")
    if all(k.startswith("module.") for k in obj):
        obj = with_metadata(obj, ((k[len("module."):], v) for k, v in obj.items()), "module")
    return obj


def without_classifier(sd: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """A torchvision ResNet's state_dict without ``fc.*`` (what a detection body lacks)."""
    return with_metadata(sd, ((k, v) for k, v in sd.items() if not k.startswith("fc.")))


def with_metadata(sd, items, strip_prefix: Optional[str] = None):
    """A new state_dict of ``items`` keeping ``sd._metadata`` (the module versions that
    ``_load_from_state_dict`` reads to rename old key names)."""
    out = type(sd)(items) if isinstance(sd, dict) else dict(items)
    meta = getattr(sd, "_metadata", None)
    if meta is not None:
        if strip_prefix:
            n = len(strip_prefix)
            meta = type(meta)((k[n:].lstrip(".") if k.startswith(strip_prefix) else k, v) for k, v in meta.items())
        out._metadata = meta
    return out


def describe_retinanet(sd: Dict[str, Tensor], path: str = "the file") -> Dict[str, object]:
    """``{"variant": "v1"|"v2", "num_classes": K, "num_anchors": A}`` of a RetinaNet
    ResNet-FPN state_dict (torchvision's key names, any of its versions)."""
    need = (CLASS_LOGITS + "weight", "head.regression_head.bbox_reg.weight",
            "backbone.fpn.extra_blocks.p6.weight", "backbone.fpn.extra_blocks.p7.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise WeightsError(f"{path} is not a torchvision RetinaNet state_dict (no {missing[0]})")
    A = sd["head.regression_head.bbox_reg.weight"].shape[0] // 4
    K = sd[CLASS_LOGITS + "weight"].shape[0] // max(A, 1)
    p6_in, p7_in = sd[need[2]].shape[1], sd[need[3]].shape[1]
    return {"variant": "v1" if p6_in == p7_in else "v2", "num_classes": int(K), "num_anchors": int(A)}


def _short(keys: List[str], n: int = 3) -> str:
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_weights(model: nn.Module, sd: Dict[str, Tensor], path: str = "the file", *,
                 reinit_class_head: bool = False, what: str = "the model") -> Optional[str]:
    """``model.load_state_dict(sd, strict=True)`` with one-line :class:`WeightsError`\\ s.

    ``reinit_class_head``: when ``sd``'s class layer (``head.classification_head.cls_logits``)
    has another shape than the model's (another number of classes), it is left out and the
    model keeps its freshly initialised one; returns a message saying so (else None)."""
    msg = None
    if reinit_class_head:
        own = model.state_dict()
        key = CLASS_LOGITS + "weight"
        if key in sd and key in own and sd[key].shape != own[key].shape:
            reg = own.get("head.regression_head.bbox_reg.weight")
            A = reg.shape[0] // 4 if reg is not None else 1
            theirs, ours = sd[key].shape[0] // A, own[key].shape[0] // A
            sd = with_metadata(sd, ((k, v) for k, v in sd.items() if not k.startswith(CLASS_LOGITS)))
            msg = (f"class head re-initialised ({CLASS_LOGITS[:-1]}): {path} has {theirs} classes, "
                   f"this model {ours}")
    try:
        res = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        detail = lines[0] if lines else (str(e).splitlines() or [""])[0]
        raise WeightsError(f"{path} does not fit {what}: {detail[:300]}") from None
    missing = [k for k in res.missing_keys if not (msg and k.startswith(CLASS_LOGITS))]
    if missing or res.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_short(missing)})")
        if res.unexpected_keys:
            parts.append(f"{len(res.unexpected_keys)} unexpected keys ({_short(res.unexpected_keys)})")
        raise WeightsError(f"{path} does not fit {what}: {'; '.join(parts)}")
    return msg


# ------------------------------------------------------------------------------ label spaces


def label_mapping(categories: Sequence[dict], num_model_classes: int, how: str = "auto"
                  ) -> Tuple[List[int], str]:
    """For each dataset category (COCO dicts ``{"id", "name"}``, in label order), the label of
    a torchvision-convention model (label = COCO category id) that predicts it; and ``"name"``
    or ``"id"``, the rule used.

    ``how``: ``"id"``: category id c is model label c (torchvision's reference scripts train
    with the category ids as labels); ``"name"`` (91-class models only): the category's name
    in :data:`COCO_CATEGORIES`, for datasets whose ids are renumbered; ``"auto"``: by name when
    every name is a COCO name, else by id."""
    if how not in ("auto", "id", "name"):
        raise WeightsError(f"label mapping must be auto, id or name, not {how!r}")
    names = [str(c.get("name", "")) for c in categories]
    by_name = None
    if num_model_classes == len(COCO_CATEGORIES) and all(n in COCO_CATEGORIES and n not in _UNUSED for n in names):
        by_name = [COCO_CATEGORIES.index(n) for n in names]
    ids = [int(c["id"]) for c in categories]
    by_id = ids if all(0 <= i < num_model_classes for i in ids) else None
    if how == "name" or (how == "auto" and by_name is not None):
        if by_name is None:
            bad = [n for n in names if n not in COCO_CATEGORIES or n in _UNUSED][:3]
            raise WeightsError("cannot map the categories by name: " + (
                f"{bad} are not COCO category names" if num_model_classes == len(COCO_CATEGORIES)
                else f"the model has {num_model_classes} classes, not COCO's 91"))
        return by_name, "name"
    if by_id is None:
        bad = [i for i in ids if not 0 <= i < num_model_classes][:3]
        raise WeightsError(f"cannot map the dataset's categories to the model's {num_model_classes} labels: "
                           f"category ids {bad} are out of range and "
                           + ("the names are not all COCO names" if num_model_classes == len(COCO_CATEGORIES)
                              else "mapping by name needs a 91-class COCO model"))
    return by_id, "id"
