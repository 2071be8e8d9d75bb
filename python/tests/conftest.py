"""Fixtures for the Python package's tests: the shipped tiny pipeline and the release CLI that the
images are compared with (built by README command 1 in CI, or `cargo build --release`)."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "models" / "tiny" / "onnx"
LORAS = ROOT / "models" / "tiny" / "loras"


def cli_path() -> Path:
    if os.environ.get("LORAFUSE_CLI"):
        return Path(os.environ["LORAFUSE_CLI"])
    target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    if not target.is_absolute():
        target = ROOT / target
    return target / "release" / "lorafuse"


@pytest.fixture(scope="session")
def cli():
    """`cli(tmp_path, *args) -> [(pixels, parameters), ...]`: run `lorafuse generate` and read its PNGs."""
    exe = cli_path()
    if not exe.is_file():
        pytest.fail(f"{exe}: no lorafuse CLI (cargo build --release, or set LORAFUSE_CLI)")

    def run(out_dir: Path, *args: str):
        out_dir.mkdir(parents=True, exist_ok=True)
        pattern = out_dir / "cli-{index}.png"
        subprocess.run(
            [str(exe), "generate", "-m", str(TINY), "--device", "cpu", "-o", str(pattern), *args],
            check=True,
            capture_output=True,
        )
        pngs = sorted(out_dir.glob("cli-*.png"), key=lambda p: int(p.stem.split("-")[1]))
        out = []
        for p in pngs:
            with Image.open(p) as img:
                out.append((np.asarray(img.convert("RGB")), img.info["parameters"]))
        return out

    return run


@pytest.fixture
def pipe():
    import lorafuse

    return lorafuse.Pipeline(TINY, "cpu")
