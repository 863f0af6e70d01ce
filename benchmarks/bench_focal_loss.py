"""Focal loss forward + backward: retina_fast (dense and labels forms) vs torchvision vs the
reference, same inputs, same run.

    python -m pytest benchmarks/bench_focal_loss.py --benchmark-only \
        --benchmark-group-by=param:shape --benchmark-columns=median,iqr,rounds

Shapes are RetinaNet's: N = batch x anchors per image (~30k at 512 px, ~120k at 800 px),
K = 80 classes, ~1 % foreground, ~1 % ignored. CPU runs the 512 px shapes; CUDA (when present)
runs batch 16 at 800 px. CUDA timings synchronise inside the timed call. Each timed call's
gradient is checked against torchvision's on the same inputs (a benchmark that timed the wrong
thing would fail, also under --benchmark-disable).

Foreground share (test_focal_fg_share, and ``python -m benchmarks.bench_focal_loss fg-sweep``,
ours and torchvision interleaved round by round): 1 %, 5 %, 30 % and 98 % of the rows
labelled (FCOS/ATSS-style assigners that reuse this loss give 5-30 %). The labels kernel
computes every element of a group of rows at the background target in one vector pass, then
the labelled elements at the foreground target: so a foreground row costs one element more,
and the labelled elements of a group are gathered into one vector call (before issue 23 each
was a call of its own: ~25 ns a foreground row, 16 % of the kernel at 98 % foreground).
torchvision's time does not depend on the share.

Peak memory (test_peak_memory_*): each implementation runs forward + backward once in a fresh
subprocess; we report its peak resident set size (VmHWM) minus that of a
subprocess that only builds the same inputs. The difference is the memory the loss itself
needed at its peak (on CUDA: torch.cuda.max_memory_allocated over the inputs' bytes).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

import retina_fast
from retina_fast.ops import _reference as ref
from retina_fast.ops import sigmoid_focal_loss, sigmoid_focal_loss_labels
from benchmarks import quick, record_untimed

K = 80
CPU_SHAPES = {"4x30k": 4 * 30_000, "16x30k": 16 * 30_000}
CUDA_SHAPES = {"16x120k": 16 * 120_000}
if quick():  # --benchmark-disable: each body once on a twentieth of the anchors (benchmarks/conftest.py)
    CPU_SHAPES = {k: v // 20 for k, v in CPU_SHAPES.items()}
    CUDA_SHAPES = {k: v // 20 for k, v in CUDA_SHAPES.items()}
HAS_CUDA = torch.cuda.is_available() and retina_fast.cuda_built()


def make_inputs(n, device, dtype=torch.float32, seed=0, fg_share=0.01):
    g = torch.Generator().manual_seed(seed)
    # filled in chunks: no full-size temporaries, so the inputs-only subprocess's peak RSS is
    # the inputs themselves (the baseline test_peak_memory subtracts)
    logits = torch.empty(n, K, dtype=dtype, device=device)
    for i in range(0, n, 4096):
        j = min(n, i + 4096)
        logits[i:j] = (torch.randn(j - i, K, generator=g) * 2 - 4).to(device=device, dtype=dtype)
    labels = torch.full((n,), -1, dtype=torch.long)
    r = torch.rand(n, generator=g)
    fg = r < fg_share
    labels[fg] = torch.randint(0, K, (int(fg.sum()),), generator=g)
    labels[(r >= fg_share) & (r < fg_share + 0.01)] = -2
    labels = labels.to(device)
    valid = labels != -2
    # what torchvision's RetinaNet builds: a one-hot over the valid anchors
    onehot = torch.zeros(n, K, dtype=dtype, device=device)
    fgi = (labels >= 0).nonzero().squeeze(1)
    onehot[fgi, labels[fgi]] = 1
    return logits, labels, valid, onehot


def impl_ours_labels(logits, labels, valid, onehot):
    x = logits.detach().requires_grad_()
    loss = sigmoid_focal_loss_labels(x, labels, reduction="sum")
    loss.backward()
    return x.grad


def impl_ours_dense(logits, labels, valid, onehot):
    x = logits.detach().requires_grad_()
    loss = sigmoid_focal_loss(x[valid], onehot[valid], reduction="sum")
    loss.backward()
    return x.grad


def impl_torchvision(logits, labels, valid, onehot):
    # exactly what torchvision's RetinaNetClassificationHead.compute_loss does per batch
    x = logits.detach().requires_grad_()
    loss = torchvision.ops.sigmoid_focal_loss(x[valid], onehot[valid], reduction="sum")
    loss.backward()
    return x.grad


def impl_reference(logits, labels, valid, onehot):
    x = logits.detach().requires_grad_()
    loss = ref.sigmoid_focal_loss_labels(x, labels, reduction="sum")
    loss.backward()
    return x.grad


IMPLS = {
    "retina_fast_labels": impl_ours_labels,
    "retina_fast_dense": impl_ours_dense,
    "torchvision": impl_torchvision,
    "reference": impl_reference,
}

PARAMS = [("cpu", s, i) for s in CPU_SHAPES for i in IMPLS]
if HAS_CUDA:
    PARAMS += [("cuda", s, i) for s in CUDA_SHAPES for i in IMPLS]


@pytest.mark.parametrize("device,shape,impl", PARAMS)
def test_focal_fwd_bwd(benchmark, device, shape, impl):
    n = {**CPU_SHAPES, **CUDA_SHAPES}[shape]
    inputs = make_inputs(n, device)
    fn = IMPLS[impl]
    benchmark.group = f"focal fwd+bwd {device} {shape} K={K}"
    benchmark.extra_info.update(device=device, n=n, k=K, threads=torch.get_num_threads())
    if device == "cuda":
        def run():
            fn(*inputs)
            torch.cuda.synchronize()
        benchmark.pedantic(run, rounds=20, warmup_rounds=3)
        # achieved bandwidth of our kernels: logits read once and the gradient written once
        # (the forward computes both: *_with_grad), labels read once
        if impl == "retina_fast_labels":
            nbytes = n * K * 4 * 2 + n * 8
            benchmark.extra_info["bytes_moved"] = nbytes
    else:
        benchmark.pedantic(fn, args=inputs, rounds=5, warmup_rounds=1)
    _check_against_torchvision(fn, inputs)


def _check_against_torchvision(fn, inputs):
    """The gradient the timed implementation computes is torchvision's (float32: ours and the
    reference differ from it by rounding, ~1e-7 relative)."""
    if fn is impl_torchvision:
        return
    got, want = fn(*inputs), impl_torchvision(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


FG_SHARES = [0.01, 0.05, 0.30, 0.98]


@pytest.mark.parametrize("share", FG_SHARES)
@pytest.mark.parametrize("impl", ["retina_fast_labels", "torchvision"])
def test_focal_fg_share(benchmark, impl, share):
    """CPU, 4x30k x K=80, fwd+bwd, at each foreground share (see the module docstring)."""
    n = CPU_SHAPES["4x30k"]
    inputs = make_inputs(n, "cpu", fg_share=share)
    benchmark.group = f"focal fwd+bwd cpu 4x30k K={K} foreground {share:.0%}"
    benchmark.extra_info.update(fg_share=share, n=n, k=K, threads=torch.get_num_threads())
    benchmark.pedantic(IMPLS[impl], args=inputs, rounds=5, warmup_rounds=1)
    _check_against_torchvision(IMPLS[impl], inputs)


def fg_sweep(shares=FG_SHARES, rounds=7, n=4 * 30_000):
    """Median times of ours (labels form) and torchvision's fwd+bwd, interleaved round by round
    (a shared machine slows both alike), per foreground share; returns rows of dicts."""
    import time

    rows = []
    for share in shares:
        inputs = make_inputs(n, "cpu", fg_share=share)
        _check_against_torchvision(impl_ours_labels, inputs)
        t = {"ours": [], "torchvision": []}
        for _ in range(rounds):
            for name, fn in (("ours", impl_ours_labels), ("torchvision", impl_torchvision)):
                t0 = time.perf_counter()
                fn(*inputs)
                t[name].append(time.perf_counter() - t0)
        med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in t.items()}
        rows.append({"fg_share": share, "ours_ms": round(med["ours"], 2), "torchvision_ms": round(med["torchvision"], 1),
                     "speedup": round(med["torchvision"] / med["ours"], 1), "threads": torch.get_num_threads(),
                     "retina_fast": os.path.dirname(retina_fast.__file__)})
    return rows


_MEM_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, {root!r})
import benchmarks.bench_focal_loss as b
device, n, impl = sys.argv[1], int(sys.argv[2]), sys.argv[3]
inputs = b.make_inputs(n, device)
if device == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
if impl != "none":
    b.IMPLS[impl](*inputs)
# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child of a big
# pytest process would report its parent's peak.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
out = {{"maxrss_kb": int(hwm.split()[1])}}
if device == "cuda":
    out["cuda_peak_extra"] = torch.cuda.max_memory_allocated() - base
print(json.dumps(out))
"""


