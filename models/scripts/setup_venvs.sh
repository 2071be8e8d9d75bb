#!/usr/bin/env bash
# Creates models/.venv-ref and models/.venv-export (both git-ignored) and installs the pinned
# requirements. Idempotent: an existing venv is reused and pip only installs what is missing.
# Needs python3 (3.11 used) and PyPI. torch 2.11.0 from PyPI is the CUDA 13 build (~4 GB with its
# nvidia-* wheels); it runs on CPU. pip's cache makes the second venv fast.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
for name in ref export; do
  venv="$here/.venv-$name"
  req="$here/requirements-$name.txt"
  lock="$here/requirements-$name.lock.txt"  # every transitive package pinned (pip freeze)
  if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv "$venv"
  fi
  stamp="$venv/.requirements.sha256"
  want="$(cat "$req" "$lock" | sha256sum | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "setup_venvs: .venv-$name up to date"
    continue
  fi
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" -c "$lock"
  echo "$want" > "$stamp"
  echo "setup_venvs: .venv-$name installed from $(basename "$req")"
done
