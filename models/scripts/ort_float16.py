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
tiny/onnx/*/model.onnx (fp32, optimum export), with each component's config.json, and
OUT_DIR/onnx-ortfp16/edge/{fp32,fp16}.onnx: one initializer of the values the converter clamps
(beyond ±65504, below ±5.96e-8, zeros, infinities, NaN, halfway cases) before and after, and
edge/computed{32,16}.onnx: a Resize whose scales are computed and a RandomNormalLike, before and
after.
"""

import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
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

    edge = Path(out) / "onnx-ortfp16" / "edge"
    edge.mkdir(parents=True, exist_ok=True)
    v = np.array([70000.0, -70000.0, 65504.0, 65519.0, 65520.0, 1e-9, -1e-9, 5.96e-8, 3e-8, 0.0, -0.0,
                  np.inf, -np.inf, np.nan, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 0.1, -2.5e-5, 3.4e38], dtype=np.float32)
    init = numpy_helper.from_array(v, "w")
    g = helper.make_graph([helper.make_node("Identity", ["w"], ["y"], name="id")], "edge", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [len(v)])], [init])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(edge / "fp32.onnx"))
    onnx.save(convert_float_to_float16(m, keep_io_types=False), str(edge / "fp16.onnx"))

    # float-only inputs made by computation, and a blocked op: Resize's scales from a Mul of two
    # constants (ORT casts them back to float), RandomNormalLike between casts (times 0, so the
    # output is deterministic)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    const = lambda name, vals: helper.make_node("Constant", [], [name], name=name,
                                                value=numpy_helper.from_array(np.array(vals, dtype=np.float32), name))
    nodes = [const("s1", [1, 1, 2, 2]), const("s2", [1, 1, 1, 1]), const("zero", [0.0]),
             helper.make_node("Mul", ["s1", "s2"], ["scales"], name="scales"),
             helper.make_node("Resize", ["x", "", "scales"], ["up"], name="resize", mode="nearest"),
             helper.make_node("RandomNormalLike", ["up"], ["r"], name="random", seed=1.0),
             helper.make_node("Mul", ["r", "zero"], ["r0"], name="r0"),
             helper.make_node("Add", ["up", "r0"], ["y"], name="y")]
    m = helper.make_model(helper.make_graph(nodes, "computed", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, str(edge / "computed32.onnx"))
    onnx.save(convert_float_to_float16(m, keep_io_types=False, op_block_list=["RandomNormalLike"]),
              str(edge / "computed16.onnx"))


if __name__ == "__main__":
    main(sys.argv[1])
