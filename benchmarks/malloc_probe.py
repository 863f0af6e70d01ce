"""What keeping freed memory (``retina_fast.engine.memory``, ``--malloc keep``) does to a step.

    python -m benchmarks.malloc_probe [--mode train,infer] [--precision bf16] [--channels-last]
                                      [--reps 2] [--steps 8]

The setting is process-wide, so each measurement is a fresh process: the pair of
``retina-fast bench model`` (R50-FPN v1, the same random weights, batch 2, 512 px), one model
(ours or torchvision's), glibc's defaults or freed memory kept, 2 warm-up calls and ``--steps``
timed ones. The processes alternate (ours/system, ours/keep, torchvision/system,
torchvision/keep) ``--reps`` times. Printed per process: the median ms of a train step
(forward, losses, backward) or an inference, and the minor page faults per call (getrusage).
Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def child(which: str, malloc: str, mode: str, precision: str, channels_last: bool, steps: int) -> dict:
    from retina_fast.engine import memory

    if malloc == "keep":
        assert memory.keep_freed_memory(), memory.describe()
    from retina_fast.engine import precision as rprec
    from retina_fast.engine import speed

    s = rprec.resolve(precision, channels_last, "cpu")
    tv, ours = speed.build_pair(512, "cpu")
    images, targets = speed.example_inputs(2, 512, "cpu")
    if which == "torchvision":
        model = speed.torchvision_for(tv, s, "cpu")
    else:
        ours_train, ours_eval = speed.ours_for(ours, s, "cpu")
        model = ours_train if mode == "train" else ours_eval
    del tv, ours
    fn = (speed.train_step_fn(model, images, targets, s, "cpu") if mode == "train"
          else speed.inference_fn(model, images, s, "cpu"))
    fn()
    fn()
    times = []
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / steps
    return {"ms": statistics.median(times), "faults": faults,
            "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="train,infer")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--child", nargs=2, metavar=("WHICH", "MALLOC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.mode, args.precision, args.channels_last, args.steps)))
        return
    print(f"R50-FPN v1, batch 2, 512 px, {args.precision}{' + channels_last' if args.channels_last else ', NCHW'}; "
          f"median ms of {args.steps} calls after 2, one process each")
    for mode in args.mode.split(","):
        got = {}
        for rep in range(args.reps):
            for which in ("ours", "torchvision"):
                for malloc in ("system", "keep"):
                    cmd = [sys.executable, "-m", "benchmarks.malloc_probe", "--child", which, malloc,
                           "--mode", mode, "--precision", args.precision, "--steps", str(args.steps),
                           "--channels-last" if args.channels_last else "--no-channels-last"]
                    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    got.setdefault((which, malloc), []).append(r["ms"])
                    print(f"{mode:5} rep {rep} {which:11} {malloc:6} {r['ms']:7.0f} ms  "
                          f"{r['faults']:8.0f} faults/call  max RSS {r['max_rss_gb']:.2f} GB", flush=True)
        med = {k: statistics.median(v) for k, v in got.items()}
        for which in ("ours", "torchvision"):
            system, keep = med[(which, "system")], med[(which, "keep")]
            print(f"{mode:5} {which:11} system {system:6.0f} ms  keep {keep:6.0f} ms  "
                  f"speed-up {system / keep:.3f}x")
        tv_sys, tv_keep, ours_sys, ours_keep = (med[("torchvision", "system")], med[("torchvision", "keep")],
                                                med[("ours", "system")], med[("ours", "keep")])
        print(f"{mode:5} torchvision / ours: system {tv_sys / ours_sys:.3f}x, ours kept against "
              f"torchvision's system {tv_sys / ours_keep:.3f}x, both kept {tv_keep / ours_keep:.3f}x")

if __name__ == "__main__":
    main()
