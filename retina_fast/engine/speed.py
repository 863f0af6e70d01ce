"""The whole-model speed table: ours and torchvision, train step and inference, under each
precision and memory format, in one run (``retina-fast bench model``,
``benchmarks/bench_model.py``).

Rows:

* the headline: ours with ``--precision auto`` (what a user of ``retina-fast`` gets by
  default) against torchvision's defaults (float32, NCHW, eager);
* like for like: both under the same setting (float32 or bfloat16 autocast, NCHW or
  channels_last), eager on both sides;
* batch-1 inference latency, ours by default against torchvision's defaults.

Ours is the model as a user holds it, in the setting's memory format: in inference its eval
forward under the setting's autocast (on the CPU that runs the folded, fused copy the model
keeps: :func:`retina_fast.models.fuse.fast_eval_parts`; ``eval``/``predict``/the demo prepare
the same copy with :func:`~retina_fast.models.fuse.prepare_for_inference`), in training the
model as the trainer runs it (autocast). The fine-tuning rows build both models in the layout
torchvision uses with a pretrained backbone (FrozenBatchNorm2d, 3 trainable stages). torchvision's
model is torchvision's own builder with the same weights, moved to the same memory format
under the same autocast. Times are medians of ``rounds`` calls after ``warmup`` calls, the
implementations interleaved call by call so a change in the machine's load hits both.
Random weights leave every score near 0.01, under the 0.05 threshold: the classification
bias is drawn from N(-4, 1) so a realistic share of candidates reaches post-processing.
"""

from __future__ import annotations

import copy
import platform
import statistics
import time

import torch

from retina_fast.engine import memory
from retina_fast.engine import precision as rprec

#: (precision, channels_last) of the like-for-like rows
LIKE_FOR_LIKE = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))


def machine_info(device) -> dict:
    """The CPU (model name, flags that matter for bfloat16) or GPU, threads, torch, allocator."""
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "malloc": memory.describe()}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        return info
    name = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu"] = name
    info.update(rprec.cpu_features())
    flags = rprec._cpuinfo_flags()
    info["cpu_flags"] = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx_vnni")) or f in ("avx2", "fma"))
    return info


