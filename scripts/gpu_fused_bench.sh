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

# MODE all: everything below; graphs: only the tiny check and the SD 1.5 rows of IO binding / CUDA
# graphs; memory: peak GPU memory only; peer: ONNX Runtime's own optimized pipeline against ours
# (PEER_STAGE=prepare: only make it, for a second call on the same warm machine); vaeprof: node
# placement and per-node profiles (TINY_ONLY=1: the tiny pipeline only); short: vaeprof's tiny part,
# SD 1.5's peak memory with a switchable LoRA and its VAE profile, for a call with little time left;
# fusions: `lorafuse optimize`'s defaults against the optimizer without its latest fusion
# (PREV_FLAGS), ORT's exhaustive cuDNN search and --float16: pixels, speed, memory; peaks: peak
# memory at 50 ms sampling with and without CUDA graphs, and diffusers'; decode: the VAE decode
# under the provider's convolution settings; profile: per-op profiles of the SD 1.5 graphs made by
# the modes before (same warm machine); memtrace: the --float16 copy's device memory stage by stage
# (LORAFUSE_MEM_TRACE=1; also ORT's identity-session copies, LORAFUSE_DEVICE_COPY=ort); optimum: optimum's ORTStableDiffusionPipeline on ORT's optimized graph
# (scripts/prepare_optimum_peer.sh) against lorafuse and diffusers
MODE=${1:-all}
sd15() { # the random SD 1.5 (fp16 export) and its lorafuse-optimized copy, once per warm machine
  [ -f /tmp/sd15-onnx/unet/model.onnx ] || {
    python3 models/scripts/gpu_sd15.py build /tmp/sd15 models/tiny/onnx/tokenizer >/dev/null 2>&1 && \
    python3 models/scripts/gpu_sd15.py loras /tmp/sd15 /tmp/loras >/dev/null 2>&1 && \
    python3 models/scripts/gpu_sd15.py export /tmp/sd15 /tmp/sd15-onnx >/dev/null 2>&1; } || return 1
  [ -f /tmp/sd15-opt/unet/model.onnx ] || { $L optimize /tmp/sd15-onnx /tmp/sd15-opt | grep -A3 -E "^(unet|text_encoder)"; }
  [ -f /tmp/sd15-opt/unet/model.onnx ]
}
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
sample() { # label, file for the command's stdout, then a command: its peak over idle while it runs
  local label=$1 log=$2; shift 2
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/mem_$label.txt" & local smi=$!
  "$@" > "$log" 2>> "$OUT/stderr_$label.log"; kill $smi; wait $smi 2>/dev/null
  python3 -c "v=[int(x) for x in open('$OUT/mem_$label.txt') if x.strip().isdigit()]; print(f'$label: peak {max(v)-min(v)} MiB over idle ({min(v)} MiB idle)')"
}
if [ "$MODE" = memory ]; then
  # Peak GPU memory of one process (nvidia-smi every 100 ms, minus the idle reading): lorafuse
  # with --cuda-memory roomy (ONNX Runtime's defaults) and lean, and diffusers fp16.
  sd15 || exit 1
  peak() { # label, then lorafuse bench arguments
    local label=$1; shift
    sample $label "$OUT/bench_$label.json" $L bench -W 512 -H 512 --steps 25 --images 2 --device cuda --json "$@"
    python3 -c "import json; r=json.load(open('$OUT/bench_$label.json')); print(f'   {r[\"median_seconds_per_image\"]:.3f} s/image, step {r[\"median_step_ms\"]:.2f} ms, text+first {r[\"median_first_step_ms\"]:.1f} ms, decode {r[\"median_decode_ms\"]:.1f} ms, open {r[\"pipeline_open_s\"]:.1f} s')"
  }
  sample diffusers_fp16 "$OUT/diffusers_memory.log" python3 models/scripts/gpu_sd15.py memory /tmp/sd15; grep "^{" "$OUT/diffusers_memory.log"
  peak graphs_roomy -m /tmp/sd15-opt --cuda-graphs --cuda-memory roomy
  peak graphs_lean -m /tmp/sd15-opt --cuda-graphs --cuda-memory lean
  peak exported_lean -m /tmp/sd15-onnx --cuda-memory lean
  for k in roomy lean; do
    # one pipeline generating with a live-switchable LoRA (bench with LoRAs also opens a second pipeline)
    sample "switch_lora_$k" /dev/null $L generate -m /tmp/sd15-opt -p "a photo of an astronaut" -W 512 -H 512 --cuda-memory $k \
      --steps 25 --device cuda --cuda-graphs --lora-mode switch --lora /tmp/loras/a.safetensors -o "$OUT/lora.png"
  done
  # the same call's diffusers speed, for the ratio
  [ -n "${SKIP_DIFFUSERS:-}" ] || python3 models/scripts/gpu_sd15.py bench /tmp/sd15 /tmp/loras/a.safetensors /tmp/loras/b.safetensors 2>&1 | grep -E "^diffusers|^\{" | tail -3
  exit 0
