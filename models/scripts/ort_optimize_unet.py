#!/usr/bin/env python3
"""The tiny UNet as ONNX Runtime's own transformer optimizer leaves it: the fixtures of
tests/packed_lora.rs (LoRAs on packed attention weights, docs/ARCHITECTURE.md §4c).

tests/packed_lora.rs runs it at test time (tests/common `made`, once per test process) into a
temporary folder (the fixtures are not committed: 3.3 MB each would grow the tree every
GPU-machine call carries), with the project venv that `scripts/setup.sh --train` makes
(onnxruntime 1.31.1, onnx 1.19.0, numpy 2.2.6, sympy):

    .venv/bin/python models/scripts/ort_optimize_unet.py OUT_DIR

numpy 2.4 breaks the optimizer on torch 2.x exports: fusion_attention_unet.get_num_heads calls
int() on a shape-[1] array, which numpy 2.4 refuses; 2.2 only warns.

Writes, from tiny/onnx/unet/model.onnx (fp32, optimum export):
- OUT_DIR/onnx-ortopt/unet/model.onnx: enable_packed_qkv + enable_packed_kv. Self-attention Q/K/V
  become one MatMul `[C, N·3·H]` interleaved per head, cross-attention K/V one `[C_ctx, N·2·H]`,
  each Reshaped to `[0, 0, N, 3|2, H]` into com.microsoft.MultiHeadAttention. ORT has no CPU
  kernel for packed QKV, so this graph runs on CUDA only.
- OUT_DIR/onnx-ortopt-attention/unet/model.onnx: packing off. Self-attention becomes
  com.microsoft.Attention with a stacked `qkv_weight` `[C, 3·C]` (Q | K | V); cross-attention
  keeps its three MatMuls into MultiHeadAttention. Runs on the CPU provider.

- OUT_DIR/onnx-ortopt-nhwc/unet/model.onnx: as onnx-ortopt-attention, plus enable_nhwc_conv
  (what the optimizer does for SD UNets on CUDA, onnx_model_unet.py `FusionNhwcConv(update_weight=True)`):
  every 4-D Conv becomes com.microsoft.NhwcConv `NhwcConv_<k>-<conv name>` between Transposes,
  its weight a new initializer `NhwcConv_<k>_weight_NHWC` `[O, kH, kW, I]` (CUDA only).

Olive-style (fp16, CUDA only: GroupNorm has no CPU kernel), as Olive's OrtTransformersOptimization
pass makes them (microsoft/Olive examples/stable_diffusion/config_unet.json: the optimizer, then
`convert_float_to_float16` with `op_block_list=["RandomNormalLike"]`,
`force_fp16_inputs={"GroupNorm": [0, 1, 2]}`, `keep_io_types=False`):
- OUT_DIR/onnx-olive/unet/model.onnx: the "optimize" pass's fusion options (packed QKV and KV,
  GroupNorm, no NHWC convolutions);
- OUT_DIR/onnx-olive-cuda/unet/model.onnx: the "optimize_cuda" pass (the optimizer's defaults for
  unet: also NhwcConv, SkipGroupNorm, BiasSplitGelu, BiasAdd).

In the first three, GroupNorm, BiasAdd and BiasSplitGelu stay off (no CPU kernels; they touch no
LoRA weight). Each
packed or NHWC weight is checked against the layout tests/packed_lora.rs assumes before anything
is written.
"""

import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.transformers.fusion_options import FusionOptions
from onnxruntime.transformers.optimizer import optimize_model

TINY = Path(__file__).resolve().parent.parent / "tiny"
SRC = TINY / "onnx" / "unet" / "model.onnx"


def log(msg):
    print(f"[ort_optimize_unet] {msg}", flush=True)


# Olive's "optimize" pass for the SD UNet (examples/stable_diffusion/config_unet.json)
OLIVE_OPTIONS = dict(
    enable_gelu=True,
    enable_layer_norm=True,
    enable_attention=True,
    use_multi_head_attention=True,
    enable_skip_layer_norm=False,
    enable_embed_layer_norm=True,
    enable_bias_skip_layer_norm=False,
    enable_bias_gelu=True,
    enable_gelu_approximation=False,
    enable_qordered_matmul=False,
    enable_shape_inference=True,
    enable_gemm_fast_gelu=False,
    enable_nhwc_conv=False,
    enable_group_norm=True,
    enable_bias_splitgelu=False,
    enable_packed_qkv=True,
    enable_packed_kv=True,
    enable_bias_add=False,
    group_norm_channels_last=False,
)


