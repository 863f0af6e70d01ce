"""A training step without graph breaks or host synchronisation.

``RetinaNet.forward(images, targets)`` checks the targets, resizes and pads on the host and
reads box counts back (Python lists of tensors, ``.item()``, ``bool(tensor)``): each is a graph
break under ``torch.compile`` and a sync that a CUDA-graph capture cannot contain. Here the
work splits in two:

* :func:`pad_batch` (host side, eager): ``forward``'s checks, the model's own transform,
  ``pack_targets`` and ``check_degenerate_boxes`` (the same :class:`InputError` messages), and
  targets padded to a bucket of ``M`` rows (the next power of two, at least 8) so that batches
  with different box counts share one compiled graph. Always a crowd mask (all False when the
  batch has none): the crowd and no-crowd batches share the graph too.
* :func:`make_train_step` (device side): ``model.forward_train_padded`` + the sum of the losses
  (+ the backward), optionally ``torch.compile(fullgraph=True)``.

Static shapes: the images' padded size is fixed when ``min_size == max_size`` and the images
share an aspect ratio (the shapes demo: 160 px), and ``M`` stays in its bucket for most batches.
When a size changes (another bucket of rows, a multi-scale ``min_size``), dynamo's default
``automatic_dynamic_shapes`` recompiles once into a graph where that dimension is symbolic,
which then serves every later size (measured on the tiny shapes model with inductor: a new M
bucket, then H and W too; losses and gradients equal eager's within 1e-5); a CUDA-graph
capture still records one graph per concrete shape. ``torch._dynamo.mark_dynamic`` on the
batch's tensors gets the symbolic graph at once; ``size_bucket`` of :func:`pad_batch` pads H and
W to a few fixed sizes instead (static graphs, at the cost of padded pixels).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from retina_fast.models.loss import check_degenerate_boxes, pack_targets

__all__ = ["PaddedBatch", "pad_batch", "bucket_rows", "TrainStep", "make_train_step"]


class PaddedBatch(NamedTuple):
    images: Tensor        # [B, C, H, W]: normalised, padded (H, W multiples of size_divisible)
    boxes: Tensor         # [B, M, 4] float32, in the transformed images' pixels, zero rows past counts
    labels: Tensor        # [B, M] int64
    counts: Tensor        # [B] int64
    crowd: Tensor         # [B, M] bool (all False when the batch has no crowd box)
    image_sizes: List[Tuple[int, int]]  # each image's (h, w) after resizing, before padding

    def tensors(self) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The arguments of ``RetinaNet.forward_train_padded``."""
        return self.images, self.boxes, self.labels, self.counts, self.crowd


def bucket_rows(n: int, minimum: int = 8) -> int:
    """The padded number of target rows for a batch whose largest image has ``n`` boxes: the
    next power of two, at least ``minimum``."""
    m = max(int(minimum), int(n), 1)
    return 1 << (m - 1).bit_length()


def pad_batch(model, images: List[Tensor], targets: List[Dict[str, Tensor]], *, min_rows: int = 8,
              size_bucket: Optional[int] = None, memory_format=None) -> PaddedBatch:
    """The host side of a training step: ``model.forward(images, targets)``'s checks (the same
    :class:`~retina_fast.models.loss.InputError` messages), the model's transform (resize,
    normalise, pad; in training mode a multi-scale ``min_size`` draws its size here, from the
    same RNG as ``forward``), then the targets padded to :func:`bucket_rows` rows.

    ``size_bucket``: pad H and W further, up to a multiple of it (fewer distinct shapes, fewer
    compiled graphs, when image sizes vary); None keeps the transform's padding, which
    ``forward`` uses (the losses equal ``forward``'s only then: anchors depend on the padded
    size). ``memory_format``: e.g. ``torch.channels_last`` for the images.

    The one host read is ``check_degenerate_boxes``'s reduction (and the counts, known on the
    host): it belongs here, outside the compiled step."""
    model.check_inputs(images, targets)
    image_list, targets = model.transform(images, targets)
    x = image_list.tensors
    if size_bucket:
        h, w = x.shape[-2:]
        ph, pw = -h % size_bucket, -w % size_bucket
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    packed = pack_targets(targets, x.device)
    check_degenerate_boxes(packed, targets, model.num_classes)
    n = max([int(t["boxes"].shape[0]) for t in targets] + [0])
    extra = bucket_rows(n, min_rows) - packed.boxes.shape[1]
    boxes = F.pad(packed.boxes, (0, 0, 0, extra))
    labels = F.pad(packed.labels, (0, extra))
    crowd = packed.crowd if packed.crowd is not None else torch.zeros_like(packed.labels, dtype=torch.bool)
    crowd = F.pad(crowd, (0, extra))
    return PaddedBatch(x, boxes, labels, packed.counts, crowd, list(image_list.image_sizes))


def _sum_losses(losses: Dict[str, Tensor]) -> Tensor:
    total = None
    for v in losses.values():
        total = v if total is None else total + v
    return total


