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
  The last two are where our kernels act: their ratio is the one this project controls.
Random weights would leave every score at ~0.01 (< score_thresh 0.05, nothing to post-process):
the classification bias is drawn from N(-4, 1) so that a realistic share of candidates passes.
CUDA timings synchronise inside the timed call.
"""

import copy

import pytest
import torch
from torchvision.models.detection import retinanet_resnet50_fpn as tv_retinanet

import retina_fast
from retina_fast.models import retinanet_resnet50_fpn
from benchmarks import quick

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
    torch.manual_seed(0)
    tv = tv_retinanet(weights=None, weights_backbone=None, min_size=size, max_size=size)
    with torch.no_grad():
        tv.head.classification_head.cls_logits.bias.normal_(-4.0, 1.0)
    ours = retinanet_resnet50_fpn("v1", min_size=size, max_size=size)
    ours.load_state_dict(tv.state_dict(), strict=True)
    patched = retina_fast.patch_torchvision(copy.deepcopy(tv))
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g).to(device) for _ in range(B)]
    targets = []
    for _ in range(B):
        xy = torch.rand(10, 2, generator=g) * size * 0.7
        wh = torch.rand(10, 2, generator=g) * size * 0.3 + 8
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(0, 91, (10,), generator=g).to(device)})
    models = {"torchvision": tv.to(device), "ours": ours.to(device), "patched": patched.to(device)}
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

    benchmark.group = f"head_loss {config}"
    benchmark.pedantic(run, rounds=rounds * 3, warmup_rounds=1)


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
