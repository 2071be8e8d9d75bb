#!/usr/bin/env python3
"""A full-size SD 1.5-architecture diffusers folder with random weights, and an image folder to
train on, for `lorafuse train` / train_text_to_image_lora.py benchmarks. No hub access: SD 1.5's
published configs are written inline below.

    python3 models/scripts/make_sd15_random.py model   OUT_DIR [--seed 0] [--tokenizer DIR]
    python3 models/scripts/make_sd15_random.py dataset OUT_DIR [--n 64] [--size 512] [--seed 0]

`model` needs torch, transformers and diffusers (on the GPU machine: carry the diffusers wheel);
it writes model_index.json, unet/, text_encoder/ (keys with `text_model.`), vae/, scheduler/ and
tokenizer/ (the CLIP BPE files from models/tiny/diffusers/tokenizer, which are CLIP's full
vocabulary). `dataset` needs only numpy and pillow: PNGs of coloured shapes with captions, in the
imagefolder layout (metadata.jsonl with `file_name` and `text`, the script's default caption
column), so both trainers read it with --train_data_dir.
"""

import argparse
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_TOKENIZER = os.path.join(HERE, "..", "tiny", "diffusers", "tokenizer")

# runwayml/stable-diffusion-v1-5 (the Hugging Face copy stable-diffusion-v1-5/stable-diffusion-v1-5),
# unet/config.json
SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# vae/config.json
SD15_VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# text_encoder/config.json (openai/clip-vit-large-patch14's text tower)
SD15_TEXT = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
# scheduler/scheduler_config.json
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD15_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _randomize(module, seed):
    """Weights with a trained model's scale: matrices N(0, 1/fan_in), norm weights 1 + N(0, 0.02),
    biases N(0, 0.02), embeddings N(0, 0.02). Every tensor distinct (no constant de-duplication)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            n = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "embedding" in name and p.ndim == 2:
                val = 0.02 * n
            elif p.ndim >= 2:
                val = n / (p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                val = 1.0 + 0.02 * n
            else:
                val = 0.02 * n
            p.copy_(val.to(p.dtype))


def _write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def make_model(out, seed, tokenizer):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    os.makedirs(out, exist_ok=True)
    cfg = {k: v for k, v in SD15_UNET.items() if not k.startswith("_")}
    unet = UNet2DConditionModel(**cfg)
    _randomize(unet, seed + 1)
    unet.save_pretrained(os.path.join(out, "unet"), safe_serialization=True)
    vcfg = {k: v for k, v in SD15_VAE.items() if not k.startswith("_")}
    vae = AutoencoderKL(**vcfg)
    _randomize(vae, seed + 2)
    vae.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    tcfg = CLIPTextConfig(**{k: v for k, v in SD15_TEXT.items() if k not in ("architectures", "model_type")})
    te = CLIPTextModel(tcfg)
    _randomize(te, seed + 3)
    te_dir = os.path.join(out, "text_encoder")
    os.makedirs(te_dir, exist_ok=True)
    # transformers 5.x drops `text_model.`; SD 1.5 files (and transformers 4.x) have it
    sd = {k if k.startswith("text_model.") else f"text_model.{k}": v.contiguous() for k, v in te.state_dict().items() if "position_ids" not in k}
    save_file(sd, os.path.join(te_dir, "model.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(te_dir, "config.json"), SD15_TEXT)
    _write_json(os.path.join(out, "scheduler", "scheduler_config.json"), SD15_SCHEDULER)
    _write_json(os.path.join(out, "model_index.json"), SD15_INDEX)
    tok_out = os.path.join(out, "tokenizer")
    os.makedirs(tok_out, exist_ok=True)
    for name in os.listdir(tokenizer):
        shutil.copy(os.path.join(tokenizer, name), os.path.join(tok_out, name))
    n = sum(p.numel() for p in unet.parameters())
    print(f"wrote {out}: UNet {n / 1e6:.1f} M parameters, text encoder, VAE, scheduler, tokenizer")


def make_dataset(out, n, size, seed):
    import numpy as np
    from PIL import Image, ImageDraw

    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (235, 210, 40), "purple": (140, 60, 170)}
    backgrounds = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
    shapes = ["circle", "square", "triangle"]
    rows = []
    for i in range(n):
        cname = list(colors)[rng.integers(len(colors))]
        bname = list(backgrounds)[rng.integers(len(backgrounds))]
        shape = shapes[rng.integers(len(shapes))]
        w = size + int(rng.integers(0, size // 4))  # a few non-square images exercise resize + crop
        h = size
        img = Image.new("RGB", (w, h), backgrounds[bname])
        d = ImageDraw.Draw(img)
        cx, cy, r = w / 2 + rng.integers(-size // 8, size // 8), h / 2 + rng.integers(-size // 8, size // 8), size * (0.2 + 0.15 * rng.random())
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colors[cname])
        elif shape == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colors[cname])
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colors[cname])
        name = f"{i:05d}.png"
        img.save(os.path.join(out, name))
        rows.append({"file_name": name, "text": f"a {cname} {shape} on a {bname} background"})
    with open(os.path.join(out, "metadata.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {out}: {n} images ({size}px shorter side) + metadata.jsonl (file_name, text)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model", help="random SD 1.5-architecture diffusers folder")
    m.add_argument("out")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--tokenizer", default=TINY_TOKENIZER, help="folder with vocab.json + merges.txt")
    d = sub.add_parser("dataset", help="image folder with metadata.jsonl")
    d.add_argument("out")
    d.add_argument("--n", type=int, default=64)
    d.add_argument("--size", type=int, default=512)
    d.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.cmd == "model":
        make_model(a.out, a.seed, a.tokenizer)
    else:
        make_dataset(a.out, a.n, a.size, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
