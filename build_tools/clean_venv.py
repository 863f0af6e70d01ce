"""Make a clean virtual environment that sees this Python's torch and nothing else of it.

    python build_tools/clean_venv.py DIR [DIST ...]      (default DISTs: torch torchvision numpy)

Creates the venv DIR (no system site-packages) and links into its site-packages each
distribution in DISTs and everything they require (their Requires-Dist closure, extras
excluded), as installed here: package folders, modules and the .dist-info folders, so pip in
DIR sees them as installed and checks requirements against them. Nothing is downloaded or
copied (the links take no space and a second); pip, with --no-index, then resolves a wheel's
dependencies against exactly these (`python -m pip --python DIR/bin/python install
--no-index WHEEL`: the venv has no pip of its own). CI installs the wheel it built from the sdist there, so a
missing dependency, a file the wheel lacks or an import of an undeclared package fails.

Never let pip in DIR uninstall or upgrade a linked distribution: it would delete the files in
this environment. (With --no-index and no other wheels offered, it cannot.)
"""

import importlib.metadata
import os
import re
import subprocess
import sys
import sysconfig

try:
    from packaging.requirements import Requirement
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.requirements import Requirement


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names):
    """The distributions ``names`` need at run time, ``names`` included, as installed here."""
    seen, done, todo = {}, set(), [(n, "") for n in names]
    while todo:
        name, extra = todo.pop()
        if (_norm(name), extra) in done:
            continue
        done.add((_norm(name), extra))
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional dependency this environment does without (a marker's)
        seen[_norm(name)] = dist
        for req in dist.requires or []:
            r = Requirement(req)
            # what the distribution needs, and what the extra it was asked with adds
            # (torch requires cuda-toolkit[cudart,...])
            if r.marker is None or r.marker.evaluate({"extra": extra}):
                todo += [(r.name, "")] + [(r.name, e) for e in sorted(r.extras)]
    return list(seen.values())


def top_level_entries(dist):
    """The site-packages entries (folders, modules, .dist-info) that ``dist`` installed."""
    site = str(dist.locate_file(""))
    entries = set()
    for f in dist.files or []:
        first = f.parts[0]
        if first in ("..", "__pycache__") or first.endswith(".pth"):
            continue
        if os.path.exists(os.path.join(site, first)):
            entries.add(first)
    return site, sorted(entries)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        sys.exit(__doc__)
    target, names = argv[0], argv[1:] or ["torch", "torchvision", "numpy"]
    # without pip (ensurepip takes half a minute): `python -m pip --python DIR/bin/python ...`
    # installs into it with this environment's pip
    subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", target], check=True)
    out = subprocess.run([os.path.join(target, "bin", "python"), "-c",
                          "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True)
    dest = out.stdout.strip()
    here = sysconfig.get_paths()["purelib"]
    linked = []
    for dist in closure(names):
        site, entries = top_level_entries(dist)
        for e in entries:
            link = os.path.join(dest, e)
            if not os.path.lexists(link):
                os.symlink(os.path.join(site, e), link)
        linked.append(f"{dist.metadata['Name']} {dist.version}")
    print(f"{target}: linked {len(linked)} distributions from {here}: {', '.join(sorted(linked))}")


if __name__ == "__main__":
    main()
