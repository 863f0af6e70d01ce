"""Eager vs torch.compile(fullgraph=True) training step (forward, losses, backward; no
optimizer step) of shapes-small on the ShapesStream, on the CPU.

    python -m benchmarks.train_step_compile [--batch 16] [--iters 10] [--modes ...]

Modes: ``eager``, ``fwd`` (forward+loss compiled, AOTAutograd backward), ``whole`` (forward,
backward and gradient accumulation in one graph), each in ``fp32`` NCHW or ``bf16cl`` (bfloat16
autocast, model and images channels_last). Prints one JSON line per mode: the median and
min step time of ``--iters`` steps after 2 warm-up steps, and the first call's time (the
compile, for the compiled modes). Not a pytest-benchmark file: one compile takes a minute.
"""

import argparse
import json
import os
import statistics
import time

import torch

from retina_fast.data import ShapesConfig, ShapesStream, train_transforms
from retina_fast.engine.model_factory import build_model
from retina_fast.engine.train_step import make_train_step, pad_batch


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--modes", nargs="+", default=["eager:fp32", "fwd:fp32", "whole:fp32", "eager:bf16cl",
                                                  "whole:bf16cl"])
    args = p.parse_args(argv)
    stream = ShapesStream(args.batch * 4, seed=0, cfg=ShapesConfig(size=160), transforms=train_transforms())
    samples = [stream[(0, i)] for i in range(args.batch * 4)]
    for mode in args.modes:
        kind, prec = mode.split(":")
        torch.manual_seed(0)
        torch._dynamo.reset()
        model = build_model("shapes-small", 3).train()
        fmt = None
        autocast = None
        if prec == "bf16cl":
            fmt = torch.channels_last
            model = model.to(memory_format=fmt)
            autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
        batches = []
        for k in range(4):
            chunk = samples[k * args.batch:(k + 1) * args.batch]
            batches.append(pad_batch(model, [s[0] for s in chunk], [s[1] for s in chunk], memory_format=fmt))
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # zero_grad only
        step = make_train_step(model, opt, compile=kind != "eager", autocast=autocast, whole_step=kind == "whole")
        times = []
        for i in range(args.iters + 3):
            t = time.perf_counter()
            loss, _ = step(batches[i % 4])
            times.append(time.perf_counter() - t)
        steady = times[3:]
        print(json.dumps({"mode": mode, "batch": args.batch, "first_s": round(times[0], 2),
                          "median_ms": round(1e3 * statistics.median(steady), 1),
                          "min_ms": round(1e3 * min(steady), 1), "loss": round(float(loss), 4),
                          "threads": torch.get_num_threads(), "load": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
