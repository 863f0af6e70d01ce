"""Box ops: IoU, anchor grids, batched anchor matching, box encoding/decoding.

Boxes are ``(x1, y1, x2, y2)``. Semantics are torchvision's (``box_iou``, ``Matcher``,
``BoxCoder``, ``AnchorGenerator``), in the same arithmetic order, so results are bitwise equal
where the arithmetic is elementary (IoU, match labels, anchors); ``log``/``exp`` in the box
coder may differ from torch's vectorised versions by an ulp.
"""

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

import retina_fast._C_loader  # noqa: F401  (registers torch.ops.retina_fast.*)

__all__ = [
    "box_iou",
    "grid_anchors",
    "match_anchors",
    "matched_targets",
    "MatchedTargets",
    "matched_box_loss",
    "encode_boxes",
    "decode_boxes",
]

_ops = torch.ops.retina_fast

DEFAULT_CLIP = math.log(1000.0 / 16)


def _to_xyxy(boxes: Tensor, fmt: str) -> Tensor:
    if fmt == "xywh":
        return torch.cat([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], -1)
    half = boxes[..., 2:] / 2
    return torch.cat([boxes[..., :2] - half, boxes[..., :2] + half], -1)


def _broadcast_lead(a: List[int], b: List[int]) -> List[int]:
    n = max(len(a), len(b))
    a = [1] * (n - len(a)) + a
    b = [1] * (n - len(b)) + b
    out: List[int] = []
    for x, y in zip(a, b):
        if x != y and x != 1 and y != 1:
            raise ValueError(f"box_iou: the leading dimensions {a} and {b} of the two sets of boxes do not broadcast")
        out.append(y if x == 1 else x)
    return out


@torch.jit.unused
def _rotated_box_iou(boxes1: Tensor, boxes2: Tensor, fmt: str) -> Tensor:
    import torchvision  # rotated boxes: torchvision's own kernel (not under TorchScript)

    return torchvision.ops.box_iou(boxes1, boxes2, fmt=fmt)


def box_iou(boxes1: Tensor, boxes2: Tensor, fmt: str = "xyxy") -> Tensor:
    """Drop-in for :func:`torchvision.ops.box_iou`, one pass, no temporaries.

    Args:
        boxes1 (Tensor[..., N, 4]): float32/float64/float16/bfloat16 or integer boxes.
        boxes2 (Tensor[..., M, 4]): same device; leading dimensions broadcast against
            boxes1's (one kernel call per batch entry).
        fmt: ``"xyxy"`` (default), ``"xywh"`` (x1, y1, w, h) or ``"cxcywh"`` (cx, cy, w, h);
            torchvision's rotated formats (``"cxcywhr"``, ``"xywhr"``, ``"xyxyxyxy"``) are
            passed on to torchvision's own kernel (eager only, not under TorchScript).

    Returns:
        Tensor[..., N, M]: IoU, float32, or float64 when either set is float64 (16-bit and
        integer boxes give float32, as in torchvision).

        * ``"xyxy"`` float boxes: bitwise torchvision's ``inter / union``, no epsilon, so a
          zero union (two zero-area boxes) gives NaN exactly where torchvision's does.
        * Integer boxes (both sets): computed exactly in float64 and rounded once to float32:
          bitwise torchvision's wherever its integer intersection and union are below 2^24
          (coordinates up to ~4,000); past that more exact (torchvision's int32 products
          overflow past 46,340, and its 8-bit differences wrap around).
        * float64 boxes beside float32/16-bit ones: torchvision computes each set's areas in
          its own (upcast) dtype before promoting, so that case runs torchvision's arithmetic
          in plain PyTorch (the kernel promotes the coordinates first, which rounds differently).
        * Integer boxes with float boxes: the integers are converted to the float dtype (to
          float32 beside 16-bit boxes, where torchvision rounds them to 16 bits).
        * ``"xywh"``/``"cxcywh"``: converted to corners in float64 and computed there (x1 + w
          exact), then rounded once to the result dtype. torchvision forms x1 + w in the
          boxes' dtype and takes the area as w * h, so the two agree to that rounding (float64:
          a few ulps; float32: ~ulp(x1 + w) / w; 16-bit boxes much less closely), not bitwise.
    """
    if fmt != "xyxy" and fmt != "xywh" and fmt != "cxcywh":  # (tuple constants do not script)
        if fmt == "cxcywhr" or fmt == "xywhr" or fmt == "xyxyxyxy":
            return _rotated_box_iou(boxes1, boxes2, fmt)
        raise ValueError(
            f"Unsupported format '{fmt}'. Supported axis-aligned formats: ('xyxy', 'xywh', 'cxcywh'). "
            "Supported rotated formats (through torchvision): ('cxcywhr', 'xywhr', 'xyxyxyxy')."
        )
    if boxes1.dtype == torch.bool or boxes2.dtype == torch.bool:
        raise ValueError(f"box_iou: expected numeric boxes, got {boxes1.dtype} and {boxes2.dtype}")
    float1, float2 = boxes1.is_floating_point(), boxes2.is_floating_point()
    if fmt == "xyxy" and float1 and float2:
        if boxes1.dtype != boxes2.dtype and (boxes1.dtype == torch.float64) != (boxes2.dtype == torch.float64) \
                and boxes1.dim() == 2 and boxes2.dim() == 2:
            return _box_iou_mixed(boxes1, boxes2)
        return _batched_box_iou(boxes1, boxes2)
    if fmt == "xyxy" and (float1 or float2):
        # one integer set beside a float one: the integers in that float dtype (at least float32)
        like = boxes2.dtype if float2 else boxes1.dtype
        like = torch.float64 if like == torch.float64 else torch.float32
        return _batched_box_iou(boxes1.to(like), boxes2.to(like))
    # both integer (exact in float64), or xywh / cxcywh (corners exact in float64)
    out_dtype = torch.float64 if boxes1.dtype == torch.float64 or boxes2.dtype == torch.float64 else torch.float32
    b1, b2 = boxes1.to(torch.float64), boxes2.to(torch.float64)
    if fmt != "xyxy":
        b1, b2 = _to_xyxy(b1, fmt), _to_xyxy(b2, fmt)
    return _batched_box_iou(b1, b2).to(out_dtype)


