"""A full-size SD 1.5-architecture pipeline with random weights, for GPU benchmarks (no hub access).

Runs on the GPU machine with its own python3 (torch 2.11, transformers 5.x, peft) plus a carried
diffusers 0.42.1 wheel. Steps (each a subcommand, so one device call can run them all):

  build   DIR              diffusers-layout folder: SD 1.5's published configs, random weights
                           (fixed seed), the real CLIP tokenizer files from models/tiny
  loras   DIR OUT          two random rank-4 LoRAs (UNet + text encoder attention), written by
                           diffusers' save_lora_weights (the dialect train_text_to_image_lora.py writes)
  export  DIR ONNX         fp16 ONNX pipeline in optimum's layout and I/O names (legacy exporter,
                           opset 17, rank-0 fp16 timestep) for unet, text_encoder, vae_decoder
  memory  DIR              diffusers fp16's peak GPU memory generating one image (the caller samples nvidia-smi)
  bench   DIR LORA_A LORA_B   diffusers side of docs/benchmarks.md: 512x512, 25 DPM-Solver++ steps,
                           CFG 7.5, fp16 and bf16, seconds/image, UNet ms/step, LoRA load+fuse and switch
"""

import json
import os
import shutil
import sys
import time

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_CLIP = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=768,
)
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False,
}
HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "tiny", "diffusers", "tokenizer")


def perturb(module, seed):
    """Random weights with enough spread that no two tensors are equal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.02 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def build(out, tokenizer_dir=TOKENIZER):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    perturb(unet, 1)
    vae = AutoencoderKL(**SD15_VAE)
    perturb(vae, 2)
    te = CLIPTextModel(CLIPTextConfig(**SD15_CLIP))
    perturb(te, 3)
    os.makedirs(out, exist_ok=True)
    unet.save_pretrained(os.path.join(out, "unet"))
    vae.save_pretrained(os.path.join(out, "vae"))
    te.save_pretrained(os.path.join(out, "text_encoder"))
    shutil.copytree(tokenizer_dir, os.path.join(out, "tokenizer"), dirs_exist_ok=True)
    os.makedirs(os.path.join(out, "scheduler"), exist_ok=True)
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(SD15_SCHEDULER, f, indent=2)
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    print(f"built {out}")


def load_pipe(d, dtype):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(d, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda")


def loras(d, out):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    os.makedirs(out, exist_ok=True)
    for k, name in enumerate(["a", "b"]):
        pipe = StableDiffusionPipeline.from_pretrained(d, safety_checker=None, requires_safety_checker=False)
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        # SD15_LORAS_UNET_ONLY=1: transformers 5.24's add_adapter wants peft >= 0.22 (the ref venv pins 0.21.2).
        te_lora = os.environ.get("SD15_LORAS_UNET_ONLY") != "1"
        if te_lora:
            pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
        g = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for n, p in list(pipe.unet.named_parameters()) + (list(pipe.text_encoder.named_parameters()) if te_lora else []):
                if "lora_B" in n:
                    p.copy_(0.01 * torch.randn(p.shape, generator=g))
        StableDiffusionPipeline.save_lora_weights(
            os.path.join(out, name), unet_lora_layers=get_peft_model_state_dict(pipe.unet),
            text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder) if te_lora else None, safe_serialization=True)
        src = os.path.join(out, name, "pytorch_lora_weights.safetensors")
        shutil.move(src, os.path.join(out, f"{name}.safetensors"))
        shutil.rmtree(os.path.join(out, name))
    print(f"loras in {out}")


def export(d, out):
    """optimum's layout and names; the legacy exporter as optimum-onnx 0.1.0 calls it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    # SD15_EXPORT=cpu-fp32 exports on a machine without a GPU (fp32; the UNet then exceeds 2 GB
    # and goes to external data) for CPU-side measurements; SD15_EXPORT=fp32 the same on the GPU
    # (the input of ONNX Runtime's own optimizer, models/scripts/ort_sd_pipeline.py).
    mode = os.environ.get("SD15_EXPORT", "")
    dev = "cpu" if mode == "cpu-fp32" else "cuda"
    dt = torch.float32 if mode in ("cpu-fp32", "fp32") else torch.float16
    os.makedirs(out, exist_ok=True)
    jobs = []
    unet = UNet2DConditionModel.from_pretrained(os.path.join(d, "unet"), torch_dtype=dt).to(dev).eval()
    # Exported directly (no wrapper module), so node and initializer names carry diffusers' module
    # paths as optimum's do; return_dict=False through the exporter's kwargs.
    jobs.append(("unet", unet, (torch.randn(2, 4, 64, 64, dtype=dt, device=dev), torch.tensor(981.0, dtype=dt, device=dev),
                                       torch.randn(2, 77, 768, dtype=dt, device=dev)),
                 ["sample", "timestep", "encoder_hidden_states"], ["out_sample"],
                 {"sample": {0: "batch_size", 2: "height", 3: "width"}, "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
                  "out_sample": {0: "batch_size", 2: "height", 3: "width"}}, unet.config))
    # The text encoder stays fp32: the legacy exporter leaves an fp32 LayerNormalization scale in an
    # fp16 CLIP graph, which ORT rejects (seen with torch 2.11 / transformers 5.17); it runs once per image.
    te = CLIPTextModel.from_pretrained(os.path.join(d, "text_encoder"), torch_dtype=torch.float32).to(dev).eval()
    jobs.append(("text_encoder", te, (torch.ones(1, 77, dtype=torch.int64, device=dev),), ["input_ids"], ["last_hidden_state", "pooler_output"],
                 {"input_ids": {0: "batch_size", 1: "sequence_length"}, "last_hidden_state": {0: "batch_size", 1: "sequence_length"},
                  "pooler_output": {0: "batch_size"}}, None))
    vae = AutoencoderKL.from_pretrained(os.path.join(d, "vae"), torch_dtype=dt).to(dev).eval()
    vae.forward = vae.decode  # the decoder half, as optimum's vae_decoder
    jobs.append(("vae_decoder", vae, (torch.randn(1, 4, 64, 64, dtype=dt, device=dev),), ["latent_sample"], ["sample"],
                 {"latent_sample": {0: "batch_size", 2: "latent_height", 3: "latent_width"}, "sample": {0: "batch_size", 2: "latent_height * 8", 3: "latent_width * 8"}},
                 vae.config))
    for name, mod, args, ins, outs, axes, cfg in jobs:
        t = time.time()
        os.makedirs(os.path.join(out, name), exist_ok=True)
        with torch.no_grad():
            torch.onnx.export(mod, args, os.path.join(out, name, "model.onnx"), kwargs={"return_dict": False}, input_names=ins,
                              output_names=outs, dynamic_axes=axes, opset_version=17, do_constant_folding=True, dynamo=False)
        if cfg is not None:
            with open(os.path.join(out, name, "config.json"), "w") as f:
                json.dump(dict(cfg), f, indent=2, default=list)
        print(f"exported {name} in {time.time() - t:.1f} s")
    shutil.copytree(os.path.join(d, "tokenizer"), os.path.join(out, "tokenizer"), dirs_exist_ok=True)
    shutil.copytree(os.path.join(d, "scheduler"), os.path.join(out, "scheduler"), dirs_exist_ok=True)
    shutil.copy(os.path.join(d, "model_index.json"), os.path.join(out, "model_index.json"))


