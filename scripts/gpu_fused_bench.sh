#!/usr/bin/env bash
# Fused-graph inference on the GPU (issue 10, docs/benchmarks.md), run on the device machine from
# the repo root: the release binary in .device/bin (xz), diffusers' wheel in .whl, ONNX Runtime's
# CUDA build staged in /tmp/ort by shared/device/prepare-ort-cuda.sh. One call, same GPU, same
# random SD 1.5 weights for every row:
#   1. tiny pipeline: exported vs `lorafuse optimize`d graphs on CUDA (fp32, fp16), pixels compared;
#   2. random SD 1.5 (gpu_sd15.py build/loras/export, fp16 UNet), optimized copies
#      (attention only; attention + GroupNorm);
#   3. `lorafuse bench` 512², 25 DPM++ 2M steps, CFG 7.5 on each graph (± prefer_nhwc), with and
#      without a live-switchable LoRA; diffusers fp16/bf16 on the same weights.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
[ -x $B/lorafuse ] || xz -dk $B/lorafuse.xz
L=$B/lorafuse
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
steps=${STEPS:-25}; images=${IMAGES:-3}

MODE=${1:-all}   # all: everything below; graphs: only the tiny check and the SD 1.5 rows of IO binding / CUDA graphs; memory: peak GPU memory only
if [ "$MODE" = memory ]; then
  python3 models/scripts/gpu_sd15.py build /tmp/sd15 models/tiny/onnx/tokenizer >/dev/null 2>&1 && \
  python3 models/scripts/gpu_sd15.py loras /tmp/sd15 /tmp/loras >/dev/null 2>&1 && \
  python3 models/scripts/gpu_sd15.py export /tmp/sd15 /tmp/sd15-onnx >/dev/null 2>&1 || exit 1
  $L optimize /tmp/sd15-onnx /tmp/sd15-opt >/dev/null
  peak() { # label, then lorafuse bench arguments: the process's peak GPU memory (nvidia-smi, 100 ms)
    local label=$1; shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/mem_$label.txt" & local smi=$!
    $L bench -W 512 -H 512 --steps 25 --images 1 --device cuda --json "$@" > "$OUT/bench_$label.json" 2>/dev/null
    kill $smi; wait $smi 2>/dev/null
    python3 -c "import json,sys; v=[int(x) for x in open('$OUT/mem_$label.txt') if x.strip().isdigit()]; r=json.load(open('$OUT/bench_$label.json')); print(f'$label: peak {max(v)-min(v)} MiB over idle ({min(v)} MiB idle), {r[\"median_seconds_per_image\"]:.3f} s/image')"
  }
  peak exported -m /tmp/sd15-onnx
  peak fused_graphs -m /tmp/sd15-opt --cuda-graphs
  # one pipeline with a live-switchable LoRA (bench with LoRAs also opens a second pipeline)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/mem_lora.txt" & smi=$!
  $L generate -m /tmp/sd15-opt -p "a photo of an astronaut" -W 512 -H 512 --steps 25 --device cuda --cuda-graphs \
    --lora-mode switch --lora /tmp/loras/a.safetensors -o "$OUT/lora.png" >/dev/null 2>&1
  kill $smi; wait $smi 2>/dev/null
  python3 -c "v=[int(x) for x in open('$OUT/mem_lora.txt') if x.strip().isdigit()]; print(f'fused_graphs_switch_lora (generate): peak {max(v)-min(v)} MiB over idle')"
  peak fused_graphs_capped -m /tmp/sd15-opt --cuda-graphs --cuda-mem-limit 3GiB
  exit 0
fi
if [ "$MODE" = graphs ]; then
  # the UNet must be captured (ORT says so at verbose level) and replayed
  ORT_LOG=verbose $L generate -m models/tiny/onnx --optimize -p "a photo of a cat" --steps 4 --seed 3 \
    --device cuda --cuda-graphs -o "$OUT/tinygraph.png" > "$OUT/tiny_graph_verbose.log" 2>&1; echo "rc $?"
  grep -c "Replaying the captured" "$OUT/tiny_graph_verbose.log"; grep -i "graph capture" "$OUT/tiny_graph_verbose.log" | cut -c1-250 | sort | uniq -c | head
