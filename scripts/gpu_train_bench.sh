#!/usr/bin/env bash
# lorafuse train on the H200: random SD 1.5-architecture model + shapes data set, the tutorial's
# settings (512 px, bf16, batch 1 x accumulation 4) and batch 8, each eager (--cuda_graphs off) and
# captured (--cuda_graphs on); samples/s, device memory and the phase breakdown of --profile_steps
# (docs/benchmarks.md). Carry .train-gpu/ (git-ignored): lorafuse.xz (release build with
# `--features train`, stripped, xz) and tokenizer/ (models/tiny/diffusers/tokenizer); .whl/ holds
# the diffusers wheel. RUNS="name:flags;name:flags" picks other configurations (RUNS= skips them;
# a word env:VAR=VALUE among the flags sets VAR for that run only);
# TORCH_PROFILE=1 adds a PyTorch profiler trace of each run's --profile_steps (summed per kernel kind;
# TRACE_OPS=N also the top N launching operators with their shapes and autograd nodes).
# PEER=1 (the default) also runs diffusers' examples/text_to_image/train_text_to_image_lora.py (carried
# as .whl/train_text_to_image_lora.py, with the datasets, dill and multiprocess wheels) on the same
# model and data, PEER_RUNS="name:samples_per_step:flags;..." (default: the tutorial recipe and batch
# 8); scripts/peer_shims/timing times its optimizer steps (tqdm's "Steps" bar) and reads torch's
# peak memory; if the carried `datasets` does not import there, scripts/peer_shims/datasets reads the
# image folder instead (said in the output).
# CHECK=1 (the default) first runs the CUDA-graph check: CHECK_STEPS steps eager, eager again (the
# noise floor: cuDNN's benchmark may pick other kernels per process), captured, and emulated (the
# graph path's buffers and flow, run eagerly), from one seed; prints the LoRA and loss differences
# (CHECK_FLAGS: more flags for these runs, e.g. --memory_format channels_last). KERNELS=1 (the
# default) first runs the fused kernels' GPU test binary when carried (.train-gpu/fused_cuda,
# built by `cargo test --release --features train --test fused_cuda --no-run`).
# Writes $OUT/<name>.csv.
set -uo pipefail
NDATA=${NDATA:-64}
source scripts/gpu_train_prologue.sh
common="--pretrained_model_name_or_path /tmp/sd15 --train_data_dir $DATA --resolution 512 --center_crop --random_flip --learning_rate 1e-04 --max_grad_norm 1 --lr_scheduler cosine --lr_warmup_steps 0 --seed 1337 --plain_log --device cuda"
tut="--train_batch_size 1 --gradient_accumulation_steps 4 --mixed_precision bf16"
# smi_start NAME / smi_stop NAME: the process's peak GPU memory over the idle reading, sampled by
# nvidia-smi every 100 ms -- the same measure for lorafuse and the script (the trainers' own figures
# differ: lorafuse's log reads cudaMemGetInfo, the device's whole use with the CUDA context; the
# script's shim reads torch's max_memory_reserved, the caching allocator's only). Each sample and
# each line of the trainer's output carry the time, so smi_stop also says when the peak came: the
# trainer's last line before it (a phase: loading, caching latents, step N).
smi_start() { nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/smi_$1.txt" & SMI=$!; }
smi_stop() {
  kill $SMI; wait $SMI 2>/dev/null
  python3 - "$1" "$OUT/smi_$1.txt" "$OUT/out_$1.txt" <<'PY' | tee -a "$OUT/smi_peaks.txt"
import sys, datetime
name, smi, out = sys.argv[1:4]
def t(s):
    return datetime.datetime.strptime(s.strip()[-12:], "%H:%M:%S.%f")
rows = []
for line in open(smi):
    ts, _, mib = line.rpartition(",")
    if mib.strip().isdigit():
        rows.append((t(ts), int(mib)))
if not rows:
    print(f"{name}: no nvidia-smi samples"); sys.exit()
peak_t, peak = max(rows, key=lambda r: r[1])
idle = min(m for _, m in rows)
last = "(before the trainer's first line)"
try:
    for line in open(out):
        stamp, _, text = line.partition(" ")
        if t(stamp) <= peak_t:
            last = text.strip()[:120]
except FileNotFoundError:
    last = "(no timed output)"
print(f"{name}: nvidia-smi peak {peak - idle} MiB over idle, at {peak_t:%H:%M:%S.%f}"[:-3] + f", after: {last}")
PY
}
# every line of stdin with the time in front (HH:MM:SS.mmm), into FILE and on to stdout
stamp() { while IFS= read -r l; do printf '%s %s\n' "$(date +%H:%M:%S.%3N)" "$l"; done | tee "$1" | cut -d' ' -f2-; }
# run NAME [env:VAR=VALUE ...] FLAGS...: one lorafuse run; env: words set that variable for it
# (e.g. env:LORAFUSE_CUDNN_BENCHMARK=0 in a RUNS spec)
run() {
  name=$1; shift; local envs=() flags=()
  for a in "$@"; do case $a in env:*) envs+=("${a#env:}");; *) flags+=("$a");; esac; done
  echo "== $name: ${envs[*]} ${flags[*]}"; s=$(date +%s.%N); smi_start $name
  env "${envs[@]}" $T/lorafuse train $common --output_dir /tmp/$name "${flags[@]}" 2>&1 | stamp "$OUT/out_$name.txt" | awk '!/^step / || $2 % 20 == 0 || $2 <= 5'
  smi_stop $name; echo "wall $(python3 -c "print(round($(date +%s.%N) - $s, 1))") s"; cp /tmp/$name/logs/train_log.csv $OUT/$name.csv 2>/dev/null
}

