"""Where a LoRA training step's GPU time goes (issue 11): diffusers' UNet2DConditionModel with a
peft LoRA (what examples/text_to_image/train_text_to_image_lora.py trains), one step's work at
the tutorial recipe (batch 4, 64x64 latents, bf16), forward + MSE + backward, timed by
torch.profiler. libtorch runs the same ATen kernels for `lorafuse train`, so the split (convolutions,
GEMMs, attention, GroupNorm, elementwise, layout copies) says which lever can pay. Run with each
memory format: contiguous (the script's) and channels_last.

    python3 scripts/gpu_profile_unet.py MODEL_DIR [--batch 4] [--steps 5]
"""

import argparse
import re
import time

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from torch.profiler import ProfilerActivity, profile

CATEGORIES = [
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("conv", r"conv|fprop|dgrad|wgrad|implicit_gemm|xmma_.*_(nhwc|nchw)|cudnn"),
    ("gemm", r"gemm|cutlass|nvjet|cublas|matmul"),
    ("groupnorm", r"group_?norm|RowwiseMoments|ComputeFused|GroupNorm|ComputeInternalGradients|ComputeBackwardFused"),
    ("layernorm", r"layer_?norm|LayerNorm"),
    ("layout copy", r"nchwToNhwc|nhwcToNchw|transpose|copy_|CatArrayBatched|permute"),
    ("elementwise", r"elementwise|vectorized|unrolled|reduce_kernel"),
]


def category(name):
    for cat, pat in CATEGORIES:
        if re.search(pat, name, re.IGNORECASE):
            return cat
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--formats", nargs="+", default=["contiguous", "channels_last"])
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    dev = "cuda"
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "cudnn", torch.backends.cudnn.version())
    for fmt in args.formats:
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet").to(dev, torch.bfloat16)
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        unet.to(memory_format=mf)
        x = torch.randn(args.batch, 4, 64, 64, device=dev).to(memory_format=mf)
        t = torch.randint(0, 1000, (args.batch,), device=dev)
        ehs = torch.randn(args.batch, 77, 768, device=dev)
        target = torch.randn_like(x)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                pred = unet(x, t, ehs).sample
            loss = torch.nn.functional.mse_loss(pred.float(), target)
            loss.backward()

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.steps * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
        per = {}
        kernels = []
        for e in prof.key_averages():
            # self time: a kernel's own; operator and autograd rows (aten::conv2d,
            # ConvolutionBackward0) have none of their own, so nothing counts twice
            us = e.self_device_time_total if hasattr(e, "self_device_time_total") else e.self_cuda_time_total
            if us <= 0 or e.key.startswith("ProfilerStep"):
                continue
            kernels.append((us, e.count, e.key))
        total = sum(us for us, _, _ in kernels) / args.steps / 1e3
        for us, _, name in kernels:
            c = category(name)
            per[c] = per.get(c, 0.0) + us / args.steps / 1e3
        print(f"== {fmt}: batch {args.batch}, step wall {wall:.1f} ms, kernel time {total:.1f} ms, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        for c, ms in sorted(per.items(), key=lambda kv: -kv[1]):
            print(f"   {c:<12} {ms:6.1f} ms ({100 * ms / total:4.1f} %)")
        for us, n, name in sorted(kernels, reverse=True)[:14]:
            print(f"   {us / args.steps / 1e3:6.2f} ms x{n // args.steps:<4} [{category(name)}] {name[:110]}")
        del unet
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
