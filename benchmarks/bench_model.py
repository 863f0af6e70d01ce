"""End-to-end RetinaNet benchmarks (pytest-benchmark): ours vs torchvision vs torchvision
patched with ``retina_fast.patch_torchvision``, same weights, same inputs, same run.

    python -m pytest benchmarks/bench_model.py --benchmark-only [-k cpu|cuda] [--benchmark-json out.json]

Configurations (ResNet-50-FPN v1, 91 classes, ~10 gt boxes per image):
  - CPU: batch 2 at 512 px (``min_size = max_size = 512``);
  - CUDA: batch 16 at 800 px (training step and inference), and batch 1 at 800 px inference
    (latency).
Timed calls:
  - ``train_step``: forward + loss + backward (gradients zeroed first);
  - ``inference``: eval forward (transform, backbone, head, post-processing, mapping back);
  - ``head_loss``: everything after the FPN in training: anchors -> matching -> focal and box
    losses -> backward into the head outputs (torchvision: ``RetinaNet.compute_loss``);
  - ``head_postprocess``: post-processing of given head outputs (torchvision:
    ``RetinaNet.postprocess_detections`` on its per-level splits).
  The last two are where our kernels act: their ratio is the one this project controls;
  - ``head_loss_parts`` (CPU): the head-side loss cut into its parts (packing the targets,
    anchors, matching, focal loss forward + backward, box loss forward + backward), each
    timed alone as CPU time of one thread (``time.thread_time``, minimum of repeats: robust on
    a shared machine), with torchvision's whole ``compute_loss`` + backward in the same run;
    the shares and the ratio go to ``extra_info`` and are printed (``-s``).
Random weights would leave every score at ~0.01 (< score_thresh 0.05, nothing to post-process):
the classification bias is drawn from N(-4, 1) so that a realistic share of candidates passes.
CUDA timings synchronise inside the timed call.
"""

import copy
import json

import pytest
import torch

import retina_fast
from retina_fast.engine import precision as rprec
from retina_fast.engine import speed
from benchmarks import quick, record_untimed

HAS_CUDA = torch.cuda.is_available() and retina_fast.cuda_built()
IMPLS = ("torchvision", "ours", "patched")
CONFIGS = {  # name: (device, batch, size, rounds)
    "cpu-b2-512": ("cpu", 2, 512, 5),  # 5 rounds: a step is ~5 s and this machine is noisy
    "cuda-b16-800": ("cuda", 16, 800, 10),
    "cuda-b1-800": ("cuda", 1, 800, 30),
}
if quick():  # --benchmark-disable: one small step of each, nothing measured (benchmarks/conftest.py)
    CONFIGS = {k: (d, 1, 128, 1) for k, (d, _, _, _) in CONFIGS.items()}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _config(name):
    device, B, size, rounds = CONFIGS[name]
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA device and a CUDA build")
    return device, B, size, rounds


_MODELS = {}


def _models(name):
    if name in _MODELS:
        return _MODELS[name]
    device, B, size, _ = _config(name)
    tv, ours = speed.build_pair(size, device)  # the same models and inputs as `retina-fast bench model`
    patched = retina_fast.patch_torchvision(copy.deepcopy(tv))
    images, targets = speed.example_inputs(B, size, device)
    models = {"torchvision": tv, "ours": ours, "patched": patched}
    _MODELS[name] = (models, images, targets)
    return _MODELS[name]


def _train_step(model, images, targets, device):
    model.zero_grad(set_to_none=True)
    losses = model(images, targets)
    (losses["classification"] + losses["bbox_regression"]).backward()
    _sync(device)