def _batched_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    if boxes1.dim() == 1 and boxes2.dim() >= 2:  # one box: [1, M] (torchvision broadcasts it so)
        boxes1 = boxes1[None]
    if boxes1.dim() == 2 and boxes2.dim() == 2:
        return _ops.box_iou(boxes1, boxes2)
    if boxes1.dim() < 2 or boxes2.dim() < 2:
        raise ValueError(
            f"box_iou: expected boxes of shape [..., N, 4] and [..., M, 4], got {list(boxes1.shape)} "
            f"and {list(boxes2.shape)}"
        )
    N, M = boxes1.shape[-2], boxes2.shape[-2]
    lead = _broadcast_lead(list(boxes1.shape[:-2]), list(boxes2.shape[:-2]))
    b1 = boxes1.expand(lead + [N, boxes1.shape[-1]]).reshape(-1, N, boxes1.shape[-1])
    b2 = boxes2.expand(lead + [M, boxes2.shape[-1]]).reshape(-1, M, boxes2.shape[-1])
    outs = [_ops.box_iou(b1[i], b2[i]) for i in range(b1.shape[0])]
    if len(outs) == 0:  # an empty batch: the dtype (and the shape checks) of one call
        return _ops.box_iou(b1.reshape(-1, b1.shape[-1])[:0], b2.reshape(-1, b2.shape[-1])[:0]).new_empty(lead + [N, M])
    return torch.stack(outs).reshape(lead + [N, M])


