"""The CUDA sources of retina_fast, run on the CPU: build the emulator library and run the CUDA
tests on it.

    python build_tools/simt.py build [--sanitize address|none] [--override FILE=MUTANT ...]
        Compiles every csrc/**/*.cu file with the host C++ compiler against csrc/simt (the CUDA
        execution model emulated: threads as fibers, blocks, shared memory, barriers, warp
        collectives, atomics, CUB) into one shared library, and prints its path on the last line.
        torch.ops.load_library(path) then gives torch.ops.retina_fast_simt.<op> (every op with a
        CUDA kernel, the same schema, on CPU tensors) and the device "simt" (tests/simt_support.py).
        --sanitize address (the default) builds with AddressSanitizer and UBSan; load it in a
        process started with LD_PRELOAD=<libasan> (`python build_tools/simt.py env` prints it).
        --override csrc/PATH=FILE builds with FILE in place of csrc/PATH (a mutant, for the
        mutation tests): the other sources are the same objects, so only FILE recompiles.

    python build_tools/simt.py test [pytest args]
        Builds with ASan + UBSan and runs the CUDA tests (`pytest tests -m cuda` and the
        emulator's own tests in tests/simt, unless pytest args are given) with RETINA_FAST_TEST_CUDA=simt
        and the race check on: every op runs in forward, reversed and shuffled thread order
        within each barrier interval, and the outputs must be equal bit for bit. Exits non-zero
        when a test fails, ASan or UBSan reports, or the race check finds a race.

Builds are incremental (ninja, dependency files) in build/simt-<variant>/, and go through
ccache when it is installed (CCACHE_BASEDIR is this checkout, so a fresh clone hits the cache).
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SIMT = os.path.join(CSRC, "simt")

# The emulator's own sources, and the project's sources that the .cu files need.
RUNTIME_SOURCES = ["csrc/simt/simt_runtime.cpp", "csrc/simt/simt_device.cpp"]


def cu_sources():
    out = []
    for d, _, files in os.walk(CSRC):
        for f in files:
            if f.endswith(".cu"):
                out.append(os.path.relpath(os.path.join(d, f), ROOT))
    return sorted(out)


def sanitizer_flags(sanitize):
    if sanitize == "address":
        return ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fsanitize-address-use-after-scope"]
    if sanitize in (None, "none"):
        return []
    raise SystemExit(f"simt.py: --sanitize address or none, got {sanitize!r}")


def runtime_library(sanitize):
    """The sanitizer runtime a process must preload to load a library built with `sanitize`."""
    if sanitize != "address":
        return None
    cxx = os.environ.get("CXX", "c++").split()[-1]
    path = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True, check=True).stdout.strip()
    return os.path.realpath(path)


def _torch_flags():
    import torch
    import torch.utils.cpp_extension as ext

    inc = ext.include_paths()
    cflags = [f"-isystem{p}" for p in inc] + [
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-isystem{sysconfig.get_paths()['include']}",
    ]
    libdirs = ext.library_paths()
    ldflags = [f"-L{d}" for d in libdirs] + [f"-Wl,-rpath,{d}" for d in libdirs] + ["-lc10", "-ltorch", "-ltorch_cpu"]
    return torch.__version__, cflags, ldflags


def _ninja():
    exe = shutil.which("ninja") or os.path.join(os.path.dirname(sys.executable), "ninja")
    if not os.path.exists(exe):
        raise SystemExit("simt.py: ninja is needed (pip install ninja)")
    return exe


def build(sanitize="address", overrides=(), quiet=False, only=None):
    """Builds (incrementally) and returns the library's path.

    overrides: (csrc/PATH, FILE) pairs, FILE compiled in place of csrc/PATH (a mutant). only:
    the .cu files (csrc/...) to compile, by default all; a mutant build takes the others out
    rather than compile them again, and links the emulator's objects of the plain build."""
    torch_version, tflags, tld = _torch_flags()
    base = os.path.join(ROOT, "build", f"simt-{sanitize or 'none'}")
    over = dict(overrides)
    bdir = base
    if over or only:
        tag = hashlib.sha1(repr((sorted(over.items()), sorted(only or []))).encode()).hexdigest()[:10]
        bdir = f"{base}-mutant-{tag}"
    gen = os.path.join(bdir, "gen")
    odir = os.path.join(bdir, "override")
    os.makedirs(gen, exist_ok=True)
    os.makedirs(odir, exist_ok=True)
    # An override is found first: it sits at the same relative path in a directory searched
    # before csrc/ (-I order), so every #include of it, and the wrapper of a .cu, takes it.
    for rel, src in over.items():
        rel = os.path.relpath(os.path.join(ROOT, rel), CSRC)
        if rel.startswith(".."):
            raise SystemExit(f"simt.py: --override takes a file under csrc/, got {rel}")
        dst = os.path.join(odir, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(src) as f:
            text = f.read()
        if not os.path.exists(dst) or open(dst).read() != text:
            with open(dst, "w") as f:
                f.write(text)
    rules = []
    wanted = cu_sources() if not only else sorted(os.path.relpath(os.path.join(ROOT, o), ROOT) for o in only)
    for cu in wanted:
        rel = os.path.relpath(os.path.join(ROOT, cu), CSRC)
        wrapper = os.path.join(gen, rel.replace("/", "__") + ".cpp")
        # Paths relative to the include directories, so the preprocessed text is the same in any
        # checkout and ccache (CCACHE_BASEDIR) serves a fresh clone.
        text = f'// generated by build_tools/simt.py\n#include "simt/prelude.h"\n#include "{rel}"\n'
        if not os.path.exists(wrapper) or open(wrapper).read() != text:
            with open(wrapper, "w") as f:
                f.write(text)
        rules.append((wrapper, os.path.join(bdir, os.path.basename(wrapper) + ".o")))
    runtime_objs = [os.path.join(base, os.path.basename(src) + ".o") for src in RUNTIME_SOURCES]
    if bdir == base:
        rules += [(os.path.join(ROOT, src), obj) for src, obj in zip(RUNTIME_SOURCES, runtime_objs)]
    else:  # a mutant links the plain build's objects (the same flags, never mutated): built first
        build(sanitize, quiet=quiet)
    cxx = os.environ.get("CXX", "c++")
    if shutil.which("ccache") and "ccache" not in cxx:
        cxx = "ccache " + cxx
    san = sanitizer_flags(sanitize)
    cflags = ["-std=c++20", "-fPIC", "-O1", "-g", "-fno-omit-frame-pointer", "-ffp-contract=off",
              "-fvisibility=hidden", "-Wno-unknown-pragmas", "-DRETINA_FAST_SIMT",
              f"-I{odir}", f"-I{CSRC}", f"-I{os.path.join(SIMT, 'shadow')}"] + tflags + san
    lib = os.path.join(bdir, "libretina_fast_simt.so")
    lines = [
        f"cxx = {cxx}",
        f"cflags = {' '.join(cflags)}",
        f"ldflags = -shared {' '.join(san)} {' '.join(tld)}",
        "rule cc",
        "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = CXX $in",
        "rule link",
        "  command = $cxx $in -o $out $ldflags",
        "  description = LINK $out",
    ]
    objs = []
    for src, obj in rules:
        lines.append(f"build {obj}: cc {src}")
        objs.append(obj)
    if bdir != base:
        objs += runtime_objs
    lines.append(f"build {lib}: link {' '.join(objs)}")
    lines.append(f"default {lib}")
    ninja_file = os.path.join(bdir, "build.ninja")
    text = "\n".join(lines) + "\n"
    if not os.path.exists(ninja_file) or open(ninja_file).read() != text:
        with open(ninja_file, "w") as f:
            f.write(text)
    env = dict(os.environ)
    env.setdefault("CCACHE_BASEDIR", ROOT)
    env.setdefault("CCACHE_NOHASHDIR", "1")
    if bdir != base:
        # ccache's direct mode would not see an override shadowing a header it hashed before
        # (the base build's manifest matches): hash the preprocessed text.
        env["CCACHE_NODIRECT"] = "1"
    jobs = os.environ.get("MAX_JOBS", str(max(1, os.cpu_count() or 1)))
    r = subprocess.run([_ninja(), "-C", bdir, "-j", jobs], env=env,
                       stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT if quiet else None,
                       text=True)
    if r.returncode != 0:
        if quiet and r.stdout:
            sys.stderr.write(r.stdout[-20000:])
        raise SystemExit(f"simt.py: the build failed (torch {torch_version}, {bdir})")
    return lib


def test_env(lib, sanitize="address", race_check=True):
    """The environment a process needs to load `lib` and run the CUDA tests on it."""
    env = dict(os.environ)
    env["RETINA_FAST_TEST_CUDA"] = "simt"
    env["RETINA_FAST_SIMT_LIB"] = lib
    if race_check:
        env["RF_SIMT_RACECHECK"] = "1"
    pre = runtime_library(sanitize)
    if pre:
        # libstdc++ too: ASan resolves the real __cxa_throw when it starts, and Python does not
        # link libstdc++ (else the first C++ exception of a later-loaded library is a CHECK failure).
        cxx = os.environ.get("CXX", "c++").split()[-1]
        stdcxx = subprocess.run([cxx, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True,
                                check=True).stdout.strip()
        env["LD_PRELOAD"] = " ".join(x for x in (pre, os.path.realpath(stdcxx), env.get("LD_PRELOAD", "")) if x)
        # Python and torch keep memory to the end on purpose: no leak report. Stop at the first
        # error, with its stack.
        env.setdefault("ASAN_OPTIONS", "detect_leaks=0:halt_on_error=1:abort_on_error=1:"
                       "check_initialization_order=1:strict_string_checks=1")
        env.setdefault("UBSAN_OPTIONS", "halt_on_error=1:abort_on_error=1:print_stacktrace=1")
    return env


def main(argv=None):
    p = argparse.ArgumentParser(prog="simt.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the emulator library; prints its path last")
    b.add_argument("--sanitize", default="address", choices=["address", "none"])
    b.add_argument("--override", action="append", default=[], metavar="csrc/PATH=FILE")
    b.add_argument("--only", action="append", default=None, metavar="csrc/PATH.cu",
                   help="compile only these .cu files (a mutant build)")
    t = sub.add_parser("test", help="build with ASan+UBSan, run the CUDA tests on it with the race check")
    t.add_argument("--sanitize", default="address", choices=["address", "none"])
    t.add_argument("--no-race-check", action="store_true")
    t.add_argument("pytest_args", nargs=argparse.REMAINDER)
    e = sub.add_parser("env", help="print the environment (LD_PRELOAD etc.) that loads a build")
    e.add_argument("--sanitize", default="address", choices=["address", "none"])
    args = p.parse_args(argv)
    if args.cmd == "build":
        overrides = []
        for o in args.override:
            k, _, v = o.partition("=")
            overrides.append((k, os.path.abspath(v)))
        print(build(args.sanitize, overrides, only=args.only))
        return 0
    if args.cmd == "env":
        lib = build(args.sanitize, quiet=True)
        env = test_env(lib, args.sanitize)
        for k in ("RETINA_FAST_TEST_CUDA", "RETINA_FAST_SIMT_LIB", "RF_SIMT_RACECHECK", "LD_PRELOAD", "ASAN_OPTIONS",
                  "UBSAN_OPTIONS"):
            if k in env:
                print(f"export {k}='{env[k]}'")
        return 0
    lib = build(args.sanitize)
    env = test_env(lib, args.sanitize, race_check=not args.no_race_check)
    pytest_args = [a for a in args.pytest_args if a != "--"]
    if not pytest_args:
        pytest_args = ["tests", "-m", "cuda or simt", "-q", "-p", "no:cacheprovider"]
    cmd = [sys.executable, "-m", "pytest"] + pytest_args
    print("simt.py: " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, env=env, cwd=ROOT)
    if r.returncode == 5:
        print("simt.py: no test ran")
        return 1
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
