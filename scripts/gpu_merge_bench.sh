#!/usr/bin/env bash
# Merge-and-export on the GPU machine (docs/benchmarks.md, issue 3): random SD 1.5 built and exported
# in fp16 by models/scripts/gpu_sd15.py (UNet inline in one 1.7 GB model.onnx, fp32 text encoder),
# then `lorafuse merge` vs `cp -r` of the same folder, each followed by `sync`, best of 3, with peak
# RSS. Run from the repo root with the stripped release binary and the CLIP tokenizer carried in
# .device/bin and the diffusers wheel in .whl:
#   scripts/gpu_merge_bench.sh
set -euo pipefail
export PYTHONUNBUFFERED=1
B=.device/bin
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
nproc; df -h /tmp | tail -1
t=$(date +%s)
[ -d /tmp/sd15-onnx ] || {
  python3 models/scripts/gpu_sd15.py build /tmp/sd15 $B/tokenizer
  python3 models/scripts/gpu_sd15.py loras /tmp/sd15 /tmp/loras
  python3 models/scripts/gpu_sd15.py export /tmp/sd15 /tmp/sd15-onnx
}
echo "build+loras+export: $(( $(date +%s) - t )) s"; du -sh /tmp/sd15-onnx/*
timed() {  # label, then a command; prints "label: seconds, peak RSS" per run (sync included)
  local label=$1; shift
  python3 - "$label" "$@" <<'PY'
import os, resource, shutil, subprocess, sys, time
label, cmd = sys.argv[1], sys.argv[2:]
for i in range(3):
    shutil.rmtree("/tmp/o", ignore_errors=True); os.sync()
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    os.sync()
    s = time.perf_counter() - t
    assert status == 0, f"{label}: exit status {status}"
    print(f"{label}: {s:.2f} s, peak RSS {ru.ru_maxrss // 1024} MiB", flush=True)
PY
}
$B/lorafuse merge -m /tmp/sd15-onnx -l /tmp/loras/a.safetensors -o /tmp/o --dry-run | tail -2
timed "lorafuse merge (a)" $B/lorafuse merge -m /tmp/sd15-onnx -l /tmp/loras/a.safetensors -o /tmp/o
timed "lorafuse merge (a:0.7 + b:0.4)" $B/lorafuse merge -m /tmp/sd15-onnx -l /tmp/loras/a.safetensors:0.7 -l /tmp/loras/b.safetensors:0.4 -o /tmp/o
timed "cp -r" cp -r /tmp/sd15-onnx /tmp/o