def example_inputs(B: int, size: int, device, seed: int = 0):
    """``(images, targets)``: ``B`` random images of ``size`` px, 10 random boxes of 91 classes each."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g).to(device) for _ in range(B)]
    targets = []
    for _ in range(B):
        xy = torch.rand(10, 2, generator=g) * size * 0.7
        wh = torch.rand(10, 2, generator=g) * size * 0.3 + 8
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(0, 91, (10,), generator=g).to(device)})
    return images, targets


def build_pair(size: int, device="cpu", seed: int = 0, finetune: bool = False):
    """(torchvision's retinanet_resnet50_fpn, ours with its state_dict), float32, NCHW.

    ``finetune``: the layout torchvision builds for a pretrained backbone (``weights_backbone``
    given): ``FrozenBatchNorm2d`` in the ResNet, its first two stages frozen (3 trainable), as a
    user fine-tuning from ImageNet or COCO weights trains; built without loading any (nothing is
    downloaded). Otherwise the layout without weights: ``BatchNorm2d`` (batch statistics in
    training), every stage trainable."""
    from torchvision.models.detection import retinanet_resnet50_fpn as tv_retinanet

    from retina_fast.models import retinanet_resnet50_fpn

    torch.manual_seed(seed)
    if finetune:
        from torchvision.models import resnet50
        from torchvision.models.detection.retinanet import RetinaNet, _resnet_fpn_extractor
        from torchvision.ops.feature_pyramid_network import LastLevelP6P7
        from torchvision.ops.misc import FrozenBatchNorm2d

        body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        backbone = _resnet_fpn_extractor(body, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
        tv = RetinaNet(backbone, 91, min_size=size, max_size=size)
        ours = retinanet_resnet50_fpn("v1", is_trained=True, bn_eps=1e-5, min_size=size, max_size=size)
    else:
        tv = tv_retinanet(weights=None, weights_backbone=None, min_size=size, max_size=size)
        ours = retinanet_resnet50_fpn("v1", min_size=size, max_size=size)
    with torch.no_grad():
        tv.head.classification_head.cls_logits.bias.normal_(-4.0, 1.0)
    ours.load_state_dict(tv.state_dict(), strict=True)
    if finetune:
        trainable = {n for n, p in tv.named_parameters() if p.requires_grad}
        assert trainable == {n for n, p in ours.named_parameters() if p.requires_grad}, "trainable sets differ"
    return tv.to(device), ours.to(device)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def train_step_fn(model, images, targets, settings, device):
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        with settings.autocast():
            losses = model(images, targets)
        (losses["classification"] + losses["bbox_regression"]).backward()
        _sync(device)
    return step


def inference_fn(model, images, settings, device):
    model.eval()

    def infer():
        with torch.no_grad(), settings.autocast():
            out = model(images)
        _sync(device)
        return out
    return infer


def interleaved_rounds(fns: dict, rounds: int, warmup: int = 1, min_round_s: float = 0.0, sync=None,
                       alternate: bool = True) -> dict:
    """``{name: [seconds per call, one per round]}``: each round calls every function in turn.

    ``warmup`` calls of each first; with ``min_round_s``, the first of them sets how many calls
    a round makes of that function (at least ``min_round_s`` seconds: short calls are noisy).
    ``sync`` (e.g. ``torch.cuda.synchronize``) is called around each timed stretch.
    ``alternate``: reverse the order every other round. (In one fixed order the same model
    timed second ran 7 % faster than timed first, R50-FPN b2 512 px train step on the 2-core
    CPU: what the first call leaves behind, in the allocator and the caches, helps the next.)"""
    sync = sync or (lambda: None)
    names = list(fns)
    reps = dict.fromkeys(names, 1)
    for i in range(warmup):
        for k in names:
            t = time.perf_counter()
            fns[k]()
            sync()
            if i == 0 and min_round_s:
                reps[k] = max(1, int(min_round_s / max(time.perf_counter() - t, 1e-6)))
    times = {k: [] for k in names}
    for r in range(rounds):
        for k in (names[::-1] if alternate and r % 2 else names):
            sync()
            t = time.perf_counter()
            for _ in range(reps[k]):
                fns[k]()
            sync()
            times[k].append((time.perf_counter() - t) / reps[k])
    return times


def time_interleaved(fns: dict, rounds: int, warmup: int = 1) -> dict:
    """``{name: median seconds}`` of :func:`interleaved_rounds` (order alternating)."""
    return {k: statistics.median(v) for k, v in interleaved_rounds(fns, rounds, warmup).items()}


def torchvision_for(tv, settings, device):
    """torchvision's model in ``settings``' memory format (a copy; train step and inference)."""
    return copy.deepcopy(tv).to(device, memory_format=settings.memory_format)


def ours_for(ours, settings, device):
    """``(train, eval)``: copies of our model in ``settings``' memory format, as a user holds
    it: the train step calls it in training mode, inference in eval mode under
    ``settings.autocast()`` (on the CPU its eval forward runs the folded, fused copy it keeps:
    :func:`retina_fast.models.fuse.fast_eval_parts`; ``eval``/``predict``/the demo prepare the
    same with :func:`~retina_fast.models.fuse.prepare_for_inference`)."""
    ours = copy.deepcopy(ours).to(device, memory_format=settings.memory_format)
    return ours, copy.deepcopy(ours)


def prepared_pair(tv, ours, settings, device):
    """torchvision's and our model for ``settings``: (tv_train, ours_train, tv_eval, ours_eval)."""
    tv_s = torchvision_for(tv, settings, device)
    ours_train, ours_eval = ours_for(ours, settings, device)
    return tv_s, ours_train, tv_s, ours_eval


def _short_name(settings) -> str:
    """``bf16+cl``, ``fp32``: a setting's precision and memory format in a table cell."""
    return settings.precision + ("+cl" if settings.channels_last else "")


def _like_for_like(precision: str, channels_last: bool) -> str:
    return f"like for like: {precision}{', channels_last' if channels_last else ', NCHW'}"


def model_table(batch: int = 2, size: int = 512, device="cpu", rounds: int = 5, warmup: int = 1,
                latency_rounds: int | None = None, rows=LIKE_FOR_LIKE, train: bool = True,
                infer: bool = True, default_precision: str = "auto", default_channels_last=None,
                log=print, finetune_rows=()) -> dict:
    """Measure and return ``{"machine", "config", "headline", "rows", "finetune_rows",
    "latency"}``; each row holds the medians in ms and torchvision / ours ratios. ``log`` gets a
    line per measurement. ``finetune_rows``: like-for-like train steps of the fine-tuning layout
    (:func:`build_pair` ``finetune``: FrozenBatchNorm2d, 3 trainable stages); its inference is
    the same network as the other rows' and is not measured again."""
    device = torch.device(device)
    tv, ours = build_pair(size, device)
    images, targets = example_inputs(batch, size, device)
    fp32 = rprec.resolve("fp32", False, device)
    auto = rprec.resolve(default_precision, default_channels_last, device)
    out = {"machine": machine_info(device),
           "config": {"model": "retinanet_resnet50_fpn (v1)", "batch": batch, "size": size, "device": str(device),
                      "rounds": rounds, "warmup": warmup, "timing": "median wall time, interleaved"},
           "ours_default": auto.as_dict(), "rows": []}

    def measure(label, tv_settings, ours_settings, pair=(tv, ours), infer=infer):
        tv_tr = tv_ev = torchvision_for(pair[0], tv_settings, device)
        ours_tr, ours_ev = ours_for(pair[1], ours_settings, device)
        row = {"setting": label, "torchvision": _short_name(tv_settings), "ours": _short_name(ours_settings)}
        if train:
            t = time_interleaved({"tv": train_step_fn(tv_tr, images, targets, tv_settings, device),
                                  "ours": train_step_fn(ours_tr, images, targets, ours_settings, device)},
                                 rounds, warmup)
            row.update(tv_train_ms=round(t["tv"] * 1e3, 1), ours_train_ms=round(t["ours"] * 1e3, 1),
                       train_ratio=round(t["tv"] / t["ours"], 3))
        if infer:
            t = time_interleaved({"tv": inference_fn(tv_ev, images, tv_settings, device),
                                  "ours": inference_fn(ours_ev, images, ours_settings, device)},
                                 rounds, warmup)
            row.update(tv_infer_ms=round(t["tv"] * 1e3, 1), ours_infer_ms=round(t["ours"] * 1e3, 1),
                       infer_ratio=round(t["tv"] / t["ours"], 3))
        log(format_row(row))
        del tv_tr, ours_tr, tv_ev, ours_ev
        return row

    out["headline"] = measure(f"ours {_short_name(auto)} (auto) vs "
                              "torchvision's defaults (fp32, NCHW)", fp32, auto)
    for precision, cl in rows:
        s = rprec.resolve(precision, cl, device)
        out["rows"].append(measure(_like_for_like(precision, cl), s, s))
    out["finetune_rows"] = []
    if finetune_rows and train:
        pair = build_pair(size, device, finetune=True)
        for precision, cl in finetune_rows:
            s = rprec.resolve(precision, cl, device)
            out["finetune_rows"].append(measure("fine-tuning layout, " + _like_for_like(precision, cl), s, s,
                                                pair, infer=False))
        del pair
    if latency_rounds:
        tv_ev = torchvision_for(tv, fp32, device)
        ours_ev = ours_for(ours, auto, device)[1]
        t = time_interleaved({"tv": inference_fn(tv_ev, images[:1], fp32, device),
                              "ours": inference_fn(ours_ev, images[:1], auto, device)}, latency_rounds, warmup)
        out["latency"] = {"batch": 1, "tv_ms": round(t["tv"] * 1e3, 1), "ours_ms": round(t["ours"] * 1e3, 1),
                          "ratio": round(t["tv"] / t["ours"], 3)}
        log(f"batch-1 inference latency: torchvision (fp32, NCHW) {out['latency']['tv_ms']} ms, ours (auto) "
            f"{out['latency']['ours_ms']} ms: {out['latency']['ratio']}x")
    return out


def format_row(row: dict) -> str:
    parts = [row["setting"] + ":"]
    if "train_ratio" in row:
        parts.append(f"train step {row['tv_train_ms']:.0f} / {row['ours_train_ms']:.0f} ms = {row['train_ratio']:.2f}x;")
    if "infer_ratio" in row:
        parts.append(f"inference {row['tv_infer_ms']:.0f} / {row['ours_infer_ms']:.0f} ms = {row['infer_ratio']:.2f}x")
    return " ".join(parts)


def markdown(table: dict) -> str:
    """The table as the README shows it."""
    m, c = table["machine"], table["config"]
    lines = [f"R50-FPN v1, batch {c['batch']}, {c['size']} px, {c['device']}"
             f" ({m.get('cpu') or m.get('gpu')}, {m['threads']} threads, torch {m['torch']}); "
             f"{c['timing']}, {c['rounds']} rounds. Ratios are torchvision / ours.", "",
             "| setting | train step: torchvision | ours | ratio | inference: torchvision | ours | ratio |",
             "|---|---|---|---|---|---|---|"]
    for row in [table["headline"]] + table["rows"] + table.get("finetune_rows", []):
        lines.append(f"| {row['setting']} | {row.get('tv_train_ms', '-')} ms | {row.get('ours_train_ms', '-')} ms | "
                     f"**{row.get('train_ratio', '-')}x** | {row.get('tv_infer_ms', '-')} ms | "
                     f"{row.get('ours_infer_ms', '-')} ms | **{row.get('infer_ratio', '-')}x** |")
    if table.get("latency"):
        lt = table["latency"]
        lines.append(f"| batch-1 inference latency, ours (auto) vs torchvision's defaults | | | | {lt['tv_ms']} ms | "
                     f"{lt['ours_ms']} ms | **{lt['ratio']}x** |")
    return "\n".join(lines)
