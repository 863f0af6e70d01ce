"""How close the focal loss kernels run to their floor: the per-element math alone.

    python -m pytest benchmarks/bench_focal_floor.py -s       # pytest-benchmark file (prints a table)
    python benchmarks/bench_focal_floor.py [--threads 1 2]     # the same, as a script

The floor: ``torch.ops.retina_fast._focal_math_bench`` runs the kernels' own span functions
(forward math, backward math, and both from one sigmoid) over 4,096 float32 logits (16 kB,
L1-resident) on one thread, many times, in one ISA variant; each variant in its own process
(``RETINA_FAST_CPU_ISA=avx512 | avx2``: the variant is chosen once per process). ns per
element, minimum over repeats of thread CPU time (``time.thread_time``), so time the thread
spends descheduled on a shared machine does not count.

The kernels, in the same process: the labels form's forward + backward (``loss.backward()``,
what a training step runs) at N = 4 x 30k anchors, K = 80, float32, about 1 % foreground and
1 % ignored, and torchvision's ``sigmoid_focal_loss`` on the same inputs (the one-hot and the
valid-anchor gathers RetinaNet's ``compute_loss`` builds), each as ns per element of the
[N, K] logits. With one thread: thread CPU time; with more: the CPU time of all threads
(``time.process_time``: per element, the sum of what each thread spent on its share, spin
waits at the end of a parallel region included), which a shared machine disturbs little;
wall times (``wall_*``) come with it and are only as good as the machine is idle.

Reading it: the labels form computes loss and gradient from one sigmoid in the forward when
the gradient is needed (``*_with_grad``), so fwd+bwd can beat the sum of the two separate
floors; the fused floor is the bound for that kernel. Everything beyond the math is the
gradient's allocation (first touch of tens of MB: page faults, on 2 MB pages where the kernel
allows them), the per-row fix-ups (labelled element, ignored rows, row weights) and the
reduction.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import pytest

from benchmarks import quick, record_untimed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_ANCHORS, K = 4 * 30_000, 80

_SCRIPT = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch, torchvision
import retina_fast
from benchmarks.bench_focal_loss import make_inputs
from retina_fast.ops import sigmoid_focal_loss_labels
threads = int(sys.argv[2])
torch.set_num_threads(threads)
ops = torch.ops.retina_fast

def best(fn, reps, clock):
    fn()
    ts = []
    for _ in range(reps):
        t0 = clock(); fn(); ts.append(clock() - t0)
    return min(ts)

g = torch.Generator().manual_seed(0)
n = 4096
x = torch.randn(n, generator=g) * 2 - 4
t = (torch.rand(n, generator=g) < 1 / 80).float()
R = int(sys.argv[6]) if len(sys.argv) > 6 else 100  # 0.4 M elements per timed call: a few ms, undisturbed
out = {"isa": retina_fast.cpu_isa(), "threads": threads}
for tt, form in ((None, "labels"), (t, "dense")):
    for mode, name in ((0, "fwd"), (1, "bwd"), (2, "fused")):
        dt = best(lambda: ops._focal_math_bench(x, tt, R, mode, 0.25, 2.0), 30, time.thread_time)
        out[f"floor_{form}_{name}"] = dt / (R * n) * 1e9
if len(sys.argv) > 3 and sys.argv[3] == "kernels":
    N, K = int(sys.argv[4]), int(sys.argv[5])
    logits, labels, valid, onehot = make_inputs(N, "cpu")
    # one thread: its CPU time; more: the CPU time of all the process's threads (each thread's
    # ns per element of its share, summed), plus wall time
    clock = time.thread_time if threads == 1 else time.process_time
    def fb():
        xx = logits.detach().requires_grad_()
        sigmoid_focal_loss_labels(xx, labels, reduction="sum").backward()
        return xx.grad
    def fwd():
        with torch.no_grad():
            sigmoid_focal_loss_labels(logits, labels, reduction="sum")
    def tv():
        xx = logits.detach().requires_grad_()
        torchvision.ops.sigmoid_focal_loss(xx[valid], onehot[valid], reduction="sum").backward()
        return xx.grad
    elems = N * K
    # what is timed computes torchvision's loss: the two gradients agree (float32 rounding apart)
    go, gt = fb(), tv()
    out["grad_max_diff_vs_torchvision"] = float((go - gt).abs().max() / gt.abs().max())
    out["kernel_labels_fwd"] = best(fwd, 15, clock) / elems * 1e9
    out["kernel_labels_fwd_bwd"] = best(fb, 15, clock) / elems * 1e9
    out["torchvision_fwd_bwd"] = best(tv, 5, clock) / elems * 1e9
    if threads > 1:
        out["wall_labels_fwd_bwd"] = best(fb, 15, time.perf_counter) / elems * 1e9
        out["wall_torchvision_fwd_bwd"] = best(tv, 5, time.perf_counter) / elems * 1e9
print(json.dumps(out))
"""


