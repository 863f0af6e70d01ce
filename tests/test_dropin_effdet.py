"""retina_fast.patch_effdet(loss): effdet's own DetectionLoss is the oracle (values and gradients),
with and without label smoothing, the legacy focal loss, the jit loss, a DetBenchTrain."""

import pytest
import torch

import retina_fast
from tests.oracles import effdet_loss

LEVELS = [16, 8, 4, 2, 1]  # P3-P7 of a 128 px input
A = 9


def make_config(num_classes=90, label_smoothing=0.0, legacy_focal=False, jit_loss=False):
    from effdet.config import get_efficientdet_config

    cfg = get_efficientdet_config("tf_efficientdet_d0")
    cfg.num_classes = num_classes
    cfg.label_smoothing = label_smoothing
    cfg.legacy_focal = legacy_focal
    cfg.jit_loss = jit_loss
    return cfg


def make_inputs(K, B=2, seed=0, dtype=torch.float32):
    """effdet's loss inputs: per level logits [B, A*K, H, W], box codes [B, A*4, H, W], class
    targets [B, H, W, A] (class, -1 background, -2 ignored), box targets [B, H, W, A*4] (zero
    off the foreground), positives per image."""
    g = torch.Generator().manual_seed(seed)
    cls_out, box_out, cls_t, box_t = [], [], [], []
    for s in LEVELS:
        cls_out.append((torch.randn(B, A * K, s, s, generator=g) * 2 - 4).to(dtype).requires_grad_())
        box_out.append((torch.randn(B, A * 4, s, s, generator=g) * 0.1).to(dtype).requires_grad_())
        r = torch.rand(B, s, s, A, generator=g)
        labels = torch.where(r < 0.05, torch.randint(0, K, (B, s, s, A), generator=g),
                             torch.where(r < 0.1, torch.full_like(r, -2, dtype=torch.long), torch.full_like(r, -1, dtype=torch.long)))
        cls_t.append(labels)
        fg = (labels >= 0).repeat_interleave(4, -1)
        box_t.append(torch.randn(B, s, s, A * 4, generator=g) * 0.1 * fg)
    num_pos = torch.stack([sum((t[b] >= 0).sum() for t in cls_t) for b in range(B)]).float()
    return cls_out, box_out, cls_t, box_t, num_pos


def run(loss, inputs):
    cls_out, box_out = inputs[0], inputs[1]
    for t in cls_out + box_out:
        t.grad = None
    total, cls_l, box_l = loss(*inputs)
    (total * 1.7).backward()
    return (total.detach(), cls_l.detach(), box_l.detach(),
            [t.grad.clone() for t in cls_out], [t.grad.clone() for t in box_out])


def assert_same(ours, theirs, dtype=torch.float32):
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-3)
    for name, o, t in zip(("total", "class", "box"), ours[:3], theirs[:3]):
        assert o.dtype == t.dtype
        torch.testing.assert_close(o, t, **tol, msg=lambda m: f"{name} loss: {m}")
    for what, os_, ts in (("class logits", ours[3], theirs[3]), ("box codes", ours[4], theirs[4])):
        for lvl, (o, t) in enumerate(zip(os_, ts)):
            scale = float(t.abs().max())  # elementwise gradients: within float32 rounding of the largest
            torch.testing.assert_close(o, t, rtol=1e-4, atol=1e-5 * scale if dtype == torch.float32 else 1e-2 * scale,
                                       msg=lambda m: f"{what} gradient, level {lvl}: {m}")


@pytest.mark.parametrize("label_smoothing, legacy, jit", [(0.0, False, False), (0.1, False, False),
                                                          (0.0, True, False), (0.1, False, True)])
def test_equals_effdet_loss_and_gradients(label_smoothing, legacy, jit):
    L = effdet_loss()
    K = 90
    loss = L.DetectionLoss(make_config(K, label_smoothing, legacy, jit))
    inputs = make_inputs(K)
    theirs = run(loss, inputs)
    assert retina_fast.patch_effdet(loss) is loss
    ours = run(loss, inputs)
    assert_same(ours, theirs)
    retina_fast.unpatch_effdet(loss)
    assert "forward" not in loss.__dict__
    assert_same(run(loss, inputs), theirs)


def test_smoothing_matters():
    """The oracle sees label smoothing (the test above would not notice it ignored)."""
    L = effdet_loss()
    inputs = make_inputs(20, seed=1)
    a = L.DetectionLoss(make_config(20, 0.0))(*inputs)[1]
    b = retina_fast.patch_effdet(L.DetectionLoss(make_config(20, 0.1)))(*inputs)[1]
    assert float((a - b).abs()) > 1e-3 * float(a.abs())


def test_half_logits():
    """AMP: half logits (effdet upcasts them with .float(); ours computes in float32 inside)."""
    L = effdet_loss()
    K = 20
    inputs = make_inputs(K, seed=2, dtype=torch.float16)
    loss = L.DetectionLoss(make_config(K, 0.1))
    theirs = run(loss, inputs)
    ours = run(retina_fast.patch_effdet(loss), inputs)
    assert_same(ours, theirs, torch.float16)


def test_det_bench_train_and_idempotence():
    L = effdet_loss()

    class Bench(torch.nn.Module):  # effdet's DetBenchTrain keeps its loss as .loss_fn
        def __init__(self, loss):
            super().__init__()
            self.loss_fn = loss

    loss = L.DetectionLoss(make_config(20))
    bench = Bench(loss)
    assert retina_fast.patch_effdet(bench) is bench
    patched_forward = loss.__dict__["forward"]
    retina_fast.patch_effdet(loss)  # already patched: unchanged
    assert loss.__dict__["forward"] is patched_forward
    retina_fast.unpatch_effdet(bench)
    assert "forward" not in loss.__dict__
    retina_fast.unpatch_effdet(bench)  # no-op


def test_bad_input():
    L = effdet_loss()
    with pytest.raises(TypeError, match="DetectionLoss"):
        retina_fast.patch_effdet(torch.nn.Linear(2, 2))
    loss = retina_fast.patch_effdet(L.DetectionLoss(make_config(20)))
    cls_out, box_out, cls_t, box_t, num_pos = make_inputs(20, seed=3)
    bad = [t.clone() for t in cls_t]
    bad[0][0, 0, 0, 0] = 20  # a class >= num_classes
    with pytest.raises(RuntimeError, match="label"):
        loss(cls_out, box_out, bad, box_t, num_pos)
    with pytest.raises(ValueError, match="num_classes=20"):
        loss([c[:, :-1] for c in cls_out], box_out, cls_t, box_t, num_pos)
