"""Deploying the eval model: ``torch.export``, AOTInductor packages, ONNX.

* :func:`export_program`: ``torch.export.export`` of the eval model on example images of a fixed
  size. Our ops have fake kernels, so they stay single nodes (``torch.ops.retina_fast.*``) in
  the graph. ``padded=False`` keeps the model's contract (a list of dicts; the per-image counts
  become unbacked sizes, read on the host); ``padded=True`` exports
  :meth:`RetinaNet.forward_padded` (static shapes: ``boxes [B, D, 4], scores [B, D], labels
  [B, D], counts [B]``), what C++ / TensorRT-style consumers want. Save with
  :func:`torch.export.save`, load with :func:`load_program` (which loads our ops first).
* :func:`build_aoti`: the padded exported program compiled by AOTInductor into a ``.pt2``
  package (``torch._inductor.aoti_compile_and_package``); our ops are called through the
  dispatcher, so the process that runs it must have them loaded: :func:`load_aoti` imports
  ``retina_fast`` first (in C++: ``torch.ops.load_library`` of the CMake-built library) and
  splits the padded rows into the model's list of dicts.
* :func:`export_onnx` / :class:`OnnxRetinaNet`: ONNX of the network up to the head's outputs
  (``cls_logits [B, A, K]``, ``bbox_regression [B, A, 4]``, and the feature map sizes), with
  dynamic batch, height and width; the runner does torchvision's transform before
  onnxruntime and our anchors and post-processing after it, so its detections are the eager
  model's up to the convolutions' float rounding in onnxruntime.

Why the ONNX model stops at the head: the post-processing is retina_fast's kernel
(``postprocess_detections``), the thing this package exists to make fast and exact. Written
in standard ONNX ops (per-level TopK, NonMaxSuppression, as torchvision's RetinaNet exports)
it would be a second implementation with other semantics: onnxruntime's NonMaxSuppression
orders and breaks ties its own way and applies ``max_output_boxes_per_class`` per class,
per-level top-k needs data-dependent sizes, and detections could then only be compared
approximately. Head outputs have static, dense shapes that every ONNX runtime (and TensorRT)
handles, the graph has no custom op, and the tolerance is that of the convolutions alone.
"""

from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["example_images", "export_program", "load_program", "build_aoti", "load_aoti", "AotiDetector", "HeadOutputs",
           "export_onnx", "OnnxRetinaNet", "FORMATS"]

FORMATS = ("export", "aoti", "onnx")
_ONNX_META_KEY = "retina_fast.recipe"


