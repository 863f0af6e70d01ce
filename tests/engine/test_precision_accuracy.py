"""Accuracy holds under the fast settings (issue 21, item 2), in a short fixed-iteration form of
the demo: shapes-small trained for the same iterations in float32 (NCHW) and in bfloat16
autocast (channels_last) reaches the same mAP, and a float32-trained model evaluated under
bfloat16 inference loses (almost) nothing.

The full-length figures (the demo's ~1,500 iterations, within 0.01 mAP; bf16 inference of the
float32 demo checkpoint within 0.005) are in the README and benchmarks/results/. Here the runs
are short (mAP ~0.3), where two training trajectories differ by chance more than at the end of
a demo (measured: 0.122 float32, 0.135 bfloat16 after these 300 iterations), so the training
bound is 0.03; evaluation of one model under two precisions has no such chance and keeps the
issue's bound (measured: 0.0001 apart).
"""

import pytest
import torch

from retina_fast.data import SHAPES_CATEGORIES, CocoDetection, ShapesConfig, ShapesStream, eval_transforms
from retina_fast.data import train_transforms, write_shapes_coco
from retina_fast.engine import TrainConfig, train
from retina_fast.engine import precision as rprec
from retina_fast.engine.evaluate import evaluate

pytest.importorskip("pycocotools")

ITERS = 300
SHAPES = ShapesConfig(size=96, min_object_size=12, max_object_size=64)
MODEL = {"min_size": 96}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("acc")
    val_dir = write_shapes_coco(str(root / "data"), {"val": 96}, seed=1000, cfg=SHAPES)["val"]
    val = CocoDetection(f"{val_dir}/instances.json", f"{val_dir}/images", transforms=eval_transforms())
    out = {}
    for precision, cl in (("fp32", False), ("bf16", True)):
        cfg = TrainConfig(out_dir=str(root / precision), model="shapes-small", model_kwargs=dict(MODEL),
                          epochs=10 ** 6, batch_size=8, workers=0, lr=4e-3, warmup_iters=30, device="cpu",
                          max_iters=ITERS, log_every=10 ** 6, progress="none", seed=0,
                          precision=precision, channels_last=cl, checkpoint_every_epoch=False)
        stream = ShapesStream(8 * 1000, seed=0, cfg=SHAPES, transforms=train_transforms(hflip=0.5, to_float=False))
        res = train(cfg, stream, SHAPES_CATEGORIES)
        assert res.iterations == ITERS and res.settings["precision"] == precision
        out[precision] = res.model.eval()
    return out, val


def test_bf16_channels_last_training_reaches_the_float32_map(runs):
    models, val = runs
    fp32 = rprec.resolve("fp32", False, "cpu")
    m32 = evaluate(models["fp32"], val, None, settings=fp32, progress="none")["AP"]
    m16 = evaluate(models["bf16"], val, None, settings=fp32, progress="none")["AP"]
    assert m32 > 0.08, f"the short run did not learn (mAP {m32:.3f}): the comparison would mean nothing"
    assert abs(m16 - m32) <= 0.03, (m32, m16)


def test_float32_model_under_bf16_inference_loses_at_most_0_005(runs):
    models, val = runs
    m = models["fp32"]
    ap32 = evaluate(m, val, None, settings=rprec.resolve("fp32", False, "cpu"), progress="none")["AP"]
    ap16 = evaluate(m, val, None, settings=rprec.resolve("bf16", True, "cpu"), progress="none")["AP"]
    assert ap32 - ap16 <= 0.005, (ap32, ap16)
    assert all(p.dtype == torch.float32 for p in m.parameters())  # the caller's model untouched
