"""Check that every torch.ops.retina_fast op has a CPU kernel and, in a CUDA build, a CUDA kernel.

    python build_tools/check_kernels.py                 # the retina_fast package's extension
    python build_tools/check_kernels.py --lib PATH      # a CMake-built libretina_fast.so
    ... [--require-cuda]                                # fail unless the CUDA kernels were built

Prints one line per op and a verdict; exit status 1 when a kernel is missing. Runs without a
GPU: registration happens when the library loads. (The --lib form never imports the
retina_fast package: both register the retina_fast namespace, and one process holds one.)
"""

import argparse
import os
import sys

import torch


def coverage():
    """{op name: {"CPU": bool, "CUDA": bool}} for every public op (names without a leading
    underscore; the private ones take no tensors and have a catch-all kernel)."""
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("retina_fast::"))
    out = {}
    for n in names:
        if n.split("::", 1)[1].startswith("_"):
            continue
        out[n] = {k: torch._C._dispatch_has_kernel_for_dispatch_key(n, k) for k in ("CPU", "CUDA")}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lib", help="load this shared library instead of importing retina_fast")
    p.add_argument("--require-cuda", action="store_true", help="fail unless CUDA kernels were compiled")
    args = p.parse_args(argv)
    if args.lib:
        torch.ops.load_library(args.lib)
    else:
        # the source tree this script belongs to (built in place), before any installed copy
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import retina_fast  # noqa: F401

    cuda_built = bool(torch.ops.retina_fast._cuda_built())
    cov = coverage()
    bad = []
    for name, keys in cov.items():
        need = ["CPU"] + (["CUDA"] if cuda_built else [])
        miss = [k for k in need if not keys[k]]
        bad += [f"{name} ({k})" for k in miss]
        print(f"{name:55s} CPU {'yes' if keys['CPU'] else 'NO'}  CUDA {'yes' if keys['CUDA'] else 'no'}")
    if not cov:
        bad.append("no retina_fast ops registered")
    if args.require_cuda and not cuda_built:
        bad.append("the CUDA kernels were not compiled (_cuda_built() is False)")
    verdict = "OK" if not bad else "MISSING: " + ", ".join(bad)
    print(f"check_kernels: {len(cov)} ops, torch {torch.__version__}, CUDA kernels compiled: {cuda_built}: {verdict}")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
