"""retina_fast.engine.memory: glibc keeps freed memory for reuse (fewer page faults a step), only
where it should, and the command line applies it only when it is the program itself.

Anything that calls mallopt runs in a subprocess: the setting is process-wide and would outlive
the test in pytest's own process."""

import argparse
import json
import os
import subprocess
import sys

import pytest

from retina_fast import cli
from retina_fast.engine import memory

glibc = pytest.mark.skipif(not memory.is_glibc(), reason="glibc's mallopt")

# Allocate, fill and free a 64 MiB tensor 12 times (above glibc's largest dynamic mmap threshold,
# 32 MiB, so by default every one is fresh pages) and report the minor page faults of the loop.
FAULTS = """
import json, resource, sys, torch
from retina_fast.engine import memory
applied = memory.keep_freed_memory() if sys.argv[1] == "keep" else False
torch.ones(16 << 20)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):
    x = torch.ones(16 << 20)
    del x
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0,
                  "describe": memory.describe()}))
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in memory._ENV_KNOBS and k != "LD_PRELOAD"}
    env.update(extra)
    return env


def _run(mode, env=None):
    out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                         env=env or _env(), timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_keeping_freed_memory_removes_the_page_faults_of_reallocation():
    system, keep = _run("system"), _run("keep")
    assert not system["applied"] and keep["applied"]
    assert "keeping freed memory" in keep["describe"]
    per_tensor = (64 << 20) // 4096
    # kept memory is reused: after the heap settles (the second block may land beside the first,
    # which is then merged with it) nothing faults again, however many times it is reallocated
    assert keep["faults"] <= 1.5 * per_tensor, keep
    # the system allocator maps fresh pages for each one (transparent huge pages, where always on,
    # fault 2 MiB at a time, and the count says little)
    if "[always]" not in _thp():
        assert system["faults"] >= 10 * per_tensor, system


def _thp():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read()
    except OSError:
        return ""


@glibc
def test_the_users_malloc_variables_win():
    got = _run("keep", _env(MALLOC_TOP_PAD_="0"))
    assert not got["applied"]
    assert "MALLOC_TOP_PAD_" in got["describe"] and "user's settings win" in got["describe"]


@pytest.mark.parametrize("preload", ["/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "libtcmalloc_minimal.so.4"])
def test_a_preloaded_allocator_is_left_alone(monkeypatch, preload):
    monkeypatch.setenv("LD_PRELOAD", preload)
    for k in memory._ENV_KNOBS:
        monkeypatch.delenv(k, raising=False)
    why = memory._why_not()
    assert why is not None and "preloaded" in why


def test_not_glibc_is_left_alone(monkeypatch):
    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("musl", ""))
    assert "not glibc" in memory._why_not()


def test_main_called_from_python_leaves_the_allocator_alone(monkeypatch):
    called = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: called.append(1))
    cli._apply_malloc(argparse.Namespace(malloc="auto", allow_reexec=False))
    assert not called and "called from Python" in memory.describe()
    cli._apply_malloc(argparse.Namespace(malloc="system", allow_reexec=True))
    assert not called and memory.describe() == "system allocator: --malloc system"
    cli._apply_malloc(argparse.Namespace(malloc="keep", allow_reexec=False))
    cli._apply_malloc(argparse.Namespace(malloc="auto", allow_reexec=True))
    assert len(called) == 2


def test_the_flag_and_its_defaults():
    p = cli.build_parser()
    args = p.parse_args(["eval", "--checkpoint", "c.pt", "--data", "d"])
    assert args.malloc == "auto"
    with pytest.raises(SystemExit):
        p.parse_args(["eval", "--checkpoint", "c.pt", "--data", "d", "--malloc", "jemalloc"])
    # bench model runs torchvision's model in the same process: glibc's defaults unless asked
    assert cli._bench_model_parser().parse_args([]).malloc == "system"
