"""FrozenBatchNorm2d folded into its convolution in training (retina_fast.models.backbone):
the same losses and gradients as torchvision's modules computing ``x * scale + bias`` after
each convolution, float32 and under bfloat16 autocast; eval and BatchNorm2d models unchanged."""

import copy

import pytest
import torch
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from retina_fast.engine import speed
from retina_fast.models import retinanet_resnet50_fpn, retinanet_resnet_fpn
from retina_fast.models.backbone import _FoldingBasicBlock, _FoldingBody, _FoldingBottleneck, conv_frozen_bn

SMALL = {"min_size": 128, "max_size": 160}


def _torchvision_classes(model):
    """A copy whose body and blocks are torchvision's own classes (unfolded FrozenBatchNorm2d)."""
    back = {_FoldingBody: IntermediateLayerGetter, _FoldingBottleneck: resnet.Bottleneck,
            _FoldingBasicBlock: resnet.BasicBlock}
    model = copy.deepcopy(model)
    for m in model.modules():
        if type(m) in back:
            m.__class__ = back[type(m)]
    return model


def _frozen_stats(model, seed=0):
    # statistics away from the identity (a fresh FrozenBatchNorm2d is one), variances ~1e-2..1
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                n = m.weight.numel()
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.01)
    return model


def _step(model, images, targets, dtype=None):
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        losses = model(images, copy.deepcopy(targets))
    (losses["classification"] + losses["bbox_regression"]).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.mark.parametrize("build", ["r50-v1", "r18"])
def test_folded_frozen_bn_training_equals_torchvision_modules(build):
    torch.manual_seed(0)
    if build == "r50-v1":
        model = retinanet_resnet50_fpn("v1", num_classes=7, is_trained=True, bn_eps=1e-5, **SMALL)
    else:
        model = retinanet_resnet_fpn(18, "v1", 7, is_trained=True, trainable_backbone_layers=5, **SMALL)
    model = _frozen_stats(model)
    assert type(model.backbone.body) is _FoldingBody
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) > 0
    ref = _torchvision_classes(model)
    assert list(ref.state_dict()) == list(model.state_dict())
    images, targets = speed.example_inputs(2, 128, "cpu", seed=1)
    targets = [{"boxes": t["boxes"] * 0.25, "labels": t["labels"] % 7} for t in targets]
    got, got_g = _step(model, images, targets)
    want, want_g = _step(ref, images, targets)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert set(got_g) == set(want_g) and any(k.startswith("backbone.body") for k in got_g)
    for k in want_g:
        scale = want_g[k].abs().max().item()
        torch.testing.assert_close(got_g[k], want_g[k], rtol=1e-3, atol=1e-4 * scale + 1e-12, msg=k)
    # bfloat16 autocast: the same losses within bfloat16's rounding
    got16, _ = _step(model, images, targets, torch.bfloat16)
    want16, _ = _step(ref, images, targets, torch.bfloat16)
    for k in want16:
        assert abs(got16[k].item() - want[k].item()) < 0.03 * abs(want[k].item()) + 1e-3
        assert abs(want16[k].item() - want[k].item()) < 0.03 * abs(want[k].item()) + 1e-3
    # eval: torchvision's arithmetic (the modules' own forward), bit for bit
    model.eval(), ref.eval()
    model.fast_inference = ref.fast_inference = False
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        a, b = model.backbone(x), ref.backbone(x)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_conv_frozen_bn_is_the_conv_then_the_norm():
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, 2, 1, bias=True)  # a conv bias too: shift + b * s
    bn = _frozen_stats(torch.nn.Sequential(FrozenBatchNorm2d(16, eps=1e-5)))[0]
    x = torch.randn(2, 8, 11, 9, generator=g, dtype=torch.float64)
    conv, bn = conv.double(), bn.double()
    torch.testing.assert_close(conv_frozen_bn(conv, bn, x), bn(conv(x)), rtol=1e-12, atol=1e-12)


def test_batchnorm2d_models_train_as_before():
    torch.manual_seed(0)
    model = retinanet_resnet_fpn(18, "v1", 5, **SMALL)  # not trained: BatchNorm2d, batch statistics
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    ref = _torchvision_classes(model)
    images, targets = speed.example_inputs(2, 128, "cpu", seed=2)
    targets = [{"boxes": t["boxes"] * 0.25, "labels": t["labels"] % 5} for t in targets]
    got, got_g = _step(model, images, targets)
    want, want_g = _step(ref, images, targets)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(got_g[k], want_g[k]) for k in want_g)
