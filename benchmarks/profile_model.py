"""Where the whole model's time goes, ours and torchvision's, by kind of op (``torch.profiler``).

    python -m benchmarks.profile_model [--mode train|infer] [--precision bf16] [--channels-last]
                                       [--batch 2] [--size 512] [--steps 2] [--head-levels]

The same pair as ``retina-fast bench model`` (:func:`retina_fast.engine.speed.build_pair`: R50-FPN
v1, the same random weights), one setting, ``--steps`` profiled calls of each model after two
warm-up calls. Prints, per model, the self CPU time per call of each kind of op (convolutions
forward and backward, BatchNorm, ReLU and adds, casts and copies, our ops, the rest) and the
ten most expensive ops; then the bound the like-for-like ratio cannot pass while ours computes
the same convolutions (and, in training, the same batch statistics): torchvision's time over
ours with everything else free. ``--head-levels``: the head's forward (+ backward in train mode)
timed on each pyramid level alone, to show what small levels cost against P3's efficiency.
Timings are self CPU time under the profiler (its overhead included); compare within a run.
"""

import argparse
import collections

import torch

from retina_fast.engine import precision as rprec
from retina_fast.engine import speed
from retina_fast.models.fuse import fast_eval_parts

KINDS = (
    ("convolution", ("convolution",)),
    ("batch norm", ("batch_norm",)),
    ("relu / add", ("clamp_min", "threshold_backward", "relu", "aten::add", "aten::add_")),
    ("casts / copies", ("copy_", "_to_copy")),
    ("ours (retina_fast ops)", ("retina_fast",)),
)


def kind_of(name: str) -> str:
    for kind, keys in KINDS:
        if any(k in name for k in keys):
            return kind
    return "other"


def profile(fn, steps):
    fn()
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    per_kind = collections.Counter()
    per_op = collections.Counter()
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1e3 / steps
        per_kind[kind_of(e.key)] += ms
        per_op[e.key] += ms
    return per_kind, per_op


def head_levels(model, images, settings, train):
    """Median ms of the head on each level's features alone (forward, + backward in train;
    in inference the folded, fused copy the model's eval forward runs, where it applies)."""
    model = model.train(train)
    with torch.no_grad(), settings.autocast():
        x = model.transform(images)[0].tensors.contiguous(memory_format=settings.memory_format)
        parts = None if train else fast_eval_parts(model, x)
        backbone, head = parts or (model.backbone, model.head)
        feats = list(backbone(x).values())

    def call(f):
        def run():
            if train:
                g = f.detach().requires_grad_()
                with settings.autocast():
                    out = head([g])
                (out["cls_logits"].float().sum() + out["bbox_regression"].float().sum()).backward()
            else:
                with torch.no_grad(), settings.autocast():
                    head([f])
        return speed.time_interleaved({"head": run}, rounds=5)["head"] * 1e3

    return [(tuple(f.shape[-2:]), call(f)) for f in feats]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=("train", "infer"), default="train")
    ap.add_argument("--precision", default="bf16", choices=rprec.PRECISIONS)
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--head-levels", action="store_true")
    args = ap.parse_args()
    dev = "cpu"
    s = rprec.resolve(args.precision, args.channels_last, dev)
    tv, ours = speed.build_pair(args.size, dev)
    images, targets = speed.example_inputs(args.batch, args.size, dev)
    tv_m = speed.torchvision_for(tv, s, dev)
    ours_train, ours_eval = speed.ours_for(ours, s, dev)
    if args.mode == "train":
        fns = {"torchvision": speed.train_step_fn(tv_m, images, targets, s, dev),
               "ours": speed.train_step_fn(ours_train, images, targets, s, dev)}
    else:
        fns = {"torchvision": speed.inference_fn(tv_m, images, s, dev),
               "ours": speed.inference_fn(ours_eval, images, s, dev)}
    print(f"R50-FPN v1, {args.mode}, batch {args.batch}, {args.size} px, {s.precision}"
          f"{' + channels_last' if s.channels_last else ', NCHW'}, {torch.get_num_threads()} threads; "
          f"self CPU ms per call, {args.steps} profiled calls")
    totals, floors = {}, {}
    for name, fn in fns.items():
        per_kind, per_op = profile(fn, args.steps)
        total = sum(per_kind.values())
        totals[name] = total
        floors[name] = per_kind["convolution"] + (per_kind["batch norm"] if args.mode == "train" else 0.0)
        print(f"\n{name}: {total:.1f} ms")
        for kind, ms in sorted(per_kind.items(), key=lambda kv: -kv[1]):
            print(f"  {kind:<24} {ms:8.1f} ms  {100 * ms / total:5.1f} %")
        print("  top ops:")
        for op, ms in per_op.most_common(10):
            print(f"    {op:<48} {ms:8.1f} ms  {100 * ms / total:5.1f} %")
    fixed = "its convolutions and batch statistics" if args.mode == "train" else "its convolutions"
    print(f"\nratio torchvision / ours under the profiler: {totals['torchvision'] / totals['ours']:.3f}")
    print(f"bound with everything but {fixed} free: {totals['torchvision'] / floors['ours']:.3f} "
          f"(ours {floors['ours']:.1f} ms); with torchvision's own cost for those: "
          f"{totals['torchvision'] / floors['torchvision']:.3f}")
    if args.head_levels:
        model = ours_train if args.mode == "train" else ours_eval
        print("\nhead alone per level (ours, median ms" + (", forward + backward):" if args.mode == "train" else "):"))
        rows = head_levels(model, images, s, args.mode == "train")
        per_px = rows[0][1] / (rows[0][0][0] * rows[0][0][1])
        for hw, ms in rows:
            print(f"  {hw[0]}x{hw[1]}: {ms:.1f} ms (at the first level's cost per pixel: {per_px * hw[0] * hw[1]:.1f} ms)")


if __name__ == "__main__":
    main()
