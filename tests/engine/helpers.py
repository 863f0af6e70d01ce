"""Tiny models and data so engine tests run in seconds on 2 CPU cores."""

from retina_fast.data import SHAPES_CATEGORIES, ShapesConfig, ShapesStream, train_transforms
from retina_fast.engine import TrainConfig

TINY_MODEL = {"widths": [8, 8, 16, 16, 16], "fpn_channels": 16, "min_size": 64}
TINY_SHAPES = ShapesConfig(size=64, min_object_size=8, max_object_size=48, empty_fraction=0.0)


def tiny_stream(n=8, seed=0, hflip=0.5):
    return ShapesStream(n, seed=seed, cfg=TINY_SHAPES, transforms=train_transforms(hflip=hflip))


def tiny_config(out_dir, **kw):
    base = dict(out_dir=str(out_dir), model="shapes-small", model_kwargs=dict(TINY_MODEL),
                epochs=2, batch_size=4, workers=0, lr=5e-3, warmup_iters=2, device="cpu",
                log_every=1000, progress="none")
    base.update(kw)
    return TrainConfig(**base)


CATEGORIES = SHAPES_CATEGORIES
