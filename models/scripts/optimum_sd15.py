#!/usr/bin/env python3
"""optimum's own ONNX Runtime Stable Diffusion pipeline, `ORTStableDiffusionPipeline`
(optimum-onnx 0.1.0 on onnxruntime-gpu 1.31.1), timed the way models/scripts/gpu_sd15.py times
diffusers: the closest peer of `lorafuse generate` on an ONNX Runtime-optimized pipeline (issue 10,
docs/benchmarks.md). 512² (--size), DPM++ 2M (diffusers' DPMSolverMultistepScheduler, dpmsolver++, order 2),
CFG 7.5, one warm-up image, then the median of N images and of the UNet calls (optimum's IO binding:
each call returns after its outputs are synchronised).

    python3 models/scripts/optimum_sd15.py PIPELINE [--images 3] [--steps 25] [--label L]
        [--provider-option KEY=VALUE ...] [--provider CPUExecutionProvider]

Prints one JSON line. Nothing in optimum is changed; the pipeline folder needs each part's
config.json (optimum refuses a part without one).
"""

import argparse
import json
import time

import torch


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("pipeline")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--label", default="optimum")
    ap.add_argument("--provider", default="CUDAExecutionProvider")
    ap.add_argument("--provider-option", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args()

    import onnxruntime
    import optimum.onnxruntime
    from diffusers import DPMSolverMultistepScheduler
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    opts = dict(kv.split("=", 1) for kv in a.provider_option)
    sync()
    t = time.perf_counter()
    pipe = ORTStableDiffusionPipeline.from_pretrained(
        a.pipeline, provider=a.provider, provider_options=opts or None
    )
    open_s = time.perf_counter() - t
    assert a.provider in pipe.unet.session.get_providers(), pipe.unet.session.get_providers()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
    )
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a photo of an astronaut riding a horse on mars", negative_prompt="blurry, low quality",
              num_inference_steps=a.steps, guidance_scale=7.5, height=a.size, width=a.size, output_type="np")
    torch.manual_seed(1)
    pipe(**kw)  # warm-up (and ORT's first-run algorithm searches)

    unet_ms = []
    forward = pipe.unet.forward

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        out = forward(*args, **kwargs)
        sync()
        unet_ms.append((time.perf_counter() - t0) * 1e3)
        return out

    times = []
    for k in range(a.images):
        pipe.unet.forward = timed if k == 0 else forward
        sync()
        t = time.perf_counter()
        pipe(**kw)
        sync()
        times.append(time.perf_counter() - t)
    pipe.unet.forward = forward
    median = lambda v: sorted(v)[len(v) // 2]
    print(json.dumps({
        "label": a.label, "optimum_onnx": getattr(optimum.onnxruntime, "__version__", "0.1.0"),
        "onnxruntime": onnxruntime.__version__, "provider_options": opts, "io_binding": pipe.unet.use_io_binding,
        "open_s": round(open_s, 3), "seconds_per_image": round(median(times[1:] or times), 4),
        "seconds_per_image_all": [round(x, 4) for x in times], "unet_ms_per_call": round(median(unet_ms), 3),
        "unet_dtype": str(pipe.unet.dtype),
    }), flush=True)


if __name__ == "__main__":
    main()
