"""What a bug report needs: ``python -m retina_fast.collect_env`` (also ``retina-fast env``).

Prints the versions of retina_fast, torch, torchvision, Python and the CUDA runtime, what the
installed extension was built with (torch, CUDA toolkit, archs, compiler: recorded at build
time in ``retina_fast/_build_info.py``), whether its CUDA kernels are present, the CPU kernel
variant in use, OpenMP threads, the GPUs and which of our kernels each can run, and the
optional packages. Modelled on torch's ``torch.utils.collect_env`` and detectron2's
``collect_env``: one ``key  value`` row each, ``--json`` for a machine-readable copy.

It runs when the kernels fail to load too (e.g. a build for another torch): the row
``kernels loaded`` then gives the reason, which is what the report is for.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys

#: Optional packages: (distribution name, what uses it).
OPTIONAL = [
    ("pycocotools", "COCO evaluation"),
    ("faster-coco-eval", "faster COCO evaluation"),
    ("pillow", "images"),
    ("matplotlib", "plots"),
    ("tqdm", "progress bars"),
    ("pyyaml", "config files"),
    ("tensorboard", "--tensorboard"),
    ("pytest", "tests, retina-fast bench"),
    ("pytest-benchmark", "benchmarks"),
]


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _where(module) -> str:
    return os.path.dirname(getattr(module, "__file__", "") or "") or "?"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _parallel_backend(torch) -> str:
    try:
        info = torch.__config__.parallel_info()
    except Exception:  # noqa: BLE001 -- a report never fails on one row
        return "?"
    m = re.search(r"ATen parallel backend: (.*)", info)
    return m.group(1).strip() if m else "?"


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def _arch_number(code: str) -> tuple[int, int] | None:
    """"sm_86" / "compute_90" -> (8, 6) / (9, 0); "sm_90a" -> (9, 0)."""
    m = re.match(r"(?:sm|compute)_(\d+)(\d)[a-z]?$", code)
    return (int(m.group(1)), int(m.group(2))) if m else None


def gpu_coverage(capability: tuple[int, int], sass: list[str], ptx: list[str]) -> str:
    """Which of the compiled kernels a GPU of ``capability`` runs: machine code for the same
    major version and a minor version at most its own, else PTX of an arch at most its own
    (compiled by the driver at first use), else none."""
    fits = [c for c in sass if (a := _arch_number(c)) and a[0] == capability[0] and a[1] <= capability[1]]
    if fits:
        return f"machine code {max(fits, key=_arch_number)}"
    jit = [c for c in ptx if (a := _arch_number(c)) and a <= capability]
    if jit:
        return f"PTX {max(jit, key=_arch_number)}, compiled by the driver at first use"
    return (f"none: rebuild with TORCH_CUDA_ARCH_LIST={capability[0]}.{capability[1]} "
            "(or without TORCH_CUDA_ARCH_LIST on this machine)")


def get_env_info() -> list[tuple[str, str]]:
    """The report, as (key, value) rows in order."""
    rows: list[tuple[str, str]] = []
    add = lambda k, v: rows.append((k, "-" if v is None else str(v)))  # noqa: E731

    add("Python", sys.version.replace("\n", " "))
    add("platform", platform.platform())

    import torch

    import retina_fast
    from retina_fast import _version

    build = _version.build_info()
    add("retina_fast", f"{retina_fast.__version__} @{_where(retina_fast)}")
    err = getattr(retina_fast, "kernel_load_error", None)
    add("kernels loaded", f"no: {err}" if err else "yes")
    library = os.environ.get("RETINA_FAST_LIBRARY")
    add("kernel library", f"RETINA_FAST_LIBRARY={library}" if library else "retina_fast._C")
    if build:
        add("built against torch", build.get("torch_version"))
        add("built with CUDA toolkit", build.get("cuda_toolkit") or "none (a build without CUDA kernels)")
        add("built with compiler", build.get("compiler"))
        add("built with OpenMP", "yes" if build.get("openmp") else "no")
        archs = "none"
        if build.get("with_cuda"):
            archs = " ".join(build.get("sass_archs", []) + build.get("ptx_archs", []))
            archs += f" (TORCH_CUDA_ARCH_LIST={build.get('cuda_arch_list')})"
        add("CUDA archs compiled in", archs)
    else:
        add("build facts", "not recorded (built before retina_fast 0.2.0, or a CMake library): "
                           "rebuild for them")
    if not err:
        add("CUDA kernels", "compiled" if retina_fast.cuda_built() else "not compiled (CPU-only build)")
        isa = retina_fast.cpu_isa()
        forced = os.environ.get("RETINA_FAST_CPU_ISA")
        add("CPU kernel variant", isa + (f" (RETINA_FAST_CPU_ISA={forced})" if forced else ""))

    add("torch", f"{torch.__version__} @{_where(torch)}")
    add("torch CUDA runtime", torch.version.cuda or "none (a CPU-only torch)")
    if torch.version.cuda:
        try:
            add("cuDNN", torch.backends.cudnn.version())
        except Exception:  # noqa: BLE001
            add("cuDNN", "?")
        add("torch CUDA archs", " ".join(torch.cuda.get_arch_list()) or "?")
    try:
        import torchvision

        add("torchvision", f"{torchvision.__version__} @{_where(torchvision)}")
    except Exception as e:  # noqa: BLE001
        add("torchvision", f"not importable: {e}")
    add("numpy", _dist_version("numpy") or "not installed")

    add("CPU", f"{_cpu_name()}, {_cores()} cores available")
    add("OpenMP threads", f"{torch.get_num_threads()} (torch.get_num_threads; parallel backend "
                          f"{_parallel_backend(torch)}; OMP_NUM_THREADS="
                          f"{os.environ.get('OMP_NUM_THREADS', '<not set>')}, OMP_WAIT_POLICY="
                          f"{os.environ.get('OMP_WAIT_POLICY', '<not set>')})")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    add("GPU available", "yes" if gpus else "no")
    if gpus:
        add("NVIDIA driver", _driver_version() or "?")
        add("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "<not set>"))
    for i in range(gpus):
        p = torch.cuda.get_device_properties(i)
        cap = (p.major, p.minor)
        desc = f"{p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB"
        if build and build.get("with_cuda"):
            desc += "; our kernels: " + gpu_coverage(cap, build.get("sass_archs", []), build.get("ptx_archs", []))
        add(f"GPU {i}", desc)

    for name, use in OPTIONAL:
        add(name, _dist_version(name) or f"not installed ({use})")
    for k in sorted(os.environ):
        if k.startswith("RETINA_FAST_") and k not in ("RETINA_FAST_LIBRARY", "RETINA_FAST_CPU_ISA"):
            add(k, os.environ[k])
    return rows


def format_env_info(rows) -> str:
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2) + "  " + "-" * 40
    return "\n".join([line] + [f"{k:<{width + 2}}  {v}" for k, v in rows] + [line])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m retina_fast.collect_env",
                                description="Print what a retina_fast bug report needs.")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    args = p.parse_args(argv)
    rows = get_env_info()
    print(json.dumps(dict(rows), indent=1) if args.json else format_env_info(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
