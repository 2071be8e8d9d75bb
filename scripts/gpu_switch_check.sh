#!/usr/bin/env bash
# The fast LoRA switch on ONNX Runtime's CUDA provider (issues 4 and 5), on the device machine:
# tiny pipeline fp32 and fp16, CPU vs CUDA, switch vs rebuild mode, two LoRAs at once, and the
# switch timings on CUDA. Carry .device/bin (release `lorafuse` + models/tiny/{onnx,onnx-fp16,loras})
# and stage ONNX Runtime's CUDA build in /tmp/ort with shared/device/prepare-ort-cuda.sh first.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# models/tiny/onnx-fp16 stores no tokenizer/ (the same files as onnx/tokenizer, models/README.md)
[ -d $B/tiny/onnx-fp16/tokenizer ] || cp -r $B/tiny/onnx/tokenizer $B/tiny/onnx-fp16/
L="--lora $B/tiny/loras/diffusers.safetensors --lora $B/tiny/loras/kohya_wide.safetensors:0.5"
for m in onnx onnx-fp16; do
  for d in cpu cuda; do
    for mode in switch rebuild; do
      $B/lorafuse generate -m $B/tiny/$m -p "a photo of a cat" -n blurry --steps 4 --seed 3 --device $d \
        --lora-mode $mode $L -o "$OUT/${m}_${d}_${mode}.png" 2>&1 | grep -iv cudnn | tail -1
    done
  done
  $B/lorafuse bench -m $B/tiny/$m --steps 4 --images 2 --device cuda \
    --lora $B/tiny/loras/diffusers.safetensors --lora $B/tiny/loras/kohya.safetensors 2>&1 | grep -iv cudnn | grep -v warm
done
python3 - "$OUT" <<'PY'
import sys, numpy as np
from PIL import Image
o = sys.argv[1]
img = lambda n: np.asarray(Image.open(f"{o}/{n}.png"), dtype=np.int16)
for m in ["onnx", "onnx-fp16"]:
    for a, b in [("cpu_switch", "cuda_switch"), ("cuda_rebuild", "cuda_switch"), ("cpu_rebuild", "cpu_switch")]:
        d = np.abs(img(f"{m}_{a}") - img(f"{m}_{b}"))
        print(f"{m}: {a} vs {b}: max |diff| {d.max()}/255, mean {d.mean():.4f}")
PY
