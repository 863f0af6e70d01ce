"""Run every op a build of the CUDA emulator has against the CPU ops, under the race check.

    python tests/simt/mutant_probe.py LIB [--ops focal,boxes,nms]

Loads LIB (a library from ``build_tools/simt.py build``, possibly a mutant made with
``--override``; start Python with the environment ``build_tools/simt.py env`` prints when it was
built with ASan), calls each op whose kernel LIB registers (torch.ops.retina_fast_simt.<op>) on
fixed inputs with the race check on (forward, reversed and shuffled thread orders must give the
same bits), and compares each result with the CPU kernel (torch.ops.retina_fast.<op>). Prints
one line per op and exits with
    0  every op ran clean and agrees with the CPU,
    3  the race check failed (which op, which output),
    4  a result differs from the CPU (parity),
    5  the emulator reported another error (a failed launch, a deadlock, ...);
an ASan or UBSan report aborts the process (its own exit status, the report on stderr).
This is how a mutation is shown to be caught, and by which check: tests/simt/test_mutations.py.
"""

import argparse
import sys

import torch

import retina_fast  # noqa: F401  (the CPU ops)


def _has_kernel(op):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"retina_fast_simt::{op}", "CPU")


def _boxes(n, g, size=200.0):
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * 40 + 2
    return torch.cat([xy, xy + wh], 1)


def cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1023 * 80 + 4, generator=g)  # a fresh allocation: n % 4 == 0, then a tail
    t = (torch.rand(x.shape, generator=g) < 0.1).float()
    x3, t3 = x[:-1].clone(), t[:-1].clone()  # numel % 4 == 3
    logits = torch.randn(1000, 80, generator=g)
    labels = torch.randint(-2, 80, (1000,), generator=g)
    for red in (0, 1, 2):
        yield "focal", "sigmoid_focal_loss", (x, t, 0.25, 2.0, red), 1e-5
        yield "focal", "sigmoid_focal_loss", (x3, t3, 0.25, 2.0, red), 1e-5
        yield "focal", "sigmoid_focal_loss_labels", (logits, labels, None, 0.25, 2.0, red, 0.0), 1e-5
    yield "focal", "sigmoid_focal_loss_labels_with_grad", (logits, labels, None, 0.25, 2.0, 1, 0.1), 1e-5
    b = _boxes(300, g)
    s = torch.rand(300, generator=g)
    cls = torch.randint(0, 4, (300,), generator=g)
    yield "nms", "nms", (b, s, 0.5), 0
    yield "nms", "batched_nms", (b, s, cls, 0.3), 0
    yield "boxes", "box_iou", (b[:100], b[100:]), 0
    gts = torch.stack([_boxes(40, g), _boxes(40, g)])
    yield "boxes", "match_anchors", (b, gts, torch.tensor([40, 13]), 0.5, 0.4, True, True), 0


def _close(a, b, tol):
    if isinstance(a, (tuple, list)):
        return all(_close(x, y, tol) for x, y in zip(a, b))
    a = a.cpu()
    if tol == 0:
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=tol, atol=tol, equal_nan=True)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("lib")
    p.add_argument("--ops", default="focal,boxes,nms")
    args = p.parse_args(argv)
    torch.ops.load_library(args.lib)
    S = torch.ops.retina_fast_simt
    S._simt_set_race_check(True)
    families = set(args.ops.split(","))
    ran = 0
    for fam, op, a, tol in cases():
        if fam not in families or not _has_kernel(op):
            continue
        ran += 1
        try:
            got = getattr(S, op)(*a)
        except RuntimeError as e:
            msg = str(e).splitlines()[0]
            if "simt race check" in msg:
                print(f"RACE {op}: {msg}")
                return 3
            print(f"ERROR {op}: {msg}")
            return 5
        want = getattr(torch.ops.retina_fast, op)(*a)
        if not _close(got, want, tol):
            print(f"PARITY {op}: the emulated CUDA kernel disagrees with the CPU kernel")
            return 4
        print(f"ok {op}")
    if ran == 0:
        print("no op of the selected families has a kernel in this library")
        return 5
    return 0


if __name__ == "__main__":
    sys.exit(main())