fi
echo "== tiny pipeline, CUDA: exported vs optimized"
# complete pipelines: models/tiny/onnx-fp16 stores no tokenizer/ (the same files as onnx/tokenizer)
T=/tmp/tiny; rm -rf $T; mkdir -p $T && cp -r models/tiny/onnx models/tiny/onnx-fp16 $T/ && cp -r models/tiny/onnx/tokenizer $T/onnx-fp16/
for v in onnx onnx-fp16; do
  $L optimize $T/$v /tmp/tiny-opt-$v | sed 's/^/  /'
  for m in $T/$v /tmp/tiny-opt-$v; do
    tag=$(basename $m)
    $L generate -m $m -p "a photo of a cat" -n blurry --steps 4 --seed 3 --device cuda -o "$OUT/tiny_${tag}.png" 2>&1 | grep -v -i cudnn | tail -1
    $L generate -m $m -p "a photo of a cat" -n blurry --steps 4 --seed 3 --device cuda -o "$OUT/tinylora_${tag}.png" \
      --lora models/tiny/loras/diffusers.safetensors 2>&1 | grep -v -i cudnn | tail -1
  done
  $L generate -m $T/$v --optimize -p "a photo of a cat" -n blurry --steps 4 --seed 3 --device cuda --lora-mode switch \
    --lora models/tiny/loras/diffusers.safetensors -o "$OUT/tinyswitch_opt-$v.png" 2>&1 | grep -v -i cudnn | tail -1
  $L generate -m $T/$v --optimize -p "a photo of a cat" -n blurry --steps 4 --seed 3 --device cuda --lora-mode switch --cuda-graphs \
    --lora models/tiny/loras/diffusers.safetensors -o "$OUT/tinygraph_opt-$v.png" 2>&1 | grep -v -i cudnn | tail -3
done
python3 - "$OUT" <<'PY'
import sys, numpy as np
from PIL import Image
o = sys.argv[1]
img = lambda n: np.asarray(Image.open(f"{o}/{n}.png"), dtype=np.int16)
for v in ["onnx", "onnx-fp16"]:
    for a, b in [(f"tiny_{v}", f"tiny_tiny-opt-{v}"), (f"tinylora_{v}", f"tinylora_tiny-opt-{v}"),
                 (f"tinylora_{v}", f"tinyswitch_opt-{v}"), (f"tinyswitch_opt-{v}", f"tinygraph_opt-{v}")]:
        d = np.abs(img(a) - img(b))
        print(f"{a} vs {b}: max |diff| {d.max()} of 255, mean {d.mean():.4f}")
PY

echo "== random SD 1.5"
t=$(date +%s)
python3 models/scripts/gpu_sd15.py build /tmp/sd15 models/tiny/onnx/tokenizer >/dev/null && \
python3 models/scripts/gpu_sd15.py loras /tmp/sd15 /tmp/loras >/dev/null && \
python3 models/scripts/gpu_sd15.py export /tmp/sd15 /tmp/sd15-onnx >/dev/null || exit 1
echo "build+loras+export: $(( $(date +%s) - t )) s"
t=$EPOCHREALTIME; $L optimize /tmp/sd15-onnx /tmp/sd15-opt; python3 -c "print(f'optimize (attention + GroupNorm): {$EPOCHREALTIME - $t:.2f} s')"
$L optimize --no-group-norm /tmp/sd15-onnx /tmp/sd15-mha >/dev/null

