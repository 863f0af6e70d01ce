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

On the CPU (float32 or bfloat16, oneDNN) :func:`fuse_pointwise` then makes each convolution a
:class:`FusedConv2d`: oneDNN's convolution with the ReLU and the residual add that follow it as
post-ops, its weight reordered once per input shape. :func:`fast_eval_parts` is the same for a
model used directly: ``RetinaNet``'s eval forward runs a folded, fused copy of its backbone and
head that it keeps, remakes when a weight changes and drops in training
(``model.fast_inference = False``: the modules as they are).
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

from retina_fast.models.backbone import _FoldingBasicBlock, _FoldingBody, _FoldingBottleneck

__all__ = ["fold_batchnorms", "prepare_for_inference", "count_batchnorms", "fuse_pointwise", "FusedConv2d",
           "pointwise_fusion_available"]

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


def _runs_children_in_order(parent: nn.Module) -> bool:
    """An ``nn.Sequential`` (or a subclass that keeps its forward: ``Conv2dNormActivation``) or
    torchvision's ``IntermediateLayerGetter`` (ours folds FrozenBatchNorm2d in training and runs
    its children in order in eval): each child's output is the next child's only input. A
    subclass with a forward of its own may not, and is left alone."""
    forward = type(parent).forward
    return ((isinstance(parent, nn.Sequential) and forward is nn.Sequential.forward)
            or (isinstance(parent, IntermediateLayerGetter)
                and forward in (IntermediateLayerGetter.forward, _FoldingBody.forward)))


def _pairs(parent: nn.Module):
    """``(conv name, norm name)`` pairs of ``parent``'s direct children where the norm directly
    follows the conv: consecutive in an ``nn.Sequential``, or named ``convN`` / ``bnN``."""
    children = dict(parent.named_children())
    if _runs_children_in_order(parent):
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


def prepare_for_inference(model: nn.Module, settings=None, fold: bool = True,
                          pointwise: bool | None = None) -> nn.Module:
    """A new module for inference: ``copy.deepcopy(model)`` in eval mode (so a BatchNorm in
    training mode is folded with its running statistics, as eval would use them), its
    BatchNorms folded (``fold``), then for ``settings`` (a
    :class:`~retina_fast.engine.precision.RunSettings`; None: float32, NCHW) converted to
    channels_last and with the convolutions' and linear layers' parameters in
    ``settings.dtype``; then (``pointwise``; None: where :func:`pointwise_fusion_available`
    for ``settings``, which must be given) every plain convolution made a :class:`FusedConv2d`
    (:func:`fuse_pointwise`: the ReLU and the residual add that follow it computed inside
    oneDNN's convolution). Call it under ``settings.autocast()``. The copy's attribute
    ``_rf_inference_prepared`` holds ``settings.as_dict()`` plus ``folded`` (the count) and
    ``pointwise`` (the convolutions made :class:`FusedConv2d`); where that is not 0 no
    parameter of the copy requires grad."""
    prepared = copy.deepcopy(model).eval()
    n = fold_batchnorms(prepared) if fold else 0
    if settings is not None:
        if settings.channels_last:
            prepared = prepared.to(memory_format=torch.channels_last)
        if settings.dtype is not None:
            for m in prepared.modules():
                if isinstance(m, _LOW_PRECISION_MODULES):
                    m.to(settings.dtype)
    if pointwise is None:
        pointwise = settings is not None and pointwise_fusion_available(settings)
    fused = fuse_pointwise(prepared) if pointwise else 0
    if fused:
        # FusedConv2d has no backward: no parameter of the copy may make its input require grad
        # (the P6/P7 convolutions, GroupNorm stay plain modules), so it runs with grad enabled too
        prepared.requires_grad_(False)
    for m in prepared.modules():
        if hasattr(m, "fast_inference"):
            m.fast_inference = False  # already prepared: no second copy (fast_eval_parts)
    info = dict(settings.as_dict()) if settings is not None else {"precision": "fp32", "channels_last": False}
    info["folded"] = n
    info["pointwise"] = fused
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


