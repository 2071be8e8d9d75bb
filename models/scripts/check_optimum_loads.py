"""Does optimum load a pipeline folder written by `lorafuse merge`, and generate diffusers' image?

Runs optimum's ORTStableDiffusionPipeline (models/.venv-export) on the merged tiny pipeline with the
settings and initial latents of expected/txt2img_pndm_lora.safetensors (diffusers' StableDiffusionPipeline
with loras/diffusers.safetensors fused at 1.0) and prints the largest pixel difference.

  target/release/lorafuse merge -m models/tiny/onnx -l models/tiny/loras/diffusers.safetensors -o /tmp/merged
  models/.venv-export/bin/python models/scripts/check_optimum_loads.py /tmp/merged
"""

import sys
from pathlib import Path

import torch
from optimum.onnxruntime import ORTStableDiffusionPipeline
from safetensors.torch import load_file

EXPECTED = Path(__file__).resolve().parent.parent / "tiny" / "expected"


def main(merged, fixture="txt2img_pndm_lora"):
    ref = load_file(str(EXPECTED / f"{fixture}.safetensors"))
    pipe = ORTStableDiffusionPipeline.from_pretrained(merged, provider="CPUExecutionProvider")
    print(f"optimum loaded {merged}: {type(pipe).__name__}, scheduler {type(pipe.scheduler).__name__}")
    image = pipe(prompt="a photo of a cat", negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.5,
                 height=64, width=64, latents=ref["init_latents"], output_type="np").images
    got = torch.from_numpy(image).float()
    want = ref["image"]
    print(f"{fixture}: image {tuple(got.shape)}, max |optimum(merged) - diffusers(fused)| = {(got - want).abs().max():.3e}"
          f" (x255: {(got - want).abs().max() * 255:.4f})")


if __name__ == "__main__":
    main(*sys.argv[1:])
