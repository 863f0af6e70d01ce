"""Property-based fuzzing of the focal losses against torchvision (float64) and the reference:
results and gradients, every dtype, shapes with 0 and 1, NaN/inf/huge logits, soft targets,
non-contiguous and offset views. Profiles: tests/conftest.py ("ci" default, "long")."""

import torch
import torchvision
from hypothesis import assume, event, given, note
from hypothesis import strategies as st

from retina_fast.ops import _reference as ref
from retina_fast.ops import sigmoid_focal_loss, sigmoid_focal_loss_labels
from tests.fuzz.strategies import assert_close, dtypes, eps, finite_floats, layout, tensors, wild_floats

alphas = st.one_of(st.sampled_from([-1.0, 0.0, 0.25, 0.5, 1.0]), finite_floats(0.0, 1.0))
gammas = st.one_of(st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0]), finite_floats(0.0, 5.0))
reductions = st.sampled_from(["none", "mean", "sum"])
shapes = st.one_of(st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple),
                   st.tuples(st.integers(0, 40), st.integers(1, 5)))


def _tol(x64, e, dtype, soft):
    """Element-wise tolerance of a loss (or its gradient) at logits x64 against the float64
    value e: a few ulps of the value in the compute precision (float32 for 16-bit inputs, whose
    result is rounded once to the dtype: one ulp of the dtype), plus, with soft targets, the
    cancellation in max(x, 0) - x t, whose error scales with |x|. The "exact" side is
    torchvision's formula run in float64, whose log(e^-m + e^(-x-m)) is only accurate to
    ~eps64 * (|x| + 1) absolute: at x = -30 it is off by 1.3% relative (ours, in float32, by 6e-9).
    """
    comp = torch.float64 if dtype == torch.float64 else torch.float32
    t = 64 * eps(comp) * (e.abs() + (x64.abs() + 1 if soft else 0)) + 16 * eps(torch.float64) * (x64.abs() + 1)
    if dtype in (torch.float16, torch.bfloat16):
        t = t + eps(dtype) * e.abs() + torch.finfo(dtype).tiny
    return t + 1e-300


def _ref_err(x64, t64, gamma):
    """The float64 reference's own error where it matters: torchvision forms 1 - p_t by
    subtraction (absolute error ~eps64), which m^gamma (gamma < 1) and its derivative amplify by
    gamma m^(gamma - 1) where m = 1 - p_t is tiny (found by the long profile: float64, x = -18,
    gamma = 0.5, off by 4e-10 relative; ours forms m directly). m here is computed without the
    cancellation; ce <= |x| + 1."""
    p, q = torch.sigmoid(x64), torch.sigmoid(-x64)
    m = p * (1 - t64) + q * t64
    amp = gamma * m.clamp_min(1e-300) ** (gamma - 1) if gamma != 0 else torch.zeros_like(m)
    return (8 * eps(torch.float64) * (x64.abs() + 1) * amp).nan_to_num(float("inf"))


def _grad_close(ours, exact, tol, what, vanishing=True):
    """Gradients at finite inputs. Where autograd through torchvision's float64 formula gives NaN
    at a finite logit (gamma < 1 at |x| large enough that 1 - p_t is 0 even in float64: inf * 0
    in d m^gamma / dm), the true gradient is finite and vanishing: ours must be finite and tiny
    there (found by the long profile: x = 1e5, t = 1, gamma = 0.5 gave torchvision NaN, ours 0)."""
    tv_nan = torch.isnan(exact)
    assert bool(torch.isfinite(ours[tv_nan]).all()), f"{what}: NaN gradient at a finite logit"
    if vanishing:
        assert bool((ours[tv_nan].double().abs() <= 1e-6).all()), f"{what}: {ours[tv_nan]}"
    assert_close(ours[~tv_nan], exact[~tv_nan], tol[~tv_nan], what)


