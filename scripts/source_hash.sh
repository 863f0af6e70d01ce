#!/usr/bin/env bash
# A short hash of everything the compiled library is built from (the same on any machine), so
# scripts/gpu_check.sh reuses a prebuilt library or an earlier build only for these sources.
cd "$(dirname "$0")/.."
cat setup.py CMakeLists.txt $(find csrc build_tools -type f -not -path '*/__pycache__/*' | LC_ALL=C sort) | sha256sum | cut -c1-16
