#!/usr/bin/env python3
"""Loads a LoRA written by `lorafuse train` into diffusers and draws one picture (docs/tutorial.md).

    python docs/examples/diffusers_lora.py MODEL_DIR LORA_FILE "PROMPT" OUT.png [SEED [GUIDANCE]]

MODEL_DIR is a diffusers folder (models/tiny/diffusers); LORA_FILE a .safetensors LoRA
(`pytorch_lora_weights.safetensors` or a renamed copy). CPU, 25 PNDM steps, CFG 7.5 unless GUIDANCE
is given (the shipped tiny model is used at 1: models/README.md), 64x64.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

model, lora, prompt, out = sys.argv[1:5]
seed = int(sys.argv[5]) if len(sys.argv) > 5 else 0
guidance = float(sys.argv[6]) if len(sys.argv) > 6 else 7.5
pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True, safety_checker=None)
pipe.set_progress_bar_config(disable=True)
lora = Path(lora)
pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
image = pipe(prompt, num_inference_steps=25, guidance_scale=guidance, height=64, width=64,
             generator=torch.Generator().manual_seed(seed)).images[0]
Path(out).parent.mkdir(parents=True, exist_ok=True)
image.save(out)
print(f"wrote {out}")
