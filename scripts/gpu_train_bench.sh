#!/usr/bin/env bash
# lorafuse train on the H200: random SD 1.5-architecture model + shapes data set, the tutorial's
# settings (512 px, bf16, batch 1 x accumulation 4) and batch 8; samples/s and device memory
# (docs/benchmarks.md). Carry .train-gpu/ (git-ignored): lorafuse.xz (release build with
# `--features train`, stripped, xz) and tokenizer/ (models/tiny/diffusers/tokenizer); .whl/ holds
# the diffusers wheel. RUNS="name:flags;name:flags" picks other configurations. Writes $OUT/<name>.csv.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
site=/opt/torch/.venv/lib/python3.12/site-packages
export LD_LIBRARY_PATH=$site/nvidia/cu13/lib:$site/nvidia/cudnn/lib:$site/torch/lib:${LD_LIBRARY_PATH:-}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
T=.train-gpu
[ -f $T/lorafuse ] || xz -dk $T/lorafuse.xz
chmod +x $T/lorafuse
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
t=$(date +%s)
[ -d /tmp/sd15 ] || python3 models/scripts/make_sd15_random.py model /tmp/sd15 --tokenizer $T/tokenizer || exit 1
[ -d /tmp/data ] || python3 models/scripts/make_sd15_random.py dataset /tmp/data --n ${NDATA:-64} || exit 1
echo "model+data: $(( $(date +%s) - t )) s"
common="--pretrained_model_name_or_path /tmp/sd15 --train_data_dir /tmp/data --resolution 512 --center_crop --random_flip --learning_rate 1e-04 --max_grad_norm 1 --lr_scheduler cosine --lr_warmup_steps 0 --checkpointing_steps 500 --seed 1337 --plain_log --device cuda"
run() { name=$1; shift; echo "== $name: $*"; s=$(date +%s.%N); $T/lorafuse train $common --output_dir /tmp/$name "$@" 2>&1 | awk '!/^step / || $2 % 20 == 0 || $2 <= 3'; echo "wall $(python3 -c "print(round($(date +%s.%N) - $s, 1))") s"; cp /tmp/$name/logs/train_log.csv $OUT/$name.csv 2>/dev/null; }
IFS=';' read -ra specs <<< "${RUNS:-tut:--train_batch_size 1 --gradient_accumulation_steps 4 --max_train_steps 100 --mixed_precision bf16;b8:--train_batch_size 8 --max_train_steps 60 --mixed_precision bf16}"
for spec in "${specs[@]}"; do
  run ${spec%%:*} ${spec#*:}
done
