#!/usr/bin/env bash
# Run the benchmarks on this machine's CPU (or a given -k filter) and save the pytest-benchmark
# JSON plus a Markdown table under benchmarks/results/<date>-<tag>.{json,md}.
# Run it with nothing else on the machine: timings of PyTorch's busy-waiting threads degrade
# 10-20x under contention.   Usage: scripts/run_benchmarks.sh [TAG] [-k EXPR] [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-cpu}; shift || true
PY=${PYTHON:-.venv/bin/python}
OUTDIR=benchmarks/results
mkdir -p "$OUTDIR"
NAME="$OUTDIR/$(date -u +%F)-$TAG"
"$PY" -m pytest benchmarks -q -p no:cacheprovider --benchmark-only --benchmark-json="$NAME.json" \
  --benchmark-columns=median,iqr,rounds "${@:--kcpu}"
{
  echo "# Benchmarks $(date -u +%F), $TAG"
  echo
  echo "CPU: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores; torch $("$PY" -c 'import torch; print(torch.__version__)'); command: \`scripts/run_benchmarks.sh $TAG $*\`"
  echo
  "$PY" scripts/bench_table.py "$NAME.json"
} > "$NAME.md"
cat "$NAME.md"
