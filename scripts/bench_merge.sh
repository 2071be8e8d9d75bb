#!/usr/bin/env bash
# Side by side on the CPU: `lorafuse merge` (merge-and-export of the ONNX pipeline) vs diffusers
# load_lora_weights + fuse_lora on the same model and LoRA, and a plain copy of the pipeline folder.
#   scripts/bench_merge.sh [ONNX_DIR DIFFUSERS_DIR LORA]     (default: the tiny pipeline)
# Needs models/.venv-ref (models/scripts/setup_venvs.sh) for the diffusers side.
set -euo pipefail
cd "$(dirname "$0")/.."
onnx=${1:-models/tiny/onnx} diffusers=${2:-models/tiny/diffusers} lora=${3:-models/tiny/loras/diffusers_wide.safetensors}
cargo build -q --release --bin lorafuse
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
best() { sort -n | head -n 1; }
for i in 1 2 3 4 5; do
  s=$EPOCHREALTIME; target/release/lorafuse merge -m "$onnx" -l "$lora" -o "$tmp/m$i" >/dev/null; sync; e=$EPOCHREALTIME
  echo "$e - $s" | python3 -c "print(eval(input()))"
done | best > "$tmp/merge"
for i in 1 2 3 4 5; do
  s=$EPOCHREALTIME; cp -r "$onnx" "$tmp/c$i"; sync; e=$EPOCHREALTIME
  echo "$e - $s" | python3 -c "print(eval(input()))"
done | best > "$tmp/copy"
models/.venv-ref/bin/python - "$diffusers" "$lora" > "$tmp/diffusers" <<'PY'
import os, sys, time, torch
from diffusers import StableDiffusionPipeline
d, lora = sys.argv[1:]
torch.set_num_threads(os.cpu_count())
pipe = StableDiffusionPipeline.from_pretrained(d, safety_checker=None, requires_safety_checker=False)
times = []
for i in range(5):
    t = time.perf_counter()
    pipe.load_lora_weights(os.path.dirname(lora), weight_name=os.path.basename(lora), adapter_name=f"a{i}")
    pipe.fuse_lora(lora_scale=1.0)
    times.append(time.perf_counter() - t)
    pipe.unfuse_lora(); pipe.unload_lora_weights()
print(min(times))
PY
printf "%-44s %10s\n" "CPU, $(nproc) cores, best of 5" "seconds"
printf "%-44s %10.3f\n" "lorafuse merge (merge + export ONNX folder)" "$(cat "$tmp/merge")"
printf "%-44s %10.3f\n" "plain copy of the ONNX folder (cp -r)" "$(cat "$tmp/copy")"
printf "%-44s %10.3f\n" "diffusers load_lora_weights + fuse_lora" "$(cat "$tmp/diffusers")"
