"""The CPU kernels' AVX-512, AVX2 and baseline variants (csrc/common/cpu_dispatch.h) give
bitwise the same results: each is forced in its own process with RETINA_FAST_CPU_ISA and runs
every op on the same inputs. (The variants differ only in vector width: no reassociation,
no FMA contraction, fixed reduction lanes, so the bits must agree.)"""

import os
import platform
import subprocess
import sys

import pytest
import torch

import retina_fast

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = r"""
import sys, torch
import retina_fast
from retina_fast import ops
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
out = {"isa": retina_fast.cpu_isa()}
x = torch.randn(3001, 13, generator=g) * 4
t = (torch.rand(3001, 13, generator=g) < 0.2).float()
lab = torch.randint(-2, 13, (3001,), generator=g)
for dtype in (torch.float32, torch.float16):
    xx = x.to(dtype).requires_grad_()
    tt = t.to(dtype).requires_grad_()
    for red in ("none", "sum"):
        l = ops.sigmoid_focal_loss(xx, tt, reduction=red)
        out[f"dense_{dtype}_{red}"] = l.detach()
        out[f"dense_grads_{dtype}_{red}"] = torch.autograd.grad(l.sum(), (xx, tt))
        l = ops.sigmoid_focal_loss_labels(xx, lab, reduction=red, label_smoothing=0.1 if red == "sum" else 0.0)
        out[f"labels_{dtype}_{red}"] = l.detach()
        out[f"labels_grad_{dtype}_{red}"] = torch.autograd.grad(l.sum(), xx)[0]
xy = torch.rand(4000, 2, generator=g) * 600
boxes = torch.cat([xy, xy + torch.rand(4000, 2, generator=g) * 120 + 4], 1)
gts = boxes[:240].view(3, 80, 4) + torch.randn(3, 80, 4, generator=g)
counts = torch.tensor([80, 17, 0])
out["iou"] = ops.box_iou(gts[0], boxes)
out["match"] = ops.match_anchors(boxes, gts, counts)
mt = ops.matched_targets(boxes, gts, torch.randint(0, 9, (3, 80), generator=g), counts)
out["targets"] = (mt.labels, mt.regression_targets)
crowd = torch.rand(3, 80, generator=g) < 0.3
out["crowd_match"] = ops.match_anchors(boxes, gts, counts, gt_crowd=crowd)
codes = (torch.randn(3, 4000, 4, generator=g) * 0.3).requires_grad_()
wimg = torch.rand(3, generator=g)
for loss in ("l1", "smooth_l1", "giou"):
    v = ops.matched_box_loss(codes, boxes, out["match"], gts, wimg, loss)
    out[f"box_loss_{loss}"] = (v.detach(), torch.autograd.grad(v, codes)[0])
xx = x.clone().requires_grad_()  # the fused forward (gradient from the same sigmoid)
for red in ("sum", "mean"):
    v = ops.sigmoid_focal_loss(xx, t, reduction=red)
    out[f"dense_fused_{red}"] = (v.detach(), torch.autograd.grad(v, xx)[0])
scores = torch.rand(4000, generator=g)
idx = torch.randint(0, 20, (4000,), generator=g)
img = torch.randint(0, 3, (4000,), generator=g)
out["nms"] = ops.nms(boxes, scores, 0.5)
out["batched_nms"] = ops.batched_nms(boxes, scores, idx, 0.5)
out["multi"] = ops.batched_nms_multi(boxes, scores, idx, img, 3, 0.5)
logits = torch.randn(2, 4000, 7, generator=g) * 2 - 2
reg = torch.randn(2, 4000, 4, generator=g) * 0.2
out["post"] = ops.postprocess_detections_padded(logits, reg, boxes, [(700, 700)] * 2, [3000, 1000])
torch.save(out, sys.argv[1])
"""


def _run(isa, path):
    env = dict(os.environ)
    env.pop("RETINA_FAST_CPU_ISA", None)
    if isa is not None:
        env["RETINA_FAST_CPU_ISA"] = isa
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(path, weights_only=True)


def _assert_bitwise(a, b, name):
    if isinstance(a, (tuple, list)):
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_bitwise(u, v, f"{name}[{i}]")
        return
    if isinstance(a, str):
        return
    assert a.dtype == b.dtype and a.shape == b.shape, name
    if a.is_floating_point():
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        a, b = torch.nan_to_num(a), torch.nan_to_num(b)
        assert torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32 if a.element_size() == 4
                                  else torch.int64), b.view(torch.int16 if b.element_size() == 2
                                                            else torch.int32 if b.element_size() == 4 else torch.int64)), name
    else:
        assert torch.equal(a, b), name


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the variants are x86-64's")
def test_every_cpu_variant_gives_the_same_bits(tmp_path):
    default = _run(None, tmp_path / "auto.pt")
    assert default["isa"] == retina_fast.cpu_isa()
    ran = {default["isa"]}
    for isa in ("avx512", "avx2", "baseline"):
        got = _run(isa, tmp_path / f"{isa}.pt")
        order = ["baseline", "avx2", "avx512"]
        # a variant wider than the CPU supports runs the widest supported one
        assert got["isa"] == order[min(order.index(isa), order.index(default["isa"]))]
        ran.add(got["isa"])
        for k in default:
            _assert_bitwise(got[k], default[k], f"{isa}:{k}")
    assert "baseline" in ran and len(ran) >= 2


def test_bad_isa_name_is_a_clear_error():
    env = dict(os.environ, RETINA_FAST_CPU_ISA="sse9", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", "import torch, retina_fast; "
                          "retina_fast.ops.box_iou(torch.rand(2, 4), torch.rand(3, 4))"],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert res.returncode != 0 and "expected RETINA_FAST_CPU_ISA to be avx512, avx2, baseline or auto, got 'sse9'" in res.stderr
