"""pytest-benchmark files (see benchmarks/conftest.py for the quick --benchmark-disable mode)."""

import os


def quick() -> bool:
    """True under ``--benchmark-disable``: each body runs once, on small inputs."""
    return os.environ.get("RF_BENCH_QUICK") == "1"


UNTIMED = "measured figures in extra_info; the timed call was an empty placeholder (its stats removed)"


def record_untimed(benchmark):
    """For a benchmark whose figures are measured elsewhere (a subprocess's peak memory, CPU
    times of interleaved rounds) and put in ``benchmark.extra_info``: pytest-benchmark records
    an entry only for a test that calls the fixture, so an empty call is made, and its
    meaningless median is removed from the JSON (benchmarks/conftest.py): ``stats`` is null."""
    benchmark.extra_info["untimed"] = UNTIMED
    benchmark.pedantic(lambda: None, rounds=1)