def example_images(batch: int = 1, size: Tuple[int, int] = (480, 640), seed: int = 0) -> List[Tensor]:
    """``batch`` random images ``Tensor[3, H, W]`` in [0, 1], the inputs an export traces with."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, int(size[0]), int(size[1]), generator=g) for _ in range(int(batch))]


class _Padded(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: List[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        d = self.model.forward_padded(images)
        return d["boxes"], d["scores"], d["labels"], d["counts"]


def _for_export(model: nn.Module, fold: bool) -> nn.Module:
    # A folded copy (float32, NCHW): the exported graph has no BatchNorm left to run.
    from retina_fast.models.fuse import prepare_for_inference

    return prepare_for_inference(model) if fold else model.eval()


def export_program(model: nn.Module, images: Sequence[Tensor], padded: bool = False, fold: bool = True):
    """``torch.export.export`` of ``model`` in eval mode on ``images`` (a list of Tensor[3, H, W];
    the program takes that many images of those sizes). See the module docstring. ``fold``: the
    program is of a copy with the BatchNorms folded into their convolutions
    (:func:`retina_fast.models.fuse.fold_batchnorms`; ``model`` itself is untouched), equal to
    the model up to float32 rounding; ``fold=False`` exports the model as it is."""
    model = _for_export(model, fold)
    module = _Padded(model).eval() if padded else model
    with torch.no_grad():
        return torch.export.export(module, (list(images),))


def load_program(path: str):
    """:func:`torch.export.load` with our ops registered."""
    import retina_fast  # noqa: F401  (registers torch.ops.retina_fast.* and their fake kernels)

    return torch.export.load(path)


def build_aoti(model: nn.Module, images: Sequence[Tensor], path: str, fold: bool = True) -> str:
    """Export the padded program (:func:`export_program` ``padded=True``) and compile it with
    AOTInductor into the package ``path`` (``.pt2``); returns the package path.

    Padded because AOTInductor's C++ wrapper cannot yet slice by an unbacked size (torch 2.14
    emits ``None < 0 ? None + 300L : None`` for the list-of-dicts program's ``boxes[b, :n]``);
    :func:`load_aoti` splits the padded rows in Python, which gives the same detections."""
    ep = export_program(model, images, padded=True, fold=fold)
    return torch._inductor.aoti_compile_and_package(ep, package_path=str(path))


class AotiDetector:
    """An AOTInductor package of :func:`build_aoti`: ``detector(images)`` returns the eager
    model's list of dicts (``padded=True``: the tuple ``boxes, scores, labels, counts``)."""

    def __init__(self, compiled, padded: bool = False):
        self.compiled, self.padded = compiled, padded

    def __call__(self, images: List[Tensor]):
        from retina_fast.models.retinanet import _split

        out = self.compiled(list(images))
        return tuple(out) if self.padded else _split(*out)


def load_aoti(path: str, padded: bool = False) -> AotiDetector:
    """Load an AOTInductor package of :func:`build_aoti`; our ops are loaded first (the package
    calls them through the dispatcher)."""
    import retina_fast  # noqa: F401

    return AotiDetector(torch._inductor.aoti_load_package(str(path)), padded)


# ------------------------------------------------------------------------------------- ONNX


