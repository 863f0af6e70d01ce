"""Command-line paths no other test ran, through a subprocess as a user runs them: a short
``demo``, ``bench``, and ``train`` on a ``--shapes-stream`` with ``--val-ann/--val-images``,
``--schedule step --lr-steps``, multi-scale ``--min-size`` and ``--amp``. Tiny models and
images; what the flags do inside training is tests/engine/test_train_paths.py's."""

import json
import os

import pytest
import yaml

from retina_fast.engine import memory

from tests.test_cli import TINY, run

pycocotools = pytest.importorskip("pycocotools")

GLIBC = memory.is_glibc()


def test_train_shapes_stream_val_files_step_schedule_multiscale_amp(tmp_path):
    from retina_fast.data import ShapesConfig, write_shapes_coco

    val = write_shapes_coco(str(tmp_path / "data"), {"val": 4}, seed=3, cfg=ShapesConfig(size=64))["val"]
    out = tmp_path / "run"
    tiny = [a for a in TINY if a not in ("--min-size", "64")]
    p = run("train", "--shapes-stream", 8, "--val-ann", os.path.join(val, "instances.json"),
            "--val-images", os.path.join(val, "images"), "--schedule", "step", "--lr-steps", 1,
            "--min-size", 48, 64, "--max-size", 96, "--amp", "--epochs", 2, "--batch-size", 4,
            "--warmup-iters", 0, "--workers", 0, "--device", "cpu", "--threads", 1, "--out", out,
            "--log-every", 1, "--model-opt", "score_thresh=0.001", *tiny)
    assert "[train] it 4/4" in p.stdout and "Average Precision" in p.stdout, p.stdout + p.stderr
    # the program itself keeps freed memory by default (--malloc auto) and says so
    assert "; memory: " in p.stderr and (GLIBC is False or "memory: keeping freed memory" in p.stderr), p.stderr
    assert "[eval] images 4/4" in p.stdout  # the --val-ann/--val-images split, evaluated
    cfg = yaml.safe_load(open(out / "config.yaml"))
    assert cfg["shapes_stream"] == 8 and cfg["schedule"] == "step" and cfg["lr_steps"] == [1]
    assert cfg["min_size"] == [48, 64] and cfg["amp"] is True
    assert cfg["val_ann"].endswith("instances.json")
    history = json.load(open(out / "history.json"))
    lrs = [h["lr"] for h in (history["history"] if isinstance(history, dict) else history)]
    assert len(lrs) == 4 and lrs[0] > lrs[-1] * 5  # stepped down by 0.1 after epoch 0
    metrics = json.load(open(out / "metrics.json"))
    assert "AP" in metrics


def test_demo_with_max_iters(tmp_path):
    out = tmp_path / "demo"
    p = run("demo", "--max-iters", 2, "--val-images", 4, "--batch-size", 2, "--workers", 0,
            "--device", "cpu", "--threads", 1, "--progress", "none", "--out", out)
    assert "[demo] mAP@[.5:.95]" in p.stdout, p.stdout + p.stderr
    summary = json.load(open(out / "summary.json"))
    assert summary["iterations"] == 2 and summary["stopped_by"] == "max_iters" and summary["val_images"] == 4
    assert GLIBC is False or summary["malloc"].startswith("keeping freed memory"), summary["malloc"]
    for f in ("loss_curve.png", "metrics.json"):
        assert (out / f).is_file(), f
    assert len(os.listdir(out / "predictions")) >= 4


def test_bench_runs_the_benchmark_files():
    # one small benchmark through `retina-fast bench`, timed for a single round
    p = run("bench", "-k", "test_box_iou and ours and cpu", "--benchmark-min-rounds=1", "--benchmark-max-time=0",
            "--benchmark-warmup=off", "-p", "no:cacheprovider")
    assert p.stdout.startswith("[bench] ") and "--benchmark-only" in p.stdout.splitlines()[0]
    assert "1 passed" in p.stdout and "box_iou 100 x 76725 cpu" in p.stdout, p.stdout
