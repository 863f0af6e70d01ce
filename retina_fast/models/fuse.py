"""An eval model made ready for fast inference: BatchNorms folded into their convolutions,
weights held in the run's precision and memory format.

:func:`fold_batchnorms` (in place) folds every BatchNorm that directly follows a ``Conv2d``
into that convolution: ``W' = W * s``, ``b' = beta + (b - mean) * s`` per output channel with
``s = gamma / sqrt(var + eps)``, and replaces the norm by ``nn.Identity``. In inference a
BatchNorm is an affine map of its conv's output, so the model computes the same function with
one pass over the feature map fewer (``native_batch_norm`` was 12 % of R50-FPN inference
under channels_last + bfloat16 on the CPU). A pair is found structurally, not from a list of
model classes: consecutive children of an ``nn.Sequential`` (``Conv2dNormActivation``, a
ResNet ``downsample``, shapes-small's stages) and children named ``convN`` / ``bnN`` of one
parent (torchvision's ResNet stem, ``Bottleneck``, ``BasicBlock``, whose forwards feed
``convN`` only to ``bnN``). Folded: ``torchvision.ops.misc.FrozenBatchNorm2d`` (its ``eps``:
torchvision's v1 COCO weights use 0.0) and ``BatchNorm2d`` in eval mode with running
statistics. A BatchNorm in training mode normalises by the batch's statistics, not an affine
map: it is left alone, as are GroupNorm (statistics of each input) and any norm not fed by a
conv.

:func:`prepare_for_inference` returns a copy of the model (the caller's and its
``state_dict`` untouched) in eval mode with its BatchNorms folded and, for
:class:`~retina_fast.engine.precision.RunSettings` ``settings``, the convolutions' weights in
channels_last and in the autocast dtype (bfloat16/float16): autocast then finds them already
cast instead of copying every weight at every call (``copy_`` was 6-9 % of the same profile).
Norm layers that remain (GroupNorm) keep float32 parameters, which autocast's float32 ops
want. The copy must be called under ``settings.autocast()``; detections stay float32 (the
post-processing upcasts the head's outputs).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["fold_batchnorms", "prepare_for_inference", "count_batchnorms"]

_BN_TYPES = (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)


def count_batchnorms(module: nn.Module) -> int:
    """The BatchNorm modules (``_BatchNorm`` subclasses and ``FrozenBatchNorm2d``) in ``module``."""
    return sum(isinstance(m, _BN_TYPES) for m in module.modules())


def _affine(bn: nn.Module):
    """``(scale, shift)`` of an inference-mode BatchNorm, float64, or None when ``bn`` is not an
    affine map (training mode, no running statistics)."""
    if isinstance(bn, FrozenBatchNorm2d):
        w, b, mean, var, eps = bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps
    elif isinstance(bn, nn.modules.batchnorm._BatchNorm):
        if bn.training or bn.running_mean is None or bn.running_var is None:
            return None
        ones = torch.ones_like(bn.running_var)
        w = bn.weight if bn.weight is not None else ones
        b = bn.bias if bn.bias is not None else ones * 0
        mean, var, eps = bn.running_mean, bn.running_var, bn.eps
    else:
        return None
    # float64: the folded float32 weights then carry one rounding, as the unfolded product does.
    scale = w.detach().double() * (var.detach().double() + eps).rsqrt()
    return scale, b.detach().double() - mean.detach().double() * scale


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.Module) -> bool:
    affine = _affine(bn)
    if affine is None or affine[0].numel() != conv.out_channels:
        return False
    scale, shift = affine
    w = conv.weight
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    new_w = (w.detach().double() * scale.to(w.device).view(-1, 1, 1, 1)).to(w.dtype)
    new_b = (shift.to(w.device) + bias.to(w.device) * scale.to(w.device)).to(w.dtype)
    conv.weight = nn.Parameter(new_w.contiguous(memory_format=_format_of(w)), requires_grad=w.requires_grad)
    conv.bias = nn.Parameter(new_b, requires_grad=w.requires_grad)
    return True


def _format_of(t: torch.Tensor):
    return torch.channels_last if (t.dim() == 4 and not t.is_contiguous()
                                   and t.is_contiguous(memory_format=torch.channels_last)) else torch.contiguous_format


def _pairs(parent: nn.Module):
    """``(conv name, norm name)`` pairs of ``parent``'s direct children where the norm directly
    follows the conv: consecutive in an ``nn.Sequential``, or named ``convN`` / ``bnN``."""
    children = dict(parent.named_children())
    if isinstance(parent, nn.Sequential):
        names = list(children)
        for a, b in zip(names, names[1:]):
            if isinstance(children[a], nn.Conv2d) and isinstance(children[b], _BN_TYPES):
                yield a, b
        return
    for name, child in children.items():
        if name.startswith("bn") and name[2:].isdigit() and isinstance(child, _BN_TYPES):
            conv = children.get("conv" + name[2:])
            if isinstance(conv, nn.Conv2d):
                yield "conv" + name[2:], name


def fold_batchnorms(module: nn.Module) -> int:
    """Fold every inference-mode BatchNorm that directly follows a ``Conv2d`` into it, in place,
    and replace the norm by ``nn.Identity`` (see the module docstring). Returns how many were
    folded; BatchNorms in training mode are left as they are (not counted)."""
    folded = 0
    for parent in list(module.modules()):
        for conv_name, bn_name in list(_pairs(parent)):
            if _fold(getattr(parent, conv_name), getattr(parent, bn_name)):
                setattr(parent, bn_name, nn.Identity())
                folded += 1
    return folded


_LOW_PRECISION_MODULES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def prepare_for_inference(model: nn.Module, settings=None, fold: bool = True) -> nn.Module:
    """A new module for inference: ``copy.deepcopy(model)`` in eval mode (so a BatchNorm in
    training mode is folded with its running statistics, as eval would use them), its
    BatchNorms folded (``fold``), then for ``settings`` (a
    :class:`~retina_fast.engine.precision.RunSettings`; None: float32, NCHW) converted to
    channels_last and with the convolutions' and linear layers' parameters in
    ``settings.dtype``. Call it under ``settings.autocast()``. The copy's attribute
    ``_rf_inference_prepared`` holds ``settings.as_dict()`` plus ``folded`` (the count)."""
    prepared = copy.deepcopy(model).eval()
    n = fold_batchnorms(prepared) if fold else 0
    if settings is not None:
        if settings.channels_last:
            prepared = prepared.to(memory_format=torch.channels_last)
        if settings.dtype is not None:
            for m in prepared.modules():
                if isinstance(m, _LOW_PRECISION_MODULES):
                    m.to(settings.dtype)
    info = dict(settings.as_dict()) if settings is not None else {"precision": "fp32", "channels_last": False}
    info["folded"] = n
    prepared._rf_inference_prepared = info
    if settings is not None and settings.dtype is not None:
        prepared.register_forward_pre_hook(_require_autocast)
    return prepared


def _require_autocast(module, args):
    # Without autocast the float32 images would meet bfloat16 weights in the first conv: say
    # what to do instead of PyTorch's "Input type (float) and bias type ... should be the same".
    info = module._rf_inference_prepared
    if not torch.is_autocast_enabled(info["device"]):
        raise RuntimeError(f"this model was prepared for {info['precision']} (its convolutions hold "
                           f"{info['precision']} weights): call it under settings.autocast()")
