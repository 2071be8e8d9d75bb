"""lorafuse for Python hosts: LoRA merging and text-to-image for ONNX Stable Diffusion 1.x pipelines.

A thin door over the Rust library, like the ``lorafuse`` CLI and the C ABI (``plugin-api/``): the
native module ``lorafuse._lorafuse`` converts arguments and calls the library; this file only turns
its raw results into PIL images, numpy arrays and dicts. Every argument left as ``None`` takes the
library's default (``DEFAULT_STEPS``, ``DEFAULT_GUIDANCE_SCALE``, the pipeline's own size and
scheduler, ...). docs/python.md has the guide.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple, Union

from . import _lorafuse
from ._lorafuse import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_STEPS,
    Cancelled,
    FileError,
    InternalError,
    LorafuseError,
    UserError,
    __version__,
)

__all__ = [
    "Pipeline",
    "Images",
    "merge",
    "inspect",
    "onnx_runtime",
    "LorafuseError",
    "UserError",
    "FileError",
    "InternalError",
    "Cancelled",
    "DEFAULT_STEPS",
    "DEFAULT_GUIDANCE_SCALE",
    "__version__",
]

PathLike = Union[str, "os.PathLike[str]"]
# "FILE[:WEIGHT]" (the CLI's --lora syntax), a path, or (path, weight).
LoraArg = Union[PathLike, Tuple[PathLike, float]]
Progress = Callable[[int, int], Optional[bool]]


def _lora_list(loras: Iterable[LoraArg]) -> list:
    return [(os.fspath(l[0]), l[1]) if isinstance(l, tuple) else os.fspath(l) for l in loras]


class Images(list):
    """The images of one ``generate`` call (a list), with what the library reports beside them.

    ``parameters[i]`` is image i's AUTOMATIC1111 ``parameters`` text (also ``image.info["parameters"]``
    on PIL images), ``seeds[i]`` its seed, ``prompt_truncated`` whether the prompt (or negative prompt)
    was longer than 77 CLIP tokens.
    """

    parameters: List[str]
    seeds: List[int]
    prompt_truncated: bool


def _to_images(raw: list, truncated: bool, output_type: str) -> Images:
    if output_type == "pil":
        from PIL import Image

        def convert(w: int, h: int, rgb: bytes, parameters: str) -> Any:
            img = Image.frombytes("RGB", (w, h), rgb)
            img.info["parameters"] = parameters
            return img

    elif output_type == "np":
        import numpy as np

        def convert(w: int, h: int, rgb: bytes, parameters: str) -> Any:
            return np.frombuffer(rgb, dtype=np.uint8).reshape(h, w, 3).copy()

    else:
        raise UserError(f'output_type {output_type!r}: expected "pil" or "np"')
    out = Images(convert(w, h, rgb, p) for (w, h, rgb, p, _) in raw)
    out.parameters = [p for (_, _, _, p, _) in raw]
    out.seeds = [s for (_, _, _, _, s) in raw]
    out.prompt_truncated = truncated
    return out


class Pipeline:
    """An ONNX Stable Diffusion pipeline folder (optimum layout), open for generation.

    ``device``: "auto" (CUDA if its provider loads, else the CPU; the library's default), "cpu",
    "cuda" or "cuda:N". The keyword options are the CLI's and the C ABI's pipeline options:
    ``threads``, ``tf32``, ``optimize``, ``float16`` (with ``optimize``: float16 graphs in memory), ``cuda_graphs``, ``cuda_io_binding``, ``cuda_mem_limit``
    (bytes or "8GiB"), ``cudnn_conv_algo`` ("heuristic", the default; "exhaustive"; "default"),
    ``cuda_conv_layout`` ("auto", "nchw", "nhwc"), ``lora_mode`` ("switch": LoRAs change live in
    milliseconds, the default for a live pipeline; "rebuild"), ``ort_lib`` (the ONNX Runtime library;
    default: the one this process holds, ``ORT_DYLIB_PATH``, this environment's ``onnxruntime``
    package, then lorafuse's search order).

    Thread-safe: the GIL is released while it works; one call at a time (a concurrent call raises
    ``UserError``); ``cancel()`` may be called from any thread or from the progress callback.
    """

    def __init__(self, path: PathLike, device: Optional[str] = None, **options: Any) -> None:
        if "ort_lib" in options and options["ort_lib"] is not None:
            options["ort_lib"] = os.fspath(options["ort_lib"])
        self._native = _lorafuse.Pipeline(os.fspath(path), device, **options)
        self.path = os.fspath(path)

    def generate(
        self,
        prompt: str,
        negative_prompt: Optional[str] = None,
        *,
        steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        width: Optional[int] = None,
        height: Optional[int] = None,
        seed: Optional[int] = None,
        scheduler: Optional[str] = None,
        num_images: Optional[int] = None,
        batch_size: Optional[int] = None,
        loras: Optional[Sequence[LoraArg]] = None,
        lora_dir: Optional[PathLike] = None,
        progress: Optional[Progress] = None,
        output_type: str = "pil",
        model_hash: Optional[str] = None,
    ) -> Images:
        """Generate ``num_images`` images (image k uses ``seed + k``), pixels identical to
        ``lorafuse generate`` with the same arguments.

        ``loras`` and/or ``lora_dir`` first make the active LoRA set: the listed LoRAs plus the
        prompt's ``<lora:name:weight>`` tags resolved in ``lora_dir`` (as ``lorafuse generate --lora
        ... --lora-dir``); without either, the set of ``set_loras`` stays and tags are plain text.
        ``progress(step, total)`` is called after every step over the whole request; returning
        ``False`` stops with ``Cancelled``, and an exception it raises stops and propagates.
        ``output_type``: "pil" (``PIL.Image.Image``, needs Pillow) or "np" (``uint8`` arrays
        ``[h, w, 3]``, needs numpy). ``model_hash``: A1111's ``Model hash`` in the parameters
        text, the checkpoint the pipeline came from (hashed as A1111 does) or its hash (as
        ``lorafuse generate --model-hash``).
        """
        raw, truncated = self._native.generate(
            prompt,
            negative_prompt,
            steps=steps,
            guidance_scale=guidance_scale,
            width=width,
            height=height,
            seed=seed,
            scheduler=scheduler,
            num_images=num_images,
            batch_size=batch_size,
            loras=None if loras is None else _lora_list(loras),
            lora_dir=None if lora_dir is None else os.fspath(lora_dir),
            progress=progress,
            model_hash=None if model_hash is None else os.fspath(model_hash),
        )
        return _to_images(raw, truncated, output_type)

    def set_loras(
        self,
        loras: Sequence[LoraArg],
        *,
        strict: Optional[bool] = None,
        unet_scale: Optional[float] = None,
        text_encoder_scale: Optional[float] = None,
    ) -> List[dict]:
        """Replace the active LoRA set (``[]``: the base weights) without writing files; returns one
        report per LoRA (dialect, modules per component, unmapped keys). On error the pipeline keeps
        its previous set."""
        return json.loads(
            self._native.set_loras(
                _lora_list(loras),
                strict=strict,
                unet_scale=unet_scale,
                text_encoder_scale=text_encoder_scale,
            )
        )

    @property
    def loras(self) -> List[Tuple[str, float]]:
        """The active LoRAs as (path, weight)."""
        return [(os.fspath(p), w) for (p, w) in self._native.loras]

    @property
    def lora_mode(self) -> str:
        return self._native.lora_mode

    def cancel(self) -> None:
        """Stop the running ``generate`` after its current step; it raises ``Cancelled``."""
        self._native.cancel()


def merge(
    src: PathLike,
    out: PathLike,
    loras: Sequence[LoraArg],
    *,
    strict: Optional[bool] = None,
    unet_scale: Optional[float] = None,
    text_encoder_scale: Optional[float] = None,
    dry_run: bool = False,
) -> dict:
    """Bake ``loras`` into a new pipeline folder ``out`` (ONNX or diffusers layout, as ``src``);
    the folder appears whole or not at all and ``src`` is never modified. Returns the report
    (``lorafuse merge``'s)."""
    return json.loads(
        _lorafuse.merge(
            os.fspath(src),
            os.fspath(out),
            _lora_list(loras),
            strict=strict,
            unet_scale=unet_scale,
            text_encoder_scale=text_encoder_scale,
            dry_run=dry_run,
        )
    )


def inspect(path: PathLike) -> dict:
    """What a pipeline folder, ONNX model or safetensors (LoRA) file holds: the document of
    ``lorafuse inspect --json``."""
    return json.loads(_lorafuse.inspect(os.fspath(path)))


def onnx_runtime(ort_lib: Optional[PathLike] = None) -> Tuple[str, str]:
    """Load ONNX Runtime as ``Pipeline`` does; returns (library path, the rule that found it)."""
    path, rule = _lorafuse.onnx_runtime(None if ort_lib is None else os.fspath(ort_lib))
    return os.fspath(path), rule