def _infer(model, images, device):
    with torch.no_grad():
        out = model(images)
    _sync(device)
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("config", ["cpu-b2-512", "cuda-b16-800"])
def test_train_step(benchmark, config, impl):
    device, B, size, rounds = _config(config)
    models, images, targets = _models(config)
    model = models[impl].train()
    benchmark.group = f"train_step {config}"
    benchmark.pedantic(_train_step, args=(model, images, targets, device), rounds=rounds, warmup_rounds=1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("config", ["cpu-b2-512", "cuda-b16-800", "cuda-b1-800"])
def test_inference(benchmark, config, impl):
    device, B, size, rounds = _config(config)
    models, images, _ = _models(config)
    model = models[impl].eval()
    benchmark.group = f"inference {config}"
    out = benchmark.pedantic(_infer, args=(model, images, device), rounds=rounds, warmup_rounds=1)
    benchmark.extra_info["detections_per_image"] = [len(d["scores"]) for d in out]


def _head_inputs(config):
    """Head outputs, anchors and transformed targets, as the model has them after the FPN."""
    device, B, size, _ = _config(config)
    models, images, targets = _models(config)
    tv = models["torchvision"].eval()
    with torch.no_grad():
        il, tt = tv.transform(images, copy.deepcopy(targets))
        feats = list(tv.backbone(il.tensors).values())
        head = tv.head(feats)
    return models, il, tt, feats, head


@pytest.mark.parametrize("impl", ["torchvision", "ours"])
@pytest.mark.parametrize("config", ["cpu-b2-512", "cuda-b16-800"])
def test_head_loss(benchmark, config, impl):
    device, B, size, rounds = _config(config)
    models, il, targets, feats, head = _head_inputs(config)
    model = models[impl]
    cls = head["cls_logits"].detach().requires_grad_()
    reg = head["bbox_regression"].detach().requires_grad_()

    def run():
        outs = {"cls_logits": cls, "bbox_regression": reg}
        if impl == "ours":
            anchors = model.anchors(tuple(il.tensors.shape[-2:]), feats)
        else:
            anchors = model.anchor_generator(il, feats)
        losses = model.compute_loss(targets, outs, anchors)
        torch.autograd.grad(losses["classification"] + losses["bbox_regression"], (cls, reg))
        _sync(device)
        return {k: v.detach() for k, v in losses.items()}

    benchmark.group = f"head_loss {config}"
    got = benchmark.pedantic(run, rounds=rounds * 3, warmup_rounds=1)
    if impl == "ours":  # the thing timed is the loss torchvision computes (cheap: one call)
        tv = models["torchvision"]
        want = tv.compute_loss(targets, {"cls_logits": cls, "bbox_regression": reg}, tv.anchor_generator(il, feats))
        for k in want:
            torch.testing.assert_close(got[k], want[k].detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["torchvision", "ours"])
@pytest.mark.parametrize("config", ["cpu-b2-512", "cuda-b16-800", "cuda-b1-800"])
def test_head_postprocess(benchmark, config, impl):
    device, B, size, rounds = _config(config)
    models, il, _, feats, head = _head_inputs(config)
    model = models[impl]
    A = head["cls_logits"].shape[1] // sum(f.shape[-2] * f.shape[-1] for f in feats)
    per_level = [f.shape[-2] * f.shape[-1] * A for f in feats]
    if impl == "ours":
        anchors = model.anchors(tuple(il.tensors.shape[-2:]), feats)
        args = (head, anchors, il.image_sizes, per_level)
    else:
        anchors = model.anchor_generator(il, feats)
        split = {k: list(v.split(per_level, dim=1)) for k, v in head.items()}
        args = (split, [list(a.split(per_level)) for a in anchors], il.image_sizes)

    def run():
        with torch.no_grad():
            out = model.postprocess_detections(*args)
        _sync(device)
        return out

    benchmark.group = f"head_postprocess {config}"
    out = benchmark.pedantic(run, rounds=rounds * 3, warmup_rounds=1)
    benchmark.extra_info["detections_per_image"] = [len(d["scores"]) for d in out]
    if impl == "ours":  # the same detections as torchvision's post-processing (tie-tolerant)
        from tests.detections import assert_same_detections

        tv = models["torchvision"]
        tv_anchors = tv.anchor_generator(il, feats)
        with torch.no_grad():
            want = tv.postprocess_detections({k: list(v.split(per_level, dim=1)) for k, v in head.items()},
                                             [list(a.split(per_level)) for a in tv_anchors], il.image_sizes)
        assert_same_detections(out, want, box_atol=1e-4, box_rtol=2e-6)


def _cpu_best(fn, reps):
    import time

    fn()
    ts = []
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        ts.append(time.thread_time() - t0)
    return min(ts)


def head_loss_parts(models, il, targets, feats, head, reps=9):
    """Seconds of CPU time (one thread) per part of our head-side loss, and of the whole of
    ours and of torchvision's (compute_loss + backward into the head outputs)."""
    from retina_fast.models.loss import pack_targets
    from retina_fast.ops import matched_box_loss, sigmoid_focal_loss_labels

    ours, tv = models["ours"], models["torchvision"]
    cls = head["cls_logits"].detach().requires_grad_()
    reg = head["bbox_regression"].detach().requires_grad_()
    B, A, K = cls.shape
    size = tuple(il.tensors.shape[-2:])
    anchors = ours.anchors(size, feats)
    packed = pack_targets(targets, cls.device)
    loss = ours.loss
    mt = loss.match(anchors, packed)
    norm = (mt.matches >= 0).sum(1).clamp(min=1).float()
    image_w = 1.0 / (norm * B)

    def focal():
        row_w = image_w.repeat_interleave(A)
        v = sigmoid_focal_loss_labels(cls.reshape(B * A, K), mt.labels.reshape(-1), loss.focal_alpha,
                                      loss.focal_gamma, reduction="sum", weights=row_w)
        torch.autograd.grad(v, cls)

    def box():
        v = matched_box_loss(reg, anchors, mt.matches, packed.boxes, image_w, ours.box_loss,
                             loss.box_coder_weights, loss.bbox_xform_clip, beta=loss.smooth_l1_beta, eps=loss.giou_eps)
        torch.autograd.grad(v, reg)

    def whole_ours():
        a = ours.anchors(size, feats)
        losses = ours.compute_loss(targets, {"cls_logits": cls, "bbox_regression": reg}, a)
        torch.autograd.grad(losses["classification"] + losses["bbox_regression"], (cls, reg))

    def whole_tv():
        a = tv.anchor_generator(il, feats)
        losses = tv.compute_loss(targets, {"cls_logits": cls, "bbox_regression": reg}, a)
        torch.autograd.grad(losses["classification"] + losses["bbox_regression"], (cls, reg))

    parts = {
        "pack_targets": _cpu_best(lambda: pack_targets(targets, cls.device), reps),
        "anchors": _cpu_best(lambda: ours.anchors(size, feats), reps),
        "matching (+ labels)": _cpu_best(lambda: loss.match(anchors, packed), reps),
        "focal fwd+bwd": _cpu_best(focal, reps),
        "box loss fwd+bwd": _cpu_best(box, reps),
    }
    total = _cpu_best(whole_ours, reps)
    parts["rest (autograd, glue)"] = max(0.0, total - sum(parts.values()))
    return parts, total, _cpu_best(whole_tv, max(3, reps // 3))


@pytest.mark.parametrize("config", ["cpu-b2-512"])
def test_head_loss_parts(benchmark, config):
    device, B, size, rounds = _config(config)
    models, il, targets, feats, head = _head_inputs(config)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        parts, total, tv_total = head_loss_parts(models, il, targets, feats, head)
    finally:
        torch.set_num_threads(n)
    benchmark.group = f"head_loss parts {config} (1 thread, CPU time)"
    info = {f"ms_{k}": round(v * 1e3, 2) for k, v in parts.items()}
    info.update({f"share_{k}": round(v / total, 3) for k, v in parts.items()})
    info.update(ms_ours=round(total * 1e3, 2), ms_torchvision=round(tv_total * 1e3, 2),
                speedup=round(tv_total / total, 2))
    benchmark.extra_info.update(info)
    print("\nhead-side loss parts (1 thread, CPU ms):", json.dumps(info))
    record_untimed(benchmark)


def _shapes_small_pair(B=16, size=160, num_classes=3):
    """The demo's model (shapes-small, GIoU box loss) and a torchvision RetinaNet with the same
    modules and weights (torchvision's head class with our 2-conv towers swapped in), on random
    images and ~4 boxes each: the comparison of the demo's training step."""
    from torchvision.models.detection import RetinaNet as TVRetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
    from torchvision.models.detection.retinanet import RetinaNetHead as TVHead

    from retina_fast.engine.model_factory import build_model

    torch.manual_seed(0)
    ours = build_model("shapes-small", num_classes)
    ag = ours.anchor_generator
    gn = ours.head.classification_head.conv[0][1]  # the towers' GroupNorm
    head = TVHead(ours.backbone.out_channels, ag.num_anchors_per_location()[0], num_classes,
                  norm_layer=lambda c: torch.nn.GroupNorm(gn.num_groups, c))
    head.classification_head.conv = copy.deepcopy(ours.head.classification_head.conv)
    head.regression_head.conv = copy.deepcopy(ours.head.regression_head.conv)
    head.regression_head._loss_type = ours.box_loss
    tv = TVRetinaNet(copy.deepcopy(ours.backbone), num_classes, min_size=size, max_size=size,
                     anchor_generator=TVAnchorGenerator(ag.sizes, ag.aspect_ratios), head=head)
    tv.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(B)]
    targets = []
    for _ in range(B):
        xy = torch.rand(4, 2, generator=g) * size * 0.6
        wh = torch.rand(4, 2, generator=g) * size * 0.3 + 6
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, num_classes, (4,), generator=g)})
    return {"torchvision": tv.train(), "ours": ours.train()}, images, targets


