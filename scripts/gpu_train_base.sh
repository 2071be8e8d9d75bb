#!/usr/bin/env bash
# Trains the shipped base model on the GPU machine (models/scripts/train_base.py; models/README.md).
# Carry .whl/ (the diffusers 0.42.1 wheel; transformers, accelerate, safetensors are in the image).
# Writes $OUT/diffusers.tar (unet, vae, text_encoder of the pipeline), $OUT/train_base.json, $OUT/train_base_samples.png, $OUT/train_base.log.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/diffusers-*.whl && export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 models/scripts/train_base.py --out /tmp/base/diffusers "$@" 2>&1 | grep -v -i warn | tee "$OUT/train_base.log"
# few files come back from $OUT: the weights travel as one tar
cp /tmp/base/train_base* "$OUT"/ 2>/dev/null
tar -C /tmp/base -cf "$OUT/diffusers.tar" diffusers/unet diffusers/vae diffusers/text_encoder
