"""Fused sigmoid focal loss (Lin et al. 2017): one pass over the logits for forward and backward.

A reduced loss (``'sum'``/``'mean'``) of float32/float64 logits whose gradient is needed is
computed with its gradient in the forward pass (``*_with_grad`` ops: one sigmoid per element
serves both); the backward then only scales the saved gradient by the upstream one (returns it
as is when that is 1). Otherwise (no gradient needed, ``reduction='none'``, or half/bfloat16
logits, whose gradient is better rounded once from float32 with the upstream scale, e.g. a
GradScaler's) the forward saves references to its inputs and the backward re-reads them. No
one-hot tensor is built for the labels form.
"""

from typing import Optional, Union

import torch
from torch import Tensor

import retina_fast._C_loader  # noqa: F401  (registers torch.ops.retina_fast.*)

__all__ = ["sigmoid_focal_loss", "sigmoid_focal_loss_labels"]

_ops = torch.ops.retina_fast


# Plain ifs and f-strings only: the wrappers compile under torch.jit.script (torchvision's
# detection models are scriptable, so a scripted model or loss that calls ours must be too).
def _reduction_code(reduction: str) -> int:
    if reduction == "none":
        return 0
    if reduction == "mean":
        return 1
    if reduction == "sum":
        return 2
    raise ValueError(
        f"Invalid Value for arg 'reduction': '{reduction}' \n Supported reduction modes: 'none', 'mean', 'sum'"
    )


def _check_alpha(alpha: float) -> None:
    if not (0 <= alpha <= 1) and alpha != -1:
        raise ValueError(f"Invalid alpha value: {alpha}. alpha must be in the range [0,1] or -1 for ignore.")


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
) -> Tensor:
    """Drop-in for :func:`torchvision.ops.sigmoid_focal_loss`, fused.

    Args:
        inputs (Tensor[...]): logits, float32/float64/float16/bfloat16, any shape.
        targets (Tensor[...]): same shape, values in [0, 1] (1 positive, 0 negative; soft
            targets in between).
        alpha: weight of positives in [0, 1], or -1 for no weighting (anything else is a
            ``ValueError``, as in torchvision).
        gamma: focusing exponent, ``>= 0``.
        reduction: ``'none'`` | ``'mean'`` | ``'sum'``.

    Returns:
        The loss, shaped like ``inputs`` (``'none'``) or a scalar, in the inputs' dtype (inputs
        and targets of different float dtypes are both converted to the promoted dtype first,
        which is the result's, as torchvision's arithmetic promotes them).
        Math runs in float32 for half/bfloat16 inputs (float64 for float64). Under
        ``torch.autocast`` the op runs in float32, as ``binary_cross_entropy_with_logits``
        (and so torchvision's version) does. Differentiable w.r.t. ``inputs`` and ``targets``
        (soft targets, e.g. distillation): both gradients come from one backward kernel pass.

    Rounding: the cross-entropy is computed as ``max(x, 0) - x t + log1p(exp(-|x|))`` with
    ``p`` and ``1 - p`` both formed from ``exp(-|x|)``, within a few float32 ulps of the
    float64 value (max ~1.7e-7 relative). torch's ``binary_cross_entropy_with_logits``
    computes ``(1 - t) x - log_sigmoid(x)``, which cancels for ``t = 0, x < 0`` (relative
    errors up to 1: the loss of ``x = -30`` rounds to 0). The loss is built as
    ``(alpha_t * ce) * (1 - p_t)^gamma`` with both factors ``<= 1``, so ``focal <= ours at
    gamma = 0, alpha = -1`` holds bit for bit for every alpha and gamma. ``focal <= torch's
    BCE`` (torchvision's test) cannot hold bit for bit for any loss more accurate than torch's
    BCE: wherever torch rounds low, the accurate value lies above it. Only copying torch's
    rounding (Sleef's exp/log1p inside its vectorised log_sigmoid, glibc's in scalar tails or
    on CPUs without AVX, libdevice on CUDA, per torch version) would make it hold, at the
    price of its error. It holds to rounding: ours exceeds torch's BCE only where ours is
    within 4 ulps of the exact value (tests/ops/test_focal_loss.py).
    """
    _check_alpha(alpha)
    if inputs.dtype != targets.dtype and inputs.is_floating_point() and targets.is_floating_point():
        common = torch.promote_types(inputs.dtype, targets.dtype)
        inputs, targets = inputs.to(common), targets.to(common)
    code = _reduction_code(reduction)
    if code != 0 and _fuse_backward(inputs) and not targets.requires_grad:
        return _ops.sigmoid_focal_loss_with_grad(inputs, targets, float(alpha), float(gamma), code)[0]
    return _ops.sigmoid_focal_loss(inputs, targets, float(alpha), float(gamma), code)