@pytest.mark.parametrize("config", ["cpu-b2-512", "cpu-shapes-small-b16-160"])
def test_train_step_cpu_time(benchmark, config):
    """The whole training step, ours vs torchvision (same modules and weights), as CPU time of
    all threads (``time.process_time``, minimum of interleaved rounds: the machine's other load
    moves it little) and wall time, in extra_info. Convolutions are most of a CPU step."""
    import time

    if config == "cpu-shapes-small-b16-160":
        models, images, targets = _shapes_small_pair()
        rounds = 7
    else:
        models, images, targets = _models(config)
        rounds = 3
    if getattr(benchmark, "disabled", False):  # --benchmark-disable (a smoke run): one round
        rounds = 1
    best = {k: [float("inf"), float("inf")] for k in ("ours", "torchvision")}
    first = {}
    for impl in ("ours", "torchvision"):  # warm-up; the first losses, from the same weights
        m = models[impl].train()
        m.zero_grad(set_to_none=True)
        losses = m(images, targets)
        (losses["classification"] + losses["bbox_regression"]).backward()
        first[impl] = {k: float(v) for k, v in losses.items()}
    for _ in range(rounds):
        for impl in ("ours", "torchvision"):  # interleaved: both see the same machine
            c0, w0 = time.process_time(), time.perf_counter()
            _train_step(models[impl], images, targets, "cpu")
            best[impl] = [min(best[impl][0], time.process_time() - c0), min(best[impl][1], time.perf_counter() - w0)]
    info = {"threads": torch.get_num_threads(),
            "cpu_s_ours": round(best["ours"][0], 3), "cpu_s_torchvision": round(best["torchvision"][0], 3),
            "wall_s_ours": round(best["ours"][1], 3), "wall_s_torchvision": round(best["torchvision"][1], 3),
            "cpu_ratio": round(best["torchvision"][0] / best["ours"][0], 3),
            "wall_ratio": round(best["torchvision"][1] / best["ours"][1], 3),
            "first_losses_ours": first["ours"], "first_losses_torchvision": first["torchvision"]}
    benchmark.group = f"train_step cpu time {config}"
    benchmark.extra_info.update(info)
    print(f"\ntrain step {config}:", json.dumps(info))
    record_untimed(benchmark)


