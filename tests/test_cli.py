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


def _env(extra=None, drop=()):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    env.update(extra or {})
    for k in drop:
        env.pop(k, None)
    return env


def run(*args, ok=True):
    p = subprocess.run([sys.executable, "-m", "retina_fast", *map(str, args)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    if ok:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def assert_one_line_error(p, needle):
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    lines = [l for l in p.stderr.splitlines() if "error:" in l]
    assert len(lines) == 1 and needle in lines[0], p.stderr


def test_help_for_every_command(capsys):
    import re

    out = run("--help").stdout
    from retina_fast.cli import _bench_model_parser, build_parser

    for cmd in ("demo", "train", "eval", "predict", "export", "bench", "make-shapes", "env"):
        assert cmd in out
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args([cmd, "--help"])
        assert e.value.code == 0
    with pytest.raises(SystemExit):
        _bench_model_parser().parse_args(["--help"])
    # each option states its default once, and never as argparse's raw None
    text = " ".join(capsys.readouterr().out.split())
    assert "--malloc" in text and "(default: 240 on CPU, 75 on GPU)" in text
    assert not re.findall(r"\(default: [^)]*\) \(default: [^)]*\)", text)
    assert "(default: None)" not in text and "(default: True)" not in text
    assert "usage: retina-fast train" in run("train", "--help").stdout


@pytest.mark.skipif(__import__("importlib").util.find_spec("pycocotools") is None, reason="needs pycocotools")
def test_make_shapes_train_eval_predict(tmp_path):
    import torch
    import yaml

    data, out = tmp_path / "data", tmp_path / "run"
    run("make-shapes", data, "--train", 8, "--val", 4, "--size", 64)
    # the tiny model from a config file; flags on the command line add to it
    (tmp_path / "tiny.yaml").write_text(
        "model_opt: {widths: [8, 8, 16, 16, 16], fpn_channels: 16, score_thresh: 0.001}\nmin_size: [64]\n"
        "epochs: 2\nbatch-size: 4\nworkers: 0\n")
    tb = ["--tensorboard"] if __import__("importlib").util.find_spec("tensorboard") else []
    p = run("train", "--config", tmp_path / "tiny.yaml", "--data", data, "--out", out, "--threads", 1,
            "--device", "cpu", "--log-every", 1, *tb)
    assert "[train] it 1/4" in p.stdout and "eta " in p.stdout and "Average Precision" in p.stdout
    assert "[eval] images 4/4" in p.stdout and "Per class" in p.stdout and "triangle" in p.stdout
    for f in ("checkpoint.pt", "history.json", "loss_curve.png", "metrics.json", "detections.json",
              "config.yaml", "log.txt", "metrics.jsonl", "per_class.csv", "pr_curves.png"):
        assert (out / f).is_file(), f
    config = yaml.safe_load(open(out / "config.yaml"))
    assert config["batch_size"] == 4 and config["threads"] == 1 and config["model_opt"]["fpn_channels"] == 16
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"] == config
    log_txt = (out / "log.txt").read_text()
    assert log_txt.startswith("== ") and "retina-fast train --config" in log_txt.splitlines()[0]
    assert "[train] it 4/4" in log_txt and "trained 4 iterations" in log_txt and "Per class" in log_txt
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["iter"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]
    assert recs[-1]["kind"] == "eval" and recs[-1]["iter"] == 4 and "AP50" in recs[-1]
    assert bool(tb) == (out / "tensorboard").is_dir()

    p = run("eval", "--checkpoint", out / "checkpoint.pt", "--data", data / "val", "--out", tmp_path / "ev")
    assert "Average Precision" in p.stdout and "AP by object size" in p.stdout
    metrics = json.load(open(tmp_path / "ev" / "metrics.json"))
    assert set(metrics) >= {"AP", "AP50", "ARl", "per_class"}
    assert [r["name"] for r in metrics["per_class"]] == ["circle", "square", "triangle"]
    assert (tmp_path / "ev" / "pr_curves.png").is_file() and (tmp_path / "ev" / "log.txt").is_file()
    p = run("predict", data / "val" / "images", "--checkpoint", out / "checkpoint.pt",
            "--out", tmp_path / "pred", "--score-thresh", 0.0, "--batch-size", 3, "--min-size", 96)
    assert len([f for f in os.listdir(tmp_path / "pred") if f.endswith(".png")]) == 4
    assert len(json.load(open(tmp_path / "pred" / "predictions.json"))["images"]) == 4
    results = json.load(open(tmp_path / "pred" / "coco_results.json"))
    assert results and set(results[0]) == {"image_id", "category_id", "bbox", "score"}
    assert {r["image_id"] for r in results} <= {1, 2, 3, 4} and {r["category_id"] for r in results} <= {1, 2, 3}
    # resume continues from the last epoch; the flags may come from the saved config
    p = run("train", "--config", out / "config.yaml", "--epochs", 3, "--no-eval",
            "--resume", out / "checkpoint.pt")
    assert "resumed from" in p.stderr and "[train] it 6/6" in p.stdout
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["iter"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


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


def test_crafted_checkpoint_is_refused_by_every_command(tmp_path):
    """A checkpoint whose unpickling runs code: eval, predict and train --resume refuse it with
    one line, and the code never runs (the marker file it would write does not exist)."""
    from tests.engine.test_checkpoint import crafted_checkpoint

    marker = tmp_path / "ran"
    evil = crafted_checkpoint(tmp_path / "evil.pt", marker, "system")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    argvs = [["eval", "--checkpoint", evil, "--ann", tmp_path / "x.json", "--images", tmp_path],
             ["predict", tmp_path / "a.png", "--checkpoint", evil, "--out", tmp_path / "p"],
             ["train", "--resume", evil, "--shapes-stream", 4, "--batch-size", 2, *TINY, "--out",
              tmp_path / "t", "--omp-wait-policy", "active", "--workers", 0]]
    procs = [_popen(a) for a in argvs]
    for p in procs:
        p.stdout, p.stderr = p.communicate(timeout=300)
        assert_one_line_error(p, "refusing to load checkpoint")
        assert "posix.system" in p.stderr and "nothing of it was run" in p.stderr
    assert not marker.exists()


def _popen(args, env_extra=None, drop=()):
    return subprocess.Popen([sys.executable, "-m", "retina_fast", *map(str, args)], cwd=ROOT,
                            env=_env(env_extra, drop), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_every_class_of_user_error_is_one_line_in_a_real_process(tmp_path):
    """One process per class of error, all started at once (each is mostly `import torch`).
    Bad paths and files have theirs above; every subcommand's variants run in-process below."""
    (tmp_path / "bad.yaml").write_text("batchsize: 4\n")
    hide = tmp_path / "hide"  # a sitecustomize that makes tensorboard look uninstalled
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['tensorboard'] = None\n")
    ck = tmp_path / "none.pt"
    cases = {
        "bad flag or value": (["eval", "--checkpoint", ck, "--batch-size", "many"], "invalid int value: 'many'"),
        "out of range": (["predict", tmp_path, "--checkpoint", ck, "--batch-size", 0],
                         "--batch-size: must be at least 1, not 0"),
        "model name": (["train", "--model", "resnet5-fpn"], "unknown model 'resnet5-fpn'"),
        "model option": (["train", "--model", "resnet18-fpn", "--model-opt", 'norm="gn"'],
                         "unknown option(s) for resnet18-fpn: ['norm']"),
        "config": (["train", "--config", tmp_path / "bad.yaml"], "unknown key 'batchsize'"),
        "device": (["demo", "--device", "gpu", "--out", tmp_path / "d"], "'gpu' is not a device"),
        "missing package": (["train", "--tensorboard", "--print-config"], "pip install tensorboard"),
    }
    hidden = {"PYTHONPATH": f"{hide}{os.pathsep}{ROOT}"}
    procs = {name: _popen(argv, hidden if name == "missing package" else None)
             for name, (argv, _) in cases.items()}
    # --omp-wait-policy passive restarts `python -m retina_fast` once, then reports the error
    procs["re-exec"] = _popen(["train", "--omp-wait-policy", "passive", "--data", tmp_path / "nodata",
                               "--out", tmp_path / "o"], drop=("OMP_WAIT_POLICY", "RETINA_FAST_REEXEC"))
    cases["re-exec"] = (None, "holds no instances.json")
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        p.stdout, p.stderr = out, err
        assert_one_line_error(p, cases[name][1])
    assert "restarting with OMP_WAIT_POLICY=PASSIVE" in procs["re-exec"].stderr


@pytest.fixture
def keep_threads():
    import torch

    n = torch.get_num_threads()  # main() sets the thread count for the commands that run
    yield
    torch.set_num_threads(n)


def _run_main(capsys, argv):
    from retina_fast.cli import main

    rc = main(list(map(str, argv)))
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["demo", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["demo", "--time-budget", "-5"], "--time-budget: must be positive"),
    (["demo", "--progress", "fancy"], "invalid choice: 'fancy'"),
    (["demo", "--threads", "-1"], "--threads: must be at least 0"),
    (["train", "--hflip", "1.5"], "--hflip: must be between 0 and 1"),
    (["train", "--epochs", "0"], "--epochs: must be at least 1"),
    (["train", "--lr", "nan"], "--lr: must be a finite number, not nan"),
    (["train", "--time-budget", "inf"], "--time-budget: must be a finite number, not inf"),
    (["train", "--log-every", "0"], "--log-every: must be at least 1"),
    (["train", "--seed", "-1"], "--seed: must be at least 0"),
    (["train", "--device", "cpu:x"], "'cpu:x' is not a device"),
    (["train", "--model", "resnet50"], "unknown model 'resnet50'"),
    (["train", "--model-opt", "head_convs"], "expected KEY=VALUE"),
    (["train", "--model-opt", "widths=[8]"], "cannot be built with widths=[8]"),
    (["train", "--model-opt", "norm=\"xx\""], "norm must be 'bn' or 'gn'"),
    (["train", "--config", "missing.yaml"], "config file not found: missing.yaml"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["predict", "missing.png", "--checkpoint", "x.pt"], "no such image or folder: missing.png"),
    (["train", "--min-size", "0"], "--min-size: must be at least 1"),
    (["eval", "--checkpoint", "x.pt"], "give --data SPLIT_DIR"),
    (["eval", "--checkpoint", "x.pt", "--device", "tpu"], "'tpu' is not a device"),
    (["eval", "--checkpoint", "x.pt", "--coco-backend", "fast"], "invalid choice: 'fast'"),
    (["predict", "x.png", "--checkpoint", "x.pt", "--min-size", "-3"], "--min-size: must be at least 1"),
    (["predict", "x.png", "--checkpoint", "x.pt", "--max-size", "0"], "--max-size: must be at least 1"),
    (["predict", "--checkpoint", "x.pt"], "the following arguments are required: inputs"),
    (["make-shapes", "out", "--size", "8"], "--size: must be at least 32"),
    (["make-shapes", "out", "--train", "-1"], "--train: must be at least 0"),
    (["nope"], "invalid choice: 'nope'"),
])
def test_user_errors_in_every_subcommand_are_one_line(capsys, keep_threads, argv, needle):
    rc, err = _run_main(capsys, argv)
    assert rc == 2 and "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and needle in lines[0], err


def test_main_called_from_python_never_replaces_the_process(monkeypatch, capsys, keep_threads, tmp_path):
    import retina_fast.cli as cli

    class Replaced(Exception):
        pass

    def fake_execve(*a):
        raise Replaced(a)

    monkeypatch.setattr(os, "execve", fake_execve)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("RETINA_FAST_REEXEC", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))  # a busy machine: auto -> passive
    argv = ["train", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "o")]
    for policy in ("auto", "passive"):
        rc, err = _run_main(capsys, argv + ["--omp-wait-policy", policy])
        assert rc == 2 and "holds no instances.json" in err and "does not restart" in err
    # the retina-fast script itself (main() with no arguments, argv[0] the script) may restart
    monkeypatch.setattr(sys, "argv", ["/venv/bin/retina-fast"] + argv)
    with pytest.raises(Replaced) as e:
        cli.main()
    assert e.value.args[0][1][1:3] == ["-m", "retina_fast"] and e.value.args[0][2]["OMP_WAIT_POLICY"] == "PASSIVE"
    # a notebook's sys.argv is not the script: no restart even with argv=None
    monkeypatch.setattr(sys, "argv", ["/usr/lib/ipykernel_launcher.py", "-f", "kernel.json"])
    assert cli.main(argv + ["--omp-wait-policy", "passive"]) == 2