def _fuse_backward(x: Tensor) -> bool:
    # The gradient is computed in the forward when it will be needed (see the module docstring).
    return x.requires_grad and torch.is_grad_enabled() and (x.dtype == torch.float32 or x.dtype == torch.float64)


def _check_label_range(logits: Tensor, labels: Tensor) -> None:
    # The CPU kernel validates labels in its own pass; on CUDA that would need a device->host
    # sync inside the op, so the check happens here, once, where eager code can afford it.
    if labels.is_cuda and labels.numel() and not torch.compiler.is_compiling():
        K = logits.shape[-1] if logits.dim() == 2 else 0
        lo, hi = torch.aminmax(labels)
        lo, hi = int(lo), int(hi)
        if lo < -2 or hi >= K:
            bad = lo if lo < -2 else hi
            raise RuntimeError(
                "retina_fast::sigmoid_focal_loss_labels: expected every label in [0, K) = "
                f"[0, {K}) (foreground), -1 (background) or -2 (ignored), got a label {bad}"
            )


def sigmoid_focal_loss_labels(
    logits: Tensor,
    labels: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "sum",
    normalizer: Optional[Union[float, Tensor]] = None,
    label_smoothing: float = 0.0,
    check_labels: bool = True,
    weights: Optional[Tensor] = None,
) -> Tensor:
    """Sigmoid focal loss of ``logits`` against integer labels, never building a one-hot.

    Args:
        logits (Tensor[N, K]): class logits of N anchors, float32/float64/float16/bfloat16.
        labels (Tensor[N], int64): ``[0, K)`` foreground class, ``-1`` background (all K
            targets 0), ``-2`` ignored (zero loss and zero gradient), as ``match_anchors``
            gives them.
        alpha, gamma: as in :func:`sigmoid_focal_loss`.
        reduction: ``'none'`` (Tensor[N, K] in the logits' dtype), ``'sum'``, or ``'mean'``
            (the sum divided by K times the number of non-ignored rows; NaN if there are
            none, as ``torch.mean`` of nothing).
        normalizer: float or 0-d tensor the result is divided by (e.g. the number of
            foreground anchors).
        label_smoothing: ``s`` in [0, 1], as NVIDIA apex's fused focal loss (MLPerf RetinaNet)
            and EfficientDet's official loss define it: only the cross-entropy sees the
            smoothed targets ``1 - s/2`` and ``s/2``; the alpha weight and the modulating
            factor ``(1 - p_t)^gamma`` use the unsmoothed 1 and 0.
        check_labels: on CUDA, validate the label range first (one device sync). The CPU
            kernel always validates, at no extra cost. Labels out of range never read
            memory out of bounds; unchecked, they behave as background.
        weights (Tensor[N], optional): row i's loss is multiplied by ``weights[i]`` inside the
            kernel, e.g. ``1 / (B * max(1, foreground anchors of i's image))``: a detector's
            per-image normalisation then needs one ``reduction='sum'`` call over the whole
            batch and no [N, K] intermediate. Not differentiated (detach it).

    Returns:
        The loss; reduced results are float32 (float64 for float64 logits) whatever the
        logits' dtype, since a sum over millions of half elements overflows half.
    """
    code = _reduction_code(reduction)
    _check_alpha(alpha)
    if check_labels:
        _check_label_range(logits, labels)
    if code != 0 and _fuse_backward(logits) and (weights is None or not weights.requires_grad):
        loss = _ops.sigmoid_focal_loss_labels_with_grad(logits, labels, weights, float(alpha), float(gamma), code,
                                                        float(label_smoothing))[0]
    else:
        loss = _ops.sigmoid_focal_loss_labels(logits, labels, weights, float(alpha), float(gamma), code,
                                              float(label_smoothing))
    if normalizer is not None:
        if isinstance(normalizer, Tensor):  # refines the Union for TorchScript
            loss = loss / normalizer
        else:
            loss = loss / float(normalizer)
    return loss