# ---------------------------------------------------------------- precision and memory format
# Issue 21: ours and torchvision under each like-for-like setting (the rows of `retina-fast
# bench model`, retina_fast/engine/speed.py, which prints them as one table with ratios), and
# ours under `auto` against torchvision's defaults. Ours in inference is the model's own eval
# forward (on the CPU: the folded, fused copy it keeps, as eval / predict / the demo run it).

_SETTINGS = {"fp32": ("fp32", False), "fp32+cl": ("fp32", True), "bf16": ("bf16", False),
             "bf16+cl": ("bf16", True), "auto": ("auto", None)}
_PAIRS = {}


def _setting_models(setting):
    if setting not in _PAIRS:
        models, images, targets = _models("cpu-b2-512")  # copied for each setting by prepared_pair
        s = rprec.resolve(*_SETTINGS[setting], "cpu")
        _PAIRS[setting] = (s, speed.prepared_pair(models["torchvision"], models["ours"], s, "cpu"), images, targets)
    return _PAIRS[setting]


@pytest.mark.parametrize("impl", ["torchvision", "ours"])
@pytest.mark.parametrize("setting", list(_SETTINGS))
@pytest.mark.parametrize("phase", ["train_step", "inference"])
def test_model_setting(benchmark, phase, setting, impl):
    if setting == "auto" and impl == "torchvision":
        pytest.skip("torchvision has no auto: its default is the fp32 row")
    s, (tv_tr, ours_tr, tv_ev, ours_ev), images, targets = _setting_models(setting)
    benchmark.group = f"{phase} cpu-b2-512 {setting}"
    benchmark.extra_info["settings"] = s.as_dict()
    if phase == "train_step":
        fn = speed.train_step_fn(tv_tr if impl == "torchvision" else ours_tr, images, targets, s, "cpu")
    else:
        fn = speed.inference_fn(tv_ev if impl == "torchvision" else ours_ev, images, s, "cpu")
    out = benchmark.pedantic(fn, rounds=CONFIGS["cpu-b2-512"][3], warmup_rounds=1)
    if phase == "inference":
        benchmark.extra_info["detections_per_image"] = [len(d["scores"]) for d in out]


