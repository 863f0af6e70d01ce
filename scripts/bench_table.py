"""Summarise a pytest-benchmark JSON file as a Markdown table: per group, each implementation's
median and its speed-up over torchvision's (pycocotools' for COCOeval) in the same group (same
inputs, same run).

    python scripts/bench_table.py bench.json
"""

import json
import re
import sys


def impl_name(bench):
    params = bench.get("params") or {}
    if "impl" in params:
        return str(params["impl"])
    m = re.search(r"\[(.*)\]", bench["name"])
    return m.group(1) if m else bench["name"]


def main(path):
    data = json.load(open(path))
    groups = {}
    for b in data["benchmarks"]:
        groups.setdefault(b.get("group") or "", []).append(b)
    machine = data.get("machine_info", {})
    print(f"machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {data.get('datetime', '')}")
    print()
    print("| group | implementation | median (ms) | speed-up vs torchvision (COCOeval: pycocotools) | peak extra memory |")
    print("|---|---|---:|---:|---|")
    for g, benches in sorted(groups.items()):
        # the baseline: torchvision's implementation (pycocotools for COCOeval)
        tv = [b for b in benches if "torchvision" in impl_name(b)] or \
            [b for b in benches if impl_name(b) == "pycocotools"]
        tv_med = tv[0]["stats"]["median"] if tv and tv[0].get("stats") else None
        # untimed entries (benchmarks.record_untimed: stats null) last, their figures in extra_info
        for b in sorted(benches, key=lambda b: b["stats"]["median"] if b.get("stats") else float("inf")):
            extra = b.get("extra_info", {})
            peak = {k: v for k, v in extra.items() if k.startswith("peak_extra_MB_")}
            if peak:  # one benchmark that measured every implementation's memory
                for k, v in peak.items():
                    print(f"| {g} | {k[len('peak_extra_MB_'):]} | | | {v:.1f} MB ({extra.get('method', '')}) |")
                continue
            if not b.get("stats"):
                print(f"| {g} | {impl_name(b)} | (untimed: see the JSON's extra_info) | | |")
                continue
            mem = f"{extra['peak_mem_bytes'] / 2**20:.1f} MB" if extra.get("peak_mem_bytes") is not None else ""
            med = b["stats"]["median"]
            ratio = f"{tv_med / med:.2f}x" if tv_med else "-"
            print(f"| {g} | {impl_name(b)} | {med * 1e3:.2f} | {ratio} | {mem} |")


if __name__ == "__main__":
    main(sys.argv[1])
