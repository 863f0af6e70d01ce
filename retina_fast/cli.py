"""``retina-fast`` (also ``python -m retina_fast``): demo | train | eval | predict | export | make-shapes | bench | env.

Errors in the user's input (a missing file, a malformed annotation file, an unknown class id,
an unwritable folder, a bad checkpoint, a diverged run) end with a one-line
``retina-fast: error: ...`` and exit status 2, never a traceback.

CPU threads and OMP_WAIT_POLICY
-------------------------------
PyTorch's OpenMP threads busy-wait between parallel regions. On an idle machine that is the
fastest setting; on a machine where other processes compete for the cores it slowed training
10-20x (threads spin while the core they wait for is taken). ``OMP_WAIT_POLICY=PASSIVE`` keeps
about half the speed under contention, but costs ~20% on an idle machine. The policy is read
once, when OpenMP starts (at ``import torch``), so ``train`` and ``demo`` decide before any real
work and, if needed, restart the process once with the variable set:

* ``--omp-wait-policy auto`` (default): PASSIVE when the 1-minute load average before the run is
  at least 40% of the cores (someone else is working), otherwise PyTorch's default (active).
* ``active`` / ``passive``: force it. An ``OMP_WAIT_POLICY`` already in the environment wins.

Only the program itself restarts: the ``retina-fast`` script and ``python -m retina_fast``.
``main()`` called from Python (a notebook) never replaces the process it runs in; it notes that
the policy cannot change there instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import subprocess
import sys

from retina_fast.data.errors import RetinaFastError
from retina_fast.engine import config as rconfig
from retina_fast.engine import precision as rprec
from retina_fast.engine.logging_utils import start_console_log, stop_console_log

log = logging.getLogger("retina_fast")


def _ncpu() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _want_passive(policy: str) -> bool:
    if policy == "passive":
        return True
    if policy == "active":
        return False
    try:
        load1 = os.getloadavg()[0]
    except (AttributeError, OSError):
        return False
    return load1 >= 0.4 * _ncpu()


def _apply_omp_policy(args, argv) -> None:
    """Restart once with OMP_WAIT_POLICY=PASSIVE when asked for (see module docstring)."""
    if os.environ.get("OMP_WAIT_POLICY") or os.environ.get("RETINA_FAST_REEXEC"):
        return
    if _want_passive(args.omp_wait_policy):
        if not getattr(args, "allow_reexec", False):
            log.info("OMP_WAIT_POLICY=PASSIVE would suit this machine, but retina_fast.cli.main() "
                     "was called from Python and does not restart the process it runs in; set "
                     "OMP_WAIT_POLICY=PASSIVE in the environment before Python starts")
            return
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", RETINA_FAST_REEXEC="1")
        print("[retina-fast] other processes are using the CPU: restarting with "
              "OMP_WAIT_POLICY=PASSIVE (see --omp-wait-policy)", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, "-m", "retina_fast"] + list(argv), env)


def _set_threads(args):
    """CPU threads (``--threads``) and the allocator (``--malloc``) for this process."""
    import torch

    n = args.threads or max(1, _ncpu() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(n)
    _apply_malloc(args)


def _apply_malloc(args) -> None:
    """``--malloc``: keep freed memory for reuse (retina_fast.engine.memory) or leave glibc's
    defaults. ``auto`` keeps it when this process is the program itself, never when ``main()``
    was called from Python (the setting is process-wide and outlives the call)."""
    from retina_fast.engine import memory

    choice = getattr(args, "malloc", None)
    if choice is None:  # export: a one-off, nothing to gain
        memory.set_system("glibc's defaults (this command has no --malloc)")
        return
    if choice == "auto" and not getattr(args, "allow_reexec", False):
        memory.set_system("retina_fast.cli.main() was called from Python, which leaves the process's "
                          "allocator alone (retina_fast.engine.memory.keep_freed_memory() sets it)")
    elif choice == "system":
        memory.set_system("--malloc system")
    else:
        memory.keep_freed_memory()
    # said where the work starts (training, inference, bench), not here: a user error found
    # after this must stay the only line


def _add_runtime_flags(p, omp=True, malloc="auto"):
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if present)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for PyTorch (default: the cores available / processes per node)")
    p.add_argument("--malloc", choices=["auto", "keep", "system"], default=malloc,
                   help="keep: have glibc keep freed memory for reuse instead of returning it to the "
                        "system between steps (fewer page faults: our training steps 1.07-1.21x "
                        "faster on the 2-core VM; retina_fast.engine.memory); system: glibc's defaults; auto: "
                        "keep when this is the retina-fast program, system when main() is called "
                        "from Python")
    if omp:
        p.add_argument("--omp-wait-policy", choices=["auto", "active", "passive"], default="auto",
                       help="OpenMP thread waiting: passive is much faster on a busy machine, ~20%% "
                            "slower on an idle one; auto picks passive when the load average "
                            "says the CPU is busy (default: auto)")


def _split_paths(args, prefix=""):
    """(ann_file, image_dir) from --data SPLIT_DIR or --ann/--images."""
    ann = getattr(args, f"{prefix}ann")
    images = getattr(args, f"{prefix}images")
    return ann, images


def _resolve_split(path: str | None, ann: str | None, images: str | None, what: str):
    """A split is a folder holding instances.json + images/, or an explicit annotation file and
    image folder (e.g. COCO's annotations/instances_val2017.json and val2017/)."""
    if ann or images:
        if not (ann and images):
            raise RetinaFastError(f"{what}: give both the annotation file and the image folder")
        return ann, images
    if path is None:
        return None
    if os.path.isfile(path):
        return path, os.path.join(os.path.dirname(path), "images")
    ann = os.path.join(path, "instances.json")
    if not os.path.isfile(ann):
        raise RetinaFastError(f"{what}: {path} holds no instances.json (a split folder needs "
                              "instances.json and images/; or pass the annotation file and image folder)")
    return ann, os.path.join(path, "images")


def _start_run_files(args, argv) -> None:
    """OUT/log.txt (a copy of the console) and, for train, OUT/config.yaml; rank 0 only."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    start_console_log(os.path.join(args.out, "log.txt"), "retina-fast " + shlex.join(argv))
    if getattr(args, "run_config", None) is not None:
        rconfig.write_config(args.out, args.run_config, args.config)


def _log_eval(args, metrics: dict, step: int) -> None:
    """The evaluation after training, into OUT/metrics.jsonl (and TensorBoard)."""
    from retina_fast.engine.evaluate import STAT_NAMES
    from retina_fast.engine.logging_utils import MetricsLogger

    ml = MetricsLogger(args.out, tensorboard=args.tensorboard)
    ml.log("eval", step, {k: metrics[k] for k in STAT_NAMES})
    ml.close()


# ---------------------------------------------------------------------------------- commands


def cmd_demo(args, argv):
    _apply_omp_policy(args, argv)
    _set_threads(args)
    from retina_fast.engine.demo import run_demo
    from retina_fast.engine.train import check_writable_dir

    check_writable_dir(args.out)
    _start_run_files(args, argv)
    run_demo(out_dir=args.out, time_budget=args.time_budget, device=args.device, seed=args.seed,
             val_images=args.val_images, batch_size=args.batch_size, lr=args.lr,
             workers=args.workers, amp=args.amp, max_iters=args.max_iters, progress=args.progress,
             precision=args.precision, channels_last=args.channels_last)


def cmd_train(args, argv):
    _apply_omp_policy(args, argv)
    _set_threads(args)
    from retina_fast.data import CocoDetection, ShapesConfig, ShapesStream, SHAPES_CATEGORIES, eval_transforms, train_transforms
    from retina_fast.engine.evaluate import evaluate
    from retina_fast.engine.plots import plot_loss_curve
    from retina_fast.engine.train import TrainConfig, check_writable_dir, resolve_resume, train

    check_writable_dir(args.out)
    resolve_resume(args.out, args.resume, args.overwrite)  # refused before OUT is touched
    model_kwargs = rconfig.model_kwargs(args)
    _start_run_files(args, argv)

    if args.shapes_stream:
        train_set = ShapesStream(args.shapes_stream, seed=args.seed, cfg=ShapesConfig(),
                                 transforms=train_transforms(hflip=args.hflip, to_float=False))
        categories = SHAPES_CATEGORIES
        data_root = args.data
    else:
        split = _resolve_split(os.path.join(args.data, "train") if args.data else None,
                               args.train_ann, args.train_images, "training data")
        if split is None:
            raise RetinaFastError("no training data: give --data ROOT (with train/ and val/ split "
                                  "folders) or --train-ann FILE --train-images DIR, or --shapes-stream N")
        train_set = CocoDetection(*split, transforms=train_transforms(hflip=args.hflip, to_float=False), seed=args.seed)
        categories = [{"id": c["id"], "name": c.get("name", str(c["id"]))} for c in train_set.categories]
        data_root = args.data
    val_split = None
    if args.val_ann or args.val_images:
        val_split = _resolve_split(None, args.val_ann, args.val_images, "validation data")
    elif data_root and os.path.isfile(os.path.join(data_root, "val", "instances.json")):
        val_split = _resolve_split(os.path.join(data_root, "val"), None, None, "validation data")
    val_set = CocoDetection(*val_split, transforms=eval_transforms()) if val_split else None
    if val_set is not None and val_set.cat_ids != [c["id"] for c in categories]:
        raise RetinaFastError("the validation categories differ from the training categories")

    cfg = TrainConfig(
        out_dir=args.out, model=args.model, model_kwargs=model_kwargs, epochs=args.epochs,
        batch_size=args.batch_size, workers=args.workers, optimizer=args.optimizer, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
        lr_steps=tuple(args.lr_steps or ()), lr_gamma=args.lr_gamma, warmup_iters=args.warmup_iters,
        clip_grad=args.clip_grad, amp=args.amp, precision=args.precision, channels_last=args.channels_last,
        sync_bn=args.sync_bn, device=args.device, compile=args.compile,
        dist_timeout=args.dist_timeout,
        seed=args.seed, resume=args.resume, overwrite=args.overwrite, init_from=args.init_from,
        backbone_weights=args.backbone_weights, time_budget=args.time_budget, max_iters=args.max_iters,
        log_every=args.log_every, progress=args.progress, tensorboard=args.tensorboard,
    )
    result = train(cfg, train_set, categories, config=args.run_config)
    from retina_fast.engine import distributed as rdist

    if rdist.rank() == 0:
        if result.history:
            plot_loss_curve(result.history, os.path.join(args.out, "loss_curve.png"))
        if val_set is not None and not args.no_eval:
            metrics = evaluate(result.model, val_set, args.out, device=next(result.model.parameters()).device,
                               progress=args.progress, coco_backend=args.coco_backend)
            _log_eval(args, metrics, result.iterations)
        print(f"[train] checkpoint: {result.checkpoint}", flush=True)
    rdist.cleanup()


def cmd_eval(args, argv):
    _set_threads(args)
    from retina_fast.data import CocoDetection, eval_transforms
    from retina_fast.engine.checkpoint import load_checkpoint, model_from_checkpoint
    from retina_fast.engine.evaluate import evaluate
    from retina_fast.engine.train import check_writable_dir, resolve_device

    split = _resolve_split(args.data, args.ann, args.images, "evaluation data")
    if split is None:
        raise RetinaFastError("give --data SPLIT_DIR or --ann FILE --images DIR")
    if args.out:
        check_writable_dir(args.out)
        _start_run_files(args, argv)
    dev = resolve_device(args.device)
    if args.weights:
        ds = CocoDetection(*split, transforms=eval_transforms())
        model = _weights_model_for_dataset(args, dev, ds)
    else:
        ckpt = load_checkpoint(args.checkpoint)
        ds = CocoDetection(*split, transforms=eval_transforms())
        ck_ids = [c["id"] for c in ckpt["categories"]]
        if ds.cat_ids != ck_ids:
            raise RetinaFastError(f"the dataset's category ids {ds.cat_ids[:10]} differ from the "
                                  f"checkpoint's {ck_ids[:10]}")
        model = model_from_checkpoint(ckpt, dev)
    from retina_fast.engine.predict import set_input_size

    set_input_size(model, args.min_size, args.max_size)
    model, settings = _inference_model(args, model, dev)
    evaluate(model, ds, args.out, device=dev, batch_size=args.batch_size, progress=args.progress,
             coco_backend=args.coco_backend, settings=settings)
    if args.out:
        print(f"[eval] metrics.json, per_class.csv, pr_curves.png and detections.json written to "
              f"{args.out}", flush=True)


def cmd_predict(args, argv):
    _set_threads(args)
    from retina_fast.engine.checkpoint import load_checkpoint, model_from_checkpoint
    from retina_fast.engine.predict import collect_images, predict_images, set_input_size
    from retina_fast.engine.train import check_writable_dir, resolve_device

    paths = collect_images(args.inputs)
    check_writable_dir(args.out)
    dev = resolve_device(args.device)
    if args.weights:
        model, categories = _weights_model(args, dev)
    else:
        ckpt = load_checkpoint(args.checkpoint)
        model, categories = model_from_checkpoint(ckpt, dev), ckpt["categories"]
    set_input_size(model, args.min_size, args.max_size)
    model, settings = _inference_model(args, model, dev)
    names = [c.get("name", str(c["id"])) for c in categories]
    recs = predict_images(model, paths, args.out, names, device=dev, score_thresh=args.score_thresh,
                          image_format=args.format,
                          label_to_cat_id=[c["id"] for c in categories],
                          batch_size=args.batch_size, settings=settings)
    n = sum(len(r["boxes"]) for r in recs)
    print(f"[predict] {n} detections on {len(recs)} images; drawn images, predictions.json and "
          f"coco_results.json in {args.out}")


def _inference_model(args, model, dev):
    """``(model, settings)`` for eval / predict: ``--precision`` / ``--channels-last`` resolved
    for the device, the model prepared for them (BatchNorms folded, weights in the precision
    and memory format: :func:`retina_fast.models.fuse.prepare_for_inference`) and, with
    ``--compile``, its backbone and head given to ``torch.compile`` (the transform and the
    post-processing stay eager: our kernels are single ops either way)."""
    import torch

    from retina_fast.engine import memory
    from retina_fast.models.fuse import prepare_for_inference

    settings = rprec.from_args(args, dev)
    log.info("inference: %s; memory: %s", settings.describe(), memory.describe())
    # oneDNN's fused convolutions are opaque to torch.compile: --compile keeps plain ones
    model = prepare_for_inference(model, settings, pointwise=False if args.compile else None)
    log.info("inference model: %d BatchNorms folded into their convolutions, %d convolutions fused with "
             "their ReLU / residual add", model._rf_inference_prepared["folded"],
             model._rf_inference_prepared["pointwise"])
    if args.compile:
        inner = getattr(model, "model", model)  # LabelMappedModel (eval --weights) holds the RetinaNet
        for name in ("backbone", "head"):
            setattr(inner, name, torch.compile(getattr(inner, name)))
        model._rf_compiled = True
        log.info("torch.compile: backbone and head (compiled at the first batch)")
    return model, settings


def _add_inference_flags(p):
    rprec.add_flags(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone and head (the first batch compiles them: "
                        "worth it for many images of one size)")


# --- torchvision weights files for eval / predict (--weights FILE --arch NAME) -----------------


def _weights_model(args, dev):
    """(model, categories) for ``--weights``: torchvision's RetinaNet with the file's weights;
    its labels are torchvision's (COCO category ids for the 91-class COCO weights)."""
    from retina_fast.engine.model_factory import model_from_weights
    from retina_fast.models.weights import COCO_CATEGORIES

    model, info = model_from_weights(args.weights, args.arch, dev)
    k = info["num_classes"]
    names = COCO_CATEGORIES if k == len(COCO_CATEGORIES) else [str(i) for i in range(k)]
    eps = "" if info["bn_eps"] is None else f"; FrozenBatchNorm2d eps {info['bn_eps']:g}"
    fix = " (torchvision's fix for its v1 COCO weights)" if info["bn_eps"] == 0 else ""
    log.info("loaded %s weights with %d classes from %s%s%s", info["arch"], k, args.weights, eps, fix)
    return model, [{"id": i, "name": n} for i, n in enumerate(names)]


def _weights_model_for_dataset(args, dev, ds):
    """``--weights`` for ``eval``: the model's labels mapped to the dataset's categories."""
    from retina_fast.engine.model_factory import map_to_dataset

    model, categories = _weights_model(args, dev)
    model, rule = map_to_dataset(model, ds.categories, len(categories), args.label_map)
    log.info("the dataset's %d categories are the model's labels with the same %s",
             len(ds.categories), "COCO category name" if rule == "name" else "category id")
    return model


TORCHVISION_ARCHS = ("retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2")  # model_factory's (no torch import here)


def _add_weights_flags(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint.pt written by retina-fast train")
    src.add_argument("--weights", metavar="FILE",
                     help="a torchvision RetinaNet state_dict file (e.g. torchvision's COCO weights "
                          "retinanet_resnet50_fpn_coco-eeacb38b.pth); its labels are COCO category ids")
    p.add_argument("--arch", choices=["auto", *TORCHVISION_ARCHS], default="auto",
                   help="the architecture of --weights (auto: told by the file)")


# --- export: torch.export / AOTInductor / ONNX of the eval model --------------------------------


def cmd_export(args, argv):
    _set_threads(args)
    from retina_fast.engine.checkpoint import load_checkpoint, model_from_checkpoint
    from retina_fast.engine.predict import set_input_size

    want = ".onnx" if args.format == "onnx" else ".pt2"
    if not args.out.endswith(want):
        raise RetinaFastError(f"argument --out: a {args.format} file must end in {want}, not {args.out!r}")
    if min(args.image_size) < 1:
        raise RetinaFastError(f"argument --image-size: must be at least 1, not {min(args.image_size)}")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    from retina_fast.engine.train import check_writable_dir

    check_writable_dir(out_dir)
    if args.weights:
        model, _ = _weights_model(args, "cpu")
    else:
        model = model_from_checkpoint(load_checkpoint(args.checkpoint), "cpu")
    set_input_size(model, args.min_size, args.max_size)
    import torch

    from retina_fast import export as rx

    images = rx.example_images(args.batch_size, tuple(args.image_size), seed=args.seed)
    with torch.no_grad():
        _export_and_check(args, model, images)


def _export_and_check(args, model, images):
    import torch

    from retina_fast import export as rx

    ref = model(images)
    if args.format == "export":
        ep = rx.export_program(model, images, padded=args.padded)
        torch.export.save(ep, args.out)
        got = rx.load_program(args.out).module()(images)
        if args.padded:
            from retina_fast.models.retinanet import _split

            got = _split(*got)
    elif args.format == "aoti":
        rx.build_aoti(model, images, args.out)
        got = rx.load_aoti(args.out)(images)
    else:
        rx.export_onnx(model, args.out, images)
        got = rx.OnnxRetinaNet(args.out)(images)
    ds = max((float((a["scores"][:n] - b["scores"][:n]).abs().max()) if n else 0.0
              for a, b in zip(got, ref) for n in [min(len(a["scores"]), len(b["scores"]))]), default=0.0)
    db = max((float((a["boxes"][:n] - b["boxes"][:n]).abs().max()) if n else 0.0
              for a, b in zip(got, ref) for n in [min(len(a["boxes"]), len(b["boxes"]))]), default=0.0)
    counts = ([len(a["scores"]) for a in got], [len(b["scores"]) for b in ref])
    print(f"[export] {args.format}: wrote {args.out}; on {len(images)} random "
          f"{args.image_size[0]}x{args.image_size[1]} images against the eager model: detections "
          f"{counts[0]} vs {counts[1]}, max |score difference| {ds:.3g}, max |box difference| {db:.3g} px",
          flush=True)


def cmd_make_shapes(args, argv):
    from retina_fast.data import ShapesConfig, write_shapes_coco
    from retina_fast.engine.train import check_writable_dir

    check_writable_dir(args.out)
    cfg = ShapesConfig(size=args.size)
    out = write_shapes_coco(args.out, {"train": args.train, "val": args.val}, seed=args.seed, cfg=cfg)
    for split, d in out.items():
        print(f"[make-shapes] {split}: {d}/instances.json + {d}/images/")


def _bench_model_parser():
    p = _ArgumentParser(prog="retina-fast bench model",
                        formatter_class=_HelpFormatter,
                        description="Ours against torchvision's RetinaNet (R50-FPN v1, same weights, same "
                                    "inputs): train step (forward, losses, backward) and inference, medians "
                                    "of interleaved calls. The first row is ours under --precision / "
                                    "--channels-last (default auto: what retina-fast chooses) against "
                                    "torchvision's defaults (float32, NCHW); the others are like for like.")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--size", type=int, default=512, help="input side (min_size = max_size)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--latency-rounds", type=int, default=10, help="batch-1 inference rounds (0: skip)")
    p.add_argument("--rows", default="fp32,fp32+cl,bf16,bf16+cl",
                   help="like-for-like settings, comma separated (PRECISION or PRECISION+cl); empty: none")
    p.add_argument("--finetune-rows", default="fp32,fp32+cl,bf16,bf16+cl",
                   help="like-for-like train-step settings of the fine-tuning layout (FrozenBatchNorm2d, "
                        "3 trainable stages, as torchvision builds it with pretrained weights); empty: none")
    p.add_argument("--no-train", action="store_true", help="inference only")
    p.add_argument("--no-infer", action="store_true", help="train step only")
    p.add_argument("--json", metavar="FILE", help="write the table as JSON")
    p.add_argument("--markdown", metavar="FILE", help="write the table as Markdown")
    rprec.add_flags(p)
    # system by default: both models run in this one process, and a torchvision user's script
    # gets glibc's defaults (--malloc keep measures both with freed memory kept)
    _add_runtime_flags(p, omp=False, malloc="system")
    return p


def _setting_rows(text: str, flag: str):
    rows = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        prec, _, cl = item.partition("+")
        if prec not in rprec.PRECISIONS[1:] or cl not in ("", "cl"):
            raise RetinaFastError(f"argument {flag}: {item!r} is not PRECISION or PRECISION+cl "
                                  f"(PRECISION one of {', '.join(rprec.PRECISIONS[1:])})")
        rows.append((prec, cl == "cl"))
    return rows


def _bench_model(argv_rest):
    import json

    a = _bench_model_parser().parse_args(argv_rest)
    for name, least in (("batch_size", 1), ("size", 32), ("rounds", 1), ("warmup", 0), ("latency_rounds", 0)):
        if getattr(a, name) < least:
            raise RetinaFastError(f"argument --{name.replace('_', '-')}: must be at least {least}, "
                                  f"not {getattr(a, name)}")
    _set_threads(a)
    from retina_fast.engine import speed
    from retina_fast.engine.train import resolve_device

    dev = resolve_device(a.device)
    rows, finetune_rows = _setting_rows(a.rows, "--rows"), _setting_rows(a.finetune_rows, "--finetune-rows")
    info = speed.machine_info(dev)
    print(f"[bench] {info.get('cpu') or info.get('gpu')}; {info['threads']} threads; torch {info['torch']}"
          + (f"; AMX {info['amx']}, AVX-512-BF16 {info['avx512_bf16']}, flags {' '.join(info['cpu_flags'])}"
             if 'cpu' in info else ""), flush=True)
    settings = rprec.resolve(a.precision, a.channels_last, dev)
    print(f"[bench] ours by default: {settings.describe()}", flush=True)
    print(f"[bench] memory: {info['malloc']}", flush=True)
    table = speed.model_table(a.batch_size, a.size, dev, a.rounds, a.warmup, a.latency_rounds or None, rows,
                              train=not a.no_train, infer=not a.no_infer, default_precision=a.precision,
                              default_channels_last=a.channels_last,
                              log=lambda line: print("[bench] " + line, flush=True), finetune_rows=finetune_rows)
    md = speed.markdown(table)
    print(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(table, f, indent=2)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(md + "\n")
    return 0


def cmd_bench(args, argv):
    rest = list(args.pytest_args)
    rest = rest[1:] if rest[:1] == ["--"] else rest
    if rest[:1] == ["model"]:
        return _bench_model(rest[1:])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    bench_dir = os.path.join(root, "benchmarks")
    files = sorted(f for f in os.listdir(bench_dir) if f.startswith("bench_")) if os.path.isdir(bench_dir) else []
    extra = list(args.pytest_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    cmd = [sys.executable, "-m", "pytest", bench_dir, "--benchmark-only", "-q"] + extra
    if not files:
        print("retina-fast bench runs the pytest-benchmark files benchmarks/bench_*.py of a source "
              "checkout:\n  " + " ".join(cmd[2:]).replace(sys.executable, "python") +
              f"\nNo benchmarks/bench_*.py found under {root}.")
        return 0
    print("[bench] " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=root)


# ------------------------------------------------- env command and optional packages (extras)
#
# `retina-fast env` is retina_fast.collect_env. It runs when the kernels do not load (a build
# for another torch): retina_fast/__init__.py lets this one command import the package without
# them, and nothing the env command imports here loads them.
#
# A command checks the optional packages it will need before any work starts
# (_check_extras, from _prepare), so a base install (`pip install retina_fast`: ops and model)
# learns which extra to install at once, not after a training run.

_BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")

#: The extra that holds what the commands need (pyproject.toml [project.optional-dependencies]).
CLI_EXTRA = "retina_fast[cli]"
#: The extra for `retina-fast export --format onnx` (retina_fast.export's ONNX path).
EXPORT_EXTRA = "retina_fast[export]"


def _add_env_command(sub, fmt):
    en = sub.add_parser("env", formatter_class=fmt, help="print the environment, for bug reports",
                        description="Print what a bug report needs: the versions of retina_fast, "
                                    "torch, torchvision, Python and CUDA, what the extension was "
                                    "built with (torch, CUDA toolkit, archs), whether its CUDA "
                                    "kernels are present, the CPU kernel variant, OpenMP threads, "
                                    "the GPUs and the optional packages. Same as python -m "
                                    "retina_fast.collect_env.")
    en.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    en.set_defaults(func=cmd_env)


def cmd_env(args, argv):
    from retina_fast.collect_env import main as collect_env_main

    return collect_env_main(["--json"] if args.json else [])


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (a ``sys.modules[name] = None``
    entry or a meta-path finder that refuses it count as not installed)."""
    import importlib.util

    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _has_val_data(args) -> bool:
    """Whether ``train`` will evaluate after training (validation data given or found)."""
    if getattr(args, "no_eval", False):
        return False
    if getattr(args, "val_ann", None) or getattr(args, "val_images", None):
        return True
    data = getattr(args, "data", None)
    return bool(data) and os.path.isfile(os.path.join(data, "val", "instances.json"))


def _needed_packages(args) -> list:
    """(import name, pip name, what for, extra) of each optional package this command will use."""
    cmd, need = args.command, []
    coco = ("pycocotools", "pycocotools", "COCO evaluation", CLI_EXTRA)
    plots = ("matplotlib", "matplotlib", "plots", CLI_EXTRA)
    evaluates = cmd in ("demo", "eval") or (cmd == "train" and _has_val_data(args))
    # --coco-backend faster names its own package (engine/coco_backends.py); auto takes either
    if evaluates and getattr(args, "coco_backend", "auto") != "faster":
        if not (getattr(args, "coco_backend", "auto") == "auto" and _installed("faster_coco_eval")):
            need.append(coco)
    if cmd in ("demo", "train") or (cmd == "eval" and args.out):
        need.append(plots)  # the loss curve; eval --out: the precision-recall panels
    if getattr(args, "config", None):
        need.append(("yaml", "pyyaml", "--config", CLI_EXTRA))
    if getattr(args, "tensorboard", False):
        need.append(("tensorboard", "tensorboard", "--tensorboard", CLI_EXTRA))
    if cmd == "export" and getattr(args, "format", None) == "onnx":
        need += [(m, m, "--format onnx", EXPORT_EXTRA) for m in ("onnx", "onnxscript", "onnxruntime")]
    if cmd == "bench" and os.path.isdir(_BENCH_DIR):  # a source checkout's benchmarks/
        need += [("pytest", "pytest", "the benchmarks", "retina_fast[test]"),
                 ("pytest_benchmark", "pytest-benchmark", "the benchmarks", "retina_fast[test]")]
    return need


def _check_extras(args) -> None:
    """A one-line RetinaFastError naming the missing packages and the extra to install."""
    missing = [n for n in _needed_packages(args) if not _installed(n[0])]
    if not missing:
        return
    extras = sorted({n[3] for n in missing})
    what = ", ".join(f"{pip} ({use})" for _, pip, use, _ in missing)
    one = len(missing) == 1
    raise RetinaFastError(
        f"{args.command} needs {what}, which {'is' if one else 'are'} not installed: "
        + " and ".join(f"pip install '{e}'" for e in extras)
        + f" (or just: pip install {' '.join(n[1] for n in missing)})")


# ------------------------------------------------------------------------------------ parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after each option, unless its help already says what the
    default is ("(default: 240 on CPU, 75 on GPU)" rather than that and "(default: None)") or
    there is none (an option left unset is None: "(default: None)" says nothing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default:" in text.lower() or action.default is None:
            return text
        return super()._get_help_string(action)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse with a usage error on one line (the full usage is one ``--help`` away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_eval_flags(p, progress=True):
    from retina_fast.engine.coco_backends import BACKENDS

    p.add_argument("--coco-backend", choices=BACKENDS, default="auto",
                   help="COCOeval implementation: faster is faster-coco-eval (pip install "
                        "faster-coco-eval; same numbers, several times faster), auto picks it "
                        "when it is installed")
    if progress:
        p.add_argument("--progress", choices=["auto", "bar", "lines", "none"], default="auto",
                       help="auto: a tqdm bar on a terminal, lines with an ETA otherwise")


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    p = _ArgumentParser(
        prog="retina-fast",
        description="Fast, exact RetinaNet: train, evaluate and run detectors on COCO-format data.",
        epilog="Start with `retina-fast demo` (synthetic shapes, under 5 minutes on 2 CPU cores). "
               "`retina-fast COMMAND --help` explains each command.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", formatter_class=fmt,
                       help="generate shapes data, train a small model, evaluate, draw predictions",
                       description="Generate the synthetic shapes dataset (COCO format), train the "
                                   "small shapes-small RetinaNet on it for a fixed time budget, "
                                   "evaluate COCO mAP on 200 validation images, and write a results "
                                   "folder: metrics.json, loss_curve.png, predictions/*.png, "
                                   "summary.json, train/checkpoint.pt.")
    d.add_argument("--out", default="retina_fast_demo", help="results folder")
    d.add_argument("--time-budget", type=float, default=None,
                   help="seconds of training (default: 240 on CPU, 75 on GPU)")
    d.add_argument("--max-iters", type=int, default=None, help="stop after this many iterations")
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--lr", type=float, default=2e-3)
    d.add_argument("--workers", type=int, default=None, help="data workers rendering training images (default: 2 on CPU)")
    d.add_argument("--val-images", type=int, default=200)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--amp", action="store_true", help="the old switch: --precision bf16 on CPU, fp16 on GPU")
    rprec.add_flags(d)
    d.add_argument("--progress", choices=["auto", "bar", "lines", "none"], default="auto")
    _add_runtime_flags(d)
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", formatter_class=fmt, help="train on any COCO-format dataset",
                       description="Train a RetinaNet on a COCO-format dataset. Data: --data ROOT "
                                   "where ROOT/train and ROOT/val each hold instances.json and "
                                   "images/ (what make-shapes writes), or --train-ann FILE "
                                   "--train-images DIR [--val-ann FILE --val-images DIR] (e.g. "
                                   "COCO 2017). Options can come from a YAML file (--config). "
                                   "Writes OUT/checkpoint.pt every epoch, OUT/config.yaml, "
                                   "OUT/metrics.jsonl, OUT/log.txt, OUT/history.json, "
                                   "OUT/loss_curve.png and, with validation data, what eval "
                                   "--out writes. Multi-GPU / multi-process: "
                                   "torchrun --nproc_per_node N -m retina_fast train ...")
    g = t.add_argument_group("data")
    g.add_argument("--data", help="dataset root with train/ and val/ split folders")
    g.add_argument("--train-ann", help="training annotation file (COCO instances JSON)")
    g.add_argument("--train-images", help="training image folder")
    g.add_argument("--val-ann", help="validation annotation file")
    g.add_argument("--val-images", help="validation image folder")
    g.add_argument("--shapes-stream", type=int, metavar="N", default=0,
                   help="train on freshly rendered shapes images, N per epoch, instead of files")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    g = t.add_argument_group("model")
    g.add_argument("--model", default="shapes-small",
                   help="shapes-small | resnet18-fpn | resnet34-fpn | resnet50-fpn (from scratch) | "
                        "retinanet_resnet50_fpn | retinanet_resnet50_fpn_v2 (torchvision's, for "
                        "--init-from / --backbone-weights)")
    g.add_argument("--min-size", type=int, nargs="+",
                   help="input shorter side; several values = multi-scale training (the last is used "
                        "for evaluation). Default: the model's (160 shapes-small, 800 resnets)")
    g.add_argument("--max-size", type=int, help="input longer side at most")
    g.add_argument("--model-opt", action="append", metavar="KEY=VALUE",
                   help="other build_model options, e.g. norm=\"gn\", head_convs=4, box_loss=\"l1\"")
    g.add_argument("--init-from", metavar="FILE",
                   help="start from these weights: a state_dict file (e.g. torchvision's COCO "
                        "RetinaNet, with --model retinanet_resnet50_fpn[_v2]) or a checkpoint.pt; "
                        "a class head for another number of classes is re-initialised")
    g.add_argument("--backbone-weights", metavar="FILE",
                   help="a torchvision ResNet state_dict file (e.g. ImageNet's resnet50-0676ba61.pth) "
                        "for the backbone's body")
    g = t.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=12)
    g.add_argument("--batch-size", type=int, default=16, help="images per process")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    g.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (SGD: try 0.01 for batch 16)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=0.05, help="not applied to norms and biases")
    g.add_argument("--schedule", choices=["cosine", "step", "constant"], default="cosine")
    g.add_argument("--lr-steps", type=int, nargs="*", help="epochs where step decay multiplies the lr by --lr-gamma")
    g.add_argument("--lr-gamma", type=float, default=0.1)
    g.add_argument("--warmup-iters", type=int, default=100)
    g.add_argument("--clip-grad", type=float, default=10.0, help="max total gradient norm, 0 = off")
    g.add_argument("--amp", action="store_true",
                   help="the old switch: --precision bf16 on CPU, fp16 + GradScaler on GPU")
    rprec.add_flags(g)
    g.add_argument("--compile", action="store_true",
                   help="torch.compile(fullgraph=True) of the whole step (forward, losses, backward: one "
                        "graph, no host sync inside); the batch is checked and padded on the host. "
                        "Compiles for ~1 min at the start; on a CPU it runs at eager's speed (oneDNN "
                        "convolutions either way), the gain is for GPUs. Not under DDP yet")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (GPU only)")
    g.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for a hung peer before it fails "
                        "(torch's default: 30 min gloo, 10 min NCCL)")
    g.add_argument("--time-budget", type=float, help="stop after this many seconds, cosine fitted to it")
    g.add_argument("--max-iters", type=int, help="stop after this many iterations")
    g = t.add_argument_group("run")
    g.add_argument("--out", default="runs/train", help="output folder")
    g.add_argument("--resume", metavar="CHECKPOINT",
                   help="continue from a checkpoint.pt (bit-for-bit); 'auto': from OUT/checkpoint.pt "
                        "if it exists, else from scratch (what a restarted job should run)")
    g.add_argument("--overwrite", action="store_true",
                   help="start from scratch even if OUT/checkpoint.pt exists (it is replaced when "
                        "the first epoch ends); without it that is an error")
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--log-every", type=int, default=50, help="iterations between progress lines (no TTY)")
    g.add_argument("--progress", choices=["auto", "bar", "lines", "none"], default="auto",
                   help="auto: a tqdm bar on a terminal, lines otherwise")
    g.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    _add_runtime_flags(g)
    t.set_defaults(func=cmd_train)
    g = t.add_argument_group("config file and logs")
    g.add_argument("--config", metavar="FILE.yaml",
                   help="read options from a YAML file: every flag above is a key (batch_size, "
                        "lr_steps, model_opt: {norm: gn}...); flags given here override it. The "
                        "resolved config is written to OUT/config.yaml and into the checkpoint")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved config (YAML) and exit")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard scalars to OUT/tensorboard (pip install "
                        "tensorboard); OUT/metrics.jsonl and OUT/log.txt are always written")
    _add_eval_flags(g, progress=False)

    e = sub.add_parser("eval", formatter_class=fmt, help="COCO mAP of a checkpoint on a COCO-format split",
                       description="Evaluate a checkpoint (or torchvision RetinaNet weights, "
                                   "--weights) with COCOeval (bbox; pycocotools or faster-coco-eval): "
                                   "prints the 12-number summary and AP per class and by object size; "
                                   "with --out writes metrics.json, per_class.csv, pr_curves.png "
                                   "(precision-recall per class) and detections.json (COCO results format).")
    _add_weights_flags(e)
    e.add_argument("--label-map", choices=["auto", "name", "id"], default="auto",
                   help="--weights: how the dataset's categories find the model's labels: by COCO "
                        "category name (for renumbered ids) or by category id; auto: by name when "
                        "every name is a COCO name")
    e.add_argument("--data", help="split folder holding instances.json and images/")
    e.add_argument("--ann", help="annotation file (instead of --data)")
    e.add_argument("--images", help="image folder (instead of --data)")
    e.add_argument("--out", help="folder for metrics.json and detections.json")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--min-size", type=int, help="resize the shorter side to this (default: the model's)")
    e.add_argument("--max-size", type=int, help="longer side at most (default: the model's, scaled like --min-size)")
    _add_runtime_flags(e, omp=False)
    e.set_defaults(func=cmd_eval)
    _add_inference_flags(e)
    _add_eval_flags(e)

    pr = sub.add_parser("predict", formatter_class=fmt, help="draw detections on images",
                        description="Run a checkpoint (or torchvision RetinaNet weights, --weights) "
                                    "on image files or folders; writes each image with boxes, class names and scores drawn (PNG, or JPEG for JPEG "
                                    "inputs), predictions.json and coco_results.json (every "
                                    "detection, COCO results format) to --out. Images are read "
                                    "upright (EXIF orientation applied).")
    pr.add_argument("inputs", nargs="+", help="image files or folders")
    _add_weights_flags(pr)
    pr.add_argument("--out", default="predictions")
    pr.add_argument("--score-thresh", type=float, default=0.4, help="draw and report detections above this score")
    pr.add_argument("--format", choices=["png", "jpg"], help="output image format (default: like the input)")
    _add_runtime_flags(pr, omp=False)
    pr.set_defaults(func=cmd_predict)
    _add_inference_flags(pr)
    pr.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    pr.add_argument("--min-size", type=int,
                    help="resize the shorter side to this (default: the model's, e.g. 160 for "
                         "shapes-small, 800 for the ResNets)")
    pr.add_argument("--max-size", type=int,
                    help="longer side at most (default: the model's, scaled like --min-size)")

    x = sub.add_parser("export", formatter_class=fmt, help="torch.export, AOTInductor or ONNX of a model",
                       description="Export a checkpoint (or torchvision RetinaNet weights) for deployment, "
                                   "traced on --batch-size random images of --image-size, then run "
                                   "the export on them and compare with the eager model. export: a "
                                   "torch.export program (.pt2; torch.export.load after importing "
                                   "retina_fast). aoti: an AOTInductor package (.pt2; "
                                   "retina_fast.export.load_aoti). onnx: the network up to the head's "
                                   "outputs (dynamic batch and size; retina_fast.export.OnnxRetinaNet "
                                   "runs it with onnxruntime and our post-processing). See "
                                   "docs/usage.md.")
    x.add_argument("--format", choices=["export", "aoti", "onnx"], required=True)
    _add_weights_flags(x)
    x.add_argument("--out", required=True, help="file to write (.pt2 or .onnx)")
    x.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"), default=[480, 640],
                   help="size of the example images (export and aoti programs take images of this size)")
    x.add_argument("--batch-size", type=int, default=1, help="images per call (export and aoti)")
    x.add_argument("--padded", action="store_true",
                   help="export: the padded program (boxes [B, D, 4], scores, labels, counts; static "
                        "shapes) instead of the list of dicts (aoti is always padded inside)")
    x.add_argument("--min-size", type=int, help="the model's input shorter side (default: the model's)")
    x.add_argument("--max-size", type=int, help="the model's input longer side at most")
    x.add_argument("--seed", type=int, default=0, help="seed of the example images")
    x.add_argument("--threads", type=int, default=0, help="CPU threads (default: all available)")
    x.set_defaults(func=cmd_export)

    m = sub.add_parser("make-shapes", formatter_class=fmt, help="write the synthetic shapes dataset (COCO format)",
                       description="Write OUT/train and OUT/val, each with images/ and instances.json: "
                                   "circles, squares and triangles of 8-128 px on textured backgrounds, "
                                   "deterministic from --seed.")
    m.add_argument("out")
    m.add_argument("--train", type=int, default=1000, help="training images")
    m.add_argument("--val", type=int, default=200, help="validation images")
    m.add_argument("--size", type=int, default=160, help="image side in pixels")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=cmd_make_shapes)

    b = sub.add_parser("bench", help="the whole-model speed table (bench model), or the kernel "
                                     "benchmarks (pytest-benchmark)",
                       description="`retina-fast bench model [options]` measures ours and torchvision's "
                                   "RetinaNet (R50-FPN v1), train step and inference, under our default "
                                   "settings and each like-for-like precision and memory format, in one "
                                   "run, and prints the table with the machine's CPU flags (`bench model "
                                   "--help` for its options). Otherwise runs `pytest benchmarks/ "
                                   "--benchmark-only` in the source checkout; extra arguments go to pytest "
                                   "(e.g. -k nms --benchmark-json out.json).")
    b.add_argument("pytest_args", nargs=argparse.REMAINDER)
    b.set_defaults(func=cmd_bench)
    _add_env_command(sub, fmt)
    return p


class _Formatter(logging.Formatter):
    def format(self, record):
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _prepare(parser, args, argv):
    """The config file merged in (train), the resolved config, and every check that can be done
    before work starts; a problem is a RetinaFastError."""
    _check_extras(args)  # first: a missing package names its extra (see _check_extras)
    if args.command == "train":
        if args.config:
            cfg = rconfig.load_config(args.config, rconfig.subparser(parser, "train"))
            args = rconfig.apply_config(parser, argv, cfg)
            _check_extras(args)  # what the file turned on (tensorboard: true, val data)
        rconfig.check_args(args, parser)
        rconfig.check_model(args.model, rconfig.model_kwargs(args))
        args.run_config = rconfig.resolved_config(args, parser)
    else:
        rconfig.check_args(args, parser)
    return args


def main(argv=None, *, allow_reexec: bool | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status.

    ``allow_reexec``: whether ``--omp-wait-policy`` may restart the process. By default only
    when this is the ``retina-fast`` program itself (``python -m retina_fast`` passes True);
    never when called from Python, e.g. a notebook."""
    if allow_reexec is None:
        script = os.path.splitext(os.path.basename(sys.argv[0]))[0]
        allow_reexec = argv is None and script in ("retina-fast", "retina-fast-script")
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser()
    parse_argv = argv
    if argv[:1] == ["bench"] and len(argv) > 1 and argv[1] not in ("-h", "--help"):
        # everything after `bench` is pytest's, options first included (`bench -k nms`):
        # argparse's REMAINDER would take them for retina-fast's own
        parse_argv = ["bench", "--", *argv[1:]]
    try:
        args = parser.parse_args(parse_argv)
    except SystemExit as e:  # --help, or a usage error already printed on one line
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        args = _prepare(parser, args, argv)
        if getattr(args, "print_config", False):
            print(rconfig.dump_config(args.run_config, args.config), end="", flush=True)
            return 0
        args.allow_reexec = allow_reexec
        rc = args.func(args, argv)
        return int(rc or 0)
    except SystemExit as e:  # a usage error while re-reading the command line with a config
        return e.code if isinstance(e.code, int) else 2
    except RetinaFastError as e:
        print(f"retina-fast: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        print(f"retina-fast: error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("retina-fast: interrupted", file=sys.stderr)
        return 130
    finally:
        stop_console_log()


if __name__ == "__main__":
    sys.exit(main())