def _box_iou_mixed(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    # Found by tests/fuzz/test_fuzz_boxes.py: float64 boxes1 with float32 boxes2 differed from
    # torchvision in the last bit. Same checks and messages as the kernel.
    _ops.box_iou(boxes1[:0], boxes2[:0])
    up1 = boxes1 if boxes1.dtype == torch.float32 or boxes1.dtype == torch.float64 else boxes1.float()
    up2 = boxes2 if boxes2.dtype == torch.float32 or boxes2.dtype == torch.float64 else boxes2.float()
    area1 = (up1[:, 2] - up1[:, 0]) * (up1[:, 3] - up1[:, 1])
    area2 = (up2[:, 2] - up2[:, 0]) * (up2[:, 3] - up2[:, 1])
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    return inter / (area1[:, None] + area2 - inter)


def grid_anchors(
    cell_anchors: List[Tensor],
    grid_sizes: List[List[int]],
    strides: List[List[int]],
) -> Tensor:
    """All levels' anchors in one kernel, as ``torchvision AnchorGenerator.grid_anchors``
    concatenated over levels.

    Args:
        cell_anchors: per level a Tensor[n_l, 4] of zero-centred cell anchors (the dtype and
            device of the output).
        grid_sizes: per level ``(h, w)`` of the feature map (any sequences of two ints).
        strides: per level ``(stride_h, stride_w)`` in pixels (torchvision:
            ``image_size // grid_size``).

    Returns:
        Tensor[sum_l h_l * w_l * n_l, 4]: ordered level, then y, then x, then cell anchor;
        anchor = ``shift + cell`` with ``shift = (x * stride_w, y * stride_h)`` (int32, no
        half-pixel offset) converted to the dtype before the add, as torchvision does.
    """
    if len(cell_anchors) == 0:
        raise ValueError("grid_anchors: expected at least one level of cell anchors")
    cells = torch.cat(list(cell_anchors), 0)
    counts = [int(c.shape[0]) for c in cell_anchors]
    gs: List[int] = []
    st: List[int] = []
    for g in grid_sizes:  # (plain loops: TorchScript compiles them)
        gs += [int(g[0]), int(g[1])]
    for s in strides:
        st += [int(s[0]), int(s[1])]
    for v in st:
        if v < 0:
            raise ValueError(f"grid_anchors: expected non-negative strides, got {st}")
    return _ops.grid_anchors(cells, counts, gs, st)


def _check_counts(gt_counts: Tensor, M: int) -> None:
    # The CPU kernel checks the counts itself; on CUDA that is a device->host sync, done here,
    # once, where eager code can afford it (the CUDA kernel clamps to [0, M] either way).
    if gt_counts.is_cuda and gt_counts.numel() and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(gt_counts)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi > M:
            bad = lo if lo < 0 else hi
            raise RuntimeError(
                f"retina_fast::match_anchors: expected every gt_counts[b] in [0, M] = [0, {M}], got {bad}"
            )


def match_anchors(
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_counts: Tensor,
    high: float = 0.5,
    low: float = 0.4,
    allow_low_quality_matches: bool = True,
    zero_iou_quirk: bool = True,
    check_counts: bool = True,
    gt_crowd: Optional[Tensor] = None,
    crowd_ioa_thresh: float = 0.5,
) -> Tensor:
    """torchvision's ``Matcher(high, low, allow_low_quality_matches)(box_iou(gt, anchors))``
    for a whole padded batch in one call, never building the ``[M, A]`` IoU matrix.

    Args:
        anchors (Tensor[A, 4]): anchors shared by every image (float dtypes).
        gt_boxes (Tensor[B, M, 4]): per image the gt boxes, padded to M; rows at and beyond
            ``gt_counts[b]`` are ignored whatever they hold.
        gt_counts (Tensor[B], int64 or int32): number of valid gts per image, in ``[0, M]``.
        high, low: thresholds (``low <= high``), compared in the IoU dtype (float32 unless
            the boxes are float64), as torch compares a float32 tensor with a Python float.
        allow_low_quality_matches: restore, for every gt, each anchor whose IoU equals that
            gt's highest IoU (ties included) to the anchor's *own* best gt.
        zero_iou_quirk: torchvision's behaviour (default, for parity): a gt whose highest IoU
            is 0 (it overlaps no anchor, e.g. a zero-area or out-of-image box) ties with every
            anchor, so *every* anchor of that image becomes foreground of its best gt (gt 0
            where all IoUs are 0). ``False`` turns that off: such a gt restores nothing.
        check_counts: on CUDA, validate ``gt_counts`` first (one device sync). The CPU kernel
            always validates.
        gt_crowd (Tensor[B, M] bool, optional): crowd regions (COCO ``iscrowd``). Crowd rows
            are never matched: matching and the low-quality restore see the other rows only,
            in their order (indices stay those of the padded rows). Then every anchor labelled
            ``-1`` whose intersection with a crowd box, over the anchor's own area (clamped at
            1e-6), is ``>= crowd_ioa_thresh`` becomes ``-2`` (ignored). Inside the kernel:
            memory O(A + M) per image, no ``[B, A, M]`` temporaries. Computed in the IoU dtype
            (float32 for 16-bit boxes). A threshold ``<= 0`` ignores every background anchor
            of every image (a share of 0 reaches it).

    Returns:
        Tensor[B, A] int64: matched gt index in ``[0, gt_counts[b])``, ``-1`` below ``low``,
        ``-2`` in ``[low, high)`` (or inside a crowd region). Ties for the best gt go to the
        lowest gt index; a NaN IoU (zero union) wins as torch.max lets it. An image with no
        gts (to match) is all ``-1``, crowd regions aside.
    """
    if check_counts:
        _check_counts(gt_counts, gt_boxes.shape[1] if gt_boxes.dim() == 3 else 0)
    return _ops.match_anchors(
        anchors, gt_boxes, gt_counts, float(high), float(low), bool(allow_low_quality_matches), bool(zero_iou_quirk),
        gt_crowd, float(crowd_ioa_thresh)
    )


def _check_gt_labels(gt_labels: Tensor, gt_counts: Tensor) -> None:
    # A negative class would pass through as -1 (background) or -2 (ignored): silent garbage.
    # Only the valid rows count (padded rows may hold anything). On CUDA a device sync, as
    # _check_counts; the kernel checks the shapes and dtype afterwards.
    if (torch.compiler.is_compiling() or gt_labels.dim() != 2 or gt_counts.dim() != 1
            or gt_labels.shape[0] != gt_counts.shape[0] or gt_labels.numel() == 0
            or gt_labels.dtype != torch.int64 or gt_labels.device != gt_counts.device
            or gt_labels.device.type == "meta"):
        return
    valid = torch.arange(gt_labels.shape[1], device=gt_labels.device)[None, :] < gt_counts[:, None]
    bad = valid & (gt_labels < 0)
    if bool(bad.any()):
        b, m = (int(v) for v in torch.nonzero(bad)[0])
        raise RuntimeError(
            f"retina_fast::matched_targets: expected every valid gt_labels[b, m] >= 0 (a class in [0, K)), "
            f"got gt_labels[{b}, {m}] = {int(gt_labels[b, m])}")


class MatchedTargets(NamedTuple):
    labels: Tensor  # [B, A] int64: gt class in [0, K), -1 background, -2 ignored
    regression_targets: Tensor  # [B, A, 4]: encode_boxes(matched gt, anchor); 0 off foreground
    matches: Tensor  # [B, A] int64: match_anchors' output


def matched_targets(
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_counts: Tensor,
    high: float = 0.5,
    low: float = 0.4,
    allow_low_quality_matches: bool = True,
    zero_iou_quirk: bool = True,
    weights: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
    check_counts: bool = True,
) -> MatchedTargets:
    """Everything a RetinaNet loss needs from the gts, for the whole batch: no Python loop.

    Args:
        anchors (Tensor[A, 4]), gt_boxes (Tensor[B, M, 4]), gt_counts (Tensor[B]): as in
            :func:`match_anchors` (same thresholds and flags).
        gt_labels (Tensor[B, M], int64): class of each gt in ``[0, K)`` (padded rows unused).
        weights: BoxCoder weights ``(wx, wy, ww, wh)``.

    Returns:
        MatchedTargets(labels, regression_targets, matches): ``labels[b, a]`` is
        ``gt_labels[b, matches[b, a]]`` for foreground anchors, else ``matches[b, a]`` (-1
        background, -2 ignored): the convention of ``sigmoid_focal_loss_labels``.
        ``regression_targets[b, a]`` is ``BoxCoder(weights).encode_single(gt, anchor)`` of the
        matched gt for foreground anchors, 0 elsewhere, in the promoted dtype of anchors and
        gt_boxes. Not differentiable (targets).
    """
    matches = match_anchors(
        anchors, gt_boxes, gt_counts, high, low, allow_low_quality_matches, zero_iou_quirk, check_counts
    )
    if check_counts:
        _check_gt_labels(gt_labels, gt_counts)
    # match_anchors never returns an out-of-range match: skip the check (a device sync on CUDA)
    labels, targets = _ops.gather_targets(matches, anchors, gt_boxes, gt_labels, [float(w) for w in weights], False)
    return MatchedTargets(labels, targets, matches)


_BOX_LOSS_CODES = {"l1": 0, "smooth_l1": 1, "giou": 2}


def matched_box_loss(
    bbox_regression: Tensor,
    anchors: Tensor,
    matches: Tensor,
    gt_boxes: Tensor,
    image_weights: Tensor,
    loss: str = "l1",
    weights: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
    clip: float = DEFAULT_CLIP,
    beta: float = 1.0,
    eps: float = 1e-7,
) -> Tensor:
    """RetinaNet's box loss over a padded batch: matched targets gathered and the loss computed
    in one pass over the foreground anchors, forward and backward.

    Args:
        bbox_regression (Tensor[B, A, 4]): predicted codes ``(dx, dy, dw, dh)``, any float
            dtype (math in float32, float64 for float64).
        anchors (Tensor[A, 4]): anchors shared by every image (not differentiated).
        matches (Tensor[B, A] int64): :func:`match_anchors`' output; anchors with a match
            ``>= 0`` are the foreground, the others contribute nothing (whatever their codes).
        gt_boxes (Tensor[B, M, 4]): the padded gts the matches index.
        image_weights (Tensor[B]): each image's loss is multiplied by its weight, e.g.
            ``1 / (B * max(1, foreground anchors))`` (torchvision's normalisation).
        loss: ``"l1"`` (torchvision's v1: L1 between the codes and
            ``BoxCoder(weights).encode_single(gt, anchor)``, encoded in the boxes' dtype),
            ``"smooth_l1"`` (``beta``; 0 is L1), or ``"giou"`` (v2:
            ``generalized_box_iou_loss(decode_single(codes, anchor), gt, eps)``, decoded in
            the codes' math dtype with ``clip``).

    Returns:
        0-d float32 (float64 for float64 codes): ``sum_b image_weights[b] * sum_{a: matches[b,
        a] >= 0} loss(b, a)``. Differentiable with respect to ``bbox_regression`` (one pass
        writing the [B, A, 4] gradient, 0 off the foreground). No ``[B, A, 4]`` target or
        gathered-gt tensor is built. On the CPU, matches outside ``[-2, M)`` are an error; on
        CUDA (no sync) they count as background.
    """
    if loss not in _BOX_LOSS_CODES:
        raise ValueError(f"matched_box_loss: expected loss 'l1', 'smooth_l1' or 'giou', got {loss!r}")
    return _ops.matched_box_loss(bbox_regression, anchors, matches, gt_boxes, image_weights,
                                 _BOX_LOSS_CODES[loss], [float(w) for w in weights], float(clip), float(beta),
                                 float(eps))


def encode_boxes(
    reference_boxes: Tensor,
    proposals: Tensor,
    weights: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
) -> Tensor:
    """``BoxCoder(weights).encode_single(reference_boxes, proposals)``.

    Args:
        reference_boxes (Tensor[..., 4]): the boxes to encode (gts).
        proposals (Tensor[..., 4]): the boxes they are encoded against (anchors), of the same
            shape, or Tensor[N, 4] shared by reference_boxes of shape [B, N, 4].
        weights: ``(wx, wy, ww, wh)``.

    Returns:
        Tensor shaped like reference_boxes: ``(dx, dy, dw, dh)`` in the promoted dtype, each
        operation rounded to that dtype as torch's elementwise ops do. Not differentiable.
        Integer boxes are converted to the other set's float dtype (float32 when both are
        integer), as torchvision's arithmetic promotes them. Mixed float dtypes: both are
        promoted first; torchvision forms the proposals' widths and centres in their own dtype
        before promoting, so 16-bit proposals beside float32 boxes differ from its codes by
        that 16-bit rounding (ours are the exact codes of the given boxes, rounded once).
    """
    if reference_boxes.dtype == torch.bool or proposals.dtype == torch.bool:
        raise ValueError(f"encode_boxes: expected numeric boxes, got reference_boxes {reference_boxes.dtype} "
                         f"and proposals {proposals.dtype}")
    if not reference_boxes.is_floating_point() or not proposals.is_floating_point():
        like = reference_boxes.dtype if reference_boxes.is_floating_point() else proposals.dtype
        like = like if torch.empty((), dtype=like).is_floating_point() else torch.float32
        reference_boxes, proposals = reference_boxes.to(like), proposals.to(like)
    return _ops.encode_boxes(reference_boxes, proposals, [float(w) for w in weights])


def decode_boxes(
    rel_codes: Tensor,
    boxes: Tensor,
    weights: Tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
    clip: float = DEFAULT_CLIP,
) -> Tensor:
    """``BoxCoder(weights, clip).decode_single(rel_codes, boxes)``, also batched.

    Args:
        rel_codes (Tensor[N, 4k] or Tensor[B, N, 4k]): codes ``(dx, dy, dw, dh)`` per box
            (k codes per box, as decode_single allows).
        boxes (Tensor[N, 4] or Tensor[B, N, 4]): reference boxes (anchors), converted to
            rel_codes' dtype (integer boxes too, as torchvision converts them); [N, 4] is
            shared by every batch entry.
        weights: ``(wx, wy, ww, wh)``; clip: ``dw, dh`` are clamped from above at ``clip``.

    Returns:
        Tensor shaped like rel_codes: decoded ``(x1, y1, x2, y2)`` in rel_codes' dtype.
        Differentiable w.r.t. ``rel_codes`` (not ``boxes``); the clamp passes gradient where
        ``d <= clip`` (inclusive, as torch.clamp does up to torch 2.11; torch 2.14 passes none
        at ``d == clip`` exactly).
    """
    if math.isnan(float(clip)):
        raise ValueError("decode_boxes: expected a clip value (log of the largest scale), got clip=nan")
    if boxes.dtype == torch.bool:
        raise ValueError(f"decode_boxes: expected numeric boxes, got {boxes.dtype}")
    if not boxes.is_floating_point() and rel_codes.is_floating_point():
        boxes = boxes.to(rel_codes.dtype)
    return _ops.decode_boxes(rel_codes, boxes, [float(w) for w in weights], float(clip))


# ---------------------------------------------------------------- fake (meta) kernels


def _same_device(op: str, **tensors: Tensor) -> None:
    # The device kernels check this too; the fake kernels must, or a meta/cuda mix would pass.
    (n0, t0), *rest = tensors.items()
    for n, t in rest:
        torch._check(
            t.device == t0.device,
            lambda: f"retina_fast::{op}: expected {n0} and {n} on the same device, got {n0} on {t0.device} and {n} on {t.device}",
        )


def _iou_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.promote_types(a, b) == torch.float64 else torch.float32


@torch.library.register_fake("retina_fast::box_iou")
def _box_iou_fake(boxes1, boxes2):
    torch._check(boxes1.dim() == 2 and boxes1.shape[-1] == 4, lambda: "boxes1 must be [N, 4]")
    torch._check(boxes2.dim() == 2 and boxes2.shape[-1] == 4, lambda: "boxes2 must be [M, 4]")
    _same_device("box_iou", boxes1=boxes1, boxes2=boxes2)
    return boxes1.new_empty((boxes1.shape[0], boxes2.shape[0]), dtype=_iou_dtype(boxes1.dtype, boxes2.dtype))


@torch.library.register_fake("retina_fast::grid_anchors")
def _grid_anchors_fake(cell_anchors, cells_per_level, grid_sizes, strides):
    total = 0
    for l, n in enumerate(cells_per_level):
        total += grid_sizes[2 * l] * grid_sizes[2 * l + 1] * n
    return cell_anchors.new_empty((total, 4))


@torch.library.register_fake("retina_fast::match_anchors")
def _match_fake(anchors, gt_boxes, gt_counts, high, low, allow_low_quality_matches, zero_iou_quirk, gt_crowd=None,
                crowd_ioa_thresh=0.5):
    torch._check(anchors.dim() == 2 and gt_boxes.dim() == 3, lambda: "anchors [A, 4], gt_boxes [B, M, 4]")
    _same_device("match_anchors", anchors=anchors, gt_boxes=gt_boxes, gt_counts=gt_counts)
    if gt_crowd is not None:
        torch._check(gt_crowd.shape == gt_boxes.shape[:2], lambda: "gt_crowd must be [B, M]")
        _same_device("match_anchors", anchors=anchors, gt_crowd=gt_crowd)
    return anchors.new_empty((gt_boxes.shape[0], anchors.shape[0]), dtype=torch.int64)


@torch.library.register_fake("retina_fast::gather_targets")
def _gather_fake(matches, anchors, gt_boxes, gt_labels, weights, check_matches=True):
    _same_device("gather_targets", anchors=anchors, matches=matches, gt_boxes=gt_boxes, gt_labels=gt_labels)
    dtype = torch.promote_types(anchors.dtype, gt_boxes.dtype)
    B, A = matches.shape
    return matches.new_empty((B, A)), anchors.new_empty((B, A, 4), dtype=dtype)


@torch.library.register_fake("retina_fast::matched_box_loss")
def _box_loss_fake(bbox_regression, anchors, matches, gt_boxes, image_weights, loss_type, weights, clip, beta, eps):
    torch._check(bbox_regression.dim() == 3 and bbox_regression.shape[-1] == 4, lambda: "bbox_regression must be [B, A, 4]")
    torch._check(matches.shape == bbox_regression.shape[:2], lambda: "matches must be [B, A]")
    _same_device("matched_box_loss", bbox_regression=bbox_regression, anchors=anchors, matches=matches,
                 gt_boxes=gt_boxes, image_weights=image_weights)
    dtype = torch.float64 if bbox_regression.dtype == torch.float64 else torch.float32
    return bbox_regression.new_empty((), dtype=dtype)


@torch.library.register_fake("retina_fast::matched_box_loss_backward")
def _box_loss_bwd_fake(grad, bbox_regression, anchors, matches, gt_boxes, image_weights, loss_type, weights, clip,
                       beta, eps):
    return bbox_regression.new_empty(bbox_regression.shape)


@torch.library.register_fake("retina_fast::encode_boxes")
def _encode_fake(reference_boxes, proposals, weights):
    _same_device("encode_boxes", reference_boxes=reference_boxes, proposals=proposals)
    return reference_boxes.new_empty(reference_boxes.shape, dtype=torch.promote_types(reference_boxes.dtype, proposals.dtype))


@torch.library.register_fake("retina_fast::decode_boxes")
def _decode_fake(rel_codes, boxes, weights, clip):
    _same_device("decode_boxes", rel_codes=rel_codes, boxes=boxes)
    return rel_codes.new_empty(rel_codes.shape)


@torch.library.register_fake("retina_fast::decode_boxes_backward")
def _decode_bwd_fake(grad, rel_codes, boxes, weights, clip):
    return rel_codes.new_empty(rel_codes.shape)


# ---------------------------------------------------------------- autograd


def _decode_setup(ctx, inputs, output):
    rel_codes, boxes, weights, clip = inputs
    ctx.save_for_backward(rel_codes, boxes)
    ctx.args = (weights, clip)


def _decode_backward(ctx, grad):
    rel_codes, boxes = ctx.saved_tensors
    if ctx.needs_input_grad[1]:
        raise NotImplementedError(
            "retina_fast.ops.decode_boxes: the gradient with respect to boxes is not "
            "implemented; detach the reference boxes (anchors)"
        )
    g = None
    if ctx.needs_input_grad[0]:
        g = _ops.decode_boxes_backward(grad, rel_codes, boxes, *ctx.args)
    return g, None, None, None


torch.library.register_autograd("retina_fast::decode_boxes", _decode_backward, setup_context=_decode_setup)


def _box_loss_setup(ctx, inputs, output):
    reg, anchors, matches, gt_boxes, image_weights, loss_type, weights, clip, beta, eps = inputs
    ctx.save_for_backward(reg, anchors, matches, gt_boxes, image_weights)
    ctx.args = (loss_type, weights, clip, beta, eps)


def _box_loss_backward(ctx, grad):
    reg, anchors, matches, gt_boxes, image_weights = ctx.saved_tensors
    for i, name in ((1, "anchors"), (3, "gt_boxes"), (4, "image_weights")):
        if ctx.needs_input_grad[i]:
            raise NotImplementedError(
                f"retina_fast.ops.matched_box_loss: the gradient with respect to {name} is not implemented; "
                f"detach {name}"
            )
    g = None
    if ctx.needs_input_grad[0]:
        g = _ops.matched_box_loss_backward(grad, reg, anchors, matches, gt_boxes, image_weights, *ctx.args)
    return g, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("retina_fast::matched_box_loss", _box_loss_backward, setup_context=_box_loss_setup)
