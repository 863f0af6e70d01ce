"""Progress lines with an ETA, metrics.jsonl, TensorBoard (optional) and the console copy in log.txt."""

import json
import logging
import sys

import pytest

from retina_fast.data.errors import RetinaFastError
from retina_fast.engine.logging_utils import (
    MetricsLogger, Progress, format_eta, log_file_only, require_tensorboard, start_console_log,
    stop_console_log,
)


def test_progress_lines_end_with_an_eta(capsys):
    now = [100.0]
    p = Progress("lines", 100, "[train]", every=10, start=20, clock=lambda: now[0])
    now[0] = 104.0
    p.update(25, {"loss": "0.5"})               # not due: nothing
    p.update(30, {"loss": "0.4"})               # 10 steps in 4 s -> 70 left = 28 s
    now[0] = 160.0
    p.update(35, force_line=True)               # 15 steps in 60 s -> 65 left = 260 s
    p.update(100, total=100)                    # done: no ETA
    p.close()
    assert capsys.readouterr().out.splitlines() == [
        "[train] it 30/100 loss=0.4 eta 28s", "[train] it 35/100 eta 4m20s", "[train] it 100/100"]
    assert [format_eta(s) for s in (0, 59.6, 61, 3725)] == ["0s", "1m00s", "1m01s", "1h02m"]
    Progress("none", 10, "[eval]").update(10)
    assert capsys.readouterr().out == ""


def test_progress_with_an_unknown_total_shows_no_eta(capsys):
    """A time-budgeted run before its speed is known: "n/?" and no ETA, then the fitted total."""
    now = [0.0]
    p = Progress("lines", 0, "[train]", every=5, clock=lambda: now[0])
    now[0] = 1.0
    p.update(1, {"loss": "1.0"}, total=0, force_line=True)
    now[0] = 5.0
    p.update(5, total=25)                       # 5 steps in 5 s -> 20 left = 20 s
    assert capsys.readouterr().out.splitlines() == ["[train] it 1/? loss=1.0", "[train] it 5/25 eta 20s"]


def _lines(path):
    return [json.loads(line) for line in open(path)]


def test_metrics_jsonl_new_resumed_and_appended(tmp_path):
    m = MetricsLogger(str(tmp_path), start_iter=0)
    for it in range(1, 6):
        m.log("train", it, {"loss": 1.0 / it, "epoch": 0})
    m.close()
    # a crash after iteration 5; the checkpoint was written at iteration 3
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "it')
    m = MetricsLogger(str(tmp_path), start_iter=3)
    m.log("train", 4, {"loss": 0.2})
    m.close()
    m = MetricsLogger(str(tmp_path))
    m.log("eval", 4, {"AP": 0.5})
    m.close()
    recs = _lines(tmp_path / "metrics.jsonl")
    assert [(r["kind"], r["iter"]) for r in recs] == [("train", 1), ("train", 2), ("train", 3),
                                                       ("train", 4), ("eval", 4)]
    assert recs[3]["loss"] == 0.2 and recs[4]["AP"] == 0.5
    MetricsLogger(str(tmp_path), start_iter=0).close()   # a new run starts a new file
    assert _lines(tmp_path / "metrics.jsonl") == []


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = MetricsLogger(str(tmp_path), tensorboard=True, start_iter=0)
    m.log("train", 1, {"loss": 2.0, "classification": 1.5, "lr": 1e-3, "epoch": 0})
    m.log("train", 2, {"loss": 1.0, "classification": 0.5, "lr": 2e-3, "img_per_s": 30.0})
    m.log("eval", 2, {"AP": 0.25})
    m.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"train/loss", "train/classification", "train/lr", "train/img_per_s", "eval/AP"}
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.0), (2, 1.0)]


def test_tensorboard_is_optional(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(RetinaFastError, match="pip install tensorboard"):
        require_tensorboard()
    with pytest.raises(RetinaFastError, match="pip install tensorboard"):
        MetricsLogger(str(tmp_path), tensorboard=True, start_iter=0)
    m = MetricsLogger(str(tmp_path), start_iter=0)      # without the flag nothing needs it
    m.log("train", 1, {"loss": 1.0})
    m.close()
    from retina_fast.cli import main

    assert main(["train", "--tensorboard", "--print-config"]) == 2


def test_console_log_copies_what_the_console_shows(tmp_path, capsys):
    log = logging.getLogger("retina_fast")
    old = log.handlers[:]
    log.handlers[:] = [logging.StreamHandler(sys.stderr)]
    try:
        start_console_log(str(tmp_path / "log.txt"), "retina-fast test")
        print("[train] it 1/10")
        print("a warning", file=sys.stderr)
        log.warning("from the logger")
        sys.stderr.write("\r 50%|#####     | 5/10")     # a terminal's bar redraw
        log_file_only("[train] it 5/10 eta 3s\n")       # what the file gets instead
    finally:
        stop_console_log()
        log.handlers[:] = old
    print("after")
    text = (tmp_path / "log.txt").read_text()
    lines = text.splitlines()
    assert lines[0].startswith("== ") and lines[0].endswith("retina-fast test")
    assert lines[1:] == ["[train] it 1/10", "a warning", "from the logger", "[train] it 5/10 eta 3s"]
    out, err = capsys.readouterr()
    assert out == "[train] it 1/10\nafter\n" and "5/10 eta" not in err and "from the logger" in err
