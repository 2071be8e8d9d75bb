"""A stand-in for Hugging Face `datasets`, only for running diffusers' example training scripts as a
peer on the GPU machine when the real package cannot be installed there (it needs pyarrow >= 24;
scripts/gpu_train_bench.sh tries the real one first and says which ran). It covers what
examples/text_to_image/train_text_to_image_lora.py uses: `load_dataset("imagefolder", data_files=
{"train": DIR/**})` over a folder with metadata.jsonl (`file_name` + other columns), `column_names`,
`shuffle(seed).select(range)`, `with_transform` (applied to a one-row batch per item, as datasets
does for an integer index) and `utils.logging`. Images are opened lazily with Pillow, as the real
imagefolder decodes them per access."""

import json
import os
import random

from . import utils  # noqa: F401

__version__ = "0.0.0-lorafuse-shim"


class Dataset:
    def __init__(self, rows, transform=None):
        self._rows = rows
        self._transform = transform

    @property
    def column_names(self):
        return list(self._rows[0]) if self._rows else []

    def __len__(self):
        return len(self._rows)

    def __getitem__(self, i):
        row = dict(self._rows[i])
        if "image" in row and isinstance(row["image"], str):
            from PIL import Image

            row["image"] = Image.open(row["image"])
        if self._transform is None:
            return row
        out = self._transform({k: [v] for k, v in row.items()})
        return {k: v[0] for k, v in out.items()}

    def shuffle(self, seed=None):
        rows = list(self._rows)
        random.Random(seed).shuffle(rows)
        return Dataset(rows, self._transform)

    def select(self, indices):
        return Dataset([self._rows[i] for i in indices], self._transform)

    def with_transform(self, transform):
        return Dataset(self._rows, transform)


def load_dataset(name, *args, data_files=None, data_dir=None, **kwargs):
    if name != "imagefolder":
        raise ValueError(f"the datasets shim reads only local imagefolder data, not {name!r}")
    out = {}
    for split, pattern in (data_files or {"train": os.path.join(data_dir, "**")}).items():
        root = pattern[:-3] if pattern.endswith("/**") else pattern
        rows = []
        with open(os.path.join(root, "metadata.jsonl")) as f:
            for line in f:
                if line.strip():
                    meta = json.loads(line)
                    path = os.path.join(root, meta.pop("file_name"))
                    rows.append({"image": path, **meta})
        out[split] = Dataset(rows)
    return out
