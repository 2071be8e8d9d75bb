#!/usr/bin/env python3
"""Summarise ONNX Runtime profiles (`LORAFUSE_ORT_PROFILE=PREFIX`, src/runtime/session.rs): for each
session's JSON trace, the runs' wall time, the node time by provider and op type, and the slowest
nodes (CUDA nodes are timed as ORT sees them: launch plus any wait). Usage: ort_profile_summary.py FILE.json..."""

import json
import sys
from collections import defaultdict


def summary(path):
    events = json.load(open(path))
    all_runs = sorted((e["ts"], e["dur"]) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    # the first run tunes kernels (cuDNN's algorithm search): left out when there are others
    warm_from = all_runs[0][0] + all_runs[0][1] if len(all_runs) > 1 else 0
    runs = [d for ts, d in all_runs if ts >= warm_from]
    by_op = defaultdict(lambda: [0, 0])
    by_node = defaultdict(int)
    providers = defaultdict(int)
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e.get("ts", 0) < warm_from:
            continue
        a = e.get("args", {})
        key = (a.get("provider", "?"), a.get("op_name", "?"))
        by_op[key][0] += e["dur"]
        by_op[key][1] += 1
        by_node[(e["name"][: -len("_kernel_time")], a.get("op_name", "?"))] += e["dur"]
        providers[a.get("provider", "?")] += 1
    n = max(len(runs), 1)
    print(f"{path}: {len(runs)} warm runs of {len(all_runs)}, median run {sorted(runs)[len(runs) // 2] / 1e3 if runs else 0:.2f} ms; nodes by provider {dict(providers)}")
    for (prov, op), (dur, cnt) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:12]:
        print(f"   {prov:28s} {op:28s} {dur / n / 1e3:9.2f} ms/run  ({cnt // n} nodes)")
    print("   slowest nodes:")
    for (name, op), dur in sorted(by_node.items(), key=lambda kv: -kv[1])[:8]:
        print(f"     {dur / n / 1e3:8.2f} ms/run  {op:20s} {name[:110]}")


for p in sys.argv[1:]:
    summary(p)
