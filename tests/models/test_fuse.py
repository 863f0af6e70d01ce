"""BatchNorm folding and the inference-prepared model (retina_fast.models.fuse): the folded
model computes the unfolded one's function up to float32 rounding, on every model we build;
the caller's model is untouched; bfloat16 / channels_last copies give float32 detections close
to the float32 model's. Small inputs (128-160 px): CPU time is scarce."""

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from retina_fast.engine import build_model
from retina_fast.engine.precision import resolve
from retina_fast.models import retinanet_resnet50_fpn
from retina_fast.models.fuse import count_batchnorms, fold_batchnorms, prepare_for_inference
from tests.detections import assert_same_detections

IMAGES = [torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(0)),
          torch.rand(3, 150, 128, generator=torch.Generator().manual_seed(1))]
SMALL = {"min_size": 128, "max_size": 160}


def _randomise_norms(model, seed=0):
    """BatchNorm statistics and affine parameters away from the identity (a fresh BatchNorm
    folds into a near-no-op); the classification bias spread so that scores pass the
    threshold and post-processing has work. FrozenBatchNorm2d gets running variances ~1e-4
    (its weight scaled to match), as trained weights have, so that its eps (0 or 1e-5)
    changes the result: a fold that ignored it would fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                n = m.running_var.numel()
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if isinstance(m, FrozenBatchNorm2d):
                    m.running_var.mul_(1e-4)
                    m.running_mean.mul_(1e-2)
                    m.weight.mul_(m.running_var.sqrt())
        cls = model.head.classification_head.cls_logits.bias
        cls.copy_(torch.randn(cls.shape, generator=g) * 0.5 - 2.0)
    return model.eval()


def _v1(eps):
    return retinanet_resnet50_fpn("v1", num_classes=5, is_trained=True, bn_eps=eps, **SMALL)


MODELS = {
    # name: (builder, BatchNorm type, BatchNorms in the model)
    "v1-eps0": (lambda: _v1(0.0), FrozenBatchNorm2d, 53),
    "v1-eps1e-5": (lambda: _v1(1e-5), FrozenBatchNorm2d, 53),
    "v2": (lambda: retinanet_resnet50_fpn("v2", num_classes=5, **SMALL), nn.BatchNorm2d, 53),
    "shapes-small": (lambda: build_model("shapes-small", 3, min_size=128), nn.BatchNorm2d, 10),
    "resnet18-fpn": (lambda: build_model("resnet18-fpn", 3, **SMALL), nn.BatchNorm2d, 20),
}


def _head(model, images):
    batch = model.transform(images)[0].tensors
    return model.head(list(model.backbone(batch).values()))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_folded_model_equals_unfolded_at_float32_tolerance(name):
    build, bn_type, n_bn = MODELS[name]
    torch.manual_seed(0)
    model = _randomise_norms(build())
    assert count_batchnorms(model) == n_bn
    assert all(type(m) is bn_type for m in model.modules() if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)))
    if name == "v1-eps0":
        assert all(m.eps == 0.0 for m in model.modules() if isinstance(m, FrozenBatchNorm2d))
    before = _state(model)
    with torch.no_grad():
        ref_head, ref = _head(model, IMAGES), model(IMAGES)
        prepared = prepare_for_inference(model)
        got_head, got = _head(prepared, IMAGES), prepared(IMAGES)
    assert prepared is not model and not prepared.training
    assert prepared._rf_inference_prepared["folded"] == n_bn
    assert count_batchnorms(prepared) == 0
    groupnorms = sum(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in prepared.modules()) == groupnorms  # not foldable: kept
    # the caller's model: the same modules and bitwise the same state
    assert count_batchnorms(model) == n_bn
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    for k in ref_head:
        torch.testing.assert_close(got_head[k], ref_head[k], rtol=1e-4, atol=1e-4)
    assert all(len(r["scores"]) > 20 for r in ref)
    # near-tied scores may swap at the detections_per_img cut-off
    assert_same_detections(got, ref, score_atol=1e-5, box_atol=1e-3, ranks=250)


def test_generic_pairs_and_what_is_not_folded():
    """Sequential pairs (conv with a bias, BatchNorm without affine parameters), convN/bnN
    children, a norm after a non-conv, a BatchNorm in training mode."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
            self.conv2, self.bn3 = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)  # not a pair: numbers differ

        def forward(self, x):
            return self.bn3(self.conv2(self.bn1(self.conv1(x))))

    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
                          Block(), nn.ReLU(), nn.BatchNorm2d(6))  # the last follows a ReLU
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
        return m

    x = torch.randn(2, 3, 12, 12)
    m = make().eval()
    with torch.no_grad():
        ref = m(x)
        assert fold_batchnorms(m) == 2
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    assert isinstance(m[1], nn.Identity) and isinstance(m[3].bn1, nn.Identity)
    assert isinstance(m[3].bn3, nn.BatchNorm2d) and isinstance(m[5], nn.BatchNorm2d)
    assert fold_batchnorms(m) == 0  # nothing left to fold

    train = make().train()
    assert fold_batchnorms(train) == 0  # batch statistics: not an affine map
    assert count_batchnorms(train) == 4
    prepared = prepare_for_inference(train)  # the copy goes to eval first: running statistics
    assert train.training and count_batchnorms(train) == 4
    assert prepared._rf_inference_prepared["folded"] == 2 and not prepared.training
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), train.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["shapes-small", "v1-eps0"])
def test_bfloat16_prepared_model(name):
    torch.manual_seed(0)
    model = _randomise_norms(MODELS[name][0]())
    settings = resolve("bf16", True, "cpu")
    prepared = prepare_for_inference(model, settings)
    convs = [m for m in prepared.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.dtype == torch.bfloat16 and (c.bias is None or c.bias.dtype == torch.bfloat16) for c in convs)
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs if c.kernel_size != (1, 1))
    gns = [m for m in prepared.modules() if isinstance(m, nn.GroupNorm)]
    assert (len(gns) > 0) == (name == "shapes-small")
    assert all(p.dtype == torch.float32 for g in gns for p in g.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the caller's model
    info = prepared._rf_inference_prepared
    assert info["precision"] == "bf16" and info["channels_last"] and info["folded"] == MODELS[name][2]
    with torch.no_grad():
        ref_head, ref = _head(model, IMAGES), model(IMAGES)
        with settings.autocast():
            got_head, got = _head(prepared, IMAGES), prepared(IMAGES)
    with torch.no_grad(), pytest.raises(RuntimeError, match="prepared for bf16.*settings.autocast"):
        prepared(IMAGES)  # float32 images and bfloat16 weights: a clear error
    for k in ref_head:
        assert got_head[k].dtype == torch.bfloat16
        scale = float(ref_head[k].abs().max())
        torch.testing.assert_close(got_head[k].float(), ref_head[k], rtol=5e-2, atol=5e-2 * scale)
    for g, r in zip(got, ref):
        assert g["boxes"].dtype == torch.float32 and g["scores"].dtype == torch.float32
        assert len(g["scores"]) > 0
        assert abs(float(g["scores"][0]) - float(r["scores"][0])) < 2e-2


def test_channels_last_float32_gives_the_same_detections():
    torch.manual_seed(0)
    model = _randomise_norms(MODELS["shapes-small"][0]())
    nchw = prepare_for_inference(model, resolve("fp32", False, "cpu"))
    cl = prepare_for_inference(model, resolve("fp32", True, "cpu"))
    assert cl.backbone.stages[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(p.dtype == torch.float32 for p in cl.parameters())
    with torch.no_grad():
        a, b = nchw(IMAGES), cl(IMAGES)
    assert all(len(r["scores"]) > 20 for r in a)
    assert_same_detections(b, a, score_atol=1e-5, box_atol=1e-3, ranks=250)


def test_label_mapped_model_is_prepared_through_its_wrapper():
    from retina_fast.engine.model_factory import LabelMappedModel

    torch.manual_seed(0)
    inner = _randomise_norms(MODELS["shapes-small"][0]())
    wrapped = LabelMappedModel(inner, [2, 0], 3)
    settings = resolve("bf16", True, "cpu")
    prepared = prepare_for_inference(wrapped, settings)
    assert prepared._rf_inference_prepared["folded"] == 10 and count_batchnorms(wrapped) == 10
    assert prepared.lut.dtype == torch.int64
    with torch.no_grad(), settings.autocast():
        out = prepared(IMAGES)
    assert all(d["scores"].dtype == torch.float32 and set(d["labels"].tolist()) <= {0, 1} for d in out)
