#!/usr/bin/env bash
# Side by side on the CPU, one script: `lorafuse merge` (merge-and-export of the ONNX pipeline) vs
# diffusers on the same model and LoRA (load_lora_weights + fuse_lora in memory, and end to end:
# from_pretrained + load + fuse + unload + save_pretrained, what a diffusers user runs to get a merged
# model on disk) and a plain copy of the pipeline folder. Seconds (best of RUNS) and peak RSS.
#   scripts/bench_merge.sh [ONNX_DIR DIFFUSERS_DIR LORA]     (default: the tiny pipeline)
#   RUNS=3 scripts/bench_merge.sh /tmp/sd15bench/onnx /tmp/sd15bench/sd15 /tmp/sd15bench/loras/a.safetensors
# Needs models/.venv-ref (models/scripts/setup_venvs.sh) for the diffusers side and GNU time.
set -euo pipefail
cd "$(dirname "$0")/.."
onnx=${1:-models/tiny/onnx} diffusers=${2:-models/tiny/diffusers} lora=${3:-models/tiny/loras/diffusers_wide.safetensors}
runs=${RUNS:-5}
cargo build -q --release --bin lorafuse
tmp=$(mktemp -d "${TMPDIR:-/tmp}/bench_merge.XXXX"); trap 'rm -rf "$tmp"' EXIT
# "seconds peak_kib" of a command (sync included in the time), best time of $runs; output removed after each run.
timed() {
  local out=$1; shift
  for i in $(seq "$runs"); do
    /usr/bin/time -f "%e %M" -o "$tmp/t" bash -c "$* && sync" > /dev/null
    rm -rf "$out"
    cat "$tmp/t"
  done | sort -n | head -n 1
}
merge=$(timed "$tmp/m" target/release/lorafuse merge -m "$onnx" -l "$lora" -o "$tmp/m")
copy=$(timed "$tmp/c" cp -r "$onnx" "$tmp/c")
models/.venv-ref/bin/python - "$diffusers" "$lora" "$runs" "$tmp/d" > "$tmp/diffusers" <<'PY'
import os, resource, shutil, sys, time, torch
from diffusers import StableDiffusionPipeline
d, lora, runs, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(os.cpu_count())
load = lambda: StableDiffusionPipeline.from_pretrained(d, safety_checker=None, requires_safety_checker=False)
kw = dict(weight_name=os.path.basename(lora))
pipe = load()
fuse = []
for i in range(runs):
    t = time.perf_counter()
    pipe.load_lora_weights(os.path.dirname(lora), adapter_name=f"a{i}", **kw)
    pipe.fuse_lora(lora_scale=1.0)
    fuse.append(time.perf_counter() - t)
    pipe.unfuse_lora(); pipe.unload_lora_weights()
peak_fuse = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
del pipe
e2e = []
for i in range(runs):
    t = time.perf_counter()
    p = load()
    p.load_lora_weights(os.path.dirname(lora), **kw)
    p.fuse_lora(lora_scale=1.0)
    p.unload_lora_weights()
    p.save_pretrained(out, safe_serialization=True)
    os.sync()
    e2e.append(time.perf_counter() - t)
    del p
    shutil.rmtree(out)
print(min(fuse), peak_fuse, min(e2e), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
PY
read -r fuse fuse_kib e2e e2e_kib < "$tmp/diffusers"
mib() { echo $(( $1 / 1024 )); }
printf "%-66s %9s %10s\n" "CPU ($(nproc) cores), best of $runs" "seconds" "peak RSS"
printf "%-66s %9.3f %6s MiB\n" "lorafuse merge (merge + export ONNX folder, sync)" "${merge% *}" "$(mib "${merge#* }")"
printf "%-66s %9.3f %6s MiB\n" "plain copy of the ONNX folder (cp -r, sync)" "${copy% *}" "$(mib "${copy#* }")"
printf "%-66s %9.3f %6s MiB\n" "diffusers load_lora_weights + fuse_lora (pipeline in memory)" "$fuse" "$(mib "$fuse_kib")"
printf "%-66s %9.3f %6s MiB\n" "diffusers from_pretrained + load + fuse + save_pretrained (sync)" "$e2e" "$(mib "$e2e_kib")"
