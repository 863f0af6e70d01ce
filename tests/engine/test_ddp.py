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
                       warmup_iters=0, schedule="constant", precision="fp32")  # float32: bf16 rounds per split


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
@pytest.mark.slow  # two processes under torchrun
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


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_restarted_workers_do_not_see_the_previous_attempts_keys(monkeypatch, caplog):
    """torchrun shares its agent's TCPStore with the workers and keeps it, keys and all, across
    --max-restarts restarts (pytorch/pytorch#135712): a restarted rank read a dead rank's address.
    On one node the process group's keys are scoped to TORCHELASTIC_RESTART_COUNT."""
    import logging
    from datetime import timedelta

    from retina_fast.engine import distributed as rdist

    server = torch.distributed.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    for k, v in dict(TORCHELASTIC_USE_AGENT_STORE="True", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(server.port), GROUP_WORLD_SIZE="1", LOCAL_WORLD_SIZE="2",
                     RANK="0", TORCHELASTIC_MAX_RESTARTS="1", TORCHELASTIC_RESTART_COUNT="0").items():
        monkeypatch.setenv(k, v)
    key = "default_pg/0//cpu/rank_1"  # where gloo publishes rank 1's address
    first = rdist._attempt_store(2, timedelta(seconds=10))
    first.set(key, b"127.0.0.1:1 (a dead rank)")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    again = rdist._attempt_store(2, timedelta(seconds=10))
    assert not again.check([key])            # the restarted rank 0 waits for the new rank 1
    again.set(key, b"127.0.0.1:2")
    assert again.get(key) == b"127.0.0.1:2" and first.get(key) == b"127.0.0.1:1 (a dead rank)"
    assert not server.check([key])           # nothing written outside the attempt's prefix

    # launched without a shared agent store (plain env://, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
    # mp.spawn): init_process_group's own store, as before
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert rdist._attempt_store(2, timedelta(seconds=10)) is None
    # several nodes: each agent counts its own restarts, so no prefix; rank 0 says what to do
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    with caplog.at_level(logging.WARNING, logger="retina_fast.engine.distributed"):
        assert rdist._attempt_store(4, timedelta(seconds=10)) is None
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in caplog.text


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    """train --dist-timeout S: the process group's timeout (how long a rank waits for a hung peer);
    without it torch's default."""
    from datetime import timedelta

    from retina_fast.cli import build_parser
    from retina_fast.engine import distributed as rdist

    seen = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: seen.append(kw))
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert rdist.init_distributed("cpu", 7.5) == (1, 2, 0)
    assert rdist.init_distributed("cpu") == (1, 2, 0)
    assert seen == [{"backend": "gloo", "timeout": timedelta(seconds=7.5)}, {"backend": "gloo"}]
    args = build_parser().parse_args(["train", "--dist-timeout", "7.5"])
    assert args.dist_timeout == 7.5