def optimize(out_dir, packed, nhwc=False, olive=None):
    opts = FusionOptions("unet")
    if olive is None:
        opts.enable_packed_qkv = packed
        opts.enable_packed_kv = packed
        opts.enable_group_norm = False
        opts.enable_skip_group_norm = False
        opts.enable_nhwc_conv = nhwc
        opts.enable_bias_add = False
        opts.enable_bias_splitgelu = False
    else:
        for k, v in olive.items():
            setattr(opts, k, v)
    # use_gpu=True: the optimizer emits MultiHeadAttention (packed or not) only for GPU targets.
    m = optimize_model(
        str(SRC),
        model_type="unet",
        num_heads=0,
        hidden_size=0,
        opt_level=0,
        optimization_options=opts,
        use_gpu=True,
    )
    if olive is not None:
        m.convert_float_to_float16(keep_io_types=False, op_block_list=["RandomNormalLike"], force_fp16_inputs={"GroupNorm": [0, 1, 2]})
    log(f"{out_dir.parent.name}: {m.get_fused_operator_statistics()}")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "model.onnx"
    m.save_model_to_file(str(out))
    shutil.copy(SRC.parent / "config.json", out_dir / "config.json")
    return out


def weights(path):
    g = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    by_node = {}
    for n in g.node:
        if n.op_type == "MatMul" and n.input[1] in inits:
            by_node[n.name] = inits[n.input[1]]
    return g, inits, by_node


def check_packing(src, packed_path):
    """Every packed weight equals the export's Q/K/V ([in, out] each) interleaved per head."""
    _, _, plain = weights(src)
    g, inits, _ = weights(packed_path)
    prod = {o: n for n in g.node for o in n.output}
    checked = 0
    for n in g.node:
        if n.op_type not in ("MultiHeadAttention", "Attention"):
            continue
        heads = next(a.i for a in n.attribute if a.name == "num_heads")
        out_mm = n
        # attention path from the to_out.0 MatMul reading the attention output
        for c in g.node:
            if n.output[0] in c.input and c.op_type == "MatMul":
                out_mm = c
        attn = out_mm.name.rsplit("/to_out.0/", 1)[0]
        if n.op_type == "Attention":
            w = inits[n.input[1]]
            parts = [plain[f"{attn}/to_{p}/MatMul"] for p in "qkv"]
            want = np.concatenate(parts, axis=1)
        else:
            src_in = n.input[0] if len(n.input) == 1 or n.input[1] == "" else n.input[1]
            names = "qkv" if src_in == n.input[0] else "kv"
            reshape = prod.get(src_in)
            if reshape is None or reshape.op_type != "Reshape":
                continue  # separate Q, K, V
            w = inits[prod[reshape.input[0]].input[1]]
            parts = [plain[f"{attn}/to_{p}/MatMul"] for p in names]
            c, hidden = parts[0].shape
            hd = hidden // heads
            want = np.stack([p.reshape(c, heads, hd) for p in parts], axis=2).reshape(c, -1)
        assert np.array_equal(w, want), f"{n.name}: packing differs from the assumed layout"
        checked += 1
    log(f"{packed_path.parent.parent.name}: {checked} packed weights match the assumed layout")
    assert checked > 0


def check_nhwc(src, nhwc_path):
    """Every NhwcConv weight is the export's Conv weight (the node named after `-`) as [O, kH, kW, I]."""
    g = onnx.load(str(src)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    plain = {n.name: inits[n.input[1]] for n in g.node if n.op_type == "Conv" and n.input[1] in inits}
    g = onnx.load(str(nhwc_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    checked = 0
    for n in g.node:
        if n.op_type != "NhwcConv":
            continue
        conv = n.name.split("-", 1)[1]
        want = plain[conv].transpose(0, 2, 3, 1)
        assert np.array_equal(inits[n.input[1]], want), f"{n.name}: weight is not the export's in NHWC"
        checked += 1
    log(f"{nhwc_path.parent.parent.name}: {checked} NhwcConv weights match the export's, NHWC")
    assert checked > 0


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: ort_optimize_unet.py OUT_DIR")
    if not SRC.exists():
        sys.exit(f"{SRC} missing: run make_tiny.py first")
    root = Path(sys.argv[1])
    for name, packed, nhwc in (
        ("onnx-ortopt", True, False),
        ("onnx-ortopt-attention", False, False),
        ("onnx-ortopt-nhwc", False, True),
    ):
        out = optimize(root / name / "unet", packed, nhwc)
        check_packing(SRC, out)
        if nhwc:
            check_nhwc(SRC, out)
    # Olive-style fp16 graphs ("optimize_cuda": the optimizer's own defaults)
    for name, olive in (("onnx-olive", OLIVE_OPTIONS), ("onnx-olive-cuda", {})):
        out = optimize(root / name / "unet", True, olive=olive)
        stats = onnx.load(str(out)).graph.initializer
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in stats), f"{name}: not fp16"


if __name__ == "__main__":
    main()
