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


# ------------------------------------------------------------------ fused convolutions (oneDNN)

import copy  # noqa: E402
import io  # noqa: E402
import pickle  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from retina_fast.models.fuse import FusedConv2d, fast_eval_parts, fuse_pointwise  # noqa: E402

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs PyTorch's oneDNN")


@needs_onednn
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("conv", [(64, 256, 1, 1, 0), (32, 48, 3, 1, 1), (32, 40, 3, 2, 1), (3, 16, 7, 2, 3)])
def test_fused_conv_equals_conv_relu_add(conv, dtype, layout):
    cin, cout, k, stride, pad = conv
    g = torch.Generator().manual_seed(cin + cout + k)
    ref = nn.Conv2d(cin, cout, k, stride, pad)
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    ref = ref.to(dtype=dtype, memory_format=fmt)
    x = torch.randn(2, cin, 21, 18, generator=g).to(dtype).contiguous(memory_format=fmt)
    with torch.no_grad():
        y = F.conv2d(x.float(), ref.weight.float(), ref.bias.float(), ref.stride, ref.padding)
        r = torch.randn(y.shape, generator=g)
        plain, fused_relu, fused_add = (FusedConv2d(ref, relu=False), FusedConv2d(ref, relu=True),
                                        FusedConv2d(ref, relu=True))
        outs = [plain(x), fused_relu(x), fused_add(x, r.to(dtype))]
        # a second input shape, and the plain weight once MAX_PACKED_SHAPES shapes are held
        for hw in ((9, 30), (5, 5), (40, 7), (11, 11), (12, 3), (6, 6)):
            xs = torch.randn(1, cin, *hw, generator=g).to(dtype).contiguous(memory_format=fmt)
            ys = F.conv2d(xs.float(), ref.weight.float(), ref.bias.float(), ref.stride, ref.padding)
            tol = 1e-5 if dtype == torch.float32 else 2e-2 * ys.abs().max().item()
            torch.testing.assert_close(fused_relu(xs).float(), ys.relu(), rtol=1e-4 if tol == 1e-5 else 2e-2, atol=tol)
    assert len(fused_relu._packed) == FusedConv2d.MAX_PACKED_SHAPES
    want = [y, y.relu(), (y + r.to(dtype).float()).relu()]
    for got, exp in zip(outs, want):
        assert got.dtype == dtype and got.shape == exp.shape
        if dtype == torch.float32:
            torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)
        else:
            torch.testing.assert_close(got.float(), exp, rtol=2e-2, atol=2e-2 * exp.abs().max().item())
    with torch.no_grad():
        ref.weight.mul_(-1)  # in place: the reordered copies must be remade
        torch.testing.assert_close(plain(x).float(), -y + 2 * ref.bias.float().view(1, -1, 1, 1),
                                   rtol=1e-4 if dtype == torch.float32 else 2e-2,
                                   atol=1e-5 if dtype == torch.float32 else 2e-2 * y.abs().max().item())
    with pytest.raises(RuntimeError, match="for inference"):
        plain(x.clone().requires_grad_())
    for again in (copy.deepcopy(fused_relu), pickle.loads(pickle.dumps(fused_relu))):
        # oneDNN's reordered weights can be neither copied nor pickled: the copy makes its own
        assert again._packed is None and len(fused_relu._packed) > 0
        with torch.no_grad():
            torch.testing.assert_close(again(x), fused_relu(x), rtol=0, atol=0)