class HeadOutputs(nn.Module):
    """The network of a :class:`~retina_fast.models.RetinaNet` from the transformed batch
    (normalised, padded) to the head: ``(cls_logits [B, A, K], bbox_regression [B, A, 4],
    feature_sizes int64 [L, 2])``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone, self.head = model.backbone, model.head

    def forward(self, batch: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        features = self.backbone(batch)
        feats = list(features.values()) if isinstance(features, dict) else [features]
        out = self.head(feats)
        # Sizes as a tensor built from the symbolic shapes (ONNX Shape ops; no data read).
        one = torch.ones(2, dtype=torch.long, device=batch.device)
        sizes = torch.stack([torch.stack([one[0] * f.shape[-2], one[1] * f.shape[-1]]) for f in feats])
        return out["cls_logits"], out["bbox_regression"], sizes


def _recipe(model) -> dict:
    t, ag = model.transform, model.anchor_generator
    return {
        "num_classes": int(model.num_classes), "min_size": list(t.min_size), "max_size": int(t.max_size),
        "image_mean": list(t.image_mean), "image_std": list(t.image_std),
        "size_divisible": int(t.size_divisible), "anchor_sizes": [list(s) for s in ag.sizes],
        "aspect_ratios": [list(r) for r in ag.aspect_ratios], "score_thresh": float(model.score_thresh),
        "nms_thresh": float(model.nms_thresh), "detections_per_img": int(model.detections_per_img),
        "topk_candidates": int(model.topk_candidates),
    }


def export_onnx(model: nn.Module, path: str, images: Optional[Sequence[Tensor]] = None, dynamic: bool = True,
                opset: int = 18, fold: bool = True) -> str:
    """ONNX of :class:`HeadOutputs` (dynamic batch, height and width when ``dynamic``), traced
    on ``images`` passed through the model's transform (default: two 480x640 images). The
    model's transform, anchors and post-processing settings go into the file's metadata for
    :class:`OnnxRetinaNet`. Needs the ``onnx`` and ``onnxscript`` packages. ``fold``: as for
    :func:`export_program`."""
    import onnx

    model = _for_export(model, fold)
    images = list(images) if images is not None else example_images(2)
    with torch.no_grad():
        batch = model.transform(images)[0].tensors
    dyn = None
    if dynamic:
        # Multiples of the padding step: what the transform produces. An example batch of 1
        # would make torch.export specialise the batch size to 1 ("0/1 specialisation").
        step = int(model.transform.size_divisible)
        dyn = ({0: torch.export.Dim("batch", min=1, max=1024), 2: step * torch.export.Dim("h", min=1, max=4096),
                3: step * torch.export.Dim("w", min=1, max=4096)},)
    with torch.no_grad():
        torch.onnx.export(HeadOutputs(model).eval(), (batch,), str(path), dynamo=True, dynamic_shapes=dyn,
                          input_names=["batch"], output_names=["cls_logits", "bbox_regression", "feature_sizes"],
                          opset_version=opset, verbose=False)
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = _ONNX_META_KEY, json.dumps(_recipe(model))
    onnx.save(proto, str(path))
    return str(path)


class _NoBackbone(nn.Module):
    out_channels = 1


class OnnxRetinaNet:
    """Runs a model written by :func:`export_onnx` with onnxruntime: ``runner(images)`` (a list
    of Tensor[3, H, W] in [0, 1]) returns the eager model's list of dicts ``boxes``, ``scores``,
    ``labels``. torchvision's transform runs before onnxruntime, our anchors and
    ``postprocess_detections`` after it (CPU, or the device of ``device``)."""

    def __init__(self, path: str, providers: Sequence[str] = ("CPUExecutionProvider",), device="cpu"):
        import onnxruntime as ort

        from retina_fast.models import AnchorGenerator, RetinaNet

        self.session = ort.InferenceSession(str(path), providers=list(providers))
        meta = self.session.get_modelmeta().custom_metadata_map
        if _ONNX_META_KEY not in meta:
            raise ValueError(f"{path} was not written by retina_fast.export.export_onnx (no {_ONNX_META_KEY} metadata)")
        r = json.loads(meta[_ONNX_META_KEY])
        self.recipe = r
        ag = AnchorGenerator(tuple(tuple(s) for s in r["anchor_sizes"]), tuple(tuple(a) for a in r["aspect_ratios"]))
        # RetinaNet's own transform, anchors and post-processing, with no network inside.
        self.post = RetinaNet(_NoBackbone(), r["num_classes"], min_size=tuple(r["min_size"]),
                              max_size=r["max_size"], image_mean=r["image_mean"], image_std=r["image_std"],
                              size_divisible=r["size_divisible"], anchor_generator=ag, head=nn.Identity(),
                              score_thresh=r["score_thresh"], nms_thresh=r["nms_thresh"],
                              detections_per_img=r["detections_per_img"],
                              topk_candidates=r["topk_candidates"]).eval().to(device)
        self.device = torch.device(device)

    def head_outputs(self, batch: Tensor) -> Tuple[Dict[str, Tensor], List[Tuple[int, int]]]:
        cls, reg, sizes = self.session.run(None, {"batch": batch.detach().cpu().numpy()})
        return ({"cls_logits": torch.from_numpy(cls).to(self.device),
                 "bbox_regression": torch.from_numpy(reg).to(self.device)},
                [(int(h), int(w)) for h, w in sizes.tolist()])

    @torch.no_grad()
    def __call__(self, images: List[Tensor]) -> List[Dict[str, Tensor]]:
        from retina_fast.models.retinanet import _split

        original = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        batch, _ = self.post.transform([im.to(self.device) for im in images])
        head, feature_sizes = self.head_outputs(batch.tensors)
        hw = (int(batch.tensors.shape[-2]), int(batch.tensors.shape[-1]))
        return _split(*self.post.detections_from_head(head, feature_sizes, hw, batch.image_sizes, original))