# ---------------------------------------------------------------- fake (meta) kernels


def _reduced_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _same_device(op: str, **tensors) -> None:
    # The device kernels check this; the fake kernels must too, or a meta tensor mixed with a
    # CPU one would reach this fake and return an uninitialised CPU tensor.
    (n0, t0), *rest = tensors.items()
    for n, t in rest:
        if t is not None:
            torch._check(
                t.device == t0.device,
                lambda: f"retina_fast::{op}: expected {n0} and {n} on the same device, got {n0} on {t0.device} and {n} on {t.device}",
            )


@torch.library.register_fake("retina_fast::sigmoid_focal_loss")
def _dense_fake(inputs, targets, alpha, gamma, reduction):
    _same_device("sigmoid_focal_loss", inputs=inputs, targets=targets)
    torch._check(inputs.shape == targets.shape, lambda: "targets must have the shape of inputs")
    if reduction == 0:
        return inputs.new_empty(inputs.shape)
    return inputs.new_empty(())


@torch.library.register_fake("retina_fast::sigmoid_focal_loss_backward")
def _dense_bwd_fake(grad, inputs, targets, alpha, gamma, reduction):
    return inputs.new_empty(inputs.shape)


@torch.library.register_fake("retina_fast::sigmoid_focal_loss_backward_with_targets")
def _dense_bwd2_fake(grad, inputs, targets, alpha, gamma, reduction):
    return inputs.new_empty(inputs.shape), targets.new_empty(targets.shape)


@torch.library.register_fake("retina_fast::sigmoid_focal_loss_labels")
def _labels_fake(logits, labels, weights, alpha, gamma, reduction, label_smoothing):
    _same_device("sigmoid_focal_loss_labels", logits=logits, labels=labels, weights=weights)
    torch._check(logits.dim() == 2, lambda: "logits must be [N, K]")
    torch._check(labels.dim() == 1 and labels.shape[0] == logits.shape[0], lambda: "labels must be [N]")
    if weights is not None:
        torch._check(weights.dim() == 1 and weights.shape[0] == logits.shape[0], lambda: "weights must be [N]")
    if reduction == 0:
        return logits.new_empty(logits.shape)
    return logits.new_empty((), dtype=_reduced_dtype(logits.dtype))


@torch.library.register_fake("retina_fast::sigmoid_focal_loss_labels_backward")
def _labels_bwd_fake(grad, logits, labels, weights, alpha, gamma, reduction, label_smoothing):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("retina_fast::sigmoid_focal_loss_labels_with_grad")
def _labels_with_grad_fake(logits, labels, weights, alpha, gamma, reduction, label_smoothing):
    torch._check(reduction == 1 or reduction == 2, lambda: "reduction must be 1 (mean) or 2 (sum)")
    return _labels_fake(logits, labels, weights, alpha, gamma, reduction, label_smoothing), logits.new_empty(logits.shape)


@torch.library.register_fake("retina_fast::sigmoid_focal_loss_with_grad")
def _dense_with_grad_fake(inputs, targets, alpha, gamma, reduction):
    torch._check(reduction == 1 or reduction == 2, lambda: "reduction must be 1 (mean) or 2 (sum)")
    return _dense_fake(inputs, targets, alpha, gamma, reduction), inputs.new_empty(inputs.shape)


# ---------------------------------------------------------------- autograd


def _dense_setup(ctx, inputs, output):
    x, t, alpha, gamma, reduction = inputs
    ctx.save_for_backward(x, t)
    ctx.args = (alpha, gamma, reduction)