def _float64_error(model, images, fast):
    """max |head output - float64 head output| / scale, for the model's eval path ``fast`` or
    its modules as they are."""
    model.eval()
    batch = model.transform(images)[0].tensors
    with torch.no_grad():
        model.fast_inference = fast
        parts = fast_eval_parts(model, batch)
        assert (parts is not None) == fast
        parts = parts or (model.backbone, model.head)
        got = parts[1](list(parts[0](batch).values()))
        ref_model = copy.deepcopy(model).double()
        ref_model.fast_inference = False
        ref = ref_model.head(list(ref_model.backbone(batch.double()).values()))
    model.fast_inference = True
    return {k: ((got[k].double() - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref}


@needs_onednn
@pytest.mark.parametrize("name", ["v1-eps1e-5", "v2", "resnet18-fpn", "shapes-small"])
def test_fast_eval_path_is_as_accurate_as_float32(name):
    """The folded, fused eval copy against float64: within a few float32 roundings, as the
    model's own modules are (a wrong fold or a dropped ReLU/residual would be off by O(1))."""
    torch.manual_seed(0)
    model = _randomise_norms(MODELS[name][0]())
    exact = _float64_error(model, IMAGES, fast=False)
    fast = _float64_error(model, IMAGES, fast=True)
    for k in exact:
        assert exact[k] < 1e-5
        assert fast[k] < 4 * exact[k] + 2e-6, (k, fast[k], exact[k])


@needs_onednn
def test_eval_forward_runs_the_cached_fast_copy_and_keeps_it_current():
    torch.manual_seed(0)
    model = _randomise_norms(MODELS["v1-eps1e-5"][0]())
    with torch.no_grad():
        fast = model(IMAGES)
        cached = model.__dict__["_rf_fast_eval"][1]
        assert count_batchnorms(cached) == 0
        assert sum(isinstance(m, FusedConv2d) for m in cached.modules()) == 69  # 53 in R50 + 8 FPN + 10 head - 2 (P6/P7)
        model.fast_inference = False
        exact = model(IMAGES)
        model.fast_inference = True
    assert_same_detections(fast, exact, score_atol=1e-5, box_atol=1e-2, box_rtol=1e-4)
    assert list(model.state_dict()) == list(MODELS["v1-eps1e-5"][0]().state_dict())
    # a weight changed in place (an optimizer step, load_state_dict): the copy is remade
    with torch.no_grad():
        model.head.classification_head.cls_logits.bias.add_(1.0)
        after = model(IMAGES)
        assert model.__dict__["_rf_fast_eval"][1] is not cached
        model.fast_inference = False
        after_exact = model(IMAGES)
    assert_same_detections(after, after_exact, score_atol=1e-5, box_atol=1e-2, box_rtol=1e-4)
    assert float(after[0]["scores"][0]) > float(fast[0]["scores"][0])
    model.fast_inference = True
    # no copy where a graph is built, in training, or for a copy / pickle of the model
    with torch.no_grad():
        model(IMAGES)
    assert "_rf_fast_eval" in model.__dict__
    assert "_rf_fast_eval" not in copy.deepcopy(model).__dict__
    assert "_rf_fast_eval" not in pickle.loads(pickle.dumps(model)).__dict__
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    model.train()
    assert "_rf_fast_eval" not in model.__dict__
    model.eval()
    out = model(IMAGES)  # grad enabled, parameters require grad: the modules themselves
    assert "_rf_fast_eval" not in model.__dict__ and out[0]["scores"].requires_grad


@needs_onednn
def test_fast_eval_under_bfloat16_autocast_and_channels_last():
    torch.manual_seed(0)
    model = _randomise_norms(MODELS["v1-eps0"][0]()).to(memory_format=torch.channels_last)
    settings = resolve("bf16", True, "cpu")
    with torch.no_grad(), settings.autocast():
        fast = model(IMAGES)
        parts = model.__dict__["_rf_fast_eval"][1]
        model.fast_inference = False
        exact = model(IMAGES)
    fused = [m for m in parts.modules() if isinstance(m, FusedConv2d)]
    assert fused and all(m.weight.dtype == torch.bfloat16 for m in fused)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in fused if m.weight.shape[-1] > 1)
    for g, r in zip(fast, exact):
        assert g["scores"].dtype == torch.float32 and len(g["scores"]) > 0
        assert abs(float(g["scores"][0]) - float(r["scores"][0])) < 2e-2


@needs_onednn
def test_prepared_model_fuses_once_and_compiled_parts_are_left_alone():
    torch.manual_seed(0)
    model = _randomise_norms(MODELS["shapes-small"][0]())
    prepared = prepare_for_inference(model, resolve("fp32", True, "cpu"))
    assert prepared._rf_inference_prepared["pointwise"] > 0
    inner = getattr(prepared, "model", prepared)
    assert not inner.fast_inference  # already folded and fused: no second copy
    with torch.no_grad():
        prepared(IMAGES)
    assert "_rf_fast_eval" not in inner.__dict__
    assert fuse_pointwise(prepared) == 0
    plain = prepare_for_inference(model, resolve("fp32", True, "cpu"), pointwise=False)
    assert plain._rf_inference_prepared["pointwise"] == 0
    assert not any(isinstance(m, FusedConv2d) for m in plain.modules())
    model.backbone = torch.compile(model.backbone)
    batch = model.transform(IMAGES)[0].tensors
    with torch.no_grad():
        assert fast_eval_parts(model, batch) is None


@needs_onednn
def test_fast_eval_in_every_no_graph_mode_and_after_requires_grad_changes():
    """The copy built under inference_mode serves no_grad; with grad enabled it serves a model
    whose parameters were frozen after it was built (the copy's own never require grad: the
    unfused P6/P7 convolutions must not hand a FusedConv2d an input that does); a prepared
    model runs with grad enabled too."""
    torch.manual_seed(0)
    model = _randomise_norms(MODELS["resnet18-fpn"][0]())
    with torch.inference_mode():
        a = model(IMAGES)
    with torch.no_grad():
        b = model(IMAGES)
    model.requires_grad_(False)
    c = model(IMAGES)  # grad enabled, nothing requires grad: the same copy
    parts = model.__dict__["_rf_fast_eval"][1]
    assert not any(p.requires_grad for p in parts.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
        d = model(IMAGES)
    with torch.no_grad():
        e = model(IMAGES)  # float32 again: the copy is remade
    for x in (b, c, e):
        for g, r in zip(x, a):
            assert torch.equal(g["scores"], r["scores"]) and torch.equal(g["boxes"], r["boxes"])
    assert all(len(g["scores"]) > 0 for g in d)
    prepared = prepare_for_inference(model.requires_grad_(True), resolve("fp32", True, "cpu"))
    assert not any(p.requires_grad for p in prepared.parameters())
    out = prepared(IMAGES)  # grad enabled
    assert not out[0]["scores"].requires_grad


def test_containers_with_a_forward_of_their_own_are_left_alone():
    """A Sequential subclass whose forward does not chain its children (here: the ReLU applied
    to the input, not the conv's output) is neither folded nor fused: doing so would change
    what it computes."""

    class Skip(nn.Sequential):
        def forward(self, x):
            return self[0](self[2](x)) + self[1](x).sum() * 0

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_var.fill_(4.0)
    model = nn.Sequential(Skip(nn.Conv2d(4, 4, 3, padding=1), bn, nn.ReLU()), nn.Conv2d(4, 4, 1), nn.ReLU()).eval()
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        want = model(x)
        prepared = prepare_for_inference(model, resolve("fp32", True, "cpu"))
        got = prepared(x)
    assert type(prepared[0][2]) is nn.ReLU and isinstance(prepared[0][1], nn.BatchNorm2d)
    assert isinstance(prepared[1], FusedConv2d) and prepared[1].relu  # the outer Sequential is plain
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