def _reduce_tol(tol_el, e_el, reduction, dtype, n):
    if reduction == "none":
        return tol_el
    s = tol_el.sum() + 16 * eps(torch.float32 if dtype != torch.float64 else dtype) * e_el.abs().sum()
    if reduction == "mean":
        s = s / max(n, 1)
    return s


@given(data=st.data(), dtype=dtypes, shape=shapes, alpha=alphas, gamma=gammas, reduction=reductions,
       soft=st.booleans(), need_target_grad=st.booleans())
def test_dense_focal_loss(data, dtype, shape, alpha, gamma, reduction, soft, need_target_grad):
    x = data.draw(tensors(shape, dtype, wild_floats()), "logits")
    tvals = finite_floats(0.0, 1.0) if soft else st.sampled_from([0.0, 1.0])
    t = data.draw(tensors(shape, dtype, tvals), "targets")
    x, t = data.draw(layout(x)), data.draw(layout(t))
    x.requires_grad_()  # every dtype, bfloat16 too: its gradient is compared below
    t.requires_grad_(need_target_grad and soft)
    ours = sigmoid_focal_loss(x, t, alpha, gamma, reduction)

    x64 = x.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_(t.requires_grad)
    exact_el = torchvision.ops.sigmoid_focal_loss(x64, t64, alpha, gamma, "none")
    exact = {"none": exact_el, "sum": exact_el.sum(), "mean": exact_el.mean()}[reduction]
    assert ours.dtype == dtype and ours.shape == exact.shape
    rerr = _ref_err(x64.detach(), t64.detach(), gamma)
    tol_el = _tol(x64.detach(), exact_el.detach(), dtype, soft) + rerr
    n = x.numel()
    tol = _reduce_tol(tol_el, exact_el.detach(), reduction, dtype, n)
    if reduction != "none" and dtype in (torch.float16, torch.bfloat16):
        tol = tol + eps(dtype) * exact.detach().abs()
    finite_in = bool(torch.isfinite(x64).all())
    if reduction == "none" or finite_in:
        assert_close(ours, exact, tol, "loss", overflow_ok=torch.finfo(dtype).max / 2)
    else:  # a reduction over a non-finite element: NaN or inf, as the reference
        assert not bool(torch.isfinite(ours)) or bool(torch.isfinite(exact)), (ours, exact)

    # gradients: the upstream gradient is random (a fixed seed per example)
    g = torch.randn(exact.shape, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    ours.backward(g.to(ours.dtype))
    exact.backward(g)
    note(f"x={x64.detach().tolist()} t={t64.detach().tolist()}")
    if reduction == "none":
        gscale = g.abs()
    else:
        gscale = g.abs() / (max(n, 1) if reduction == "mean" else 1)
    gt = (_tol(x64.detach(), x64.grad, dtype, soft) * 4 + 64 * eps(torch.float32) * gscale * (x64.detach().abs() + 1)
          + 4 * rerr * gscale)
    finite = torch.isfinite(x64.detach()) & torch.isfinite(t64.detach())
    # non-finite logits: the gradient is NaN/0 by convention; compare only at finite inputs
    assert x.grad is not None and x.grad.dtype == dtype
    _grad_close(x.grad[finite], x64.grad[finite], gt[finite], "d loss / d logits")
    event(f"dense: {'empty' if n == 0 else 'elements'}, gradient compared at {'some' if bool(finite.any()) else 'no'} element")
    if t.requires_grad:
        assert t.grad is not None
        gtt = (_tol(x64.detach(), t64.grad, dtype, True) * 4 + 64 * eps(torch.float32) * gscale * (x64.detach().abs() + 1)
               + 4 * rerr * gscale)
        # d/dt at 1 - p_t = 0 with gamma < 1 is singular (c (1 - t)^(gamma - 1), c = log1p(e^-|x|)
        # > 0): torchvision gives NaN, ours a finite value; only "no NaN" is asked there
        _grad_close(t.grad[finite], t64.grad[finite], gtt[finite], "d loss / d targets", vanishing=False)


labels_shapes = st.tuples(st.integers(0, 40), st.integers(0, 6))


@given(data=st.data(), dtype=dtypes, nk=labels_shapes, alpha=alphas, gamma=gammas, reduction=reductions,
       smoothing=st.one_of(st.just(0.0), finite_floats(0.0, 1.0)), use_weights=st.booleans(),
       normalizer=st.one_of(st.none(), finite_floats(0.5, 100.0)))
def test_labels_focal_loss(data, dtype, nk, alpha, gamma, reduction, smoothing, use_weights, normalizer):
    N, K = nk
    x = data.draw(tensors((N, K), dtype, wild_floats()), "logits")
    lab = torch.tensor(data.draw(st.lists(st.integers(-2, K - 1), min_size=N, max_size=N)), dtype=torch.long)
    w = None
    if use_weights:
        w = data.draw(tensors((N,), dtype, finite_floats(0.0, 4.0)), "weights")
        w = data.draw(layout(w))
    x, lab = data.draw(layout(x)), data.draw(layout(lab.double())).long() if N else lab
    x.requires_grad_()
    ours = sigmoid_focal_loss_labels(x, lab, alpha, gamma, reduction, normalizer, smoothing, weights=w)

    x64 = x.detach().double().requires_grad_()
    exact = ref.sigmoid_focal_loss_labels(x64, lab, alpha, gamma, reduction, normalizer, smoothing,
                                          weights=None if w is None else w.double())
    if smoothing == 0.0 and w is None:  # the reference is torchvision's formula on the one-hot
        onehot = ref.labels_to_targets(lab, K, torch.float64)
        tv = torchvision.ops.sigmoid_focal_loss(x64.detach(), onehot, alpha, gamma, "none")
        tv = torch.where((lab != -2)[:, None], tv, torch.zeros((), dtype=tv.dtype))
        el = ref.sigmoid_focal_loss_labels(x64.detach(), lab, alpha, gamma, "none")
        assert_close(el, tv, 1e-12 * (tv.abs() + 1), "reference vs torchvision")
    out_dtype = dtype if reduction == "none" else (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ours.dtype == out_dtype and ours.shape == exact.shape
    el = ref.sigmoid_focal_loss_labels(x64.detach(), lab, alpha, gamma, "none", None, smoothing,
                                       weights=None if w is None else w.double())
    soft = smoothing > 0
    wt = 1.0 if w is None else w.double()[:, None]
    rerr = _ref_err(x64.detach(), ref.labels_to_targets(lab, K, torch.float64), gamma) * wt
    tol_el = _tol(x64.detach(), el, dtype, soft) + rerr
    div = (normalizer or 1.0)
    if reduction == "none":
        tol = tol_el / div
    else:
        tol = _reduce_tol(tol_el, el, "sum", dtype, N) / div
        if reduction == "mean":
            tol = tol / max(int((lab != -2).sum()) * K, 1)
    if reduction == "none" or bool(torch.isfinite(x64[lab != -2]).all()):
        assert_close(ours, exact, tol, "loss", overflow_ok=torch.finfo(dtype).max / 2)
    if exact.numel() == 0 or not exact.requires_grad:
        event("labels: empty (loss compared, no gradient)")
        return
    event(f"labels: gradient compared ({'N K > 0' if x.numel() else 'empty'})")
    g = torch.randn(exact.shape, generator=torch.Generator().manual_seed(N * 7 + K), dtype=torch.float64)
    ours.backward(g.to(ours.dtype))
    exact.backward(g)
    gscale = g.abs() / div
    if reduction == "mean":
        gscale = gscale / max(int((lab != -2).sum()) * K, 1)
    gt = (_tol(x64.detach(), x64.grad, dtype, soft) * 4
          + 64 * eps(torch.float32) * gscale * wt * (x64.detach().abs() + 1) + 4 * rerr * gscale)
    finite = torch.isfinite(x64.detach())
    _grad_close(x.grad[finite], x64.grad[finite], gt[finite], "d loss / d logits")
    ign = lab == -2
    assert bool((x.grad[ign] == 0).all()), "ignored rows must get zero gradient"