def _dense_backward(ctx, grad):
    x, t = ctx.saved_tensors
    gx = gt = None
    if ctx.needs_input_grad[1]:
        # soft targets that need a gradient (distillation): both in one kernel pass
        gx, gt = _ops.sigmoid_focal_loss_backward_with_targets(grad, x, t, *ctx.args)
        if not ctx.needs_input_grad[0]:
            gx = None
    elif ctx.needs_input_grad[0]:
        gx = _ops.sigmoid_focal_loss_backward(grad, x, t, *ctx.args)
    return gx, gt, None, None, None


def _labels_setup(ctx, inputs, output):
    logits, labels, weights, alpha, gamma, reduction, label_smoothing = inputs
    ctx.save_for_backward(logits, labels, weights)
    ctx.args = (alpha, gamma, reduction, label_smoothing)


def _labels_backward(ctx, grad):
    logits, labels, weights = ctx.saved_tensors
    if ctx.needs_input_grad[2]:
        raise NotImplementedError(
            "retina_fast.ops.sigmoid_focal_loss_labels: the gradient with respect to weights is "
            "not implemented; detach the weights"
        )
    gx = None
    if ctx.needs_input_grad[0]:
        gx = _ops.sigmoid_focal_loss_labels_backward(grad, logits, labels, weights, *ctx.args)
    return gx, None, None, None, None, None, None


def _with_grad_setup(ctx, inputs, output):
    # Saved with save_for_backward, so autograd releases it once the backward has run and can
    # hand the returned tensor on without a copy.
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])
    # the gradient output gets no gradient: no [N, K] zeros for it in the backward
    ctx.set_materialize_grads(False)


def _scaled(saved: Tensor, grad: Tensor) -> Tensor:
    # An upstream gradient of exactly 1 (loss.backward() on this loss, or on a sum of losses)
    # returns the saved gradient itself: no pass over it. Only checked on a plain CPU tensor,
    # where reading the value costs no device sync (not while tracing: data-dependent).
    if (type(grad) is Tensor and grad.device.type == "cpu" and not torch.compiler.is_compiling()
            and grad.item() == 1.0):
        return saved
    return saved * grad.to(saved.dtype)


def _dense_with_grad_backward(ctx, grad, _grad_of_grad):
    (saved,) = ctx.saved_tensors
    if grad is None:
        return None, None, None, None, None
    if ctx.needs_input_grad[1]:
        raise NotImplementedError(
            "retina_fast.ops.sigmoid_focal_loss: targets that need a gradient take the two-pass path; "
            "call the op sigmoid_focal_loss, not sigmoid_focal_loss_with_grad"
        )
    return _scaled(saved, grad), None, None, None, None


def _labels_with_grad_backward(ctx, grad, _grad_of_grad):
    (saved,) = ctx.saved_tensors
    if grad is None:
        return None, None, None, None, None, None, None
    if ctx.needs_input_grad[2]:
        raise NotImplementedError(
            "retina_fast.ops.sigmoid_focal_loss_labels: the gradient with respect to weights is "
            "not implemented; detach the weights"
        )
    return _scaled(saved, grad), None, None, None, None, None, None


torch.library.register_autograd("retina_fast::sigmoid_focal_loss", _dense_backward, setup_context=_dense_setup)
torch.library.register_autograd(
    "retina_fast::sigmoid_focal_loss_with_grad", _dense_with_grad_backward, setup_context=_with_grad_setup
)
torch.library.register_autograd(
    "retina_fast::sigmoid_focal_loss_labels_with_grad", _labels_with_grad_backward, setup_context=_with_grad_setup
)
torch.library.register_autograd(
    "retina_fast::sigmoid_focal_loss_labels", _labels_backward, setup_context=_labels_setup
)

# Under autocast the dense op runs in float32, like binary_cross_entropy_with_logits (so the
# result equals torchvision's under autocast). The labels op reads half/bfloat16 natively
# (float32 math, float32 reductions): upcasting [N, K] logits would cost a full copy.
for _device in ("cpu", "cuda"):
    torch.library.register_autocast("retina_fast::sigmoid_focal_loss", _device, torch.float32)
    torch.library.register_autocast("retina_fast::sigmoid_focal_loss_with_grad", _device, torch.float32)
