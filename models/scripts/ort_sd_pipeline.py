#!/usr/bin/env python3
"""ONNX Runtime's own Stable Diffusion optimizer, as its authors run it: the installed onnxruntime's
`transformers/models/stable_diffusion/optimize_pipeline.py -i FP32 -o OUT --float16` (fusions on the
fp32 graphs first, then fp16), over an optimum-layout fp32 pipeline. The peer graph of
docs/benchmarks.md (issue 10): what a user who wants ORT's speed without LoRAs gets today.

    python3 models/scripts/ort_sd_pipeline.py FP32_PIPELINE OUT_PIPELINE [optimize_pipeline.py options]

One compatibility fix, nothing else changed: with NumPy >= 2.4 the UNet attention fusion's head
count detection (`FusionAttentionUnet.get_num_heads`, torch 2 exports) calls int() on a shape-[1]
array, which NumPy now refuses, so no attention would be fused; the replacement reads the same
constant with `.item()`.
"""

import logging
import os
import runpy
import sys

import numpy as np
import onnxruntime

TOOLS = os.path.join(os.path.dirname(onnxruntime.__file__), "transformers")
SCRIPT = os.path.join(TOOLS, "models", "stable_diffusion", "optimize_pipeline.py")


def num_heads_from_shape(self, reshape_q, is_torch2=False):
    """The head count of a Q reshape: `[0, 0, heads, head_size]` as a Concat (torch 2) or a constant."""
    if is_torch2:
        parent = self.model.get_parent(reshape_q, 1)
        if parent is None or parent.op_type != "Concat" or len(parent.input) != 4:
            return 0
        value = self.model.get_constant_value(parent.input[2])
        heads = int(np.asarray(value).reshape(-1)[0]) if value is not None and np.size(value) == 1 else 0
    else:
        value = self.model.get_constant_value(reshape_q.input[1])
        heads = int(value[2]) if isinstance(value, np.ndarray) and list(value.shape) == [4] else 0
    return heads if heads > 0 else 0


def main():
    if len(sys.argv) < 3:
        sys.exit("usage: ort_sd_pipeline.py FP32_PIPELINE OUT_PIPELINE [optimize_pipeline.py options]")
    src, out, *extra = sys.argv[1:]
    sys.path[:0] = [TOOLS, os.path.dirname(SCRIPT)]
    import fusion_attention_unet

    fusion_attention_unet.FusionAttentionUnet.get_num_heads = num_heads_from_shape
    logging.basicConfig(format="[ort_sd_pipeline] %(funcName)s: %(message)s", level=logging.INFO)
    print(f"[ort_sd_pipeline] onnxruntime {onnxruntime.__version__}, numpy {np.__version__}: {SCRIPT}", flush=True)
    sys.argv = [SCRIPT, "-i", src, "-o", out, "--float16", *extra]
    runpy.run_path(SCRIPT, run_name="__main__")


if __name__ == "__main__":
    main()
