"""What the data pipeline costs the demo's training: compute-only against end-to-end images/s.

    python -m benchmarks.demo_pipeline [--precision auto] [--workers 1,2] [--iters 40] [--rounds 2]

The demo's model and step (shapes-small, batch 16, 160 px, AdamW, under ``--precision``):

* compute-only: 8 batches rendered beforehand, in memory, stepped through round-robin: no
  worker, no transfer;
* end to end: the trainer's loader (``make_loader``: rendering workers, packed batches, uint8
  images converted in the training process), for each worker count.

Each round measures compute-only and then every worker count, ``--iters`` steps each after 4
warm-up steps; the figures printed are per round, and the last line the medians. Run it on an
idle machine: a second process on a 2-core CPU halves both numbers in unequal measure.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from retina_fast.data import SHAPES_CATEGORIES, ShapesConfig, ShapesStream, train_transforms
from retina_fast.data.loader import EpochSampler, PackedBatch, make_loader
from retina_fast.engine import precision as rprec
from retina_fast.engine.model_factory import build_model

B = 16


def _to_float(images):
    return [im.float().div_(255.0) if im.dtype == torch.uint8 else im for im in images]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="auto", choices=rprec.PRECISIONS)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    s = rprec.resolve(a.precision, None, "cpu")
    print(f"{s.describe()}; {torch.get_num_threads()} threads", flush=True)
    ds = ShapesStream(images_per_epoch=B * 1000, seed=0, cfg=ShapesConfig(),
                      transforms=train_transforms(hflip=0.5, to_float=False))
    torch.manual_seed(0)
    model = build_model("shapes-small", len(SHAPES_CATEGORIES)).to(memory_format=s.memory_format).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-4)

    def step(images, targets):
        opt.zero_grad(set_to_none=True)
        with s.autocast():
            losses = model(_to_float(images), [{k: t[k] for k in ("boxes", "labels")} for t in targets])
        (losses["classification"] + losses["bbox_regression"]).backward()
        opt.step()

    held = [PackedBatch([ds[(0, b * B + i)] for i in range(B)]).unpack() for b in range(8)]
    workers = [int(w) for w in a.workers.split(",")]
    results = {"compute-only": [], **{f"workers={w}": [] for w in workers}}
    for r in range(a.rounds):
        for b in held[:4]:
            step(*b)
        t = time.perf_counter()
        for k in range(a.iters):
            step(*held[k % len(held)])
        results["compute-only"].append(a.iters * B / (time.perf_counter() - t))
        line = [f"round {r}: compute-only {results['compute-only'][-1]:.1f} img/s"]
        for w in workers:
            loader = make_loader(ds, B, EpochSampler(len(ds), shuffle=True, seed=r), num_workers=w)
            it = iter(loader)
            for _ in range(4):
                step(*next(it))
            t = time.perf_counter()
            for _ in range(a.iters):
                step(*next(it))
            results[f"workers={w}"].append(a.iters * B / (time.perf_counter() - t))
            line.append(f"workers={w} {results[f'workers={w}'][-1]:.1f} img/s")
            del it, loader
        print("; ".join(line), flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    base = med["compute-only"]
    print("median: " + "; ".join(f"{k} {v:.1f} img/s" + ("" if k == "compute-only" else f" ({v / base:.2f})")
                                 for k, v in med.items()))


if __name__ == "__main__":
    main()