if [ "${KERNELS:-1}" = 1 ] && [ -f $T/fused_cuda.xz ]; then
  [ -f $T/fused_cuda ] || xz -dk $T/fused_cuda.xz
  chmod +x $T/fused_cuda && $T/fused_cuda --nocapture --test-threads 1 2>&1 | grep -v "^$" | tail -30
fi
if [ "${CHECK:-1}" = 1 ]; then
  n=${CHECK_STEPS:-12}
  for m in ${CHECK_MODES:-off off2 on emulate}; do
    run check-$m $tut --max_train_steps $n --checkpointing_steps 4 --cuda_graphs ${m%2} ${CHECK_FLAGS:-}
  done
  # checkpoint-4: 3 eager warm-up steps + 1 captured step; the final LoRA: n steps
  python3 - /tmp/check-off $(for m in ${CHECK_MODES:-off off2 on emulate}; do [ $m = off ] || echo /tmp/check-$m; done) <<'EOF'
import csv, os, sys
from safetensors.torch import load_file
def lora(d, sub=""):
    return load_file(os.path.join(d, sub, "pytorch_lora_weights.safetensors"))
def losses(d):
    with open(os.path.join(d, "logs", "train_log.csv")) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]
base = sys.argv[1]
for d in sys.argv[2:]:
    if not os.path.exists(os.path.join(d, "pytorch_lora_weights.safetensors")):
        print(f"{os.path.basename(d)}: no LoRA written (the run failed)"); continue
    out = []
    for sub in ["checkpoint-4", ""]:
        a, b = lora(base, sub), lora(d, sub)
        if a.keys() != b.keys():
            out.append(f"{sub or 'final'}: keys differ"); continue
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        up = max((a[k].float().abs().max().item() for k in a if "lora_B" in k or ".up." in k), default=0.0)
        out.append(f"{sub or 'final'} max|dW| {diff:.3e} (max|up| {up:.3e})")
    la, lb = losses(base), losses(d)
    dl = [abs(x - y) for x, y in zip(la, lb)]
    out.append("|dloss| per step " + " ".join(f"{x:.1e}" for x in dl))
    print(f"{os.path.basename(d)} vs check-off: " + "; ".join(out))
EOF
fi

