#!/usr/bin/env python3
"""The tiny fp32 UNet re-saved by onnx with every weight in one external data file: optimum's
layout for models over 2 GB, the fixture of the external-data tests (tests/onnx_tiny.rs,
tests/merge.rs, tests/tiny_models.rs, tests/cli.rs, tests/hostile.rs).

Not committed (3.4 MB, a second copy of tiny/onnx/unet's weights in the tree every GPU-machine
call carries): the tests run it once per test process into a temporary folder
(tests/common `made`), with the project venv that `scripts/setup.sh --train` makes (onnx 1.19.0):

    .venv/bin/python models/scripts/onnx_extdata_unet.py OUT_DIR

make_tiny.py's `check_onnx` runs the same function with onnx 1.23.2 (.venv-ref) for the ORT row of
expected/onnx_check.json. Both onnx versions write the same bytes as the file that was committed
until then (sha256 model.onnx 1fe943c4…, model.onnx_data d11935a4…).

Writes OUT_DIR/onnx-extdata/unet/{model.onnx, model.onnx_data, config.json} from
tiny/onnx/unet/model.onnx (fp32, optimum export).
"""

import shutil
import sys
from pathlib import Path

import onnx

TINY = Path(__file__).resolve().parent.parent / "tiny"
SRC = TINY / "onnx" / "unet" / "model.onnx"


def make(src, out_dir):
    """`onnx.save(load(src), save_as_external_data=True, all_tensors_to_one_file=True,
    location="model.onnx_data", size_threshold=100)` into out_dir, with src's config.json."""
    src, out_dir = Path(src), Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    onnx.save(
        onnx.load(str(src)),
        str(out_dir / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx_data",
        size_threshold=100,
    )
    shutil.copy(src.parent / "config.json", out_dir / "config.json")
    return out_dir / "model.onnx"


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: onnx_extdata_unet.py OUT_DIR")
    if not SRC.exists():
        sys.exit(f"{SRC} missing: run make_tiny.py first")
    out = make(SRC, Path(sys.argv[1]) / "onnx-extdata" / "unet")
    print(f"[onnx_extdata_unet] {out} (onnx {onnx.__version__})", flush=True)


if __name__ == "__main__":
    main()
