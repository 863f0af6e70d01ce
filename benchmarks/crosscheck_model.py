"""A cross-check of `retina-fast bench model`'s table on other inputs, with none of its code.

`bench model` (``retina_fast.engine.speed``) builds both models, times them and prints the
table; a mistake there would be in every figure the README quotes. This script shares none of
that: it builds torchvision's ``retinanet_resnet50_fpn`` itself (another seed; the classifier
bias left at torchvision's own prior), loads its state_dict into ours, and times each model
with its own loop of ``time.perf_counter`` under plain ``torch.autocast`` and
``.to(memory_format=torch.channels_last)``, one call of each per round, the order alternating.
The inputs differ from the table's: two non-square images of different sizes (480x640 and
544x608, so the transform pads a batch), 1-9 boxes each, ``min_size=480, max_size=640``.

    python -m benchmarks.crosscheck_model [--rounds 7] [--phases train,infer,parts] [--busy] [--out FILE]

Run it on an idle machine: it measures wall time. Ratios are torchvision / ours.
"""
import argparse
import contextlib
import copy
import platform
import statistics
import time

import torch


def _inputs(seed=7):
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for h, w in ((480, 640), (544, 608)):
        # smooth random content: a low-resolution noise field upsampled, in [0, 1]
        low = torch.rand(1, 3, h // 16, w // 16, generator=g)
        images.append(torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear")[0])
        n = int(torch.randint(1, 10, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 16 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        targets.append({"boxes": torch.cat([xy, xy + wh], 1),
                        "labels": torch.randint(1, 91, (n,), generator=g)})
    return images, targets


def _models(seed=123, busy=False):
    from torchvision.models.detection import retinanet_resnet50_fpn as tv_retinanet

    from retina_fast.models import retinanet_resnet50_fpn

    torch.manual_seed(seed)
    tv = tv_retinanet(weights=None, weights_backbone=None, min_size=480, max_size=640)
    ours = retinanet_resnet50_fpn("v1", min_size=480, max_size=640)
    if busy:  # bench model's classifier bias: many candidates reach the post-processing
        with torch.no_grad():
            tv.head.classification_head.cls_logits.bias.normal_(-4.0, 1.0)
    ours.load_state_dict(tv.state_dict(), strict=True)
    return tv, ours


def _format(channels_last):
    return torch.channels_last if channels_last else torch.contiguous_format


def _autocast(bf16):
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _step(model, images, targets, bf16):
    def run():
        model.zero_grad(set_to_none=True)
        with _autocast(bf16):
            losses = model(images, targets)
        sum(losses.values()).backward()
    return run


def _infer(model, images, bf16):
    def run():
        with torch.no_grad(), _autocast(bf16):
            return model(images)
    return run


def _median_pair(a, b, rounds):
    """Median seconds of ``a`` and ``b``, one warm-up call each, then one call of each per
    round, the order alternating."""
    a(), b()
    ta, tb = [], []
    for r in range(rounds):
        for f, ts in (((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta))):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def _parts(tv0, ours0, images, bf16, cl, rounds):
    """Eval-mode backbone + FPN and head alone, torchvision's modules against the folded, fused
    copy our model runs (``fast_eval_parts``), on the same transformed batch: where the
    inference ratio comes from."""
    from retina_fast.models.fuse import fast_eval_parts

    fmt = _format(cl)
    tv = copy.deepcopy(tv0).to(memory_format=fmt).eval()
    ours = copy.deepcopy(ours0).to(memory_format=fmt).eval()
    with torch.no_grad(), _autocast(bf16):
        x = tv.transform(images)[0].tensors.contiguous(memory_format=fmt)
        body, head = fast_eval_parts(ours, x)
        feats_tv, feats_ours = list(tv.backbone(x).values()), list(body(x).values())
        out = {}
        for part, a, b in (("backbone+FPN", lambda: tv.backbone(x), lambda: body(x)),
                           ("head", lambda: tv.head(feats_tv), lambda: head(feats_ours))):
            out[part] = _median_pair(a, b, rounds)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None, help="also write the lines to this file")
    ap.add_argument("--phases", default="train,infer",
                    help="comma separated: train, infer, parts (inference's backbone + FPN and head alone)")
    ap.add_argument("--busy", action="store_true",
                    help="the classifier bias drawn from N(-4, 1) as in bench model (many candidates "
                         "above the score threshold), instead of torchvision's prior (none with these weights)")
    args = ap.parse_args(argv)
    phases = args.phases.split(",")
    unknown = set(phases) - {"train", "infer", "parts"}
    if unknown:
        ap.error(f"--phases: expected train, infer or parts, got {', '.join(sorted(unknown))}")

    tv0, ours0 = _models(busy=args.busy)
    images, targets = _inputs()
    lines = [f"crosscheck_model: torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{platform.processor() or platform.machine()}, rounds {args.rounds}, classifier bias "
             f"{'N(-4, 1)' if args.busy else 'torchvision prior'}; "
             f"images {[tuple(i.shape[1:]) for i in images]}, boxes {[len(t['boxes']) for t in targets]}",
             "phase  setting           torchvision ms   ours ms   tv/ours"]
    for line in lines:
        print(line, flush=True)

    def row(phase, name, t_tv, t_ours):
        line = f"{phase:6s} {name:28s} {t_tv * 1e3:9.0f} {t_ours * 1e3:9.0f}   {t_tv / t_ours:5.2f}x"
        print(line, flush=True)
        lines.append(line)

    settings = [("fp32 NCHW", False, False), ("fp32 cl", False, True), ("bf16 NCHW", True, False),
                ("bf16 cl", True, True)]
    for phase in phases:
        if phase == "parts":
            for name, bf16, cl in settings:
                for part, times in _parts(tv0, ours0, images, bf16, cl, args.rounds).items():
                    row(phase, f"{name}, {part}", *times)
            continue
        pairs = [(s, s) for s in settings] + [(("tv defaults", False, False), ("ours bf16 cl", True, True))]
        for (tv_name, tv_bf16, tv_cl), (ours_name, ours_bf16, ours_cl) in pairs:
            tv = copy.deepcopy(tv0).to(memory_format=_format(tv_cl))
            ours = copy.deepcopy(ours0).to(memory_format=_format(ours_cl))
            if phase == "train":
                tv.train(), ours.train()
                a, b = _step(tv, images, targets, tv_bf16), _step(ours, images, targets, ours_bf16)
            else:
                tv.eval(), ours.eval()
                a, b = _infer(tv, images, tv_bf16), _infer(ours, images, ours_bf16)
            name = tv_name if tv_name == ours_name else f"{ours_name} vs {tv_name}"
            row(phase, name, *_median_pair(a, b, args.rounds))
            del tv, ours, a, b
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
