#!/usr/bin/env bash
# The tutorial's whole run on the GPU (issue 11): 15,000 optimizer steps of the recipe (512 px, bf16,
# batch 1 x accumulation 4, rank 4, lr 1e-4 cosine, checkpoints every 500 steps) on the random
# SD 1.5-architecture folder and NDATA (default 833, the tutorial data set's size) generated images,
# in parts that fit one device call each: every call trains for at most SECONDS (default 500) and
# then interrupts the run (SIGINT: lorafuse saves a checkpoint after the step and exits), the next
# call resumes it with --resume_from_checkpoint latest. The run's folder travels between calls as
# $OUT/run.tar (carry it back as .long/run.tar: `mkdir -p .long && cp FILES_AT/run.tar .long/`),
# so a part may land on a fresh machine; the model and data are regenerated from their seeds.
# When the run is complete, the final LoRA is loaded into diffusers' StableDiffusionPipeline
# (load_lora_weights) and its keys are checked against the UNet's LoRA layers.
# Carry .train-gpu (see scripts/gpu_train_bench.sh), .whl (diffusers wheel) and, after the first
# part, .long. EXTRA adds flags. COMPARE=1 (first part only) first trains 80 steps of the recipe
# with CUDA graphs in each --memory_format on 64 images and runs the whole run in the faster one
# (recorded in the run's folder, so later parts keep it); without it the run uses the trainer's
# default, `auto`. A part ends by DEADLINE seconds (default 560) after the script starts, leaving
# MARGIN seconds (default 45) for the checkpoint, the tar and the diffusers check. The whole run as one part on a warm machine (model and data made, 111
# samples/s: ≈ 565 s of training): DEADLINE=598 MARGIN=25.
set -uo pipefail
start=$(date +%s)
NDATA=${NDATA:-833}
source scripts/gpu_train_prologue.sh
run=/tmp/long
if [ ! -d $run ] && [ -f .long/run.tar ]; then
  mkdir -p $run && tar -xf .long/run.tar -C $run && echo "resuming from the carried run: $(ls $run | tr '\n' ' ')"
fi
mkdir -p $run
if [ "${COMPARE:-0}" = 1 ] && [ ! -f $run/memory_format ]; then
  [ -d /tmp/data-64 ] || python3 models/scripts/make_sd15_random.py dataset /tmp/data-64 --n 64 || exit 1
  best=contiguous; bsps=0
  for f in contiguous channels_last; do
    $T/lorafuse train --pretrained_model_name_or_path /tmp/sd15 --train_data_dir /tmp/data-64 --resolution 512 --center_crop --random_flip \
      --train_batch_size 1 --gradient_accumulation_steps 4 --max_train_steps 80 --learning_rate 1e-04 --max_grad_norm 1 \
      --lr_scheduler cosine --lr_warmup_steps 0 --mixed_precision bf16 --seed 1337 --checkpointing_steps 1000 \
      --output_dir /tmp/cmp-$f --plain_log --device cuda --cuda_graphs on --profile_steps 20 --memory_format $f 2>&1 | grep -E "^phases|memory_format|^done|error" 
    sps=$(python3 -c "import csv,statistics,sys; r=list(csv.DictReader(open(sys.argv[1])))[25:]; print(statistics.median(float(x['samples_per_s']) for x in r)); print(max(int(x['device_mem'] or 0) for x in r) / 2**30, file=sys.stderr)" /tmp/cmp-$f/logs/train_log.csv 2>/tmp/cmp-$f.mem)
    echo "compare $f: median $sps samples/s over steps 26-80, peak $(cut -c1-4 /tmp/cmp-$f.mem) GiB"
    cp /tmp/cmp-$f/logs/train_log.csv $OUT/compare-$f.csv
    if python3 -c "import sys; sys.exit(0 if float(sys.argv[1]) > float(sys.argv[2]) else 1)" "$sps" "$bsps"; then best=$f; bsps=$sps; fi
  done
  echo $best > $run/memory_format
fi
# the run's --memory_format: COMPARE's pick, else the trainer's default (auto: channels-last on CUDA)
[ -f $run/memory_format ] || echo auto > $run/memory_format
fmt=$(cat $run/memory_format)
left=$(( ${DEADLINE:-560} - ($(date +%s) - start) - ${MARGIN:-45} ))
echo "this part: --memory_format $fmt, at most $left s of training"
s=$(date +%s.%N)
timeout -s INT --kill-after 60 $left $T/lorafuse train --memory_format $fmt \
  --pretrained_model_name_or_path /tmp/sd15 --train_data_dir $DATA --resolution 512 --center_crop --random_flip \
  --train_batch_size 1 --gradient_accumulation_steps 4 --max_train_steps 15000 --learning_rate 1e-04 \
  --max_grad_norm 1 --lr_scheduler cosine --lr_warmup_steps 0 --mixed_precision bf16 --seed 1337 \
  --checkpointing_steps 500 --checkpoints_total_limit 2 --resume_from_checkpoint latest \
  --output_dir $run --plain_log --device cuda ${EXTRA:-} 2>&1 | awk '!/^step / || $2 % 500 == 0 || $2 <= 3'
echo "part wall $(python3 -c "print(round($(date +%s.%N) - $s, 1))") s"
ls $run
# what the next part resumes from: the newest checkpoint's LoRA, AdamW state and data order (not
# its copy of the LoRA in diffusers' format, which resuming does not read), the config and logs
last=$(cd $run && ls -d checkpoint-* 2>/dev/null | sort -t- -k2 -n | tail -1)
[ -n "$last" ] && tar -cf $OUT/run.tar -C $run --exclude "$last/pytorch_lora_weights.safetensors" "$last" logs train_config.json memory_format && du -h $OUT/run.tar
cp $run/logs/train_log.csv $OUT/train_log.csv 2>/dev/null
python3 - $run/logs/train_log.csv <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
if rows:
    sps = [float(r["samples_per_s"]) for r in rows if r.get("samples_per_s")]
    print(f"log: steps {rows[0]['step']}..{rows[-1]['step']} ({len(rows)} rows), median {statistics.median(sps):.1f} samples/s, last loss {rows[-1]['loss']}")
EOF
if [ -f $run/pytorch_lora_weights.safetensors ]; then
  python3 - $run <<'EOF'
import logging, sys, io
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
out = sys.argv[1]
buf = io.StringIO()
h = logging.StreamHandler(buf)
for name in ("diffusers", "peft"):
    logging.getLogger(name).addHandler(h)
pipe = StableDiffusionPipeline.from_pretrained("/tmp/sd15", safety_checker=None, torch_dtype=torch.float32)
pipe.load_lora_weights(out)
keys = load_file(f"{out}/pytorch_lora_weights.safetensors")
layers = [n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A) > 0]
# peft's messages when keys do not fit (diffusers' _load_lora_into_..., "led to unexpected keys" /
# "missing keys"); the note that the file has no text encoder LoRA is not one of them
msgs = [l for l in buf.getvalue().splitlines() if "unexpected keys" in l.lower() or "missing keys" in l.lower()]
print(f"diffusers load_lora_weights: {len(keys)} tensors in the file, {len(layers)} UNet LoRA layers, warnings about keys: {msgs or 'none'}")
ok = len(keys) == 2 * len(layers) and not msgs
print("final LoRA loads in diffusers with no missing or unexpected keys" if ok else "KEY MISMATCH")
EOF
fi
