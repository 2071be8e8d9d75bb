#!/usr/bin/env python3
"""Where the profiled training steps' time goes, from the Chrome trace `lorafuse train
--profile_steps N --torch_profile FILE` writes (PyTorch's profiler through libtorch; the same
format `torch.profiler`'s `export_chrome_trace` writes, so a trace of diffusers' script sums the
same way): GPU kernel time by kind (convolutions, GEMMs, attention, normalisation, elementwise,
layout copies, optimizer, other) per step, then the busiest kernels. Without kernels (a CPU run)
the top-level ATen operators' host time instead.

    python3 scripts/torch_trace_summary.py FILE [--steps N] [--top 25] [--ops 40]

--ops N: the kernel time by the operator that launched it (the ATen operator whose "External id"
the kernel carries, with its input shapes where the trace recorded them) and the autograd node
around it in the backward pass (`autograd::engine::evaluate_function: ...`): which layers' adds,
copies or GEMMs the kinds above are.
"""

import argparse
import bisect
import collections
import json
import re

KINDS = [
    # first match wins; kernel names as cuDNN, cuBLAS(Lt), CUTLASS and ATen name them
    ("layout copies", r"nchwToNhwc|nhwcToNchw|direct_copy|copy_kernel|transpose|permute|CatArrayBatched|contiguous"),
    ("attention", r"flash|fmha|attention|sdpa|cudnn_generated_fort_native_sdpa"),
    ("convolutions", r"conv|implicit_gemm|wgrad|dgrad|fprop"),
    ("GEMMs", r"gemm|cutlass|cublas|nvjet|xmma|ampere_|matmul"),
    ("GroupNorm", r"group_?norm|GroupNorm|compute_mean_rstd|ComputeFusedParams|RowwiseMoments"),
    ("LayerNorm", r"layer_?norm|LayerNorm"),
    ("optimizer", r"adam|Adam|foreach|multi_tensor|norm_kernel|clip"),
    ("reductions", r"reduce_kernel|Reduce"),
    ("elementwise", r"elementwise|vectorized|unrolled|silu|gelu|Silu|Gelu|add|mul|fill"),
]


def kind_of(name):
    for kind, pat in KINDS:
        if re.search(pat, name):
            return kind
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=1, help="profiled steps in the trace (per-step figures)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--ops", type=int, default=0, help="also the top N (operator, shapes, autograd node) rows")
    a = ap.parse_args()
    events = json.load(open(a.trace))["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    n = max(a.steps, 1)
    if kernels:
        by_kind = collections.Counter()
        by_name = collections.Counter()
        count = collections.Counter()
        for e in kernels:
            by_kind[kind_of(e["name"])] += e["dur"]
            by_name[e["name"]] += e["dur"]
            count[e["name"]] += 1
        total = sum(by_kind.values())
        memcpy = sum(e["dur"] for e in events if e.get("cat") in ("gpu_memcpy", "gpu_memset") and "dur" in e)
        print(f"{len(kernels)} kernels over {n} step(s): {total / 1e3 / n:.2f} ms of kernel time per step"
              f" (+ {memcpy / 1e3 / n:.2f} ms memcpy/memset)")
        for kind, us in by_kind.most_common():
            print(f"  {kind:14s} {us / 1e3 / n:8.2f} ms/step  {100 * us / total:5.1f}%")
        print(f"top {a.top} kernels (ms/step, launches/step):")
        for name, us in by_name.most_common(a.top):
            print(f"  {us / 1e3 / n:7.3f}  {count[name] / n:6.1f}  [{kind_of(name)}] {name[:150]}")
        if a.ops:
            by_op(events, kernels, n, a.ops)
    else:
        ops = [e for e in events if e.get("cat") == "cpu_op" and "dur" in e and e.get("name", "").startswith("aten::")]
        by_name = collections.Counter()
        for e in ops:
            by_name[e["name"]] += e["dur"]
        print(f"no GPU kernels in the trace: {len(ops)} ATen operator events over {n} step(s), host time (inclusive):")
        for name, us in by_name.most_common(a.top):
            print(f"  {us / 1e3 / n:9.3f} ms/step  {name}")


def by_op(events, kernels, n, top):
    """Kernel time per (launching operator, its input shapes, enclosing autograd node)."""
    ops = {}
    nodes = collections.defaultdict(list)  # tid -> [(start, end, name)] of autograd nodes
    for e in events:
        if e.get("cat") != "cpu_op" or "dur" not in e:
            continue
        name = e.get("name", "")
        if name.startswith("autograd::engine::evaluate_function: "):
            nodes[e.get("tid")].append((e["ts"], e["ts"] + e["dur"], name.split(": ", 1)[1]))
        ext = e.get("args", {}).get("External id")
        if ext is not None:
            ops[ext] = e
    for v in nodes.values():
        v.sort()
    starts = {tid: [s for s, _, _ in v] for tid, v in nodes.items()}

    def node_of(op):
        v, s = nodes.get(op.get("tid"), []), starts.get(op.get("tid"), [])
        i = bisect.bisect_right(s, op["ts"]) - 1
        for j in range(i, max(i - 4, -1), -1):  # nodes rarely nest: the last few that started
            if v[j][1] >= op["ts"] + op["dur"]:
                return v[j][2]
        return "forward"

    rows = collections.Counter()
    count = collections.Counter()
    for k in kernels:
        op = ops.get(k.get("args", {}).get("External id"))
        if op is None:
            key = ("?", "", "", kind_of(k["name"]))
        else:
            dims = op.get("args", {}).get("Input Dims", "")
            key = (op["name"], json.dumps(dims, separators=(",", ":"))[:90], node_of(op), kind_of(k["name"]))
        rows[key] += k["dur"]
        count[key] += 1
    print(f"top {top} (operator, input shapes, autograd node, kind) rows (ms/step, kernels/step):")
    for (name, dims, node, kind), us in rows.most_common(top):
        print(f"  {us / 1e3 / n:7.3f}  {count[(name, dims, node, kind)] / n:6.1f}  [{kind}] {name} {dims} <{node}>")


if __name__ == "__main__":
    main()
