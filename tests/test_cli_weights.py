"""torchvision's weights through the command line, as a user runs it: ``eval`` / ``predict
--weights FILE --arch ...`` against torchvision's own model on the same images, ``train
--init-from`` / ``--backbone-weights``, and their one-line errors. Stand-in weights: random
torchvision models saved to files (tests/tv_weights.py)."""

import json
import os

import pytest
import torch

from tests.detections import assert_same_coco_results
from tests.test_cli import _popen, assert_one_line_error
from tests.tv_weights import (
    IMAGE_SIZES, SIZE, HubCache, coco_from_detections, fake_coco_state_dict, pycocotools_stats,
    read_images, results_of, tv_builder, tv_enum, write_images, write_split,
)

pytest.importorskip("pycocotools")
RUN = ["--device", "cpu", "--threads", "1"]
SMALL = ["--min-size", SIZE["min_size"], "--max-size", SIZE["max_size"]]
# eval / predict against torchvision's float32 detections: float32, NCHW (the default, auto,
# may be bfloat16 + channels_last); the BatchNorms are still folded (float32 rounding)
FP32 = ["--precision", "fp32", "--no-channels-last"]


def _wait(procs):
    for p in procs:
        p.stdout, p.stderr = p.communicate(timeout=600)
    return procs


def _ok(p):
    assert p.returncode == 0, p.stdout + p.stderr
    return p


@pytest.fixture(scope="module")
def tvw(tmp_path_factory):
    """Weights files for both variants, torchvision's detections with them (its own builder,
    reading them from a hub cache as it would its published weights), and datasets whose
    ground truth is drawn from the detections: COCO ids, renumbered ids 1..K, and v2's."""
    root = tmp_path_factory.mktemp("tvw")
    w = {"root": root}
    with HubCache(root / "hub") as hub:
        for v in ("v1", "v2"):
            w[v] = hub.put(tv_enum(v), fake_coco_state_dict(v))
            tv = tv_builder(v)(weights=tv_enum(v), **SIZE).eval()
            if v == "v1":
                w["images"] = read_images(root / "probe", write_images(root / "probe"))
            with torch.no_grad():
                w[v, "dets"] = tv(w["images"])  # one batch, as eval runs them (--batch-size 8)
    names = [f"{i + 1:06d}.png" for i in range(len(IMAGE_SIZES))]
    for kind, renumber, v in (("coco_ids", False, "v1"), ("renumbered", True, "v1"), ("v2_data", False, "v2")):
        coco, cat_of = coco_from_detections(w[v, "dets"], names, IMAGE_SIZES, renumber=renumber)
        w[kind] = (write_split(root / kind, coco), coco, cat_of)
    return w