def measure(isa, threads=1, kernels=True):
    env = dict(os.environ, RETINA_FAST_CPU_ISA=isa, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [sys.executable, "-c", _SCRIPT, ROOT, str(threads)]
    if kernels:
        # --benchmark-disable (quick): a fortieth of the anchors and a tenth of the repeats, so
        # CI checks the script and the gradient against torchvision, not the figures
        args += ["kernels", str(N_ANCHORS // 40 if quick() else N_ANCHORS), str(K), "10" if quick() else "100"]
    res = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def summarise(r):
    """Ratios: share of the floor the kernel reaches (floor time / kernel time) and speed-up
    over torchvision."""
    sep = r["floor_labels_fwd"] + r["floor_labels_bwd"]
    s = dict(r)
    if "kernel_labels_fwd_bwd" in r:
        k = r["kernel_labels_fwd_bwd"]
        s["share_of_separate_floor"] = sep / k       # floor: forward math + backward math
        s["share_of_fused_floor"] = r["floor_labels_fused"] / k  # floor: both from one sigmoid
        s["share_of_fwd_floor_fwd_only"] = r["floor_labels_fwd"] / r["kernel_labels_fwd"]
        s["speedup_vs_torchvision"] = r["torchvision_fwd_bwd"] / k
    if "wall_labels_fwd_bwd" in r:
        s["wall_speedup_vs_torchvision"] = r["wall_torchvision_fwd_bwd"] / r["wall_labels_fwd_bwd"]
    return s


def _table(rows):
    keys = ["isa", "threads", "floor_labels_fwd", "floor_labels_bwd", "floor_labels_fused", "floor_dense_fused",
            "kernel_labels_fwd", "kernel_labels_fwd_bwd", "torchvision_fwd_bwd", "share_of_separate_floor",
            "share_of_fused_floor", "speedup_vs_torchvision", "wall_labels_fwd_bwd", "wall_torchvision_fwd_bwd"]
    lines = [" | ".join(keys)]
    for r in rows:
        lines.append(" | ".join(f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys))
    return "\n".join(lines)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_focal_floor(benchmark, isa, threads):
    """ns per element: the math alone (floor) and the labels-form kernel, fwd + bwd, in extra_info."""
    r = summarise(measure(isa, threads))
    if r["isa"] != isa:
        pytest.skip(f"this CPU runs {r['isa']}, not {isa}")
    assert r["grad_max_diff_vs_torchvision"] < 1e-5, r["grad_max_diff_vs_torchvision"]  # relative to the largest
    benchmark.group = f"focal floor {isa} threads={threads}"
    benchmark.extra_info.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
    print("\n" + _table([r]))
    record_untimed(benchmark)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--isa", nargs="+", default=["avx512", "avx2"])
    a = p.parse_args()
    rows = [summarise(measure(isa, t)) for isa in a.isa for t in a.threads]
    print(_table(rows))
