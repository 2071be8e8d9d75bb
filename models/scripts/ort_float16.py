#!/usr/bin/env python3
"""The tiny pipeline's fp32 components converted to float16 by ONNX Runtime's own converter, as its
Stable Diffusion optimizer converts them (onnxruntime/python/tools/transformers/models/
stable_diffusion/optimize_pipeline.py `--float16`: `convert_float_to_float16(keep_io_types=False,
op_block_list=["RandomNormalLike"])`, with onnx shape inference for the types): the reference of
tests/float16.rs (`lorafuse optimize --float16`).

Run at test time (tests/common `made`, once per test process) into a temporary folder with the
project venv that `scripts/setup.sh --train` makes (onnxruntime 1.31.1, onnx 1.19.0):

    .venv/bin/python models/scripts/ort_float16.py OUT_DIR

Writes OUT_DIR/onnx-ortfp16/{text_encoder,unet,vae_decoder,vae_encoder}/model.onnx from
tiny/onnx/*/model.onnx (fp32, optimum export), with each component's config.json.
"""

import shutil
import sys
from pathlib import Path

import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16

TINY = Path(__file__).resolve().parent.parent / "tiny"


def main(out):
    for comp in ["text_encoder", "unet", "vae_decoder", "vae_encoder"]:
        src = TINY / "onnx" / comp
        dst = Path(out) / "onnx-ortfp16" / comp
        dst.mkdir(parents=True, exist_ok=True)
        m = convert_float_to_float16(onnx.load(str(src / "model.onnx")), keep_io_types=False, op_block_list=["RandomNormalLike"])
        onnx.save(m, str(dst / "model.onnx"))
        if (src / "config.json").exists():
            shutil.copy(src / "config.json", dst / "config.json")


if __name__ == "__main__":
    main(sys.argv[1])
