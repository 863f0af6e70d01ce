"""retina_fast.patch_ultralytics(): ultralytics' own validator post-processing runs through
multiclass_nms and gives ultralytics' results (synthetic predictions: nothing is downloaded)."""

import sys

import pytest
import torch

import retina_fast
from tests.ops.test_multiclass_nms import assert_rows_equal, make_prediction
from tests.oracles import ultralytics_nms


@pytest.fixture
def U():
    mod = ultralytics_nms()
    original = mod.non_max_suppression
    yield mod
    retina_fast.unpatch_ultralytics(mod)
    assert mod.non_max_suppression is original


def _validator(task="detect", nc=80, conf=0.001, iou=0.7):
    from ultralytics.models.yolo.detect import DetectionValidator

    v = DetectionValidator(args=dict(conf=conf, iou=iou, max_det=300, task=task, single_cls=False, agnostic_nms=False))
    v.args.task = task  # (the constructor sets "detect")
    v.end2end = False
    v.nc = nc
    return v


@pytest.mark.parametrize("task, extra", [("detect", 0), ("segment", 32)])
def test_validator_postprocess_through_the_swap(U, spy, task, extra):
    """DetectionValidator.postprocess (multi_label=True, iou 0.7; segment: nc=80 and 32 mask
    coefficients carried along) equals ultralytics' own result when patched. conf 0.6 instead of
    0.001 on these uniform scores keeps ultralytics' own call within its time limit."""
    v = _validator(task, conf=0.6)
    pred = make_prediction(3, 80, 150, extra=extra, seed=11)  # exact coordinates, distinct scores
    theirs = v.postprocess(pred)
    retina_fast.patch_ultralytics()
    assert U.non_max_suppression.__wrapped__ is U._retina_fast_original_nms
    ours = v.postprocess(pred)
    assert spy == [1], "the validator did not go through multiclass_nms"
    assert len(ours) == len(theirs) == 3
    for o, t in zip(ours, theirs):
        assert o.keys() == t.keys()
        for k in o:
            torch.testing.assert_close(o[k], t[k], rtol=0, atol=0)
        assert o["extra"].shape[1] == extra


def test_patch_is_reversible_and_idempotent(U):
    original = U.non_max_suppression
    assert retina_fast.patch_ultralytics() is U
    patched = U.non_max_suppression
    retina_fast.patch_ultralytics(U)  # twice: no double wrapping
    assert U.non_max_suppression is patched and patched is not original
    retina_fast.unpatch_ultralytics()
    assert U.non_max_suppression is original
    retina_fast.unpatch_ultralytics()  # no-op


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls that reach multiclass_nms through the swap."""
    import retina_fast.dropin as D

    calls = []
    real = D.multiclass_nms
    monkeypatch.setattr(D, "multiclass_nms", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_unsupported_modes_go_to_ultralytics(U, spy):
    """rotated, end2end and N == 6 (ultralytics reads it as an end-to-end output) use
    ultralytics' own function."""
    orig = U.non_max_suppression
    retina_fast.patch_ultralytics()
    e2e = torch.rand(2, 300, 6)
    assert_rows_equal(U.non_max_suppression(e2e, 0.5, end2end=True), orig(e2e, 0.5, end2end=True), "end2end")
    six = make_prediction(1, 3, 6, seed=1)
    assert_rows_equal(U.non_max_suppression(six, 0.1), orig(six, 0.1), "N == 6")
    obb = torch.rand(1, 4 + 2 + 1, 50) * 100
    assert_rows_equal(U.non_max_suppression(obb, 0.1, rotated=True, nc=2), orig(obb, 0.1, rotated=True, nc=2), "obb")
    assert spy == []
    p = make_prediction(2, 3, 40, seed=2)
    assert_rows_equal(U.non_max_suppression(p, 0.1, 0.5), orig(p, 0.1, 0.5), "ordinary call")
    assert spy == [1]


def test_patch_needs_ultralytics_imported(monkeypatch):
    monkeypatch.delitem(sys.modules, "ultralytics.utils.nms", raising=False)
    with pytest.raises(ImportError, match="import ultralytics first"):
        retina_fast.patch_ultralytics()
    with pytest.raises(TypeError, match="non_max_suppression"):
        retina_fast.patch_ultralytics(torch)


def test_package_never_imports_ultralytics():
    """AGPL: no module of retina_fast imports ultralytics (checked in the source, so a test
    that imported it first cannot hide an import)."""
    import pathlib

    root = pathlib.Path(retina_fast.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if any(line.lstrip().startswith(("import ultralytics", "from ultralytics"))
                        for line in p.read_text().splitlines())]
    assert offenders == []
