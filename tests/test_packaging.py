"""Packaging: one version, a wheel that knows its torch, a complete sdist, dependencies that
match the imports, the CUDA arch default, and scripts/setup.sh in step with the extras.

The sdist tests build one sdist of a copy of the tracked tree (seconds; `python -m build
--sdist --no-isolation`, as the README says). Building a wheel takes minutes, so the tests
ask the build backend for the wheel's metadata instead (prepare_metadata_for_build_wheel:
setup.py runs, nothing compiles); CI builds the real wheel from the sdist and smoke-tests it in
a clean venv (.ci/run, build_tools/smoke_installed.py).
"""

import ast
import email
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch

import retina_fast
from retina_fast import _version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERIES = _version.torch_series(torch.__version__)
IN_GIT = shutil.which("git") is not None and subprocess.run(
    ["git", "-C", ROOT, "rev-parse", "--show-toplevel"], capture_output=True, text=True
).stdout.strip() == os.path.realpath(ROOT)

needs_git = pytest.mark.skipif(not IN_GIT, reason="needs the git checkout (its tracked files)")


def _tracked():
    out = subprocess.run(["git", "-C", ROOT, "ls-files", "-co", "--exclude-standard"],
                         capture_output=True, text=True, check=True).stdout
    return sorted(p for p in out.splitlines() if os.path.isfile(os.path.join(ROOT, p)))


def _copy_tree(dst):
    """The source tree as a fresh clone would have it (tracked and untracked-unignored files)."""
    for rel in _tracked():
        os.makedirs(os.path.join(dst, os.path.dirname(rel)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), os.path.join(dst, rel))


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RETINA_FAST_LOCAL_VERSION", None)
    env.update(extra)
    return env


def _wheel_metadata(src, tmp, *envs):
    """The METADATA a wheel built in ``src`` would have, for each environment in ``envs``
    (dicts added to FORCE_CUDA=0; one run at once each, in ``tmp``/meta<i>)."""
    code = ("import setuptools.build_meta as b, sys; "
            "print('DISTINFO=' + b.prepare_metadata_for_build_wheel(sys.argv[1]))")
    procs = []
    for i, env in enumerate(envs or ({},)):
        out = os.path.join(tmp, f"meta{i}")
        os.makedirs(out, exist_ok=True)
        procs.append((out, subprocess.Popen([sys.executable, "-c", code, out], cwd=src, text=True,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            env=_env(**{"FORCE_CUDA": "0", **env}))))
    metas = []
    for out, p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stdout[-2000:] + stderr[-3000:]
        name = [l for l in stdout.splitlines() if l.startswith("DISTINFO=")][-1].split("=", 1)[1]
        with open(os.path.join(out, name, "METADATA")) as f:
            metas.append(email.message_from_string(f.read()))
    return metas