class TrainStep:
    """``step(batch) -> (loss, losses)``: forward, losses and the backward (through the
    GradScaler's scale when one is given; after ``optimizer.zero_grad(set_to_none=True)`` when
    an optimizer is given). Neither clipping nor the optimizer's step: the trainer keeps those.
    ``step.forward_loss(batch)`` is the forward and loss alone, for a caller that runs the
    backward itself (compiled: AOTAutograd's backward graph runs it)."""

    def __init__(self, model, forward_loss: Callable, whole_step: Optional[Callable], optimizer=None,
                 scaler=None):
        self.model = model
        self.forward_loss_fn = forward_loss
        self.whole_step_fn = whole_step
        self.optimizer = optimizer
        self.scaler = scaler

    def forward_loss(self, batch: PaddedBatch) -> Tuple[Tensor, Dict[str, Tensor]]:
        return self.forward_loss_fn(*batch.tensors())

    def _scale(self, like: Tensor) -> Optional[Tensor]:
        if self.scaler is None or not self.scaler.is_enabled():
            return None
        # the scale as a device tensor (get_scale() would read it on the host)
        return self.scaler.scale(torch.ones((), dtype=torch.float32, device=like.device))

    def __call__(self, batch: PaddedBatch) -> Tuple[Tensor, Dict[str, Tensor]]:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        if self.whole_step_fn is not None:
            # Dynamo traces loss.backward() as autograd.grad + accumulation into .grad: forward,
            # backward and the gradient writes in one graph (torch >= 2.14).
            with torch._dynamo.config.patch(trace_autograd_ops=True):
                return self.whole_step_fn(*batch.tensors(), self._scale(batch.images))
        loss, losses = self.forward_loss(batch)
        scale = self._scale(loss)
        (loss if scale is None else loss * scale).backward()
        return loss.detach(), {k: v.detach() for k, v in losses.items()}


def make_train_step(model, optimizer=None, *, compile: bool = False, autocast=None, scaler=None,
                    whole_step: Optional[bool] = None, **compile_kwargs) -> TrainStep:
    """A training step over :class:`PaddedBatch` es (see :class:`TrainStep`).

    Args:
        model: a :class:`~retina_fast.models.RetinaNet` in training mode.
        optimizer: when given, its gradients are zeroed (set to None) before each step; its
            ``step()`` is the caller's.
        compile: ``torch.compile(fullgraph=True)``.
        autocast: a factory of the context the forward runs in (e.g.
            ``RunSettings.autocast``), or None (float32).
        scaler: a ``torch.amp.GradScaler`` whose scale multiplies the loss before the backward.
        whole_step: with ``compile``, compile forward, backward and the gradient accumulation
            as one graph (dynamo's ``trace_autograd_ops``; the gradients must be None before
            each step, as ``optimizer.zero_grad(set_to_none=True)`` leaves them, else it
            recompiles once for the accumulating form). False: compile the forward and loss;
            the backward is AOTAutograd's compiled backward graph, run by ``loss.backward()``.
            None (default): True where this torch has ``trace_autograd_ops`` (2.14 on), else
            False (an older dynamo breaks the graph at ``loss.backward()``).
        compile_kwargs: more ``torch.compile`` arguments (``mode``, ``backend``, ``dynamic``).
    """
    ctx = autocast if autocast is not None else contextlib.nullcontext
    if whole_step is None:
        whole_step = hasattr(torch._dynamo.config, "trace_autograd_ops")

    def forward_loss(images, boxes, labels, counts, crowd):
        with ctx():
            losses = model.forward_train_padded(images, boxes, labels, counts, crowd)
        return _sum_losses(losses), losses

    def step(images, boxes, labels, counts, crowd, scale):
        loss, losses = forward_loss(images, boxes, labels, counts, crowd)
        (loss if scale is None else loss * scale).backward()
        return loss.detach(), {k: v.detach() for k, v in losses.items()}

    if not compile:
        return TrainStep(model, forward_loss, step if whole_step else None, optimizer, scaler)
    step_kwargs = dict(compile_kwargs)
    if step_kwargs.get("backend", "inductor") == "inductor" and "mode" not in step_kwargs:
        # The whole step's graph returns no tensor that needs a gradient, so inductor takes it
        # for an inference graph and converts the convolutions to channels_last around
        # oneDNN ("layout optimization"): measured 4x slower than eager on the CPU
        # (shapes-small b16 160 px: 870 vs 220 ms); without it, eager's speed. (torch.compile
        # takes mode or options, not both: with a mode, inductor's default stays.)
        step_kwargs["options"] = {"layout_optimization": False, **step_kwargs.get("options", {})}
    # (step calls the plain forward_loss: dynamo traces it into the step's graph)
    return TrainStep(model, torch.compile(forward_loss, fullgraph=True, **compile_kwargs),
                     torch.compile(step, fullgraph=True, **step_kwargs) if whole_step else None, optimizer, scaler)