@pytest.mark.skipif(__import__("importlib").util.find_spec("pycocotools") is None, reason="needs pycocotools")
def test_eval_and_predict_precision_flags(tmp_path, capsys, monkeypatch):
    """eval / predict --precision, --no-channels-last and --compile, in process on a tiny
    checkpoint and 3 images: the settings reach metrics.json; --compile hands the backbone and
    the head (only) to torch.compile (here a stand-in: compiling takes minutes on 2 cores)."""
    import torch

    from retina_fast.cli import main
    from retina_fast.engine import build_model
    from retina_fast.engine.checkpoint import FORMAT
    from tests.engine.test_evaluate import _dataset

    ds = _dataset(tmp_path)
    kw = {"widths": [8, 8, 16, 16, 16], "fpn_channels": 16, "min_size": 64}
    torch.manual_seed(0)
    model = build_model("shapes-small", 2, **kw)
    torch.save({"format": FORMAT, "model": model.state_dict(), "categories": ds.categories,
                "model_config": {"name": "shapes-small", "num_classes": 2, "kwargs": kw}}, tmp_path / "ck.pt")
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m, **k: compiled.append(type(m).__name__) or m)
    common = ["--checkpoint", tmp_path / "ck.pt", "--threads", 1]
    n = torch.get_num_threads()
    try:
        for flags, want in ((["--precision", "fp32", "--no-channels-last"], ("fp32", False)),
                            (["--precision", "bf16"], ("bf16", True))):
            out = tmp_path / f"ev-{want[0]}"
            rc = main(["eval", *common, "--ann", tmp_path / "instances.json", "--images", tmp_path / "images",
                       "--out", out, "--progress", "none", *flags])
            assert rc == 0, capsys.readouterr().err
            got = json.load(open(out / "metrics.json"))["precision"]
            assert (got["precision"], got["channels_last"], got["folded"]) == (*want, 10)
        rc = main(["predict", tmp_path / "images", *common, "--out", tmp_path / "pred", "--precision", "bf16",
                   "--compile"])
        err = capsys.readouterr().err
        assert rc == 0, err
        assert compiled == ["PlainConvFPNBackbone", "RetinaNetHead"]
        assert "precision bf16" in err and "10 BatchNorms folded" in err and "torch.compile: the first batch" in err
        assert len(json.load(open(tmp_path / "pred" / "predictions.json"))["images"]) == 3
    finally:
        torch.set_num_threads(n)
