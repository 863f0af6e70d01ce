"""Smoke test of an *installed* retina_fast (CI runs it in a clean venv on the wheel it built
from the sdist): the package imports from site-packages, not a source tree; its version is
its metadata's and it requires the torch series it runs with; every public op runs once on
small CPU inputs and agrees with the pure-PyTorch reference (and torchvision where it has the
op); the model runs; `retina-fast --help` and `retina-fast env` work, and a command that needs
an extra the venv lacks says which one before doing anything.

    python build_tools/smoke_installed.py [--expect-extra-missing]

Run it from outside the source tree (otherwise `import retina_fast` may find the tree).
Prints one line per check and "smoke_installed: all ok" last; exits non-zero on a failure.
"""

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile

import torch


def check(name, cond, detail=""):
    if not cond:
        sys.exit(f"smoke_installed: FAILED {name} {detail}")
    print(f"ok {name}", flush=True)


def installed_package():
    import retina_fast

    here = os.path.realpath(retina_fast.__file__)
    check("imports from site-packages", here.startswith(os.path.realpath(sys.prefix)), here)
    meta = importlib.metadata.metadata("retina_fast")
    check("__version__ is the metadata's", meta["Version"] == retina_fast.__version__,
          f"{meta['Version']} != {retina_fast.__version__}")
    reqs = [r for r in (meta.get_all("Requires-Dist") or []) if "extra ==" not in r]
    series = ".".join(torch.__version__.split(".")[:2])
    check("requires the torch series it runs with", f"torch=={series}.*" in reqs, str(reqs))
    from retina_fast import _version

    info = _version.build_info()
    check("records its build", info is not None and info["torch_version"] == torch.__version__, str(info))
    check("CUDA kernels as recorded", retina_fast.cuda_built() == info["with_cuda"])
    print(f"   retina_fast {retina_fast.__version__}, CPU kernels {retina_fast.cpu_isa()}, "
          f"CUDA kernels {retina_fast.cuda_built()}", flush=True)


def boxes(n, g):
    xy = torch.rand(n, 2, generator=g) * 100
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 30 + 1], 1)


def ops_once():
    import torchvision

    from retina_fast import ops
    from retina_fast.ops import _reference as ref

    g = torch.Generator().manual_seed(0)
    close = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6)  # noqa: E731
    x = torch.randn(64, 7, generator=g, requires_grad=True)
    t = (torch.rand(64, 7, generator=g) < 0.2).float()
    got = ops.sigmoid_focal_loss(x, t, reduction="sum")
    got.backward()
    check("sigmoid_focal_loss", close(got, torchvision.ops.sigmoid_focal_loss(x, t, reduction="sum"))
          and x.grad is not None)
    lab = torch.randint(-2, 7, (64,), generator=g)
    check("sigmoid_focal_loss_labels", close(ops.sigmoid_focal_loss_labels(x, lab, reduction="sum"),
                                             ref.sigmoid_focal_loss_labels(x, lab, reduction="sum")))
    a, b = boxes(50, g), boxes(9, g)
    check("box_iou", torch.equal(ops.box_iou(a, b), torchvision.ops.box_iou(a, b)))
    check("encode_boxes", close(ops.encode_boxes(a, a.flip(0)), ref.encode_boxes(a, a.flip(0))))
    rel = torch.randn(50, 4, generator=g) * 0.1
    check("decode_boxes", close(ops.decode_boxes(rel, a), ref.decode_boxes(rel, a)))
    cells = [torch.tensor([[-8.0, -8.0, 8.0, 8.0], [-4.0, -12.0, 4.0, 12.0]])] * 2
    grid, strides = [(4, 5), (2, 3)], [(8, 8), (16, 16)]
    anchors = ops.grid_anchors(cells, grid, strides)
    check("grid_anchors", torch.equal(anchors, ref.grid_anchors(cells, grid, strides)))
    gts = boxes(2 * 4, g).view(2, 4, 4)
    counts = torch.tensor([4, 2])
    m = ops.match_anchors(anchors, gts, counts)
    check("match_anchors", torch.equal(m, ref.match_anchors(anchors, gts, counts)))
    gl = torch.randint(0, 7, (2, 4), generator=g)
    mt = ops.matched_targets(anchors, gts, gl, counts)
    rl, rt = ref.matched_targets(anchors, gts, gl, counts)[:2]
    check("matched_targets", torch.equal(mt.labels, rl) and close(mt.regression_targets, rt))
    sc = torch.rand(50, generator=g)
    check("nms", torch.equal(ops.nms(a, sc, 0.5), torchvision.ops.nms(a, sc, 0.5)))
    idx = torch.randint(0, 3, (50,), generator=g)
    check("batched_nms", torch.equal(ops.batched_nms(a, sc, idx, 0.5), torchvision.ops.batched_nms(a, sc, idx, 0.5)))
    img = torch.randint(0, 2, (50,), generator=g)
    keep, n = ops.batched_nms_multi(a, sc, idx, img, 2, 0.5)
    rkeep, rn = ref.batched_nms_multi(a, sc, idx, img, 2, 0.5)
    check("batched_nms_multi", torch.equal(keep, rkeep) and torch.equal(n, rn))
    A = anchors.shape[0]
    logits, reg = torch.randn(2, A, 5, generator=g), torch.randn(2, A, 4, generator=g) * 0.1
    nl = [4 * 5 * 2, 2 * 3 * 2]
    dets = ops.postprocess_detections(logits, reg, anchors, [(48, 48)] * 2, nl)
    want = ref.postprocess_detections(logits, reg, anchors, [(48, 48)] * 2, nl)
    check("postprocess_detections", all(close(d["boxes"], w["boxes"]) and torch.equal(d["labels"], w["labels"])
                                        for d, w in zip(dets, want)))
    pboxes, _, plabels, pcounts = ops.postprocess_detections_padded(logits, reg, anchors, [(48, 48)] * 2, nl)
    check("postprocess_detections_padded", pcounts.tolist() == [len(d["boxes"]) for d in dets]
          and all(torch.equal(plabels[i, :len(d["labels"])], d["labels"]) for i, d in enumerate(dets)))


def model_once():
    from retina_fast.models import retinanet_resnet_fpn

    model = retinanet_resnet_fpn(depth=18, num_classes=3, min_size=64, max_size=64).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 64)])
    check("RetinaNet forward", set(out[0]) == {"boxes", "scores", "labels"})


def commands(expect_extra_missing):
    exe = shutil.which("retina-fast")
    check("retina-fast on PATH", exe is not None)
    p = subprocess.run([exe, "--help"], capture_output=True, text=True)
    check("retina-fast --help", p.returncode == 0 and "demo" in p.stdout, p.stderr[-500:])
    p = subprocess.run([exe, "env"], capture_output=True, text=True)
    check("retina-fast env", p.returncode == 0 and "CPU kernel variant" in p.stdout, p.stderr[-500:])
    if expect_extra_missing:
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "demo")
            p = subprocess.run([exe, "demo", "--out", out], capture_output=True, text=True)
            check("a missing extra is named before any work",
                  p.returncode == 2 and "retina_fast[cli]" in p.stderr and not os.path.exists(out),
                  p.stderr[-500:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--expect-extra-missing", action="store_true",
                    help="the venv lacks the [cli] extra: `retina-fast demo` must say so")
    args = ap.parse_args()
    installed_package()
    ops_once()
    model_once()
    commands(args.expect_extra_missing)
    print("smoke_installed: all ok")


if __name__ == "__main__":
    main()