IFS=';' read -ra specs <<< "${RUNS-tut-eager:$tut --max_train_steps 100 --cuda_graphs off --profile_steps 20;tut-graph:$tut --max_train_steps 100 --cuda_graphs on --profile_steps 20;b8-eager:--train_batch_size 8 --max_train_steps 60 --mixed_precision bf16 --cuda_graphs off --profile_steps 20;b8-graph:--train_batch_size 8 --max_train_steps 60 --mixed_precision bf16 --cuda_graphs on --profile_steps 20}"
for spec in "${specs[@]}"; do
  # TORCH_PROFILE=1: a PyTorch profiler trace of each run's --profile_steps steps, summed per kind
  tp=(); [ "${TORCH_PROFILE:-0}" = 1 ] && tp=(--torch_profile "$OUT/trace_${spec%%:*}.json")
  run ${spec%%:*} --checkpointing_steps 500 ${spec#*:} "${tp[@]}"
  if [ -f "$OUT/trace_${spec%%:*}.json" ]; then
    n=$(sed -n 's/.*--profile_steps \([0-9]*\).*/\1/p' <<< "${spec#*:}")
    python3 scripts/torch_trace_summary.py "$OUT/trace_${spec%%:*}.json" --steps "${n:-1}" --top 30 --ops "${TRACE_OPS:-0}"
  fi
done
if [ "${PEER:-1}" = 1 ]; then
  pp=${PYTHONPATH:-}
  if python3 -c "import datasets" 2>/dev/null; then
    echo "peer data loading: datasets $(python3 -c 'import datasets; print(datasets.__version__)'), pyarrow $(python3 -c 'import pyarrow; print(pyarrow.__version__)')"
  else
    echo "peer data loading: the carried datasets does not import here ($(python3 -c 'import datasets' 2>&1 | tail -1)); using scripts/peer_shims/datasets"
    pp=$PWD/scripts/peer_shims:$pp
  fi
  peer() {
    name=$1; spb=$2; shift 2; echo "== $name (diffusers' script, $spb samples per step): $*"; s=$(date +%s.%N)
    echo $spb > $OUT/$name.spb
    smi_start $name
    PEER_TIMING=$OUT/$name.json PYTHONPATH=$PWD/scripts/peer_shims/timing:$pp python3 .whl/train_text_to_image_lora.py \
      --pretrained_model_name_or_path /tmp/sd15 --train_data_dir $DATA --resolution 512 --center_crop --random_flip \
      --learning_rate 1e-04 --max_grad_norm 1 --lr_scheduler cosine --lr_warmup_steps 0 --seed 1337 --rank 4 \
      --output_dir /tmp/$name "$@" 2>&1 | tr '\r' '\n' | stamp "$OUT/out_$name.txt" > /tmp/$name.log
    rc=$?; smi_stop $name
    echo "exit $rc; wall $(python3 -c "print(round($(date +%s.%N) - $s, 1))") s"
    tr '\r' '\n' < /tmp/$name.log | grep -v -i "warn\|^Steps:\|^ *$" | tail -8
  }
  IFS=';' read -ra pspecs <<< "${PEER_RUNS-peer-tut:4:--train_batch_size 1 --gradient_accumulation_steps 4 --mixed_precision bf16 --max_train_steps 60;peer-b8:8:--train_batch_size 8 --mixed_precision bf16 --max_train_steps 60}"
  for spec in "${pspecs[@]}"; do
    IFS=: read -r pname pspb pflags <<< "$spec"
    peer $pname $pspb $pflags
  done
  python3 - $OUT/peer*.json <<'EOF'
import json, os, statistics, sys
for p in sys.argv[1:]:
    d = json.load(open(p))
    spb = int(open(p[:-5] + ".spb").read())
    t = d["step_times"]
    dt = [b - a for a, b in zip(t, t[1:])][5:]  # after the first 6 steps (warm-up)
    if dt:
        print(f"{os.path.basename(p)[:-5]:<14} median {spb / statistics.median(dt):7.1f} samples/s over {len(dt)} steps, peak {d.get('max_memory_reserved', 0) / 2**30:.1f} GiB reserved ({d.get('max_memory_allocated', 0) / 2**30:.1f} allocated)")
    else:
        print(f"{os.path.basename(p)[:-5]:<14} no steps timed")
EOF
fi

# samples/s: median of the steps after the first 25 (warm-up, capture and the profiled steps,
# which synchronise at every phase boundary); peak device memory
python3 - $OUT/*.csv <<'EOF'
import csv, os, statistics, sys
for p in sys.argv[1:]:
    rows = list(csv.DictReader(open(p)))
    sps = [float(r["samples_per_s"]) for r in rows[25:]]
    mem = [int(r["device_mem"]) for r in rows if r["device_mem"]]
    if sps:
        print(f"{os.path.basename(p)[:-4]:<14} median {statistics.median(sps):7.1f} samples/s over {len(sps)} steps, peak {max(mem, default=0) / 2**30:.1f} GiB")
EOF
[ -f "$OUT/smi_peaks.txt" ] && sort -u "$OUT/smi_peaks.txt"
