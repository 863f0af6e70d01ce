"""Both devices refuse the same bad values: labels outside [-2, K), gt_counts outside [0, M],
matches outside [-2, M). The CPU ops raise at once with the value's position. The CUDA kernels
read every such value on the device, so they check it there, without a host sync: a device-side
assertion (RF_DEVICE_ASSERT, csrc/common/cuda_utils.cuh), as torch's own CUDA index checks do.

What a user sees:
- CPU: ``RuntimeError: retina_fast::...: expected every label in [0, K) = [0, 5) (foreground), -1
  (background) or -2 (ignored), got labels[3] = 7``, raised by the call.
- CUDA (a GPU): the kernel traps and prints the assertion (file, line, block, thread and the same
  expectation); the call returns, and the next synchronising call raises ``CUDA error:
  device-side assert triggered``. As with any device-side assertion, the CUDA context is then
  unusable: the process must restart.
- The CPU emulator of the CUDA kernels (build_tools/simt.py): the launch check raises
  ``CUDA error (simt emulator): device-side assert triggered: device-side assertion failed at
  focal_loss_cuda.cu:LINE in block (b) thread (t): <the same expectation>``.

Before, the CUDA kernels read such a label as background, clamped such a count into [0, M] and
dropped such a match, silently. On a real GPU these tests would leave the context unusable for
the tests after them, so they run on the CPU and on the emulated CUDA kernels, not on a GPU.
"""

import pytest
import torch

from tests.conftest import CUDA, EMULATED_CUDA, cuda_param

DEVICES = ["cpu", pytest.param(CUDA, marks=cuda_param().marks, id="cuda")]


def _raises(device, cpu_message, cuda_message):
    if device == "cpu":
        return pytest.raises(RuntimeError, match=cpu_message)
    if not EMULATED_CUDA:
        pytest.skip("a device-side assertion leaves the CUDA context unusable for the tests after it")
    return pytest.raises(RuntimeError, match="device-side assert triggered.*" + cuda_message)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [5, 9, -3, -100])
@pytest.mark.parametrize("entry", ["forward", "backward", "with_grad", "mean"])
def test_labels_outside_range_raise(device, bad, entry):
    x = torch.randn(6, 5, device=device)
    labels = torch.tensor([0, -1, -2, bad, 4, 1], device=device)
    ops = torch.ops.retina_fast
    with _raises(device, rf"expected every label in \[0, K\) = \[0, 5\).*got labels\[3\] = {bad}",
                 r"sigmoid_focal_loss_labels: expected every label in \[0, K\)"):
        if entry == "forward":
            ops.sigmoid_focal_loss_labels(x, labels, None, 0.25, 2.0, 2, 0.0)
        elif entry == "mean":
            ops.sigmoid_focal_loss_labels(x, labels, None, 0.25, 2.0, 1, 0.0)
        elif entry == "backward":
            ops.sigmoid_focal_loss_labels_backward(torch.ones((), device=device), x, labels, None, 0.25, 2.0, 2, 0.0)
        else:
            ops.sigmoid_focal_loss_labels_with_grad(x, labels, None, 0.25, 2.0, 1, 0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [-1, 3, 1000])
def test_gt_counts_outside_range_raise(device, bad):
    anchors = torch.tensor([[0.0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 40, 40]], device=device)
    gt = torch.tensor([[[0.0, 0, 10, 10], [18, 18, 40, 41]]] * 2, device=device)
    counts = torch.tensor([2, bad], device=device)
    with _raises(device, rf"expected every gt_counts\[b\] in \[0, M\] = \[0, 2\], got gt_counts\[1\] = {bad}",
                 r"match_anchors: expected every gt_counts\[b\] in \[0, M\]"):
        torch.ops.retina_fast.match_anchors(anchors, gt, counts, 0.5, 0.4, True, True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [1, 7, -3])
@pytest.mark.parametrize("entry", ["gather_targets", "gather_targets_unchecked", "matched_box_loss",
                                   "matched_box_loss_backward"])
def test_matches_outside_range_raise(device, bad, entry):
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0]], device=device)
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0]]], device=device)
    labels = torch.tensor([[3]], device=device)
    m = torch.tensor([[0, bad]], device=device)
    w = [1.0, 1.0, 1.0, 1.0]
    reg = torch.zeros(1, 2, 4, device=device)
    iw = torch.ones(1, device=device)
    ops = torch.ops.retina_fast
    with _raises(device, rf"expected matches in \[0, M\) = \[0, 1\), -1 or -2, got matches\[0, 1\] = {bad}",
                 entry.replace("_unchecked", "") + r": expected matches in \[0, M\), -1 or -2"):
        if entry == "gather_targets":
            ops.gather_targets(m, anchors, gt, labels, w)
        elif entry == "gather_targets_unchecked":  # check_matches=False no longer reads them as background
            ops.gather_targets(m, anchors, gt, labels, w, False)
        elif entry == "matched_box_loss":
            ops.matched_box_loss(reg, anchors, m, gt, iw, 0, w, 4.135, 0.11, 1e-7)
        else:
            ops.matched_box_loss_backward(torch.ones((), device=device), reg, anchors, m, gt, iw, 0, w, 4.135,
                                          0.11, 1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_in_range_values_still_work(device):
    """The checks take nothing valid away: -1 / -2 rows, M gts, empty images."""
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0]], device=device)
    gt = torch.tensor([[[0.0, 0.0, 10.0, 10.0]]], device=device)
    labels = torch.tensor([[3]], device=device)
    lab, tgt = torch.ops.retina_fast.gather_targets(torch.tensor([[0, -2]], device=device), anchors, gt, labels,
                                                    [1.0] * 4)
    assert lab.tolist() == [[3, -2]] and tgt[0, 1].abs().sum().item() == 0
    m = torch.ops.retina_fast.match_anchors(anchors, gt.repeat(2, 1, 1), torch.tensor([1, 0], device=device),
                                            0.5, 0.4, True, True)
    assert m.cpu().tolist() == [[0, -1], [-1, -1]]  # anchor 1: IoU 1/7 with the gt
    x = torch.randn(3, 4, device=device)
    torch.ops.retina_fast.sigmoid_focal_loss_labels(x, torch.tensor([-2, -1, 3], device=device), None, 0.25, 2.0,
                                                    2, 0.0)
