#!/usr/bin/env bash
# Stage optimum's ONNX Runtime Stable Diffusion pipeline (the peer of docs/benchmarks.md, issue 10)
# for the GPU machine, which has no registry access and carries at most 64 MiB a call:
#   scripts/prepare_optimum_peer.sh [DIR]      (default .optpeer, git-ignored)
# writes DIR/q1 and DIR/q2, each small enough to travel beside the tree. optimum-onnx 0.1.0 (the
# newest) wants transformers < 4.58 and optimum 2.1, so its process gets its own site
# (transformers 4.57.3, huggingface_hub 0.36.0, tokenizers 0.22.1, diffusers 0.35.2) instead of the
# machine's transformers 5; onnxruntime-gpu 1.31.1's Python package travels without its CUDA
# provider library, which scripts/gpu_fused_bench.sh links from the copy staged by
# shared/device/prepare-ort-cuda.sh (same release). On the device, one call per piece:
#   mkdir -p /tmp/optpeer && cp DIR/qK/* /tmp/optpeer/        carry ["DIR/qK"]
# then `scripts/gpu_fused_bench.sh optimum` installs them into /tmp/optsite.
set -euo pipefail
dest=${1:-.optpeer}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/optimum-peer
mkdir -p "$cache"
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$cache" "$@"; }
dl optimum-onnx==0.1.0 optimum==2.1.0 transformers==4.57.3 huggingface_hub==0.36.0 tokenizers==0.22.1 \
  diffusers==0.35.2 onnxruntime-gpu==1.31.1
if [ ! -f "$cache/ort-py312.tar.xz" ]; then
  rm -rf "$cache/pkg" && mkdir -p "$cache/pkg"
  unzip -q -o "$cache"/onnxruntime_gpu-1.31.1-cp312-*.whl 'onnxruntime/*' -d "$cache/pkg"
  # the provider comes from the staged ORT build; the C library and TensorRT are not used here
  rm -f "$cache"/pkg/onnxruntime/capi/libonnxruntime_providers_{cuda,tensorrt}.so "$cache"/pkg/onnxruntime/capi/libonnxruntime.so.*
  tar -C "$cache/pkg" -cJf "$cache/ort-py312.tar.xz.tmp" onnxruntime && mv "$cache/ort-py312.tar.xz.tmp" "$cache/ort-py312.tar.xz"
fi
rm -rf "$dest" && mkdir -p "$dest/q1" "$dest/q2"
cp "$cache"/{optimum_onnx-0.1.0,optimum-2.1.0,transformers-4.57.3,huggingface_hub-0.36.0}-*.whl "$dest/q1/"
cp "$cache"/ort-py312.tar.xz "$cache"/{diffusers-0.35.2,tokenizers-0.22.1}-*.whl "$dest/q2/"
git check-ignore -q "$dest" || echo "WARNING: $dest is not git-ignored" >&2
du -sh "$dest"/q*
