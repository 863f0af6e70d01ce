"""gamma = 1.5 (EfficientDet's) has its own kernel path, m^1.5 = m sqrt(m): same values and
gradients as the general exp(gamma log m) path and as the float64 reference."""

import pytest
import torch

from retina_fast.ops import _reference as ref
from retina_fast.ops import sigmoid_focal_loss, sigmoid_focal_loss_labels
from tests.conftest import cuda_param


def _inputs(device, n=4000, K=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, K, generator=g) * 4).to(device)
    x[0, :4] = torch.tensor([0.0, 30.0, -30.0, 1e-3])
    labels = torch.randint(-2, K, (n,), generator=g).to(device)
    return x, labels


@pytest.mark.parametrize("device", ["cpu", cuda_param()])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_labels_form_matches_reference_and_general_path(device, smoothing):
    x, labels = _inputs(device)
    xs = x.clone().requires_grad_()
    loss = sigmoid_focal_loss_labels(xs, labels, 0.25, 1.5, "sum", label_smoothing=smoothing)
    loss.backward()
    # float64 reference (its own one-hot definition)
    x64 = x.double().cpu().requires_grad_()
    onehot = torch.zeros_like(x64)
    fg = labels.cpu() >= 0
    onehot[fg, labels.cpu()[fg]] = 1
    p = torch.sigmoid(x64)
    p_t = onehot * p + (1 - onehot) * (1 - p)
    a_t = onehot * 0.25 + (1 - onehot) * 0.75
    t_s = onehot * (1 - smoothing) + 0.5 * smoothing
    ce = torch.nn.functional.binary_cross_entropy_with_logits(x64, t_s, reduction="none")
    exact = (a_t * (1 - p_t) ** 1.5 * ce * (labels.cpu() != -2)[:, None]).sum()
    exact.backward()
    torch.testing.assert_close(loss.double().cpu(), exact.detach(), rtol=2e-6, atol=0)
    torch.testing.assert_close(xs.grad.double().cpu(), x64.grad, rtol=1e-4, atol=1e-7)
    # the general path (gamma a hair above 1.5) agrees to its own rounding
    xg = x.clone().requires_grad_()
    general = sigmoid_focal_loss_labels(xg, labels, 0.25, 1.5 + 1e-12, "sum", label_smoothing=smoothing)
    general.backward()
    torch.testing.assert_close(loss, general, rtol=1e-5, atol=0)
    torch.testing.assert_close(xs.grad, xg.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("device", ["cpu", cuda_param()])
def test_dense_form_matches_reference(device):
    x, _ = _inputs(device, n=500, seed=1)
    t = (torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) < 0.1).float().to(device)
    ours = sigmoid_focal_loss(x, t, 0.25, 1.5, "none")
    exact = ref.sigmoid_focal_loss(x.double().cpu(), t.double().cpu(), 0.25, 1.5, "none")
    torch.testing.assert_close(ours.double().cpu(), exact, rtol=1e-5, atol=1e-12)