def _run_deps(meta):
    return [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    if not IN_GIT:
        pytest.skip("needs the git checkout (its tracked files)")
    d = str(tmp_path_factory.mktemp("tree") / "src")
    _copy_tree(d)
    return d


@pytest.fixture(scope="module")
def sdist(tree, tmp_path_factory):
    """(path of the .tar.gz, its member names without the top folder)."""
    out = str(tmp_path_factory.mktemp("dist"))
    p = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", out, "."],
                       cwd=tree, capture_output=True, text=True, env=_env(FORCE_CUDA="0"), timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    (name,) = os.listdir(out)
    path = os.path.join(out, name)
    with tarfile.open(path) as t:
        members = [m.name.split("/", 1)[1] for m in t.getmembers() if m.isfile()]
    return path, members


# ---------------------------------------------------------------------------- the version


def test_local_tag_and_torch_requirement():
    assert _version.local_tag("2.14.1+cu130", "13.0") == "pt214cu130"
    assert _version.local_tag("2.11.0", None) == "pt211cpu"
    assert _version.local_tag("2.15.0a0+git1234", "12.8") == "pt215cu128"
    assert _version.build_version("2.14.1", "13.0") == _version.RELEASE + "+pt214cu130"
    assert _version.torch_requirement("2.14.1+cu130") == "torch==2.14.*"
    assert _version.torch_series("2.9.0") == "2.9"
    with pytest.raises(ValueError):
        _version.torch_series("nightly")


def test_the_version_is_written_once():
    """RELEASE in retina_fast/_version.py is the only place: pyproject.toml takes the version
    from setup.py (dynamic), setup.py from _version.py."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pyproject = f.read()
    assert re.search(r'^dynamic = \[.*"version"', pyproject, re.M)
    assert not re.search(r'^version\s*=', pyproject, re.M)
    with open(os.path.join(ROOT, "setup.py")) as f:
        setup_py = f.read()
    assert not re.search(r'version\s*=\s*["\']\d', setup_py)
    assert re.fullmatch(r"\d+\.\d+\.\d+", _version.RELEASE)


def _installed_from_here():
    """The installed retina_fast distribution when it is this tree (an editable install of
    it, as scripts/setup.sh makes), else None."""
    try:
        dist = importlib.metadata.distribution("retina_fast")
        url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None
    return dist if url.startswith("file://") and os.path.realpath(url[7:]) == os.path.realpath(ROOT) else None


def test_dunder_version_is_the_build_and_the_metadata():
    info = _version.build_info()
    assert retina_fast.__version__ == (info["version"] if info else _version.RELEASE)
    if info:
        # the build of this tree: its tag names the torch it was built with, the one running
        assert info["torch_version"] == torch.__version__
        tagged = _version.build_version(info["torch_version"], info["cuda_version"])
        assert info["version"] in (tagged, _version.RELEASE)
        assert info["with_cuda"] == retina_fast.cuda_built()
    dist = _installed_from_here()
    if dist is not None:  # CI: scripts/setup.sh's `pip install -e .` of this tree
        assert dist.version == retina_fast.__version__


def test_checkout_wheel_metadata(tree, tmp_path):
    """A wheel built from a checkout is tagged with its torch and requires that torch series;
    the extras are the commands' and the tests'."""
    (meta,) = _wheel_metadata(tree, str(tmp_path))
    assert meta["Version"] == _version.build_version(torch.__version__, None)  # FORCE_CUDA=0
    assert _run_deps(meta) == [f"torch=={SERIES}.*", "torchvision>=0.26", "numpy"]
    assert set(meta.get_all("Provides-Extra")) == {"cli", "export", "oracles", "test"}
    assert meta["License-Expression"] == "BSD-3-Clause" and meta["Requires-Python"] == ">=3.10"
    assert "A RetinaNet (focal loss + FPN, Lin et al. 2017) for PyTorch" in meta.get_payload()  # the README


def test_the_import_check_rules():
    cuda_build = {"version": "0.2.0+pt214cu130", "torch_version": "2.14.1+cu130", "cuda_version": "13.0",
                  "with_cuda": True}
    cpu_build = {"version": "0.2.0+pt214cpu", "torch_version": "2.14.1", "cuda_version": None,
                 "with_cuda": False}
    assert _version.torch_mismatch(cuda_build, "2.14.0+cu130", "13.0") is None  # a patch release
    assert _version.torch_mismatch(cuda_build, "2.14.1+cu131", "13.1") is None  # a CUDA minor
    assert _version.torch_mismatch(cpu_build, "2.14.1+cu130", "13.0") is None   # CPU kernels only
    assert _version.torch_mismatch(cpu_build, "2.14.1+cpu", None) is None
    why = _version.torch_mismatch(cuda_build, "2.11.0+cu130", "13.0")
    assert "2.14.1+cu130" in why and "2.11.0+cu130" in why
    assert "pip install --no-build-isolation --no-deps -e ." in why and "torch==2.14.*" in why
    assert "CPU-only" in _version.torch_mismatch(cuda_build, "2.14.1+cpu", None)
    why = _version.torch_mismatch(cuda_build, "2.14.1+cu126", "12.6")
    assert "CUDA 13.0" in why and "CUDA 12.6" in why


def _fake_build_site(tmp_path, build):
    """A sitecustomize that makes retina_fast read ``build`` as its recorded build facts."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys, types\n"
        f"sys.modules['retina_fast._build_info'] = types.SimpleNamespace(BUILD={build!r})\n")
    return {"PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}


OTHER_TORCH = {"version": _version.RELEASE + "+pt29cu126", "torch_version": "2.9.0+cu126",
               "cuda_version": "12.6", "with_cuda": True, "cuda_toolkit": "12.6.85",
               "cuda_arch_list": "9.0", "sass_archs": ["sm_90"], "ptx_archs": [],
               "compiler": "c++ 11", "openmp": True}


def test_import_with_another_torch_names_both_and_how_to_rebuild(tmp_path):
    env = _env(**_fake_build_site(tmp_path, OTHER_TORCH))
    # the three processes at once (each is mostly `import torch`)
    cmds = [["-c", "import retina_fast"], ["-m", "retina_fast.collect_env", "--json"],
            ["-m", "retina_fast", "env", "--json"]]
    procs = [subprocess.Popen([sys.executable, *c], cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in cmds]
    (_, err), *reports = [p.communicate(timeout=300) for p in procs]
    assert procs[0].returncode != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("ImportError: ") and "undefined symbol" not in last
    assert "2.9.0+cu126" in last and torch.__version__ in last
    assert "pip install --no-build-isolation" in last and "torch==2.9.*" in last
    # the environment report still runs, and says why the kernels did not load
    for p, (out, err) in zip(procs[1:], reports):
        assert p.returncode == 0, err
        rows = json.loads(out)
        assert rows["kernels loaded"].startswith("no: retina_fast") and "2.9.0+cu126" in rows["kernels loaded"]
        assert rows["built against torch"] == "2.9.0+cu126" and rows["torch"].startswith(torch.__version__)


# ------------------------------------------------------------------------------ the sdist


@pytest.mark.slow
@needs_git
def test_sdist_holds_every_tracked_file(sdist):
    """Everything needed to build (csrc/ with every header and .cu, build_tools/,
    CMakeLists.txt), the tests, benchmarks, docs, scripts, LICENSE, README.md, CHANGELOG.md;
    nothing built (no .so, no _build_info.py); only CI's own files stay out."""
    _, members = sdist
    generated = {"PKG-INFO", "setup.cfg"}
    got = {m for m in members if m not in generated and not m.startswith("retina_fast.egg-info/")}
    want = set(_tracked()) - {".ci/run", ".gitignore"}
    assert got == want, (sorted(want - got), sorted(got - want))
    for must in ("csrc/common/cuda_utils.cuh", "csrc/nms/nms_cuda.cu", "csrc/focal_loss/focal_loss_math.h",
                 "build_tools/cuda_env.py", "CMakeLists.txt", "LICENSE", "README.md", "CHANGELOG.md",
                 "tests/conftest.py", "benchmarks/bench_nms.py", "docs/design.md", "MANIFEST.in"):
        assert must in got


@pytest.mark.slow
@needs_git
def test_sdist_metadata_and_the_wheel_built_from_it(sdist, tmp_path):
    """The sdist carries the release and builds against any torch from 2.11; a wheel built
    from it keeps the sdist's version (pip discards an sdist whose wheel metadata has another
    version), still requires the torch series it is built with, and RETINA_FAST_LOCAL_VERSION=1
    gives it the tag."""
    path, _ = sdist
    with tarfile.open(path) as t:
        top = t.getnames()[0].split("/")[0]
        pkg = email.message_from_string(t.extractfile(f"{top}/PKG-INFO").read().decode())
        t.extractall(str(tmp_path), filter="data") if sys.version_info >= (3, 12) else t.extractall(str(tmp_path))
    assert pkg["Version"] == _version.RELEASE and top == f"retina_fast-{_version.RELEASE}"
    assert _run_deps(pkg) == ["torch>=2.11", "torchvision>=0.26", "numpy"]
    src = str(tmp_path / top)
    meta, tagged = _wheel_metadata(src, str(tmp_path), {}, {"RETINA_FAST_LOCAL_VERSION": "1"})
    assert meta["Version"] == _version.RELEASE
    assert _run_deps(meta)[0] == f"torch=={SERIES}.*"
    assert tagged["Version"] == _version.build_version(torch.__version__, None)


# ---------------------------------------------------------------------- the CUDA arch default


def test_cuda_arch_default_without_a_gpu(tree):
    """No TORCH_CUDA_ARCH_LIST, no GPU visible: Turing to Hopper plus PTX (torch's own default
    would be every arch it knows, with a warning); with a GPU, torch's default (its archs)."""
    sys.path.insert(0, os.path.join(ROOT, "build_tools"))
    try:
        import cuda_env
    finally:
        sys.path.pop(0)
    if torch.version.cuda is None or cuda_env.find_cuda_home() is None:
        pytest.skip("needs a CUDA build of torch and a CUDA toolkit")
    env = _env(FORCE_CUDA="1")
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    p = subprocess.run([sys.executable, "setup.py", "--name"], cwd=tree, capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [l for l in p.stdout.splitlines() if l.startswith("retina_fast: building")][0]
    archs = line.split("archs ", 1)[1].rstrip(")").split()
    if torch.cuda.is_available():
        caps = {f"sm_{a}{b}" for a, b in (torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))}
        assert caps <= set(archs), line
    else:
        assert "TORCH_CUDA_ARCH_LIST=7.5;8.0;8.6;8.9;9.0+PTX" in line
        assert archs == ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "compute_90"], line


def test_arch_flags_parsed_as_nvcc_gets_them():
    sys.path.insert(0, os.path.join(ROOT, "build_tools"))
    try:
        import cuda_env
    finally:
        sys.path.pop(0)
    flags = ["-gencode=arch=compute_75,code=sm_75", "-gencode=arch=compute_90,code=compute_90",
             "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_80,code=[sm_80,compute_80]"]
    assert cuda_env.parse_arch_flags(flags) == (["sm_75", "sm_90", "sm_80"], ["compute_90", "compute_80"])


# -------------------------------------------------------------- dependencies and extras


def _pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _norm(name):
    return re.sub(r"[-_.]+", "-", re.split(r"[\s;<>=!~\[]", name, maxsplit=1)[0]).lower()


def _extras():
    """{extra: {distribution names}}, self-references (retina_fast[cli]) expanded."""
    raw = _pyproject()["project"]["optional-dependencies"]
    out = {}
    for extra, reqs in raw.items():
        names = set()
        for r in reqs:
            m = re.match(r"retina[-_]fast\[(.+)\]", r)
            names |= {_norm(x) for e in m.group(1).split(",") for x in raw[e.strip()]} if m else {_norm(r)}
        out[extra] = names
    return out


BASE = {"torch", "torchvision", "numpy"}


def _imports(folder):
    """Top-level names of the absolute imports in every .py file under ``folder``."""
    names = set()
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
        for fn in files:
            if fn.endswith(".py"):
                with open(os.path.join(dirpath, fn)) as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        names |= {a.name.split(".")[0] for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                        names.add(node.module.split(".")[0])
    return names


def _third_party(names):
    """Import names -> distribution names, for the names that are not ours or the stdlib."""
    ours = {"retina_fast", "tests", "benchmarks"} | {
        os.path.splitext(f)[0] for d in ("build_tools", "scripts") for f in os.listdir(os.path.join(ROOT, d))}
    dists = importlib.metadata.packages_distributions()
    out = {}
    for n in names - ours - set(sys.stdlib_module_names) - {"__future__"}:
        out[n] = {_norm(d) for d in dists.get(n, [n])}
    return out


def test_every_imported_package_is_declared():
    """The package imports only its dependencies and the [cli] extra's packages (and
    faster-coco-eval, optional); the tests and benchmarks only those and the [test] extra's."""
    extras = _extras()
    pkg_ok = BASE | extras["cli"] | extras["export"] | {"faster-coco-eval"}
    for name, dists in _third_party(_imports("retina_fast")).items():
        assert dists & pkg_ok, f"retina_fast imports {name} ({dists}): not a dependency or in [cli]"
    test_ok = BASE | extras["test"]
    for folder in ("tests", "benchmarks"):
        for name, dists in _third_party(_imports(folder)).items():
            assert dists & test_ok, f"{folder}/ imports {name} ({dists}): add it to the [test] extra"
    assert extras["cli"] <= extras["test"] and extras["export"] <= extras["test"]


def test_setup_sh_installs_every_extra():
    """scripts/setup.sh installs by name what the [cli] and [test] extras hold (its editable
    install runs with --no-deps), and its 'already installed?' check imports each of them."""
    with open(os.path.join(ROOT, "scripts", "setup.sh")) as f:
        text = f.read()
    install = re.search(r'pip install -q \$TORCH_SPEC(.*?)\n(?!\s)', text, re.S).group(1)
    installed = {_norm(w) for w in re.findall(r"[A-Za-z][\w.-]*", install)}
    check = re.search(r'-c "import ([^"]+)"', text).group(1)
    imported = {n.strip() for n in check.split(",")}
    dists = importlib.metadata.packages_distributions()
    for extra, names in _extras().items():
        for name in names:
            assert name in installed, f"scripts/setup.sh does not install {name} (extra [{extra}])"
            modules = {m for m, ds in dists.items() if name in {_norm(d) for d in ds}}
            if modules:  # installed here: its import name is known
                assert modules & imported, f"scripts/setup.sh's check imports nothing of {name}"