_FT_PAIRS = {}


@pytest.mark.parametrize("impl", ["torchvision", "ours"])
@pytest.mark.parametrize("setting", ["fp32", "fp32+cl", "bf16", "bf16+cl"])
def test_model_finetune_train_step(benchmark, setting, impl):
    """The train step in the layout torchvision builds for pretrained weights (FrozenBatchNorm2d
    in the ResNet, 3 trainable stages): `retina-fast bench model`'s fine-tuning rows."""
    device, B, size, rounds = _config("cpu-b2-512")
    if setting not in _FT_PAIRS:
        if "pair" not in _FT_PAIRS:
            _FT_PAIRS["pair"] = speed.build_pair(size, device, finetune=True)
        tv, ours = _FT_PAIRS["pair"]
        s = rprec.resolve(*_SETTINGS[setting], device)
        _FT_PAIRS[setting] = (s, speed.torchvision_for(tv, s, device), speed.ours_for(ours, s, device)[0])
    s, tv_tr, ours_tr = _FT_PAIRS[setting]
    images, targets = _models("cpu-b2-512")[1:]
    benchmark.group = f"train_step finetune cpu-b2-512 {setting}"
    benchmark.extra_info["settings"] = s.as_dict()
    fn = speed.train_step_fn(tv_tr if impl == "torchvision" else ours_tr, images, targets, s, device)
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1)