def _time_images(pipe, n, steps=25):
    gen = torch.Generator("cuda").manual_seed(1)
    kw = dict(prompt="a photo of an astronaut riding a horse on mars", negative_prompt="blurry, low quality",
              num_inference_steps=steps, guidance_scale=7.5, height=512, width=512, generator=gen, output_type="np")
    pipe(**kw)  # warm-up
    times, unet_ms = [], []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    h1 = pipe.unet.register_forward_pre_hook(lambda m, a: start.record())

    def post(m, a, o):
        end.record()
        torch.cuda.synchronize()
        unet_ms.append(start.elapsed_time(end))

    h2 = pipe.unet.register_forward_hook(post)
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        pipe(**kw)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    h1.remove()
    h2.remove()
    # Image times without the per-step synchronisation the hooks add.
    clean = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        pipe(**kw)
        torch.cuda.synchronize()
        clean.append(time.perf_counter() - t)
    return sorted(clean)[len(clean) // 2], sorted(unet_ms)[len(unet_ms) // 2]


def memory(d):
    """One diffusers fp16 process generating one image after a warm-up (512², 25 steps, CFG): the
    caching allocator's peaks (the caller samples nvidia-smi for the whole process)."""
    pipe = load_pipe(d, torch.float16)
    torch.cuda.reset_peak_memory_stats()
    _time_images(pipe, 1)
    mib = 1 << 20
    print(json.dumps({"diffusers_fp16_max_allocated_mib": torch.cuda.max_memory_allocated() // mib,
                      "diffusers_fp16_max_reserved_mib": torch.cuda.max_memory_reserved() // mib}), flush=True)


def bench(d, lora_a, lora_b, images=3):
    import diffusers

    res = {"diffusers": diffusers.__version__, "torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    for label, dt in [("fp16", torch.float16), ("bf16", torch.bfloat16)]:
        pipe = load_pipe(d, dt)
        s, u = _time_images(pipe, images)
        res[f"{label}_seconds_per_image"] = s
        res[f"{label}_unet_ms_per_call"] = u
        print(f"diffusers {label}: {s:.3f} s/image, UNet {u:.2f} ms/call (batch 2)", flush=True)
        if label == "fp16":
            torch.cuda.synchronize()
            t = time.perf_counter()
            pipe.load_lora_weights(lora_a, adapter_name="a")
            pipe.fuse_lora(lora_scale=1.0)
            torch.cuda.synchronize()
            res["load_fuse_s"] = time.perf_counter() - t
            sw = []
            for k in range(4):
                nxt = [lora_b, lora_a][k % 2]
                torch.cuda.synchronize()
                t = time.perf_counter()
                pipe.unfuse_lora()
                pipe.unload_lora_weights()
                pipe.load_lora_weights(nxt, adapter_name=f"x{k}")
                pipe.fuse_lora(lora_scale=1.0)
                torch.cuda.synchronize()
                sw.append(time.perf_counter() - t)
            res["switch_s_median"] = sorted(sw)[len(sw) // 2]
            print(f"diffusers fp16: load+fuse {res['load_fuse_s']:.3f} s, switch {res['switch_s_median']:.3f} s", flush=True)
        del pipe
        torch.cuda.empty_cache()
    print(json.dumps(res))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"build": build, "loras": loras, "export": export, "memory": memory, "bench": bench}[cmd](*args)
