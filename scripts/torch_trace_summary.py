#!/usr/bin/env python3
"""Where the profiled training steps' time goes, from the Chrome trace `lorafuse train
--profile_steps N --torch_profile FILE` writes (PyTorch's profiler through libtorch; the same
format `torch.profiler`'s `export_chrome_trace` writes, so a trace of diffusers' script sums the
same way): GPU kernel time by kind (convolutions, GEMMs, attention, normalisation, elementwise,
layout copies, optimizer, other) per step, then the busiest kernels. Without kernels (a CPU run)
the top-level ATen operators' host time instead.

    python3 scripts/torch_trace_summary.py FILE [--steps N] [--top 25]
"""

import argparse
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
    else:
        ops = [e for e in events if e.get("cat") == "cpu_op" and "dur" in e and e.get("name", "").startswith("aten::")]
        by_name = collections.Counter()
        for e in ops:
            by_name[e["name"]] += e["dur"]
        print(f"no GPU kernels in the trace: {len(ops)} ATen operator events over {n} step(s), host time (inclusive):")
        for name, us in by_name.most_common(a.top):
            print(f"  {us / 1e3 / n:9.3f} ms/step  {name}")


if __name__ == "__main__":
    main()
