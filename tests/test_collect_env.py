"""The environment report (`python -m retina_fast.collect_env`, `retina-fast env`) and the
extras check: a command that misses an optional package names it and the extra to install
before any work starts (packages hidden with a `sys.modules[name] = None` entry in-process, and
with a meta-path finder that refuses them in a real process)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import retina_fast
from retina_fast import _version, cli, collect_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows():
    return dict(collect_env.get_env_info())


def test_report_has_what_a_bug_report_needs():
    rows = _rows()
    assert rows["retina_fast"].startswith(retina_fast.__version__ + " @")
    assert rows["torch"].startswith(torch.__version__ + " @")
    assert rows["torchvision"].split()[0] == __import__("torchvision").__version__
    assert rows["Python"].startswith(sys.version.split()[0])
    assert rows["torch CUDA runtime"] == (torch.version.cuda or "none (a CPU-only torch)")
    assert rows["kernels loaded"] == "yes"
    assert rows["CUDA kernels"] == ("compiled" if retina_fast.cuda_built() else "not compiled (CPU-only build)")
    assert rows["CPU kernel variant"].split()[0] == retina_fast.cpu_isa()
    assert rows["OpenMP threads"].startswith(f"{torch.get_num_threads()} (")
    assert rows["GPU available"] == ("yes" if torch.cuda.is_available() else "no")
    for name, _ in collect_env.OPTIONAL:
        assert name in rows
    info = _version.build_info()
    if info:  # what this tree's build recorded
        assert rows["built against torch"] == info["torch_version"]
        if info["with_cuda"]:
            assert rows["CUDA archs compiled in"].startswith(" ".join(info["sass_archs"] + info["ptx_archs"]))
            assert rows["built with CUDA toolkit"] == info["cuda_toolkit"]
    else:
        assert rows["build facts"].startswith("not recorded")


def test_report_of_a_recorded_cuda_build(monkeypatch):
    build = {"version": "0.2.0+pt214cu130", "torch_version": torch.__version__, "cuda_version": "13.0",
             "with_cuda": True, "cuda_toolkit": "13.0.88", "cuda_arch_list": "7.5;8.0;8.6;8.9;9.0+PTX",
             "sass_archs": ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90"], "ptx_archs": ["compute_90"],
             "compiler": "c++ (GCC) 12.2.0", "openmp": True}
    monkeypatch.setattr(_version, "build_info", lambda: dict(build))
    rows = _rows()
    assert rows["built against torch"] == torch.__version__
    assert rows["built with CUDA toolkit"] == "13.0.88" and rows["built with compiler"] == "c++ (GCC) 12.2.0"
    assert rows["CUDA archs compiled in"] == ("sm_75 sm_80 sm_86 sm_89 sm_90 compute_90 "
                                              "(TORCH_CUDA_ARCH_LIST=7.5;8.0;8.6;8.9;9.0+PTX)")
    assert rows["built with OpenMP"] == "yes"


def test_which_kernels_a_gpu_runs():
    sass, ptx = ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90"], ["compute_90"]
    assert collect_env.gpu_coverage((7, 5), sass, ptx) == "machine code sm_75"       # T4
    assert collect_env.gpu_coverage((8, 7), sass, ptx) == "machine code sm_86"       # Orin: same major
    assert collect_env.gpu_coverage((9, 0), sass, ptx) == "machine code sm_90"       # H100
    assert collect_env.gpu_coverage((12, 0), sass, ptx).startswith("PTX compute_90")  # Blackwell
    assert collect_env.gpu_coverage((10, 0), ["sm_90"], []).startswith("none: rebuild with TORCH_CUDA_ARCH_LIST=10.0")
    assert collect_env.gpu_coverage((8, 0), ["sm_90"], ["compute_90"]).startswith("none")  # PTX only runs upwards


def test_env_command_and_module_in_a_real_process():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, *c], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for c in (["-m", "retina_fast", "env", "--json"], ["-m", "retina_fast.collect_env"])]
    (out_json, err1), (out_table, err2) = [p.communicate(timeout=300) for p in procs]
    assert procs[0].returncode == 0 and procs[1].returncode == 0, err1 + err2
    rows = json.loads(out_json)
    assert rows["retina_fast"].startswith(retina_fast.__version__) and rows["kernels loaded"] == "yes"
    assert "CPU kernel variant" in out_table and out_table.splitlines()[0].startswith("---")


# ------------------------------------------------------------------------------- extras


def _main(capsys, argv):
    n = torch.get_num_threads()
    try:
        rc = cli.main([str(a) for a in argv])
    finally:
        torch.set_num_threads(n)
    return rc, capsys.readouterr().err


def _hide(monkeypatch, *modules):
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


@pytest.mark.parametrize("hidden, argv, named, extra", [
    (["matplotlib"], ["train", "--shapes-stream", "4"], ["matplotlib (plots)"], "retina_fast[cli]"),
    (["pycocotools", "faster_coco_eval"], ["demo"], ["pycocotools (COCO evaluation)"], "retina_fast[cli]"),
    (["matplotlib", "pycocotools", "faster_coco_eval"], ["eval", "--checkpoint", "x.pt", "--data", "d", "--out", "o"],
     ["pycocotools (COCO evaluation), matplotlib (plots)"], "retina_fast[cli]"),
    (["yaml"], ["train", "--config", "missing.yaml"], ["pyyaml (--config)"], "retina_fast[cli]"),
    (["tensorboard"], ["train", "--shapes-stream", "4", "--tensorboard"], ["tensorboard (--tensorboard)"],
     "retina_fast[cli]"),
    (["pytest_benchmark"], ["bench"], ["pytest-benchmark (the benchmarks)"], "retina_fast[test]"),
])
def test_a_missing_package_names_its_extra_before_any_work(monkeypatch, capsys, tmp_path, hidden, argv,
                                                           named, extra):
    _hide(monkeypatch, *hidden)
    out = tmp_path / "out"
    argv = [a if a not in ("d", "o") else str(tmp_path / a) for a in argv]
    if argv[0] in ("train", "demo"):
        argv += ["--out", out]
    rc, err = _main(capsys, argv)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"retina-fast: error: {argv[0]} needs ")
    assert f"pip install '{extra}'" in lines[0]
    for n in named:
        assert n in lines[0]
    assert not out.exists() and not (tmp_path / "o").exists()  # nothing was started


def test_only_what_the_run_will_use_is_required(monkeypatch, tmp_path):
    _hide(monkeypatch, "faster_coco_eval")  # else auto needs no pycocotools
    parser = cli.build_parser()
    need = lambda argv: {n[1] for n in cli._needed_packages(parser.parse_args(argv))}  # noqa: E731
    data = tmp_path / "data"
    (data / "val").mkdir(parents=True)
    (data / "val" / "instances.json").write_text("{}")
    assert need(["train", "--data", str(data)]) == {"matplotlib", "pycocotools"}
    assert need(["train", "--data", str(data), "--no-eval"]) == {"matplotlib"}
    assert need(["train", "--shapes-stream", "8"]) == {"matplotlib"}  # no validation data
    assert need(["eval", "--checkpoint", "c.pt", "--data", "d"]) == {"pycocotools"}
    assert need(["eval", "--checkpoint", "c.pt", "--data", "d", "--coco-backend", "faster"]) == set()
    for argv in (["predict", "x.png", "--checkpoint", "c.pt"], ["make-shapes", "out"], ["env"]):
        assert need(argv) == set()
    # auto takes faster-coco-eval when it is there
    monkeypatch.setattr(cli, "_installed", lambda module: module != "pycocotools")
    assert need(["eval", "--checkpoint", "c.pt", "--data", "d"]) == set()
    assert need(["eval", "--checkpoint", "c.pt", "--data", "d", "--coco-backend", "pycocotools"]) == {"pycocotools"}


def test_a_missing_extra_in_a_real_process(tmp_path):
    """As a user's base install meets it: a meta-path finder refuses the packages."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Refuse:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('pycocotools', 'faster_coco_eval', 'matplotlib'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, _Refuse())\n")
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1",
               OMP_WAIT_POLICY="PASSIVE")
    out = tmp_path / "demo"
    p = subprocess.run([sys.executable, "-m", "retina_fast", "demo", "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip() == ("retina-fast: error: demo needs pycocotools (COCO evaluation), matplotlib "
                                "(plots), which are not installed: pip install 'retina_fast[cli]' (or just: "
                                "pip install pycocotools matplotlib)")
    assert not out.exists()
