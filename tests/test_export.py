"""Export of the eval model: torch.export (our ops as single nodes), the padded path and the
graph breaks it removes, an AOTInductor package run in a fresh process, ONNX run by
onnxruntime, and ``retina-fast export``. A tiny shapes-small model keeps compile times down."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from retina_fast import export as rx
from retina_fast.engine import build_model
from tests.detections import assert_same_detections
from tests.test_cli import _env, _popen, assert_one_line_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"widths": [8, 8, 16, 16, 16], "fpn_channels": 16, "min_size": 64, "score_thresh": 0.001}
IMAGES = rx.example_images(2, (64, 80))
HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))
HAS_AOTI = hasattr(torch._inductor, "aoti_compile_and_package") if hasattr(torch, "_inductor") else False


def _tiny():
    from retina_fast.engine.checkpoint import FORMAT
    from retina_fast.data import SHAPES_CATEGORIES

    torch.manual_seed(0)
    m = build_model("shapes-small", 3, **TINY)
    with torch.no_grad():  # scores spread around the threshold: post-processing has work
        m.head.classification_head.cls_logits.bias.normal_(-2.0, 0.5)
    ckpt = {"format": FORMAT, "model": m.state_dict(), "categories": SHAPES_CATEGORIES,
            "model_config": {"name": "shapes-small", "num_classes": 3, "kwargs": TINY}}
    # The eager reference runs the model's own modules, as an exported or compiled program does
    # (the folded, fused CPU eval copy is eager-only): the fold=False comparisons are bitwise.
    m.fast_inference = False
    return m.eval(), ckpt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    m, ckpt = _tiny()
    path = tmp_path_factory.mktemp("ck") / "checkpoint.pt"
    torch.save(ckpt, path)
    with torch.no_grad():
        ref = m(IMAGES)
    return m, str(path), ref


def _same(got, ref, score_atol=0.0, box_atol=0.0, first=None):
    """Same detections: counts, labels; scores and boxes within the tolerances (0: bitwise, in
    order: the same kernels on the same inputs). With tolerances, as multisets per image and
    label (rounding can reorder near-tied scores: tests/detections.py); ``first``: detections
    ranked past it may go unpaired (a detection at the cut-off may swap)."""
    assert len(got) == len(ref)
    if score_atol == 0 and box_atol == 0:
        for g, r in zip(got, ref):
            assert all(torch.equal(g[k], r[k]) for k in ("boxes", "scores", "labels"))
        return
    assert_same_detections(got, ref, score_atol=score_atol, box_atol=box_atol, ranks=first)


def _our_ops(ep):
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "retina_fast" in str(n.target)}


# Exports fold the BatchNorms into the convolutions (retina_fast.models.fuse): the program
# computes the eager model's function up to float32 rounding (measured on TINY: scores 6e-8,
# boxes 1.1e-5 px), so it is compared with the unfolded eager model within these tolerances;
# fold=False exports the model as it is, bitwise equal to eager (the same kernels run).
FOLD_TOL = {"score_atol": 1e-5, "box_atol": 1e-3, "first": 250}


def test_torch_export_matches_eager_and_keeps_our_ops(tiny):
    m, _, ref = tiny
    assert all(len(r["scores"]) > 100 for r in ref)
    ep = rx.export_program(m, IMAGES)
    assert "retina_fast.postprocess_detections.default" in _our_ops(ep)
    assert not any("batch_norm" in str(n.target) for n in ep.graph.nodes)
    assert any(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # the model itself is untouched
    with torch.no_grad():
        _same(ep.module()(IMAGES), ref, **FOLD_TOL)
        _same(rx.export_program(m, IMAGES, fold=False).module()(IMAGES), ref)  # bitwise
        padded = rx.export_program(m, IMAGES, padded=True, fold=False).module()(IMAGES)
        want = m.forward_padded(IMAGES)
    assert all(torch.equal(a, want[k]) for a, k in zip(padded, ("boxes", "scores", "labels", "counts")))
    assert padded[3].tolist() == [len(r["scores"]) for r in ref]


def test_torch_export_of_a_torchvision_architecture():
    from retina_fast.models import retinanet_resnet_fpn

    torch.manual_seed(0)
    m = retinanet_resnet_fpn(18, "v2", 5, min_size=96, max_size=128).eval()
    images = rx.example_images(2, (90, 120))
    with torch.no_grad():
        ref = m(images)
        _same(rx.export_program(m, images).module()(images), ref, **FOLD_TOL)


def test_graph_breaks_only_the_one_host_read(tiny):
    import torch._dynamo as dynamo

    m = tiny[0]
    with torch.no_grad():
        dynamo.reset()
        ex = dynamo.explain(m)(IMAGES)
        # the list of dicts needs each image's count on the host: one break, at counts.tolist()
        assert ex.graph_break_count == 1, [b.reason for b in ex.break_reasons]
        assert any("tolist" in (f.line or "") for b in ex.break_reasons for f in b.user_stack)
        dynamo.reset()
        assert dynamo.explain(m.forward_padded)(IMAGES).graph_break_count == 0
        dynamo.reset()
        compiled = torch.compile(m.forward_padded, fullgraph=True, backend="eager")
        got, want = compiled(IMAGES), m.forward_padded(IMAGES)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow  # ~10 s idle, 40 s on a busy 2-core machine (the ONNX exporter)
@pytest.mark.skipif(not HAS_ONNX, reason="needs onnx, onnxscript and onnxruntime")
def test_onnx_runs_in_onnxruntime_within_tolerance(tiny, tmp_path):
    import onnx

    m, _, ref = tiny
    path = rx.export_onnx(m, tmp_path / "m.onnx", IMAGES)
    proto = onnx.load(path)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}  # standard ops only, no custom op
    runner = rx.OnnxRetinaNet(path)
    # Tolerance: the convolutions in onnxruntime round differently from PyTorch's (measured:
    # scores 6e-8, boxes 1.2e-5 px on 64-80 px images); 100x margin. The first 250 of the 300
    # detections: the last rows sit at the score cut-off, where a 1e-8 change may swap one.
    _same(runner(IMAGES), ref, score_atol=1e-5, box_atol=1e-3, first=250)
    other = rx.example_images(3, (70, 50), seed=1)  # dynamic batch and size
    with torch.no_grad():
        _same(runner(other), m(other), score_atol=1e-5, box_atol=1e-3, first=250)
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match="not written by retina_fast"):
        rx.OnnxRetinaNet(str(tmp_path / "bare.onnx"))


_FRESH = """
import sys, torch
from retina_fast import export as rx
torch.set_num_threads(int(sys.argv[4]))  # the test process's: convolutions may round otherwise
images = rx.example_images(2, (64, 80))
with torch.no_grad():
    aoti = rx.load_aoti(sys.argv[1])(images)
    prog = rx.load_program(sys.argv[2]).module()(images)