fi
if [ "$MODE" = fusions ]; then
  # `lorafuse optimize`'s defaults (every CUDA fusion, cuDNN heuristics) against the optimizer
  # without its latest fusion (PREV_FLAGS), against ORT's exhaustive cuDNN search and with
  # --float16, same call: pixels against the exported graph, speed and peak memory, a live LoRA,
  # and diffusers fp16/bf16 (speed, then peak memory) on the same weights
  sd15 || exit 1   # /tmp/sd15-opt: the default optimize
  # PREV_FLAGS: the optimizer before the latest fusion (default: without SkipLayerNormalization)
  [ -f /tmp/sd15-prev/unet/model.onnx ] || $L optimize ${PREV_FLAGS:---no-skip-layer-norm} /tmp/sd15-onnx /tmp/sd15-prev >/dev/null
  [ -f /tmp/sd15-opt-h/unet/model.onnx ] || $L optimize --float16 /tmp/sd15-onnx /tmp/sd15-opt-h 2>&1 | grep -A2 "^text_encoder"
  g() { $L generate -p "a photo of an astronaut" -W 512 -H 512 --steps $steps --device cuda --seed 1 "$@" 2>&1 | grep -v -i cudnn | tail -1; }
  g -m /tmp/sd15-onnx -o "$OUT/f_exported.png"
  g -m /tmp/sd15-opt -o "$OUT/f_all.png"
  g -m /tmp/sd15-opt-h -o "$OUT/f_all16.png"
  g -m /tmp/sd15-opt --cudnn-conv-algo exhaustive -o "$OUT/f_exhaustive.png"
  # speed and peak GPU memory (nvidia-smi every 100 ms over idle) side by side
  mbench() { local label=$1; shift; echo "-- $label"; sample $label "$OUT/bench_$label.json" $L bench -W 512 -H 512 --steps $steps --images $images --device cuda --json "$@"
    python3 -c "import json; r=json.load(open('$OUT/bench_$label.json')); print('  ', {k: v for k, v in r.items() if not isinstance(v, (list, dict))})"; }
  mbench exported -m /tmp/sd15-onnx
  mbench prev_graphs -m /tmp/sd15-prev --cuda-graphs
  mbench all_graphs_exhaustive -m /tmp/sd15-opt --cuda-graphs --cudnn-conv-algo exhaustive
  mbench all_graphs -m /tmp/sd15-opt --cuda-graphs
  mbench all16_graphs -m /tmp/sd15-opt-h --cuda-graphs
  if [ -z "${QUICK:-}" ]; then
    # a live-switchable LoRA (bench opens a second pipeline for the rebuild figure: no peak here)
    bench all16_graphs_lora_switch -m /tmp/sd15-opt-h --cuda-graphs --lora /tmp/loras/a.safetensors --lora /tmp/loras/b.safetensors
    bench all_graphs_lora_switch -m /tmp/sd15-opt --cuda-graphs --lora /tmp/loras/a.safetensors --lora /tmp/loras/b.safetensors
    g -m /tmp/sd15-opt --cuda-graphs --lora-mode switch --lora /tmp/loras/a.safetensors -o "$OUT/f_all_switch_a.png"
    g -m /tmp/sd15-opt --cuda-graphs --lora-mode rebuild --lora /tmp/loras/a.safetensors -o "$OUT/f_all_rebuild_a.png"
    g -m /tmp/sd15-onnx --lora /tmp/loras/a.safetensors -o "$OUT/f_exported_a.png"
    sample switch_lora_all16 /dev/null $L generate -m /tmp/sd15-opt-h -p "a photo of an astronaut" -W 512 -H 512 \
      --steps 25 --device cuda --cuda-graphs --lora-mode switch --lora /tmp/loras/a.safetensors -o "$OUT/lora.png"
  fi
  python3 - "$OUT" <<'PY'
