"""``pytest benchmarks --benchmark-disable`` runs every benchmark's body once, as a plain test:
CI does, so no benchmark rots before the rare GPU run. In that mode nothing is measured, so
the inputs shrink too (``benchmarks.quick()``: a tenth to a twentieth of the sizes, 100 COCO
images instead of 5,000) and the whole folder runs in a couple of minutes on 2 cores; timed
runs (``--benchmark-only``, scripts/run_benchmarks.sh) keep the published sizes."""

import os


def pytest_configure(config):
    if config.getoption("benchmark_disable", default=False):
        os.environ["RF_BENCH_QUICK"] = "1"  # read by benchmarks.quick(), also in the subprocesses
        os.environ.setdefault("COCOEVAL_BENCH_IMAGES", "100")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """No meaningless figure in a results file: an untimed benchmark (benchmarks.record_untimed)
    keeps its extra_info, and loses the stats of its empty placeholder call."""
    for b in output_json.get("benchmarks", []):
        if (b.get("extra_info") or {}).get("untimed"):
            b["stats"] = None
