#!/usr/bin/env python3
"""The reference side of tests/learning.rs (run with the repository's .venv: scripts/setup.sh --train
installs diffusers, transformers and peft there). Everything here is diffusers / peft; the picture
metric is models/scripts/shapes.py `read_scene` (docs/tutorial.md).

    check.py latents DIR N SEED                     # DIR/{i}.npy: initial noise [1, 4, 8, 8], float32
    check.py report GUIDANCE MODEL LORA HELDOUT LATENTS_DIR PROMPTS OUT.json NAME=PNG_DIR...

`report` writes JSON: the held-out diffusion loss (diffusers' UNet, peft's LoRA from
`load_lora_weights`) without and with the LoRA at fixed noise and timesteps; for every PNG folder the
scene read from each image; and diffusers' own pictures (same initial latents, PNDM, 25 steps, the
test's GUIDANCE: 1, i.e. no CFG, for the shipped model) without and with the LoRA, with their largest difference in 1/255 from the folders named
`base` and `lora`.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "models" / "scripts"))
import shapes  # noqa: E402

STEPS = 25
HELDOUT_DRAWS = 16  # (timestep, noise) pairs per held-out image


def latents(out, n, seed):
    rng = np.random.default_rng(int(seed))
    Path(out).mkdir(parents=True, exist_ok=True)
    for i in range(int(n)):
        np.save(Path(out) / f"{i}.npy", rng.standard_normal((1, 4, 8, 8)).astype(np.float32))


def heldout_loss(pipe, folder):
    import csv

    import torch
    from PIL import Image

    rows = list(csv.DictReader(open(Path(folder) / "metadata.csv")))
    px = np.stack([np.asarray(Image.open(Path(folder) / r["file_name"]).convert("RGB")) for r in rows])
    x = torch.from_numpy(px).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    ids = pipe.tokenizer([r["en_text"] for r in rows], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    sched = pipe.scheduler
    alphas = torch.tensor(np.asarray(sched.alphas_cumprod), dtype=torch.float32)
    total = 0.0
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        enc = pipe.text_encoder(ids)[0]
        for _ in range(HELDOUT_DRAWS):
            t = torch.randint(0, 1000, (len(rows),), generator=g)
            noise = torch.randn(z.shape, generator=g)
            a = alphas[t].sqrt()[:, None, None, None]
            s = (1 - alphas[t]).sqrt()[:, None, None, None]
            pred = pipe.unet(a * z + s * noise, t, enc).sample
            total += float(torch.nn.functional.mse_loss(pred, noise))
    return total / HELDOUT_DRAWS


def diffusers_images(pipe, prompts, init, guidance):
    import torch

    out = []
    for p, lat in zip(prompts, init):
        img = pipe(p, latents=torch.from_numpy(lat[None]), num_inference_steps=STEPS, guidance_scale=guidance, height=64, width=64, output_type="np").images[0]
        out.append(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8))
    return out


def read_png(path):
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def report(guidance, model, lora, heldout, latents_file, prompts_file, out, *dirs):
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(2)
    guidance = float(guidance)
    prompts = [l for l in Path(prompts_file).read_text().splitlines() if l.strip()]
    init = [np.load(Path(latents_file) / f"{i}.npy")[0] for i in range(len(prompts))]
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    rep = {"prompts": prompts, "heldout_loss": {}, "scenes": {}, "diffusers_max_diff": {}}
    folders = dict(d.split("=", 1) for d in dirs)
    for name, folder in folders.items():
        rep["scenes"][name] = [shapes.read_scene(read_png(Path(folder) / f"{i}.png")) for i in range(len(prompts))]
    rep["heldout_loss"]["base"] = heldout_loss(pipe, heldout)
    base = diffusers_images(pipe, prompts, init, guidance)
    pipe.load_lora_weights(lora)
    rep["heldout_loss"]["lora"] = heldout_loss(pipe, heldout)
    with_lora = diffusers_images(pipe, prompts, init, guidance)
    rep["scenes"]["diffusers_lora"] = [shapes.read_scene(im) for im in with_lora]
    for name, imgs in [("base", base), ("lora", with_lora)]:
        if name in folders:
            d = [int(np.abs(read_png(Path(folders[name]) / f"{i}.png").astype(int) - im.astype(int)).max()) for i, im in enumerate(imgs)]
            rep["diffusers_max_diff"][name] = max(d)
    Path(out).write_text(json.dumps(rep, indent=1))


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    {"latents": latents, "report": report}[cmd](*rest)
