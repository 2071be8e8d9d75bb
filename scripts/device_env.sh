# Sourced by the scripts/gpu_*.sh device-machine scripts: OUT, B (carried .device/bin), and ONNX
# Runtime's CUDA build unpacked from the pieces staged in /tmp/ort by
# shared/device/prepare-ort-cuda.sh, with the CUDA/cuDNN libraries of the machine's torch install.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
B=.device/bin
site=/opt/torch/.venv/lib/python3.12/site-packages
( cd /tmp/ort && { [ -f libonnxruntime_providers_cuda.so ] || { cat part.* | xz -d > libonnxruntime_providers_cuda.so && tar -xJf base.tar.xz; }; } )
export ORT_DYLIB_PATH=/tmp/ort/libonnxruntime.so.1.31.1
export LD_LIBRARY_PATH=$site/nvidia/cu13/lib:$site/nvidia/cudnn/lib:$site/torch/lib:${LD_LIBRARY_PATH:-}
