#!/usr/bin/env bash
# Builds the Python package (python/: PyO3 native module + pure-Python lorafuse/) as one abi3 wheel
# for CPython 3.9 and later, with maturin from PyPI (pinned below) in a git-ignored build venv:
#
#   scripts/python-wheel.sh            -> target/wheels/lorafuse-<version>-cp39-abi3-<platform>.whl
#   pip install target/wheels/lorafuse-*.whl    (in any venv; docs/python.md)
#
# The release build shares the target dir (CARGO_TARGET_DIR, default target/) with `cargo build
# --release`, so the library's dependencies built for the CLI or the plugin are reused.
# python/Cargo.lock is used as it is (--locked).
set -euo pipefail
MATURIN_VERSION=1.16.0
root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
venv=$target/python-build
py=${PYTHON:-python3}
if ! "$venv/bin/maturin" --version 2>/dev/null | grep -qx "maturin $MATURIN_VERSION"; then
  echo "python-wheel: installing maturin==$MATURIN_VERSION into $venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip --disable-pip-version-check -q install "maturin==$MATURIN_VERSION"
fi
out=$target/wheels
rm -f "$out"/lorafuse-*.whl
cd "$root"
CARGO_TARGET_DIR=$target "$venv/bin/maturin" build --release --locked \
  --manifest-path python/Cargo.toml --out "$out"
ls "$out"/lorafuse-*.whl
