"""The training loop.

``train(cfg, dataset, categories)`` trains ``build_model(cfg.model, len(categories),
**cfg.model_kwargs)`` on ``dataset`` (anything whose ``dataset[(epoch, i)]`` returns
``(image float[3, H, W], target)``: :class:`~retina_fast.data.CocoDetection`,
:class:`~retina_fast.data.ShapesStream`).

* Optimizer: ``adamw`` (no weight decay on norms and biases) or ``sgd`` with momentum; linear
  warmup, then ``cosine`` or ``step`` decay (milestones in epochs, torchvision's recipe).
* Gradient clipping (``clip_grad``, total L2 norm). Precision and memory format
  (``precision``: ``auto``, ``fp32``, ``bf16``, ``fp16``; ``channels_last``: None for the
  hardware's choice), resolved by :mod:`retina_fast.engine.precision`: ``auto`` is bfloat16
  autocast where the hardware computes it natively (CPU with AMX or AVX-512-BF16, CUDA Ampere+),
  float16 + GradScaler on older GPUs, else float32. The old ``amp=True`` means bfloat16 on CPU /
  float16 on CUDA when ``precision`` is ``auto``. The choice and its reason are logged and kept
  in the checkpoint (``"settings"``) and :class:`TrainResult`.
* DDP: launched with ``torchrun --nproc_per_node N -m retina_fast train ...``; NCCL on GPU, gloo
  on CPU; each rank reads its share through :class:`~retina_fast.data.EpochSampler`;
  ``batch_size`` is per process. BatchNorm statistics stay per process (SyncBatchNorm is
  GPU-only; use ``--sync-bn`` there).
* Checkpoints: ``<out>/checkpoint.pt`` after every epoch, written atomically, holding model,
  optimizer, scheduler, scaler, epoch, iteration, RNG states, loss history and the model recipe.
  ``resume`` continues with the next epoch and, because every sample's content and augmentation
  derive from ``(seed, epoch, index)``, bit-for-bit like an uninterrupted run (same device,
  thread count and process count).
* Starting weights: ``init_from`` (a state_dict file, e.g. torchvision's COCO RetinaNet, or a
  retina_fast checkpoint; a class layer for another number of classes is re-initialised and
  the run says so) and ``backbone_weights`` (a torchvision ResNet state_dict for
  ``backbone.body``); see :func:`~retina_fast.engine.model_factory.init_weights`.
* ``resume="auto"`` (``--resume auto``): continue from ``<out>/checkpoint.pt`` if it exists,
  else start from scratch: the command a restarted job (``torchrun --max-restarts``) repeats.
  Starting from scratch in a folder that already holds a checkpoint is refused
  (:class:`CheckpointExistsError`) unless ``overwrite`` (``--overwrite``): a run never
  silently replaces a checkpoint, even a corrupt one (which ``resume`` reports in one line).
* Faults: a checkpoint write that fails (a full disk) is a one-line
  :class:`~retina_fast.engine.checkpoint.CheckpointWriteError` and leaves the previous
  checkpoint intact; a kill at any moment, mid-write included, leaves the last complete
  checkpoint loadable (the temporary file a killed writer left is removed at the next start).
* A non-finite loss (or, without AMP, gradient norm) stops training before the update with
  :class:`NonFiniteLossError` naming the epoch, the iteration and the batch's image ids (on
  every rank: the ids of the ranks whose loss was not finite); a target the model rejects (a
  NaN or degenerate box, a label out of range) stops it the same way with
  :class:`BadTrainingDataError`. The last good checkpoint is left as it was.
* ``time_budget`` (seconds): stop when it is spent, and fit the cosine schedule to it: the total
  iteration count is re-estimated from the measured speed every ``log_every`` iterations, so the
  learning rate reaches its floor as the budget runs out. Such a run is not bit-reproducible.
* ``compile``: the step (forward, losses, backward) as one ``torch.compile(fullgraph=True)``
  graph over a batch checked, transformed and padded on the host
  (:mod:`retina_fast.engine.train_step`); single process only.
* Metrics: every iteration's losses and lr (and img/s every ``log_every``) go to
  ``<out>/metrics.jsonl`` and, with ``tensorboard``, to TensorBoard scalars
  (:class:`~retina_fast.engine.logging_utils.MetricsLogger`). ``config``, the run's resolved
  command-line config (plain types), is kept in the checkpoint under ``"config"``.
* Progress: a tqdm bar with loss, lr and images/s when stderr is a terminal, otherwise a line
  every ``log_every`` iterations ending with the estimated time left.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch

from retina_fast.data.errors import RetinaFastError
from retina_fast.data.loader import EpochSampler, make_loader
from retina_fast.engine import distributed as rdist
from retina_fast.engine.checkpoint import (
    FORMAT, atomic_save, atomic_write_json, load_checkpoint, remove_stale_temporaries, rng_state,
    set_rng_state,
)
from retina_fast.engine.logging_utils import MetricsLogger, Progress
from retina_fast.engine import memory
from retina_fast.engine import precision as rprec
from retina_fast.engine.model_factory import build_model, init_weights, param_groups, pretrained_kwargs
from retina_fast.engine.schedule import WarmupSchedule
from retina_fast.engine.train_step import make_train_step, pad_batch
from retina_fast.models.loss import InputError

log = logging.getLogger("retina_fast")


class NonFiniteLossError(RetinaFastError):
    """The loss (or gradient) became NaN/inf; training stopped before applying the update."""


class BadTrainingDataError(RetinaFastError):
    """A batch the model rejects (bad boxes or labels); training stopped before the update."""


class CheckpointExistsError(RetinaFastError):
    """Training from scratch would replace an existing checkpoint."""


def resolve_resume(out_dir: str, resume: str | None, overwrite: bool = False) -> str | None:
    """The checkpoint to resume from: ``resume``, or for ``"auto"`` ``<out>/checkpoint.pt`` if it
    exists (else None). Starting from scratch where a checkpoint exists is a
    :class:`CheckpointExistsError` unless ``overwrite``."""
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    if resume == "auto":
        return ckpt_path if os.path.lexists(ckpt_path) else None
    if resume is None and not overwrite and os.path.lexists(ckpt_path):
        raise CheckpointExistsError(
            f"{ckpt_path} exists: training from scratch would replace it. Continue it with "
            f"--resume auto (or --resume {ckpt_path}), start again with --overwrite, or choose "
            "another --out")
    return resume


@dataclass
class TrainConfig:
    out_dir: str = "runs/train"
    model: str = "shapes-small"
    model_kwargs: dict = field(default_factory=dict)
    epochs: int = 12
    batch_size: int = 16            # per process
    workers: int = 2
    optimizer: str = "adamw"        # adamw | sgd
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 0.05
    schedule: str = "cosine"        # cosine | step | constant
    lr_steps: tuple = ()            # epochs at which step decay multiplies by lr_gamma
    lr_gamma: float = 0.1
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    clip_grad: float = 10.0         # 0 disables
    amp: bool = False               # the old switch: bf16 (CPU) / fp16 (CUDA) when precision is auto
    precision: str = "auto"         # auto | fp32 | bf16 | fp16 (engine/precision.py)
    channels_last: bool | None = None  # None: where it is faster (engine/precision.py)
    sync_bn: bool = False
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    dist_timeout: float | None = None  # seconds a rank waits for a peer in a collective (torch's default)
    seed: int = 0
    resume: str | None = None      # a checkpoint path, or "auto": <out>/checkpoint.pt if it exists
    overwrite: bool = False         # start from scratch even where <out>/checkpoint.pt exists
    init_from: str | None = None        # weights file to start from (class head re-initialised if K differs)
    backbone_weights: str | None = None  # ResNet state_dict file for backbone.body
    time_budget: float | None = None  # seconds of training (the demo)
    max_iters: int | None = None
    log_every: int = 50
    checkpoint_every_epoch: bool = True
    progress: str = "auto"          # auto | bar | lines | none
    tensorboard: bool = False       # scalars to <out>/tensorboard (needs the tensorboard package)
    compile: bool = False           # torch.compile(fullgraph=True) of the whole step (engine/train_step.py)


@dataclass
class TrainResult:
    model: torch.nn.Module
    history: list
    checkpoint: str | None
    iterations: int
    epochs_done: int
    train_seconds: float
    images_seen: int
    stopped_by: str
    settings: dict = field(default_factory=dict)  # RunSettings.as_dict(): precision, format, why
    data_wait_seconds: float = 0.0  # time the loop waited for the DataLoader (the rest is compute)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise RetinaFastError(f"device {name!r} is not a device (cpu, cuda, cuda:N or auto)") from None
    if dev.type not in ("cpu", "cuda"):
        raise RetinaFastError(f"device {name!r} is not supported (cpu, cuda, cuda:N or auto)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RetinaFastError(f"device {name} requested but no CUDA device is available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RetinaFastError(f"device {name} requested but there are only "
                              f"{torch.cuda.device_count()} CUDA devices")
    return dev


def check_writable_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise RetinaFastError(f"cannot write to output folder {path}: {e.strerror or e}") from None


def _to_device(images, targets, device):
    # uint8 images (train_transforms(to_float=False)) become float32 [0, 1] here, on the
    # device: the same values as ToFloat on a worker, a quarter of the bytes to ship.
    images = [im.to(device, non_blocking=True) for im in images]
    images = [im.float().div_(255.0) if im.dtype == torch.uint8 else im for im in images]
    targets = [{k: targets_i[k].to(device, non_blocking=True) for k in ("boxes", "labels", "iscrowd")
                if k in targets_i} for targets_i in targets]
    return images, targets


def _ids_text(ids) -> str:
    ids = list(ids)
    return ", ".join(str(i) for i in ids[:32]) + (f" and {len(ids) - 32} more" if len(ids) > 32 else "")


def _stop_on_bad_batch(epoch, it, ids, finite, bad_input, losses, world, ckpt_path):
    """Every rank raises the same error, naming the images of the ranks whose batch was bad."""
    parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
    mine = (not finite, list(ids), bad_input, parts)
    reports = [mine]
    if world > 1:
        reports = [None] * world
        torch.distributed.all_gather_object(reports, mine)
    bad = [r for r in reports if r[0]]
    bad_ids = [i for r in bad for i in r[1]]
    where = (f"at epoch {epoch}, iteration {it} (images {_ids_text(bad_ids)}"
             f"{', rank ' + ', '.join(str(reports.index(r)) for r in bad) if world > 1 else ''})")
    kept = f" at {ckpt_path}" if ckpt_path else " (none written yet)"
    input_errors = [r[2] for r in bad if r[2]]
    if input_errors:
        raise BadTrainingDataError(f"bad training data {where}: {input_errors[0]}; stopped before the "
                                   f"update. The last good checkpoint is untouched{kept}")
    raise NonFiniteLossError(
        f"non-finite loss {where}{' (' + bad[0][3] + ')' if bad and bad[0][3] else ''}; stopped before "
        f"the update. The last good checkpoint is untouched{kept}. "
        "Try a lower --lr, --warmup-iters longer, --clip-grad, or no --amp")


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def train(cfg: TrainConfig, dataset, categories: list, progress_callback=None,
          config: dict | None = None) -> TrainResult:
    """Train; see the module docstring. ``categories`` (COCO dicts ``{"id", "name"}`` in label
    order) go into the checkpoint so evaluation and prediction can map labels back."""
    device = resolve_device(cfg.device)
    rank, world, local_rank = rdist.init_distributed(device.type, cfg.dist_timeout)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
    is_main = rank == 0
    if is_main:
        check_writable_dir(cfg.out_dir)
    ckpt_path = os.path.join(cfg.out_dir, "checkpoint.pt")
    resume = resolve_resume(cfg.out_dir, cfg.resume, cfg.overwrite)
    if is_main:
        for f in remove_stale_temporaries(ckpt_path) + remove_stale_temporaries(
                os.path.join(cfg.out_dir, "history.json")):
            log.info("removed %s, left by a run that was killed while writing", f)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts them)
    model_kwargs = pretrained_kwargs(cfg.model, cfg.model_kwargs, cfg.init_from, cfg.backbone_weights)
    model = build_model(cfg.model, len(categories), **model_kwargs)
    if not resume:  # a resumed run's weights come from its checkpoint
        for msg in init_weights(model, cfg.model, cfg.init_from, cfg.backbone_weights):
            if is_main:
                log.info(msg)
    settings = rprec.resolve(cfg.precision, cfg.channels_last, device, amp=cfg.amp)  # logged at the start
    model = model.to(device, memory_format=settings.memory_format)
    if cfg.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)

    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)
    else:
        raise RetinaFastError(f"unknown optimizer {cfg.optimizer!r} (adamw or sgd)")

    sampler = EpochSampler(len(dataset), num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    iters_per_epoch = len(sampler) // cfg.batch_size
    if iters_per_epoch == 0:
        raise RetinaFastError(f"the dataset has {len(dataset)} images, fewer than one batch of "
                              f"{cfg.batch_size} per process x {world} processes; lower --batch-size")
    total_iters = cfg.epochs * iters_per_epoch
    if cfg.max_iters:
        total_iters = min(total_iters, cfg.max_iters)
    sched_fn = WarmupSchedule(cfg.schedule, total_iters, cfg.warmup_iters, cfg.warmup_factor,
                              milestones=[e * iters_per_epoch for e in cfg.lr_steps],
                              gamma=cfg.lr_gamma,
                              max_warmup_frac=0.1 if cfg.time_budget else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, sched_fn)
    use_scaler = settings.grad_scaler
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)

    start_epoch, it, history, images_seen = 0, 0, [], 0
    if resume:
        ckpt = load_checkpoint(resume)
        if ckpt["model_config"]["name"] != cfg.model or ckpt["model_config"]["num_classes"] != len(categories):
            raise RetinaFastError(
                f"{resume} holds a {ckpt['model_config']['name']} model with "
                f"{ckpt['model_config']['num_classes']} classes; this run builds {cfg.model} "
                f"with {len(categories)}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        # The schedule follows this run's flags (a longer --epochs extends the cosine); with the
        # same flags this restores exactly what was saved.
        sched_fn.__dict__.update(WarmupSchedule(
            cfg.schedule, total_iters, cfg.warmup_iters, cfg.warmup_factor,
            milestones=[e * iters_per_epoch for e in cfg.lr_steps], gamma=cfg.lr_gamma,
            max_warmup_frac=0.1 if cfg.time_budget else None).__dict__)
        if cfg.time_budget:
            sched_fn.total_iters = ckpt["scheduler"]["lr_lambdas"][0]["total_iters"]
        if use_scaler and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, it = ckpt["epoch"] + 1, ckpt["iteration"]
        history = ckpt.get("history", [])
        images_seen = ckpt.get("images_seen", 0)
        set_rng_state(ckpt["rng"][rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
        if is_main:
            log.info("resumed from %s at epoch %d (iteration %d)", resume, start_epoch, it)
            # a kill between the checkpoint's rename and history.json's left the latter behind
            atomic_write_json(history, os.path.join(cfg.out_dir, "history.json"))

    ddp_model = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    # --compile: the batch is checked, transformed and padded on the host (pad_batch), then one
    # compiled graph runs forward, losses, backward and the gradient writes (make_train_step).
    compiled_step = None
    if cfg.compile:
        if world > 1:
            raise RetinaFastError("--compile does not run under DDP yet (the compiled step calls the model "
                                  "past DistributedDataParallel's forward); train without --compile")
        compiled_step = make_train_step(
            model, opt, compile=True, scaler=scaler,
            autocast=settings.autocast)

    loader = make_loader(dataset, cfg.batch_size, sampler, num_workers=cfg.workers,
                         pin_memory=device.type == "cuda")

    def save(epoch):
        # Every rank's RNG state, so each resumes its own stream.
        rngs = [rng_state()]
        if world > 1:
            rngs = [None] * world
            torch.distributed.all_gather_object(rngs, rng_state())
        if not is_main:
            return
        atomic_save({
            "format": FORMAT,
            "model": model.state_dict(),
            "model_config": {"name": cfg.model, "num_classes": len(categories), "kwargs": model_kwargs},
            "categories": categories,
            "optimizer": opt.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if use_scaler else None,
            "epoch": epoch,
            "iteration": it,
            "images_seen": images_seen,
            "rng": rngs if world > 1 else rngs[0],
            "history": history,
            "train_config": dataclasses.asdict(cfg),
            "world_size": world,
            "settings": settings.as_dict(),
            **({"config": config} if config is not None else {}),
        }, ckpt_path)
        atomic_write_json(history, os.path.join(cfg.out_dir, "history.json"))

    # A time-budgeted run's length is unknown until its speed is measured (its schedule's
    # placeholder length is epochs x iterations): the progress shows "n/?" and no ETA until
    # the budget has been fitted, or was fitted before (a resumed run).
    budget_fitted = not cfg.time_budget or it > 0
    progress = Progress(cfg.progress, sched_fn.total_iters if budget_fitted else 0, "[train]",
                        enabled=is_main, every=cfg.log_every, start=it)
    metrics = MetricsLogger(cfg.out_dir, cfg.tensorboard, start_iter=it) if is_main else None
    t0 = time.perf_counter()
    speed_mark = (t0, it)
    stopped_by = "epochs"
    epoch = start_epoch - 1
    if is_main:
        log.info("training in %s; memory: %s", settings.describe(), memory.describe())
    data_wait = 0.0
    ddp_model.train()
    try:
        for epoch in range(start_epoch, cfg.epochs if cfg.time_budget is None else 10 ** 9):
            sampler.set_epoch(epoch)
            stop = False
            batches = iter(loader)
            while True:
                t_wait = time.perf_counter()
                batch = next(batches, None)
                data_wait += time.perf_counter() - t_wait
                if batch is None:
                    break
                images, targets = batch
                ids = [t.get("image_id") for t in targets]
                images, targets = _to_device(images, targets, device)
                bad_input = None
                try:
                    if compiled_step is not None:  # zero_grad, forward, losses and backward
                        loss, losses = compiled_step(pad_batch(model, images, targets))
                    else:
                        with settings.autocast():
                            losses = ddp_model(images, targets)
                        loss = sum(losses.values())
                    finite = bool(torch.isfinite(loss).item())
                except InputError as e:  # a target the model rejects: stop every rank alike
                    bad_input, finite, losses = str(e), False, {}
                elapsed = time.perf_counter() - t0
                # One small all-reduce carries everything the ranks must agree on.
                flags = torch.tensor([0.0 if finite else 1.0,
                                      1.0 if cfg.time_budget and elapsed >= cfg.time_budget else 0.0,
                                      float(sched_fn.total_iters) if is_main else 0.0])
                if world > 1:
                    rdist.all_reduce_max(flags)
                if flags[0] > 0:
                    _stop_on_bad_batch(epoch, it, ids, finite, bad_input, losses, world,
                                       ckpt_path if os.path.exists(ckpt_path) else None)
                vals = torch.stack([loss.detach().float()] + [v.detach().float() for v in losses.values()]).cpu()
                if world > 1:
                    rdist.all_reduce_mean(vals)
                sched_fn.total_iters = int(flags[2].item())

                if compiled_step is None:
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                if cfg.clip_grad and cfg.clip_grad > 0:
                    scaler.unscale_(opt)
                    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                    if not use_scaler and not torch.isfinite(gnorm):
                        raise NonFiniteLossError(
                            f"non-finite gradient norm at epoch {epoch}, iteration {it} (images "
                            f"{_ids_text(ids)}); stopped before the update, the last good checkpoint "
                            "is untouched. Try a lower --lr")
                scaler.step(opt)
                scaler.update()
                scheduler.step()
                it += 1
                images_seen += len(images) * world

                lr = opt.param_groups[0]["lr"]
                rec = {"iter": it, "epoch": epoch, "loss": round(vals[0].item(), 5),
                       **{k: round(v, 5) for k, v in zip(losses.keys(), vals[1:].tolist())},
                       "lr": lr, "time": round(elapsed, 3)}
                history.append(rec)

                now = time.perf_counter()
                if it % cfg.log_every == 0 or it == 1:
                    dt = now - speed_mark[0]
                    ips = (it - speed_mark[1]) * cfg.batch_size * world / max(dt, 1e-9)
                    if cfg.time_budget and is_main and it - speed_mark[1] >= 5:
                        # Fit the schedule to the budget from the recent speed.
                        left = cfg.time_budget - (now - t0)
                        est = it + max(0, int(left * (it - speed_mark[1]) / dt))
                        sched_fn.total_iters = max(it + 1, min(est, cfg.max_iters or est))
                        budget_fitted = True
                    speed_mark = (now, it)
                    rec["img_per_s"] = round(ips, 2)
                stats = {"ep": epoch, "loss": f"{rec['loss']:.4f}",
                         **{k[:3]: f"{rec[k]:.4f}" for k in losses.keys()},
                         "lr": f"{lr:.2e}", "img/s": rec.get("img_per_s", "")}
                progress.update(it, stats, total=sched_fn.total_iters if budget_fitted else 0,
                                force_line=it == 1)
                if metrics is not None:
                    metrics.log("train", it, {k: v for k, v in rec.items() if k != "iter"},
                                flush=it % cfg.log_every == 0)
                if progress_callback is not None and is_main:
                    progress_callback(rec)

                if flags[1] > 0:
                    stopped_by, stop = "time_budget", True
                elif cfg.max_iters and it >= cfg.max_iters:
                    stopped_by, stop = "max_iters", True
                if stop:
                    break
            if cfg.checkpoint_every_epoch or stop:
                save(epoch)
            if stop:
                break
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
        # Stop the persistent workers now rather than at interpreter exit.
        del loader
    train_seconds = time.perf_counter() - t0
    if is_main:
        log.info("trained %d iterations (%d images) in %.1f s, %.1f img/s (%.1f s waiting for data); "
                 "stopped by %s", it, images_seen, train_seconds, images_seen / max(train_seconds, 1e-9),
                 data_wait, stopped_by)
    return TrainResult(model=_unwrap(ddp_model), history=history,
                       checkpoint=ckpt_path if os.path.exists(ckpt_path) else None,
                       iterations=it, epochs_done=epoch + 1, train_seconds=train_seconds,
                       images_seen=images_seen, stopped_by=stopped_by, settings=settings.as_dict(),
                       data_wait_seconds=data_wait)
