"""pytest-benchmark files (see benchmarks/conftest.py for the quick --benchmark-disable mode)."""

import os


def quick() -> bool:
    """True under ``--benchmark-disable``: each body runs once, on small inputs."""
    return os.environ.get("RF_BENCH_QUICK") == "1"
