"""The command line through a subprocess, as a user runs it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model-opt", "widths=[8,8,16,16,16]", "--model-opt", "fpn_channels=16", "--min-size", "64"]


def run(*args, ok=True):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    p = subprocess.run([sys.executable, "-m", "retina_fast", *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    if ok:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def assert_one_line_error(p, needle):
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    lines = [l for l in p.stderr.splitlines() if "error:" in l]
    assert len(lines) == 1 and needle in lines[0], p.stderr


def test_help_for_every_command():
    out = run("--help").stdout
    from retina_fast.cli import build_parser

    for cmd in ("demo", "train", "eval", "predict", "bench", "make-shapes"):
        assert cmd in out
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([cmd, "--help"])
        assert e.value.code == 0
    assert "usage: retina-fast train" in run("train", "--help").stdout


@pytest.mark.skipif(__import__("importlib").util.find_spec("pycocotools") is None, reason="needs pycocotools")
def test_make_shapes_train_eval_predict(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    run("make-shapes", data, "--train", 8, "--val", 4, "--size", 64)
    p = run("train", "--data", data, "--out", out, *TINY, "--epochs", 2, "--batch-size", 4,
            "--workers", 0, "--threads", 1, "--device", "cpu", "--log-every", 1)
    assert "[train] it 1/4" in p.stdout and "Average Precision" in p.stdout
    for f in ("checkpoint.pt", "history.json", "loss_curve.png", "metrics.json", "detections.json"):
        assert (out / f).is_file(), f
    p = run("eval", "--checkpoint", out / "checkpoint.pt", "--data", data / "val", "--out", tmp_path / "ev")
    assert "Average Precision" in p.stdout
    assert set(json.load(open(tmp_path / "ev" / "metrics.json"))) >= {"AP", "AP50", "ARl"}
    p = run("predict", data / "val" / "images", "--checkpoint", out / "checkpoint.pt",
            "--out", tmp_path / "pred", "--score-thresh", 0.0)
    assert len([f for f in os.listdir(tmp_path / "pred") if f.endswith(".png")]) == 4
    assert len(json.load(open(tmp_path / "pred" / "predictions.json"))["images"]) == 4
    # resume continues from the last epoch
    p = run("train", "--data", data, "--out", out, *TINY, "--epochs", 3, "--batch-size", 4,
            "--workers", 0, "--device", "cpu", "--no-eval", "--log-every", 1, "--resume", out / "checkpoint.pt")
    assert "resumed from" in p.stderr and "[train] it 6/6" in p.stdout


def test_bad_inputs_give_one_line_errors(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(img_dir / "a.png")
    good = {"images": [{"id": 1, "file_name": "a.png", "width": 20, "height": 20}],
            "categories": [{"id": 1, "name": "x"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]}]}
    bad_cat = dict(good, annotations=[dict(good["annotations"][0], category_id=4)])
    (tmp_path / "bad_cat.json").write_text(json.dumps(bad_cat))
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "empty.json").write_text(json.dumps(dict(good, images=[], annotations=[])))
    common = ["--train-images", img_dir, "--out", tmp_path / "o", "--omp-wait-policy", "active"]
    assert_one_line_error(run("train", "--train-ann", tmp_path / "bad_cat.json", *common, ok=False),
                          "category_id 4")
    assert_one_line_error(run("train", "--train-ann", tmp_path / "broken.json", *common, ok=False),
                          "not valid JSON")
    assert_one_line_error(run("train", "--train-ann", tmp_path / "empty.json", *common, ok=False),
                          "no usable images")
    assert_one_line_error(run("train", "--train-ann", tmp_path / "missing.json", *common, ok=False),
                          "not found")
    assert_one_line_error(run("eval", "--checkpoint", tmp_path / "nope.pt", "--ann", tmp_path / "broken.json",
                              "--images", img_dir, ok=False), "")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert_one_line_error(run("predict", img_dir, "--checkpoint", tmp_path / "junk.pt",
                              "--out", tmp_path / "p", ok=False), "cannot read checkpoint")
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        assert_one_line_error(run("make-shapes", ro / "x", ok=False), "cannot write")
    assert_one_line_error(run("make-shapes", tmp_path / "empty.json" / "x", ok=False), "cannot write")