import sys, numpy as np
from PIL import Image
o = sys.argv[1]
img = lambda n: np.asarray(Image.open(f"{o}/f_{n}.png"), dtype=np.int16)
for a, b in [("exported", "all"), ("exported", "all16"), ("all", "all16"), ("all", "exhaustive"),
             ("exported_a", "all_switch_a"), ("all_rebuild_a", "all_switch_a")]:
    try:
        d = np.abs(img(a) - img(b))
        print(f"{a} vs {b}: max |diff| {d.max()} of 255, mean {d.mean():.3f}")
    except Exception as e:
        print(f"{a} vs {b}: {e}")
PY
  if [ -z "${SKIP_DIFFUSERS:-}${QUICK:-}" ]; then
    python3 models/scripts/gpu_sd15.py bench /tmp/sd15 /tmp/loras/a.safetensors /tmp/loras/b.safetensors 2>&1 | grep -E "^diffusers|^\{" | tail -3
    sample diffusers_fp16 "$OUT/diffusers_memory.log" python3 models/scripts/gpu_sd15.py memory /tmp/sd15; grep "^{" "$OUT/diffusers_memory.log"
  fi
  exit 0
fi
if [ "$MODE" = peaks ]; then
  # peak GPU memory at 50 ms sampling, one image after the warm-up: the --float16 copy with and
  # without CUDA graphs (and an arena cap), diffusers fp16 (after `fusions`, same warm machine)
  sd15 || exit 1
  [ -f /tmp/sd15-opt-h/unet/model.onnx ] || $L optimize --float16 /tmp/sd15-onnx /tmp/sd15-opt-h >/dev/null
  peak50() { local label=$1; shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$OUT/mem50_$label.txt" & local smi=$!
    "$@" > "$OUT/peak_$label.log" 2>"${ERR:-/dev/null}"; kill $smi; wait $smi 2>/dev/null
    python3 -c "v=[int(x) for x in open('$OUT/mem50_$label.txt') if x.strip().isdigit()]; print(f'$label: peak {max(v)-min(v)} MiB over idle')"
  }
  b1() { $L bench -W 512 -H 512 --steps 25 --images ${PEAK_IMAGES:-1} --device cuda --json -m ${PEAK_MODEL:-/tmp/sd15-opt-h} "$@"; }
  # defaults (lean: the VAE decoder and the CUDA-graph UNet plan no memory pattern; the device
  # buffers copied with cudaMemcpy), ORT's identity-session copies (LORAFUSE_DEVICE_COPY=ort, the
  # default before 2026-12-07's fourth session), ORT's memory pattern everywhere
  # (LORAFUSE_ORT_MEM_PATTERN=1: the UNet's was the default before the fifth); PEAK_SET=all adds
  # ONNX Runtime's own graph (made by MODE=peer), whose capture needed the pattern: its stderr
  # (the pipeline's warning when it builds the UNet again with the pattern) goes to
  # peak_ortopt_graphs.err
  peak50 float16_no_graphs b1
  peak50 float16_graphs b1 --cuda-graphs
  peak50 float16_graphs_ort_copies env LORAFUSE_DEVICE_COPY=ort $L bench -W 512 -H 512 --steps 25 --images ${PEAK_IMAGES:-1} \
    --device cuda --json -m /tmp/sd15-opt-h --cuda-graphs
  peak50 float16_graphs_mem_pattern env LORAFUSE_ORT_MEM_PATTERN=1 $L bench -W 512 -H 512 --steps 25 --images ${PEAK_IMAGES:-1} \
    --device cuda --json -m /tmp/sd15-opt-h --cuda-graphs
  if [ "${PEAK_SET:-short}" = all ] && [ -f /tmp/sd15-ortopt/unet/model.onnx ]; then
    ERR="$OUT/peak_ortopt_graphs.err" PEAK_MODEL=/tmp/sd15-ortopt peak50 ortopt_graphs b1 --cuda-graphs
    grep -i "warning\|error" "$OUT/peak_ortopt_graphs.err" | cut -c1-300
  fi
  for f in "$OUT"/peak_*.log; do python3 - "$f" <<'PY'
