"""Two CPU processes (gloo) through the real training loop agree with one process on the
same global batch: DDP averages the per-process gradients, and the loss is a mean over images."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from retina_fast.engine import load_checkpoint, train

from .helpers import CATEGORIES, tiny_config, tiny_stream

# GroupNorm everywhere: BatchNorm statistics depend on how the batch is split across processes.
MODEL = {"widths": [8, 8, 16, 16, 16], "fpn_channels": 16, "min_size": 64, "norm": "gn"}


def _cfg(out_dir, batch_size):
    return tiny_config(out_dir, model_kwargs=dict(MODEL), epochs=2, batch_size=batch_size,
                       optimizer="sgd", momentum=0.0, weight_decay=0.0, lr=0.05, clip_grad=0.0,
                       warmup_iters=0, schedule="constant")


def _worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        train(_cfg(out_dir, batch_size=2), tiny_stream(8), CATEGORIES)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_two_process_gloo_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    ddp = load_checkpoint(str(tmp_path / "ddp" / "checkpoint.pt"))
    assert ddp["world_size"] == 2 and ddp["iteration"] == 4

    single = train(_cfg(tmp_path / "single", batch_size=4), tiny_stream(8), CATEGORIES)
    torch.manual_seed(0)
    from retina_fast.engine import build_model
    init = build_model("shapes-small", 3, **MODEL).state_dict()

    a, b = ddp["model"], single.model.state_dict()
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
        moved += int(not torch.equal(a[k], init[k]))
    assert moved > len(a) // 2          # training really changed the weights
    # the logged losses are the mean over both processes = the single-process batch loss
    la = [h["loss"] for h in ddp["history"]]
    lb = [h["loss"] for h in single.history]
    assert la == pytest.approx(lb, rel=1e-4)
