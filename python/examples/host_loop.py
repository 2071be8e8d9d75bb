"""lorafuse inside a diffusers-style host: an app written against diffusers'
``StableDiffusionPipeline`` (``pipe(prompt, num_inference_steps=..., guidance_scale=...,
generator=...).images``, ``load_lora_weights``/``set_adapters``) runs on lorafuse's ONNX pipeline
with no other change.

    python python/examples/host_loop.py models/tiny/onnx --lora-dir models/tiny/loras --out outputs/host

The adapter mirrors the diffusers calls it stands in for
(https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion.py,
``StableDiffusionPipeline.__call__``; ``loaders/lora_pipeline.py``, ``load_lora_weights`` and
``set_adapters``). Everything it does not pass on keeps lorafuse's defaults.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import lorafuse


@dataclass
class PipelineOutput:
    """diffusers' ``StableDiffusionPipelineOutput``: ``images`` plus the safety checker's flags
    (lorafuse has no safety checker: ``None``, as diffusers gives without one)."""

    images: List[Any]
    nsfw_content_detected: Optional[List[bool]] = None


def _seed(generator: Any) -> Optional[int]:
    """A seed from what a diffusers host passes as ``generator``: an int, a ``torch.Generator``
    (its ``initial_seed()``), or a list of them (the first: image k uses seed + k in lorafuse)."""
    if generator is None:
        return None
    if isinstance(generator, (list, tuple)):
        return _seed(generator[0]) if generator else None
    if isinstance(generator, int):
        return generator
    return int(generator.initial_seed())


class LorafuseDiffusionPipeline:
    """The subset of ``StableDiffusionPipeline`` a typical host loop calls, over ``lorafuse.Pipeline``."""

    def __init__(self, pipeline: lorafuse.Pipeline, lora_dir: Optional[str] = None) -> None:
        self.pipeline = pipeline
        self.lora_dir = lora_dir
        self._adapters: Dict[str, str] = {}

    @classmethod
    def from_pretrained(cls, path: str, device: Optional[str] = None, **options: Any):
        """``path``: an ONNX pipeline folder (optimum's export). ``device``: "cpu", "cuda", ...;
        ``options``: ``lorafuse.Pipeline``'s (``optimize``, ``cuda_graphs``, ...)."""
        return cls(lorafuse.Pipeline(path, device, **options))

    def load_lora_weights(self, path: str, adapter_name: Optional[str] = None) -> None:
        name = adapter_name or os.path.splitext(os.path.basename(path))[0]
        self._adapters[name] = path
        self.pipeline.set_loras([(p, 1.0) for p in self._adapters.values()])

    def set_adapters(
        self, adapter_names: Union[str, Sequence[str]], adapter_weights: Union[float, Sequence[float], None] = None
    ) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            weights: Sequence[float] = [1.0] * len(names)
        elif isinstance(adapter_weights, (int, float)):
            weights = [float(adapter_weights)] * len(names)
        else:
            weights = list(adapter_weights)
        self.pipeline.set_loras([(self._adapters[n], w) for n, w in zip(names, weights)])

    def unload_lora_weights(self) -> None:
        self._adapters.clear()
        self.pipeline.set_loras([])

    def interrupt(self) -> None:
        """diffusers' ``pipe._interrupt = True``: stop the running call after its current step."""
        self.pipeline.cancel()

    def __call__(
        self,
        prompt: str,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        negative_prompt: Optional[str] = None,
        num_images_per_prompt: Optional[int] = None,
        generator: Any = None,
        output_type: str = "pil",
        callback: Optional[Callable[[int, int], Any]] = None,
    ) -> PipelineOutput:
        images = self.pipeline.generate(
            prompt,
            negative_prompt,
            steps=num_inference_steps,
            guidance_scale=guidance_scale,
            width=width,
            height=height,
            seed=_seed(generator),
            num_images=num_images_per_prompt,
            # A1111 <lora:name:weight> tags in prompts, when the host has a LoRA folder.
            lora_dir=self.lora_dir,
            progress=callback,
            output_type=output_type,
        )
        return PipelineOutput(images=list(images))


def host_loop(pipe: Any, jobs: Sequence[Dict[str, Any]], out_dir: str) -> List[str]:
    """What a host app does with any diffusers-style pipeline: run its queue of jobs and save each
    image with its generation parameters (AUTOMATIC1111's PNG ``parameters`` text)."""
    from PIL.PngImagePlugin import PngInfo

    os.makedirs(out_dir, exist_ok=True)
    written = []
    for n, job in enumerate(jobs):
        out = pipe(**job)
        for k, image in enumerate(out.images):
            info = PngInfo()
            if "parameters" in image.info:
                info.add_text("parameters", image.info["parameters"])
            path = os.path.join(out_dir, f"{n}-{k}.png")
            image.save(path, pnginfo=info)
            written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="ONNX pipeline folder")
    ap.add_argument("--lora-dir", help="folder for <lora:name:weight> prompt tags")
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default="outputs/host")
    a = ap.parse_args(argv)
    pipe = LorafuseDiffusionPipeline.from_pretrained(a.model, a.device)
    pipe.lora_dir = a.lora_dir
    jobs = [
        {"prompt": "a photo of a cat", "num_inference_steps": a.steps, "generator": 42},
        {"prompt": "a photo of a cat <lora:diffusers:0.8>" if a.lora_dir else "a painting of a cat",
         "num_inference_steps": a.steps, "guidance_scale": 6.0, "num_images_per_prompt": 2,
         "callback": lambda step, total: print(f"\rstep {step}/{total}", end="", flush=True)},
    ]
    written = host_loop(pipe, jobs, a.out)
    print()
    for p in written:
        print(p)
    return written


if __name__ == "__main__":
    main()