def _peak(device, n, impl):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = _MEM_SCRIPT.format(root=root)
    res = subprocess.run([sys.executable, "-c", code, device, str(n), impl], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("device,shape", [("cpu", "16x30k")] + ([("cuda", "16x120k")] if HAS_CUDA else []))
def test_peak_memory(benchmark, device, shape):
    """Peak extra memory of forward + backward, per implementation (MB), in extra_info."""
    n = {**CPU_SHAPES, **CUDA_SHAPES}[shape]
    base = _peak(device, n, "none")
    report = {}
    for impl in IMPLS:
        p = _peak(device, n, impl)
        if device == "cuda":
            report[impl] = p["cuda_peak_extra"] / 2**20
        else:
            report[impl] = (p["maxrss_kb"] - base["maxrss_kb"]) / 1024
    benchmark.group = f"focal peak memory {device} {shape}"
    benchmark.extra_info.update({f"peak_extra_MB_{k}": round(v, 1) for k, v in report.items()})
    benchmark.extra_info["method"] = "cuda max_memory_allocated" if device == "cuda" else "VmHWM delta vs inputs-only subprocess"
    print(f"\npeak extra memory ({device}, {shape}, MB):", json.dumps({k: round(v, 1) for k, v in report.items()}))
    record_untimed(benchmark)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="focal loss fwd+bwd vs foreground share, ours and torchvision interleaved")
    ap.add_argument("mode", choices=["fg-sweep"])
    ap.add_argument("--shares", default=",".join(str(s) for s in FG_SHARES))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    for row in fg_sweep([float(x) for x in a.shares.split(",")], a.rounds):
        print(json.dumps(row), flush=True)
