"""The README's "no [M, A] IoU matrix" for match_anchors / matched_targets, measured: the peak
resident memory (VmHWM) of a fresh process grows by far less than one [M, A] float32 matrix
when it matches M = 1,000 gts against A = 50,000 anchors, while torchvision's box_iou + Matcher
on the same inputs (the mutation check: the measurement does see a matrix when there is one)
grows by at least that matrix. On a GPU: torch.cuda.max_memory_allocated."""

import json
import os
import subprocess
import sys

import pytest
import torch

import retina_fast.ops as rf
from tests.conftest import requires_gpu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
B, M, A = 1, 1000, 50_000
MATRIX = M * A * 4  # one [M, A] float32 IoU matrix: 200 MB

_SCRIPT = r"""
import json, sys
sys.path.insert(0, {root!r})
import torch
import retina_fast.ops as rf
from torchvision.models.detection._utils import Matcher
import torchvision

torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
def boxes(n, size=1000.0):
    xy = torch.rand(n, 2, generator=g) * size
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 200 + 4], 1)
anchors = boxes({A})
gt = boxes({B} * {M}).view({B}, {M}, 4)
labels = torch.randint(0, 80, ({B}, {M}), generator=g)
counts = torch.full(({B},), {M})
which = sys.argv[1]
def hwm():
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]) * 1024
if which == "torchvision":  # warm up the same code paths on a tiny case first
    Matcher(0.5, 0.4, True)(torchvision.ops.box_iou(gt[0, :2], anchors[:10]))
else:
    rf.matched_targets(anchors[:10], gt[:, :2], labels[:, :2], counts.clamp(max=2))
before = hwm()
if which == "match_anchors":
    out = rf.match_anchors(anchors, gt, counts)
elif which == "matched_targets":
    out = rf.matched_targets(anchors, gt, labels, counts)
else:
    out = Matcher(0.5, 0.4, True)(torchvision.ops.box_iou(gt[0], anchors))
print(json.dumps({{"extra": hwm() - before}}))
"""


def _peak_extra(which):
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux's /proc/self/status")
    code = _SCRIPT.format(root=ROOT, A=A, B=B, M=M)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    p = subprocess.run([sys.executable, "-c", code, which], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])["extra"]


@pytest.mark.parametrize("which", ["match_anchors", "matched_targets"])
def test_matching_builds_no_m_by_a_matrix_on_cpu(which):
    extra = _peak_extra(which)
    # outputs: [B, A] int64 matches (+ labels and [B, A, 4] targets): ~3.2 MB at most; allow
    # allocator and thread-stack noise (measured: ~1 MB), still 1/20 of one IoU matrix
    assert extra < MATRIX / 20, f"{which}: peak grew by {extra / 2**20:.0f} MB"


def test_the_measurement_sees_torchvisions_matrix():
    extra = _peak_extra("torchvision")
    assert extra >= MATRIX * 0.9, f"torchvision: peak grew by only {extra / 2**20:.0f} MB"


@requires_gpu
def test_matching_builds_no_m_by_a_matrix_on_cuda():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(A, 2, generator=g) * 1000
    anchors = torch.cat([xy, xy + 50], 1).cuda()
    gt = anchors[torch.randperm(A, generator=g)[:M].cuda()].view(B, M, 4) + 3
    labels = torch.zeros(B, M, dtype=torch.long, device="cuda")
    counts = torch.full((B,), M, device="cuda")
    rf.matched_targets(anchors, gt, labels, counts)  # warm-up
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    rf.match_anchors(anchors, gt, counts)
    rf.matched_targets(anchors, gt, labels, counts)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < MATRIX / 20, f"peak grew by {extra / 2**20:.0f} MB"
