#!/usr/bin/env bash
# GPU benchmarks for `lorafuse generate` (docs/benchmarks.md), run on the device machine from the
# repo root, with the release binary and the tiny pipeline carried in .device/bin, the diffusers
# wheel in .whl, and ONNX Runtime's CUDA build staged in /tmp/ort by shared/device/prepare-ort-cuda.sh.
#   scripts/gpu_bench.sh ours       tiny pipeline CUDA vs CPU; random SD 1.5 build + LoRAs + fp16 ONNX
#                                   export; lorafuse bench on CUDA
#   scripts/gpu_bench.sh diffusers  diffusers on the same model (fp16 and bf16), same settings
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
case "${1:-ours}" in
ours)
  for d in cpu cuda; do
    $B/lorafuse generate -m $B/tiny/onnx -p "a photo of a cat" -n blurry --steps 4 --seed 3 --device $d -o "$OUT/tiny_$d.png"
    $B/lorafuse generate -m $B/tiny/onnx -p "a photo of a cat" -n blurry --steps 4 --seed 3 --device $d -o "$OUT/tinylora_$d.png" \
      --lora $B/tiny/loras/diffusers.safetensors
  done
  $B/lorafuse generate -m $B/tiny/onnx -p "a photo of a cat" -n blurry --steps 4 --seed 3 --device cuda --tf32 -o "$OUT/tinytf32_cuda.png"
  python3 - "$OUT" <<'PY'
import sys, numpy as np
from PIL import Image
o = sys.argv[1]
img = lambda n: np.asarray(Image.open(f"{o}/{n}.png"), dtype=np.int16)
for a, b in [("tiny_cpu", "tiny_cuda"), ("tinylora_cpu", "tinylora_cuda"), ("tiny_cpu", "tinytf32_cuda")]:
    d = np.abs(img(a) - img(b))
    print(f"{a} vs {b}: max |diff| {d.max()} of 255, mean {d.mean():.4f}")
PY
  t=$(date +%s)
  python3 models/scripts/gpu_sd15.py build /tmp/sd15 $B/tiny/tokenizer && \
  python3 models/scripts/gpu_sd15.py loras /tmp/sd15 /tmp/loras && \
  python3 models/scripts/gpu_sd15.py export /tmp/sd15 /tmp/sd15-onnx || exit 1
  echo "build+loras+export: $(( $(date +%s) - t )) s"; du -sh /tmp/sd15-onnx/*
  $B/lorafuse inspect /tmp/sd15-onnx/unet/model.onnx 2>/dev/null | head -5
  $B/lorafuse merge -m /tmp/sd15-onnx -l /tmp/loras/a.safetensors -o /tmp/merged --dry-run 2>&1 | grep -v cudnn | head -8
  sync; t=$EPOCHREALTIME; $B/lorafuse merge -m /tmp/sd15-onnx -l /tmp/loras/a.safetensors -o /tmp/merged >/dev/null 2>&1 && sync
  python3 -c "print(f'merge-and-export (1 LoRA, UNet+TE, fp16 SD 1.5): {$EPOCHREALTIME - $t:.2f} s')"
  t=$EPOCHREALTIME; cp -r /tmp/sd15-onnx /tmp/copied && sync; python3 -c "print(f'plain copy of the folder: {$EPOCHREALTIME - $t:.2f} s')"
  $B/lorafuse bench -m /tmp/sd15-onnx -W 512 -H 512 --steps 25 --images 3 --device cuda \
    --lora /tmp/loras/a.safetensors --lora /tmp/loras/b.safetensors --json 2>/dev/null | tee "$OUT/lorafuse_bench.json"
  $B/lorafuse generate -m /tmp/sd15-onnx -p "a photo of an astronaut" -W 512 -H 512 --steps 25 --device cuda -o "$OUT/sd15_cuda.png" 2>&1 | grep -v cudnn
  ;;
diffusers)
  python3 models/scripts/gpu_sd15.py bench /tmp/sd15 /tmp/loras/a.safetensors /tmp/loras/b.safetensors | tee "$OUT/diffusers_bench.txt"
  ;;
esac