torch.save({"aoti": aoti, "export": prog}, sys.argv[3])
"""


@pytest.mark.slow  # the AOTInductor build: ~25 s idle, 65 s on a busy 2-core machine
@pytest.mark.skipif(not HAS_AOTI, reason="torch._inductor.aoti_compile_and_package is missing")
def test_aoti_package_from_the_cli_gives_the_same_detections_in_a_fresh_process(tiny, tmp_path):
    _, ck, ref = tiny
    common = ["--checkpoint", ck, "--image-size", 64, 80, "--batch-size", 2, "--threads", 1]
    p_aoti, p_exp = [_popen(["export", "--format", f, "--out", tmp_path / f"{f}.pt2", *common]) for f in ("aoti", "export")]
    for p in (p_aoti, p_exp):
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, out + err
        assert "[export]" in out and "detections [300, 300] vs [300, 300]" in out
    r = subprocess.run([sys.executable, "-c", _FRESH, tmp_path / "aoti.pt2", tmp_path / "export.pt2", tmp_path / "o.pt",
                        str(torch.get_num_threads())],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    got = torch.load(tmp_path / "o.pt", weights_only=True)
    _same(got["export"], ref, **FOLD_TOL)  # the exported program: the folded model
    # AOTInductor generates its own C++ for the convolutions' epilogues (measured: scores 7e-9,
    # boxes 1.1e-5 px off); our post-processing kernel runs as it is.
    _same(got["aoti"], ref, score_atol=1e-6, box_atol=1e-3)


@pytest.mark.skipif(not HAS_ONNX, reason="needs onnx, onnxscript and onnxruntime")
def test_cli_export_errors_are_one_line(tiny, tmp_path, capsys):
    from retina_fast.cli import main

    _, ck, _ = tiny
    n = torch.get_num_threads()
    try:
        for argv, needle in (
            (["export", "--format", "onnx", "--checkpoint", ck, "--out", tmp_path / "m.pt2"], "must end in .onnx"),
            (["export", "--format", "aoti", "--checkpoint", ck, "--out", tmp_path / "m.onnx"], "must end in .pt2"),
            (["export", "--format", "tflite", "--checkpoint", ck, "--out", tmp_path / "m"], "invalid choice: 'tflite'"),
            (["export", "--format", "export", "--checkpoint", ck, "--out", tmp_path / "m.pt2", "--image-size", 0, 9],
             "--image-size: must be at least 1"),
            (["export", "--format", "export", "--out", tmp_path / "m.pt2"], "one of the arguments --checkpoint --weights"),
            (["export", "--format", "export", "--checkpoint", tmp_path / "no.pt", "--out", tmp_path / "m.pt2"],
             "checkpoint not found"),
        ):
            rc = main([str(a) for a in argv])
            err = capsys.readouterr().err
            lines = [ln for ln in err.splitlines() if "error:" in ln]
            assert rc == 2 and len(lines) == 1 and needle in lines[0], err
    finally:
        torch.set_num_threads(n)
    hide = tmp_path / "hide"  # onnx looks uninstalled
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['onnx'] = None\n")
    p = _popen(["export", "--format", "onnx", "--checkpoint", ck, "--out", tmp_path / "m.onnx"],
               {"PYTHONPATH": f"{hide}{os.pathsep}{ROOT}"})
    p.stdout, p.stderr = p.communicate(timeout=300)
    assert_one_line_error(p, "export needs onnx (--format onnx), which is not installed: pip install 'retina_fast[export]'")