# ---------------------------------------------------------------------------------------------
# Convolution + ReLU (+ residual add) in one oneDNN call, for inference on the CPU.


def pointwise_fusion_available(settings) -> bool:
    """Whether :func:`fuse_pointwise` applies for ``settings`` (a ``RunSettings``): a CPU run in
    float32 or bfloat16 with PyTorch's oneDNN (``torch.ops.mkldnn._convolution_pointwise``)."""
    return (torch.device(settings.device).type == "cpu" and settings.dtype in (None, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


def _plain_conv(conv: nn.Module, any_class: bool = False) -> bool:
    """An ``nn.Conv2d`` (exactly, unless ``any_class``: a subclass may change its forward) with
    zero padding given as numbers: what oneDNN's fused convolution computes."""
    return ((isinstance(conv, nn.Conv2d) if any_class else type(conv) is nn.Conv2d)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


class FusedConv2d(nn.Module):
    """An inference-only ``nn.Conv2d`` (its BatchNorm already folded in) computed by oneDNN
    with what follows it as post-ops: ``relu(conv(x) + bias [+ residual])``, or the bare
    convolution (``relu=False``).

    Against ``conv``, ReLU, ``add_`` as three ops, the output is written once instead of three
    times (a ResNet-50 bottleneck's 1x1 expansion at 128x128, bfloat16 channels_last on the
    2-core CPU: 2.6 ms -> 1.4 ms). The weight is also reordered once into oneDNN's blocked
    layout, at the first call (``mkldnn_reorder_conv2d_weight``), instead of at every call
    (0.45 -> 0.27 ms for a 3x3 256-channel float32 convolution of an 8x8 map, 2.2 -> 0.85 ms
    for the 819-channel classifier there), one copy per input shape (at most
    ``MAX_PACKED_SHAPES``: the memory of the weights at most that many times over), remade
    when the weight changes (``_version``, dtype, storage). The residual is added
    in float32 before the single rounding to bfloat16 (the unfused ops round twice), so
    bfloat16 results differ from the unfused ones by a rounding; float32 agrees to float32
    tolerance. The output is channels_last whatever the input's layout (oneDNN's choice). The
    input is cast to the weight's dtype, as autocast would (oneDNN's op is not
    on autocast's lists). No autograd: its parameters do not require grad, and it refuses
    an input that does."""

    def __init__(self, conv: nn.Conv2d, relu: bool):
        super().__init__()
        if not _plain_conv(conv, any_class=True):
            raise ValueError(f"FusedConv2d: needs zero padding given as numbers, got padding={conv.padding!r}, "
                             f"padding_mode={conv.padding_mode!r}")
        self.weight = nn.Parameter(conv.weight.detach(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
        self.stride, self.padding, self.dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        self.groups = conv.groups
        self.relu = relu
        self._packed = None
        self._packed_key = None

    def extra_repr(self) -> str:
        w = self.weight
        return (f"{w.shape[1] * self.groups}, {w.shape[0]}, kernel_size={tuple(w.shape[2:])}, stride={self.stride}, "
                f"padding={self.padding}, relu={self.relu}")

    def __getstate__(self):
        # oneDNN's reordered weights are opaque tensors that can be neither copied nor pickled:
        # a copy (deepcopy, pickle, torch.save) makes its own at its first call.
        state = dict(self.__dict__)
        state["_packed"] = state["_packed_key"] = None
        return state

    #: input shapes per convolution with a reordered weight of their own (RetinaNet's head
    #: sees 5 pyramid levels); further shapes use the plain weight, which oneDNN reorders per call
    MAX_PACKED_SHAPES = 5

    def _packed_weight(self, x):
        # oneDNN picks the blocked layout for an input shape: a weight reordered for P3's 64x64
        # and used on P7's 4x4 ran 25-40x slower than the plain weight (256 -> 36 channels), so
        # each input shape gets its own. The cache is dropped when the weight changes.
        w = self.weight
        key = _tensor_key(w)
        if self._packed_key != key:
            self._packed, self._packed_key = {}, key
        shape = tuple(x.shape)
        packed = self._packed.get(shape)
        if packed is None:
            if len(self._packed) >= self.MAX_PACKED_SHAPES:
                return w
            with torch.no_grad():
                packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                    w.detach().to_mkldnn(), self.padding, self.stride, self.dilation, self.groups, list(shape))
            self._packed[shape] = packed
        return packed

    def forward(self, x, residual=None):
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("FusedConv2d is for inference (it has no backward): got an input that requires grad")
        w = self.weight
        if x.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16):
            raise RuntimeError(f"FusedConv2d: oneDNN on the CPU in float32 or bfloat16, got a {x.device.type} "
                               f"input and {w.dtype} weights")
        x = x.to(w.dtype)
        packed = self._packed_weight(x)
        unary = "relu" if self.relu else "none"
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, packed, self.bias, self.padding, self.stride,
                                                          self.dilation, self.groups, unary, [], "")
        residual = residual.to(w.dtype).contiguous(memory_format=_format_of(x))
        return torch.ops.mkldnn._convolution_pointwise(x, residual, packed, self.bias, self.padding, self.stride,
                                                      self.dilation, self.groups, "add", 1.0,
                                                      "relu" if self.relu else None, [], "")


#: torchvision's residual blocks and ours (the same blocks, folding FrozenBatchNorm2d in training)
_RESIDUAL_BLOCKS = (Bottleneck, BasicBlock, _FoldingBottleneck, _FoldingBasicBlock)


class _FusedResidualBlock(nn.Module):
    """torchvision's ``Bottleneck`` / ``BasicBlock`` after :func:`fold_batchnorms`, each
    convolution a :class:`FusedConv2d`: the last one adds the shortcut and applies the ReLU."""

    def __init__(self, block: nn.Module):
        super().__init__()
        convs = tuple(f"conv{i}" for i in _block_layers(block))
        for name in convs:
            setattr(self, name, FusedConv2d(getattr(block, name), relu=True))
        self.convs = convs
        self.downsample = block.downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = x
        for name in self.convs[:-1]:
            out = getattr(self, name)(out)
        return getattr(self, self.convs[-1])(out, identity)


def _block_layers(block: nn.Module) -> range:
    """The numbers of a residual block's conv / bn pairs (``conv1`` / ``bn1`` ...)."""
    return range(1, 4 if isinstance(block, Bottleneck) else 3)


def _block_is_folded(block: nn.Module) -> bool:
    return all(isinstance(getattr(block, f"bn{i}"), nn.Identity) and _plain_conv(getattr(block, f"conv{i}"))
               for i in _block_layers(block))


def fuse_pointwise(module: nn.Module) -> int:
    """Make, in place, every plain ``nn.Conv2d`` of an inference model (BatchNorms already
    folded: :func:`fold_batchnorms`) a :class:`FusedConv2d`: in a container that runs its
    children in order (``nn.Sequential``, torchvision's ``IntermediateLayerGetter``: the
    ResNet stem) a conv followed, past folded norms (``nn.Identity``), by ``nn.ReLU`` takes the
    ReLU (which becomes ``nn.Identity``); torchvision's ``Bottleneck`` and ``BasicBlock`` with
    folded norms become blocks whose last convolution also adds the shortcut. Returns the
    number of convolutions made :class:`FusedConv2d`. CPU only (oneDNN)."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in _RESIDUAL_BLOCKS and _block_is_folded(child):
                fused = _FusedResidualBlock(child)
                setattr(parent, name, fused)
                count += len(fused.convs)
    for parent in list(module.modules()):
        if isinstance(parent, FusedConv2d):
            continue
        children = list(parent.named_children())
        ordered = _runs_children_in_order(parent)
        for i, (name, child) in enumerate(children):
            if not _plain_conv(child):
                continue
            relu_at = None
            if ordered:
                j = i + 1
                while j < len(children) and isinstance(children[j][1], nn.Identity):
                    j += 1
                if j < len(children) and type(children[j][1]) is nn.ReLU:
                    relu_at = children[j][0]
            setattr(parent, name, FusedConv2d(child, relu=relu_at is not None))
            if relu_at is not None:
                setattr(parent, relu_at, nn.Identity())
            count += 1
    return count


# ---------------------------------------------------------------------------------------------
# The eval forward of a model as the user holds it: a cached folded and fused copy.


class _InferenceParts(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head


def _tensor_key(t: torch.Tensor):
    """What changes when a tensor's values may have: its storage, in-place version, dtype, device."""
    return (t.data_ptr(), t._version, t.dtype, t.device)


def _tensors_key(module: nn.Module):
    return tuple(_tensor_key(t) for t in [*module.parameters(), *module.buffers()])


def fast_eval_parts(model: nn.Module, images: torch.Tensor):
    """``(backbone, head)`` for an eval forward of ``model`` (its ``backbone`` and ``head``) on
    the batch ``images``: a cached copy with the BatchNorms folded and the convolutions made
    :class:`FusedConv2d` (weights in the autocast dtype and in the model's memory format), or
    None where that does not apply and the model's own modules run.

    It applies on the CPU with oneDNN, with no autograd graph to build (``torch.no_grad()`` /
    ``torch.inference_mode()``, or no parameter and no input requiring grad), in float32 or
    under bfloat16 autocast, outside ``torch.compile`` / ``torch.export`` / tracing (and not
    where the backbone or head was given to ``torch.compile``), and while
    ``model.fast_inference`` is true (set it False for torchvision's exact arithmetic). The
    copy is remade when any parameter or buffer changes (storage or ``_version``: an
    optimizer step, ``load_state_dict``, ``.to()``), and dropped by ``model.train()`` and on
    copying or pickling the model. It costs one more copy of the backbone's and head's
    weights (in the run's dtype) plus oneDNN's reordered copies (:class:`FusedConv2d`)."""
    if images.device.type != "cpu":
        drop_fast_eval(model)  # the model moved off the CPU: free the CPU copy
        return None
    if not getattr(model, "fast_inference", False) or model.training:
        return None
    if torch.compiler.is_compiling() or torch.jit.is_scripting() or torch.jit.is_tracing():
        return None
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    if eval_frame is not None and any(isinstance(m, eval_frame.OptimizedModule) for m in (model.backbone, model.head)):
        return None  # the user compiled them: run what they compiled
    if torch.is_grad_enabled() and (images.requires_grad or any(p.requires_grad for p in model.parameters())):
        return None
    from retina_fast.engine.precision import RunSettings

    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    first = next((m.weight for m in model.backbone.modules() if isinstance(m, nn.Conv2d)), None)
    channels_last = first is not None and _format_of(first) == torch.channels_last
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype)
    if precision is None:
        return None
    settings = RunSettings(precision, channels_last, "cpu", False, "the model's eval forward")
    if not pointwise_fusion_available(settings):
        return None
    # the key holds every tensor's dtype: a copy it finds was built from float32 parameters
    key = (dtype, channels_last, _tensors_key(model.backbone), _tensors_key(model.head))
    cached = model.__dict__.get("_rf_fast_eval")
    if cached is not None and cached[0] == key:
        return cached[1].backbone, cached[1].head
    model.__dict__.pop("_rf_fast_eval", None)  # stale: free it first
    if dtype is None and any(p.dtype != torch.float32 for m in (model.backbone, model.head) for p in m.parameters()):
        return None
    with torch.inference_mode(False), torch.no_grad():
        parts = prepare_for_inference(_InferenceParts(model.backbone, model.head), settings, pointwise=True)
    parts._forward_pre_hooks.clear()  # the autocast check: this copy is only called from the model
    model.__dict__["_rf_fast_eval"] = (key, parts)
    return parts.backbone, parts.head


def drop_fast_eval(model: nn.Module) -> None:
    """Free the copy :func:`fast_eval_parts` keeps."""
    model.__dict__.pop("_rf_fast_eval", None)