import json, sys, os
t = open(sys.argv[1]).read()
try:
    r = json.loads(t[t.index("{"):])
    print(f"{os.path.basename(sys.argv[1])[5:-4]:36s} open {r['pipeline_open_s']:.2f} s  {r['median_seconds_per_image']:.4f} s/image  step {r['median_step_ms']:.2f} ms  decode {r['median_decode_ms']:.1f} ms")
except Exception as e:
    print(os.path.basename(sys.argv[1]), "no result:", e, t[-300:])
PY
  done
  [ -n "${SKIP_DIFFUSERS:-}" ] || peak50 diffusers_fp16 python3 models/scripts/gpu_sd15.py memory /tmp/sd15
  exit 0
fi
if [ "$MODE" = memtrace ]; then
  # where the --float16 copy's device memory goes, stage by stage (LORAFUSE_MEM_TRACE=1: the
  # device's used memory and every session's CUDA arena), with and without CUDA graphs, with ORT's
  # memory pattern on (1) and off (0), and the open time of each layout
  sd15 || exit 1
  [ -f /tmp/sd15-opt-h/unet/model.onnx ] || $L optimize --float16 /tmp/sd15-onnx /tmp/sd15-opt-h >/dev/null
  # ortcopy: the device buffers filled and read by ORT (its identity sessions, each one more CUDA
  # provider instance) instead of cudaMemcpy (LORAFUSE_DEVICE_COPY=ort); one line per stage
  for v in "" "--cuda-io-binding" "--cuda-io-binding ortcopy" "--cuda-graphs" "--cuda-graphs ortcopy" "--cuda-graphs mp0"; do
    mp=; cc=; a=${v%% *}; case $v in *mp0) mp=0;; *ortcopy) cc=ort;; esac
    echo "-- ${v:-no CUDA graphs}"
    env ${mp:+LORAFUSE_ORT_MEM_PATTERN=$mp} ${cc:+LORAFUSE_DEVICE_COPY=$cc} LORAFUSE_MEM_TRACE=1 $L bench -W 512 -H 512 --steps 25 --images 1 --device cuda \
      --json -m /tmp/sd15-opt-h $a 2> "$OUT/memtrace.err" > "$OUT/memtrace.json"
    grep '^\[mem\].*device used' "$OUT/memtrace.err" | head -4 | cut -c7- | tr '\n' ';'; echo
    grep '^\[mem\]   unet' "$OUT/memtrace.err" | tail -1 | cut -c1-200
    python3 -c "import json; r=json.load(open('$OUT/memtrace.json')); print(f'   open {r[\"pipeline_open_s\"]:.2f} s, step {r[\"median_step_ms\"]:.2f} ms, {r[\"median_seconds_per_image\"]:.3f} s/image')" 2>&1 | tail -1
  done
  # the same image through both copy paths, and twice through cudaMemcpy (the run-to-run floor:
  # ORT's GroupNorm kernels sum with atomics)
  for cc in ort cuda cuda2; do
    LORAFUSE_DEVICE_COPY=${cc%2} $L generate -m /tmp/sd15-opt-h -p "a photo of an astronaut" -W 512 -H 512 --steps 25 --device cuda \
      --seed 1 --cuda-graphs -o "$OUT/copy_$cc.png" 2>&1 | grep -v cudnn_frontend | tail -1
  done
  python3 -c "