bench() { # label, then lorafuse bench arguments
  local label=$1; shift
  echo "-- $label"
  $L bench -W 512 -H 512 --steps $steps --images $images --device cuda --json "$@" 2>/dev/null > "$OUT/bench_$label.json"
  python3 - "$OUT/bench_$label.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    print("   no result:", e); sys.exit()
keep = {k: v for k, v in r.items() if not isinstance(v, (list, dict))}
print("  ", json.dumps(keep))
PY
}
if [ "$MODE" = graphs ]; then
  bench fused -m /tmp/sd15-opt
  bench fused_iobinding -m /tmp/sd15-opt --cuda-io-binding
  bench fused_graphs -m /tmp/sd15-opt --cuda-graphs
  bench fused_graphs_lora_switch -m /tmp/sd15-opt --cuda-graphs --lora /tmp/loras/a.safetensors --lora /tmp/loras/b.safetensors
  bench optimize_inmem_graphs -m /tmp/sd15-onnx --optimize --cuda-graphs
  t=$EPOCHREALTIME; $L generate -m /tmp/sd15-opt -p "a photo of an astronaut" -W 768 -H 512 --steps $steps --device cuda --seed 1 --cuda-graphs \
    --lora /tmp/loras/a.safetensors -o "$OUT/sd15_768_rebuild_graphs.png" 2>&1 | grep -v -i cudnn | tail -2
  python3 -c "print(f'one-shot generate 768x512 + LoRA (rebuild mode) with CUDA graphs, whole process: {$EPOCHREALTIME - $t:.2f} s')"
  for g in "" --cuda-graphs; do
    $L generate -m /tmp/sd15-opt -p "a photo of an astronaut" -W 512 -H 512 --steps $steps --device cuda --seed 1 $g -o "$OUT/sd15_fused$g.png" 2>&1 | grep -v -i cudnn | tail -2
    $L generate -m /tmp/sd15-opt -p "a photo of an astronaut" -W 512 -H 512 --steps $steps --device cuda --seed 1 $g --lora-mode switch \
      --lora /tmp/loras/a.safetensors -o "$OUT/sd15_fused_lora$g.png" 2>&1 | grep -v -i cudnn | tail -2
  done
  python3 - "$OUT" <<'PY'
import sys, numpy as np
from PIL import Image
o = sys.argv[1]
for a, b in [("sd15_fused", "sd15_fused--cuda-graphs"), ("sd15_fused_lora", "sd15_fused_lora--cuda-graphs")]:
    x, y = (np.asarray(Image.open(f"{o}/{n}.png"), dtype=np.int16) for n in [a, b])
    d = np.abs(x - y)
    print(f"{a} vs {b}: max |diff| {d.max()} of 255, mean {d.mean():.3f}")
PY
  python3 models/scripts/gpu_sd15.py bench /tmp/sd15 /tmp/loras/a.safetensors /tmp/loras/b.safetensors 2>&1 | grep -E "^diffusers|^\{" | tail -3
  exit 0
fi
bench exported -m /tmp/sd15-onnx
bench mha -m /tmp/sd15-mha
bench fused -m /tmp/sd15-opt
bench fused_nchw -m /tmp/sd15-opt --cuda-conv-layout nchw
bench exported_nhwc -m /tmp/sd15-onnx --cuda-conv-layout nhwc
bench fused_lora_switch -m /tmp/sd15-opt --lora /tmp/loras/a.safetensors --lora /tmp/loras/b.safetensors
bench exported_lora_switch -m /tmp/sd15-onnx --lora /tmp/loras/a.safetensors --lora /tmp/loras/b.safetensors
$L generate -m /tmp/sd15-opt -p "a photo of an astronaut" -W 512 -H 512 --steps $steps --device cuda --seed 1 -o "$OUT/sd15_fused.png" 2>&1 | grep -v -i cudnn | tail -1
$L generate -m /tmp/sd15-onnx -p "a photo of an astronaut" -W 512 -H 512 --steps $steps --device cuda --seed 1 -o "$OUT/sd15_exported.png" 2>&1 | grep -v -i cudnn | tail -1
python3 - "$OUT" <<'PY'
import sys, numpy as np
from PIL import Image
o = sys.argv[1]
a, b = (np.asarray(Image.open(f"{o}/sd15_{n}.png"), dtype=np.int16) for n in ["exported", "fused"])
d = np.abs(a - b)
print(f"SD 1.5 fp16 512², seed 1: exported vs fused max |diff| {d.max()} of 255, mean {d.mean():.3f}")
PY
[ -n "${SKIP_DIFFUSERS:-}" ] || python3 models/scripts/gpu_sd15.py bench /tmp/sd15 /tmp/loras/a.safetensors /tmp/loras/b.safetensors 2>&1 | grep -v Warn | tail -4
