# Sourced by the GPU training scripts (gpu_train_bench.sh, gpu_train_long.sh) on the device
# machine: CUDA's libraries on the path, the carried wheels (.whl) installed into /tmp/site, the
# carried release binary (.train-gpu/lorafuse.xz, or TRAIN_BIN_DIR/lorafuse.xz: e.g. a previous
# build carried alongside for a same-call comparison) unpacked as $T/lorafuse, the random SD
# 1.5-architecture model in /tmp/sd15 and NDATA generated 512 px images in $DATA (/tmp/data-NDATA),
# each made once per machine (models/scripts/make_sd15_random.py).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
site=/opt/torch/.venv/lib/python3.12/site-packages
export LD_LIBRARY_PATH=$site/nvidia/cu13/lib:$site/nvidia/cudnn/lib:$site/torch/lib:${LD_LIBRARY_PATH:-}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
T=${TRAIN_BIN_DIR:-.train-gpu}
[ -f $T/lorafuse ] || xz -dk $T/lorafuse.xz
chmod +x $T/lorafuse
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
t=$(date +%s)
[ -d /tmp/sd15 ] || python3 models/scripts/make_sd15_random.py model /tmp/sd15 --tokenizer $T/tokenizer || exit 1
DATA=/tmp/data-$NDATA
[ -d $DATA ] || python3 models/scripts/make_sd15_random.py dataset $DATA --n $NDATA || exit 1
echo "model+data: $(( $(date +%s) - t )) s"