import numpy as np; from PIL import Image
a, b, c = (np.asarray(Image.open('$OUT/copy_%s.png' % k), dtype=np.int16) for k in ('ort', 'cuda', 'cuda2'))
print('identity-session copies vs cudaMemcpy: max |diff|', np.abs(a - b).max(), '; cudaMemcpy twice:', np.abs(b - c).max())"
  exit 0
fi
if [ "$MODE" = optimum ]; then
  # optimum's ORTStableDiffusionPipeline (optimum-onnx 0.1.0, onnxruntime-gpu 1.31.1, staged by
  # scripts/prepare_optimum_peer.sh into /tmp/optpeer) on ONNX Runtime's optimized pipeline, against
  # lorafuse on the same graph and on its own, and diffusers, same call: speed, open time, peak memory
  sd15 || exit 1
  [ -f /tmp/sd15-ortopt/unet/model.onnx ] || PEER_STAGE=prepare bash "$0" peer || exit 1
  [ -f /tmp/sd15-opt-h/unet/model.onnx ] || $L optimize --float16 /tmp/sd15-onnx /tmp/sd15-opt-h >/dev/null
  if [ ! -d /tmp/optsite/optimum ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/optsite /tmp/optpeer/*.whl || exit 1
    tar -C /tmp/optsite -xJf /tmp/optpeer/ort-py312.tar.xz || exit 1
    ln -sf /tmp/ort/libonnxruntime_providers_cuda.so /tmp/optsite/onnxruntime/capi/
  fi
  # optimum refuses a part without config.json (the exporter writes none for the text encoder) and
  # sizes the decoder's output from its symbolic dims (`latent_height * 8`, as optimum's exporter
  # names them; gpu_sd15.py exports made before 2026-12-07 said `height`)
  for m in sd15-ortopt sd15-onnx; do [ -f /tmp/$m/text_encoder/config.json ] || cp /tmp/sd15/text_encoder/config.json /tmp/$m/text_encoder/; done
  python3 - /tmp/sd15-ortopt /tmp/sd15-onnx <<'PY'
import sys, onnx
for d in sys.argv[1:]:
    p = f"{d}/vae_decoder/model.onnx"
    m = onnx.load(p, load_external_data=False)
    dims = m.graph.output[0].type.tensor_type.shape.dim
    if dims[2].dim_param == "height":
        dims[2].dim_param, dims[3].dim_param = "latent_height * 8", "latent_width * 8"
        onnx.save(m, p)
        print(f"{p}: output dims renamed as optimum's exporter names them")
PY
  peak50() { local label=$1; shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$OUT/mem50_$label.txt" & local smi=$!
    "$@" > "$OUT/peak_$label.log" 2> "$OUT/peak_$label.err"; kill $smi; wait $smi 2>/dev/null
    python3 -c "v=[int(x) for x in open('$OUT/mem50_$label.txt') if x.strip().isdigit()]; print(f'$label: peak {max(v)-min(v)} MiB over idle')"
    python3 - "$OUT/peak_$label.log" <<'PY'
import json, sys
t = open(sys.argv[1]).read()
try:
    r = json.loads(t[t.index("{"):])
    print("  ", json.dumps({k: v for k, v in r.items() if not isinstance(v, (list, dict)) or k == "seconds_per_image_all"}))
except Exception as e:
    print("   no result:", e)
PY
    grep -q Traceback "$OUT/peak_$label.err" && grep -v -i warn "$OUT/peak_$label.err" | tail -25
  }
  opt() { PYTHONPATH=/tmp/optsite python3 models/scripts/optimum_sd15.py "$@" --images ${images}; }
  peak50 optimum_ortopt opt /tmp/sd15-ortopt --label ortopt
  peak50 optimum_ortopt_heuristic opt /tmp/sd15-ortopt --label ortopt_heuristic --provider-option cudnn_conv_algo_search=HEURISTIC
  peak50 optimum_exported_heuristic opt /tmp/sd15-onnx --label exported_heuristic --provider-option cudnn_conv_algo_search=HEURISTIC
  lb() { $L bench -W 512 -H 512 --steps $steps --images $images --device cuda --json "$@"; }
  peak50 lorafuse_ortopt lb -m /tmp/sd15-ortopt
  peak50 lorafuse_ortopt_graphs lb -m /tmp/sd15-ortopt --cuda-graphs
  peak50 lorafuse_opt16_graphs lb -m /tmp/sd15-opt-h --cuda-graphs
  peak50 lorafuse_opt16 lb -m /tmp/sd15-opt-h
  [ -n "${SKIP_DIFFUSERS:-}" ] || python3 models/scripts/gpu_sd15.py bench /tmp/sd15 /tmp/loras/a.safetensors /tmp/loras/b.safetensors 2>&1 | grep -E "^diffusers|^\{" | tail -3
  exit 0
fi
if [ "$MODE" = decode ]; then
  # the ~100 ms VAE decode: the same optimized SD 1.5 under the CUDA provider's convolution
  # settings (layout, cuDNN algorithm search, workspace, TF32), decode time and step side by side
  sd15 || exit 1
  for v in "auto" "--cuda-conv-layout nchw" "--cuda-conv-layout nhwc" "--cudnn-conv-algo heuristic" "--cuda-memory roomy" "--tf32"; do
    a=$v; [ "$v" = auto ] && a=
    $L bench -W 512 -H 512 --steps 5 --images 2 --device cuda --json -m /tmp/sd15-opt $a 2>/dev/null > "$OUT/decode.json"
    python3 -c "import json; r=json.load(open('$OUT/decode.json')); print(f'{\"$v\":30s} decode {r[\"median_decode_ms\"]:7.1f} ms  step {r[\"median_step_ms\"]:.2f} ms  text+first {r[\"median_first_step_ms\"]:.1f} ms')" 2>&1 | tail -1
  done
  $L bench -W 512 -H 512 --steps 5 --images 2 --device cuda --json -m /tmp/sd15-onnx 2>/dev/null > "$OUT/decode.json"
  python3 -c "import json; r=json.load(open('$OUT/decode.json')); print(f'exported graph                 decode {r[\"median_decode_ms\"]:7.1f} ms')"
  exit 0
fi
if [ "$MODE" = profile ]; then
  # per-op profiles (launch-blocking) of every SD 1.5 graph this warm machine has: where
  # ONNX Runtime's own optimized graph saves time per step and where the VAE decoder's time goes
  # PROFILE_MODELS: which of them (default: all three that exist)
  for m in ${PROFILE_MODELS:-sd15-opt sd15-ortopt sd15-onnx}; do
    [ -f /tmp/$m/unet/model.onnx ] || continue
    mkdir -p "$OUT/prof_$m"
    CUDA_LAUNCH_BLOCKING=1 LORAFUSE_ORT_PROFILE="$OUT/prof_$m/p" $L generate -m /tmp/$m -p "a photo of an astronaut" -W 512 -H 512 --steps 3 --num-images 3 --device cuda -o "$OUT/prof_${m}_{index}.png" 2>&1 | tail -1
    python3 scripts/ort_profile_summary.py "$OUT"/prof_$m/*.json
  done
  exit 0
fi
if [ "$MODE" = short ]; then
  # one short call: the VAE profile on the tiny fp16 pipeline, then SD 1.5's peaks with a
  # live-switchable LoRA and without, and the VAE profile of the optimized SD 1.5
  TINY_ONLY=1 bash "$0" vaeprof
  sd15 || exit 1
  sample switch_lora_lean /dev/null $L generate -m /tmp/sd15-opt -p "a photo of an astronaut" -W 512 -H 512 \
    --steps 25 --device cuda --cuda-graphs --lora-mode switch --lora /tmp/loras/a.safetensors -o "$OUT/lora.png"
  sample graphs_lean "$OUT/bench_graphs_lean.json" $L bench -W 512 -H 512 --steps 25 --images 2 --device cuda --json -m /tmp/sd15-opt --cuda-graphs \
    --lora /tmp/loras/a.safetensors --lora /tmp/loras/b.safetensors
  python3 -c "import json; r=json.load(open('$OUT/bench_graphs_lean.json')); print({k: v for k, v in r.items() if not isinstance(v, dict)})"
  mkdir -p "$OUT/prof_sd15"
  CUDA_LAUNCH_BLOCKING=1 LORAFUSE_ORT_PROFILE="$OUT/prof_sd15/p" $L generate -m /tmp/sd15-opt -p "a photo" -W 512 -H 512 --steps 2 --num-images 3 --device cuda -o "$OUT/prof_sd15_{index}.png" 2>&1 | tail -1
  python3 scripts/ort_profile_summary.py "$OUT"/prof_sd15/*.json
  exit 0
fi
if [ "$MODE" = vaeprof ]; then
  # Where the ~100 ms after the last step goes: ORT's node placement (verbose log) and per-node
  # profile of each session (scripts/ort_profile_summary.py), tiny fp16 and SD 1.5 at 512².
  T=/tmp/tiny; rm -rf $T; mkdir -p $T && cp -r models/tiny/onnx-fp16 $T/ && cp -r models/tiny/onnx/tokenizer $T/onnx-fp16/
  ORT_LOG=verbose $L generate -m $T/onnx-fp16 -p "a cat" -W 512 -H 512 --steps 2 --device cuda -o "$OUT/tiny512.png" > "$OUT/tiny_verbose.log" 2>&1
  grep -i -E "placed on|fall ?back|CPUExecutionProvider\]" "$OUT/tiny_verbose.log" | cut -c1-300 | sort | uniq -c | head -20
  bench tiny_fp16_512 -m $T/onnx-fp16
  mkdir -p "$OUT/prof_tiny"
  CUDA_LAUNCH_BLOCKING=1 LORAFUSE_ORT_PROFILE="$OUT/prof_tiny/p" $L generate -m $T/onnx-fp16 -p "a cat" -W 512 -H 512 --steps 3 --num-images 3 --device cuda -o "$OUT/prof_tiny_{index}.png" 2>&1 | tail -1
  python3 scripts/ort_profile_summary.py "$OUT"/prof_tiny/*.json
  [ -n "${TINY_ONLY:-}" ] && exit 0
  sd15 || exit 1
  for m in sd15-opt sd15-onnx; do
    mkdir -p "$OUT/prof_$m"
    # launch-blocking: each CUDA node's profiled time then includes its kernels
    CUDA_LAUNCH_BLOCKING=1 LORAFUSE_ORT_PROFILE="$OUT/prof_$m/p" $L generate -m /tmp/$m -p "a photo of an astronaut" -W 512 -H 512 --steps 3 --num-images 3 --device cuda -o "$OUT/prof_${m}_{index}.png" 2>&1 | tail -1
    python3 scripts/ort_profile_summary.py "$OUT"/prof_$m/*.json
  done
  ORT_LOG=verbose $L generate -m /tmp/sd15-opt -p "a cat" -W 512 -H 512 --steps 2 --device cuda -o "$OUT/sd15v.png" > "$OUT/sd15_verbose.log" 2>&1
  grep -i -E "placed on|fall ?back" "$OUT/sd15_verbose.log" | cut -c1-300 | sort | uniq -c | head -20
  exit 0
fi
if [ "$MODE" = peer ]; then
  # ONNX Runtime's own SD optimizer (optimize_pipeline.py --float16 on the fp32 export, the way
  # its authors run it) as the peer graph: lorafuse runs it, merges into it and switches LoRAs on
  # it, against lorafuse's own optimized graph, same call.
  sd15 || exit 1
  t=$(date +%s)
  [ -f /tmp/sd15-fp32/unet/model.onnx ] || SD15_EXPORT=fp32 python3 models/scripts/gpu_sd15.py export /tmp/sd15 /tmp/sd15-fp32 >/dev/null 2>&1 || exit 1
  echo "fp32 export: $(( $(date +%s) - t )) s"; t=$(date +%s)
  [ -f /tmp/sd15-ortopt/unet/model.onnx ] || python3 models/scripts/ort_sd_pipeline.py /tmp/sd15-fp32 /tmp/sd15-ortopt > "$OUT/ort_optimizer.log" 2>&1 || { tail -20 "$OUT/ort_optimizer.log"; exit 1; }
  echo "ONNX Runtime's optimize_pipeline.py --float16: $(( $(date +%s) - t )) s"
  grep -E "Optimized operators|is optimized" "$OUT/ort_optimizer.log" | cut -c1-300
  $L inspect /tmp/sd15-ortopt 2>&1 | grep -E "^  [a-z_]+: |fused|mapped" | head -12
  [ "${PEER_STAGE:-all}" = prepare ] && exit 0
  bench ortopt -m /tmp/sd15-ortopt
  bench ortopt_graphs -m /tmp/sd15-ortopt --cuda-graphs
  bench fused_graphs -m /tmp/sd15-opt --cuda-graphs
  bench ortopt_graphs_lora_switch -m /tmp/sd15-ortopt --cuda-graphs --lora /tmp/loras/a.safetensors --lora /tmp/loras/b.safetensors
  # a LoRA merged into ORT's packed-QKV / NhwcConv graph vs the same LoRA on the plain export, on CUDA
  t=$EPOCHREALTIME; $L merge -m /tmp/sd15-ortopt --lora /tmp/loras/a.safetensors -o /tmp/sd15-ortopt-a 2>&1 | tail -2
  python3 -c "print(f'merge into the ORT-optimized pipeline: {$EPOCHREALTIME - $t:.2f} s')"
  g() { $L generate -p "a photo of an astronaut" -W 512 -H 512 --steps $steps --device cuda --seed 1 "$@" 2>&1 | grep -v -i cudnn | tail -1; }
  g -m /tmp/sd15-onnx -o "$OUT/peer_exported.png"
  g -m /tmp/sd15-ortopt -o "$OUT/peer_ortopt.png"
  g -m /tmp/sd15-onnx --lora /tmp/loras/a.safetensors -o "$OUT/peer_exported_a.png"
  g -m /tmp/sd15-ortopt-a -o "$OUT/peer_ortopt_merged_a.png"
  g -m /tmp/sd15-ortopt --lora /tmp/loras/a.safetensors -o "$OUT/peer_ortopt_rebuild_a.png"
  g -m /tmp/sd15-ortopt --lora-mode switch --lora /tmp/loras/a.safetensors -o "$OUT/peer_ortopt_switch_a.png"
  python3 - "$OUT" <<'PY'
import sys, numpy as np
from PIL import Image
o = sys.argv[1]
img = lambda n: np.asarray(Image.open(f"{o}/peer_{n}.png"), dtype=np.int16)
for a, b in [("exported", "ortopt"), ("exported_a", "ortopt_merged_a"), ("ortopt_merged_a", "ortopt_rebuild_a"),
             ("ortopt_merged_a", "ortopt_switch_a"), ("ortopt", "ortopt_merged_a")]:
    d = np.abs(img(a) - img(b))
    print(f"{a} vs {b}: max |diff| {d.max()} of 255, mean {d.mean():.3f}")
PY
  [ -n "${SKIP_DIFFUSERS:-}" ] || python3 models/scripts/gpu_sd15.py bench /tmp/sd15 /tmp/loras/a.safetensors /tmp/loras/b.safetensors 2>&1 | grep -E "^diffusers|^\{" | tail -3
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
rm -rf /tmp/sd15-opt; sd15 || exit 1
echo "build+loras+export+optimize: $(( $(date +%s) - t )) s"
$L optimize --no-group-norm /tmp/sd15-onnx /tmp/sd15-mha >/dev/null

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