def test_eval_with_torchvision_weights_gives_pycocotools_numbers_on_torchvision_detections(tvw, tmp_path):
    runs = {}
    for kind, how in (("coco_ids", "id"), ("renumbered", "auto")):  # auto: by name, all are COCO names
        runs[kind] = ["eval", "--weights", tvw["v1"], "--data", tvw[kind][0], "--out", tmp_path / kind,
                      "--label-map", how, "--coco-backend", "pycocotools", "--progress", "none", *SMALL, *FP32, *RUN]
    runs["v2"] = ["eval", "--weights", tvw["v2"], "--arch", "retinanet_resnet50_fpn_v2", "--data",
                  tvw["v2_data"][0], "--out", tmp_path / "v2", "--coco-backend", "pycocotools",
                  "--progress", "none", *SMALL, *FP32, *RUN]
    procs = dict(zip(runs, _wait([_popen(a) for a in runs.values()])))
    for name, p in procs.items():
        _ok(p)
        _, coco, cat_of = tvw["v2_data" if name == "v2" else name]
        variant = "v2" if name == "v2" else "v1"
        want = pycocotools_stats(coco, results_of(tvw[variant, "dets"], cat_of))
        got = json.load(open(tmp_path / name / "metrics.json"))
        stats = [got[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")]
        assert stats == pytest.approx(want, abs=1e-12), name
        # the ground truth is made from these detections: every number means something (a
        # random model's hundreds of near-identical boxes keep precision, so AP, low)
        assert 0 < got["AP"] < 1 and got["AR100"] > 0.1, (name, stats)
        assert ("category id" if name == "coco_ids" else "COCO category name") in p.stderr
    assert "FrozenBatchNorm2d eps 0 (torchvision's fix for its v1 COCO weights)" in procs["coco_ids"].stderr
    assert "loaded retinanet_resnet50_fpn_v2 weights with 91 classes" in procs["v2"].stderr


def test_predict_with_torchvision_weights_gives_torchvision_detections(tvw, tmp_path):
    folder = os.path.join(tvw["coco_ids"][0], "images")
    p = _ok(_wait([_popen(["predict", folder, "--weights", tvw["v1"], "--out", tmp_path / "pred",
                           "--batch-size", 8, "--score-thresh", 0.5, *SMALL, *FP32, *RUN])])[0])
    got = json.load(open(tmp_path / "pred" / "coco_results.json"))
    want = results_of(tvw["v1", "dets"], {i: i for i in range(91)})  # every label: COCO ids
    assert len(got) == len(want) > 100
    # as multisets per image and category (scores are written to 5 decimals: ties are common,
    # and tied detections may come in either order; tests/detections.py)
    assert_same_coco_results(got, want, score_atol=2e-5, box_atol=0.02)
    drawn = json.load(open(tmp_path / "pred" / "predictions.json"))["images"][0]
    assert drawn["class_names"] and set(drawn["class_names"]) <= set(tv_enum("v1").meta["categories"])
    assert "loaded retinanet_resnet50_fpn weights" in p.stderr


def test_train_init_from_and_backbone_weights(tvw, tmp_path):
    from torchvision.models import resnet18

    from retina_fast.data import write_shapes_coco
    from retina_fast.data.shapes import ShapesConfig
    from retina_fast.engine import load_checkpoint
    from retina_fast.engine.checkpoint import model_from_checkpoint

    write_shapes_coco(str(tmp_path / "data"), {"train": 4}, seed=0, cfg=ShapesConfig(size=64))
    torch.manual_seed(3)
    r18 = resnet18(weights=None).state_dict()
    torch.save(r18, tmp_path / "r18.pth")
    common = ["--data", tmp_path / "data", "--batch-size", 2, "--max-iters", 1, "--min-size", 64,
              "--max-size", 64, "--workers", 0, "--no-eval", "--omp-wait-policy", "active", *RUN]
    init, backbone = _wait([
        _popen(["train", "--model", "retinanet_resnet50_fpn", "--init-from", tvw["v1"], "--out", tmp_path / "ft", *common]),
        _popen(["train", "--model", "resnet18-fpn", "--backbone-weights", tmp_path / "r18.pth",
                "--out", tmp_path / "bb", "--lr", 1e-30, *common]),
    ])
    _ok(init), _ok(backbone)
    assert f"initialised retinanet_resnet50_fpn from {tvw['v1']}" in init.stderr
    assert (f"class head re-initialised (head.classification_head.cls_logits): {tvw['v1']} has 91 classes, "
            "this model 3") in init.stderr
    ck = load_checkpoint(str(tmp_path / "ft" / "checkpoint.pt"))
    assert ck["model_config"]["kwargs"]["is_trained"] is True and ck["model_config"]["kwargs"]["bn_eps"] == 0.0
    coco = torch.load(tvw["v1"], weights_only=True)
    for k, v in ck["model"].items():  # frozen stages (conv1, layer1) and FrozenBatchNorm: the file's
        if k.startswith(("backbone.body.conv1", "backbone.body.layer1", "backbone.body.bn1")) or "running_" in k:
            assert torch.equal(v, coco[k]), k
    rebuilt = model_from_checkpoint(ck)  # eval/predict rebuild the same layout
    assert {m.eps for m in rebuilt.modules() if type(m).__name__ == "FrozenBatchNorm2d"} == {0.0}
    assert f"backbone (backbone.body) initialised from {tmp_path / 'r18.pth'}" in backbone.stderr
    body = load_checkpoint(str(tmp_path / "bb" / "checkpoint.pt"))["model"]
    for k, v in r18.items():  # lr 1e-30: the weights stay the file's (BatchNorm statistics move)
        if not k.startswith("fc.") and "running_" not in k and "num_batches" not in k:
            torch.testing.assert_close(body["backbone.body." + k], v, rtol=0, atol=1e-6)


def test_weights_errors_are_one_line(tvw, tmp_path, capsys):
    """In-process (one import of torch for all of them; test_cli runs the same main() in real
    processes): each mistake is one line on stderr and exit status 2."""
    from retina_fast.cli import main
    from retina_fast.engine.checkpoint import FORMAT

    torch.save({"format": FORMAT, "model": {}}, tmp_path / "ours.pt")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    img = os.path.join(tvw["coco_ids"][0], "images", "000001.png")
    data = tvw["coco_ids"][0]
    stream = ["--shapes-stream", 4, "--batch-size", 2, "--min-size", 64, "--workers", 0, "--omp-wait-policy", "active"]
    cases = {
        "arch": (["predict", img, "--weights", tvw["v2"], "--arch", "retinanet_resnet50_fpn", "--out", tmp_path / "p"],
                 "holds retinanet_resnet50_fpn_v2 weights, not retinanet_resnet50_fpn's"),
        "ours": (["predict", img, "--weights", tmp_path / "ours.pt", "--out", tmp_path / "p"],
                 "is a retina_fast checkpoint: pass it with --checkpoint"),
        "other": (["eval", "--weights", tmp_path / "other.pth", "--data", data], "not a torchvision RetinaNet state_dict"),
        "missing": (["eval", "--weights", tmp_path / "none.pth", "--data", data], "weights not found"),
        "both": (["eval", "--weights", tvw["v1"], "--checkpoint", tmp_path / "ours.pt", "--data", data],
                 "not allowed with argument"),
        "neither": (["eval", "--data", data], "one of the arguments --checkpoint --weights is required"),
        "label map": (["eval", "--weights", tvw["v1"], "--data", tvw["renumbered"][0], "--label-map", "idx"],
                      "invalid choice: 'idx'"),
        "init variant": (["train", "--model", "retinanet_resnet50_fpn", "--init-from", tvw["v2"], *stream,
                          "--out", tmp_path / "t"],
                         "holds retinanet_resnet50_fpn_v2 weights: train with --model retinanet_resnet50_fpn_v2"),
        "no body": (["train", "--backbone-weights", tvw["v1"], *stream, "--out", tmp_path / "t2"],
                    "model shapes-small has no ResNet body"),
        "init misfit": (["train", "--init-from", tvw["v1"], *stream, "--out", tmp_path / "t3"],
                        "does not fit model shapes-small"),
    }
    n = torch.get_num_threads()
    try:
        for name, (argv, needle) in cases.items():
            rc = main([str(a) for a in argv + RUN])
            err = capsys.readouterr().err
            lines = [ln for ln in err.splitlines() if "error:" in ln]
            assert rc == 2 and "Traceback" not in err and len(lines) == 1 and needle in lines[0], (name, err)
    finally:
        torch.set_num_threads(n)


def test_cli_knows_the_factory_architectures():
    from retina_fast import cli
    from retina_fast.engine import model_factory

    assert cli.TORCHVISION_ARCHS == tuple(model_factory.TORCHVISION_ARCHS)
