#!/usr/bin/env python3
"""Seed corpora that are not plain copies of fixtures (scripts/fuzz.sh calls this).

Standard library only. Usage: seeds.py CORPUS_DIR (with one sub-folder per target), run from
the repository root. The fixture copies (safetensors, onnx, scheduler_config.json) are made
by scripts/fuzz.sh itself.
"""

import json
import pathlib
import struct
import sys

corpus = pathlib.Path(sys.argv[1])
models = pathlib.Path("models")


def put(target, name, data):
    if isinstance(data, str):
        data = data.encode()
    (corpus / target / f"seed-{name}").write_bytes(data)


# ---- lora_keys: tensor names of every small safetensors fixture (8-byte LE length, JSON header)
seen = set()
for f in sorted(models.rglob("*.safetensors")):
    if f.stat().st_size >= 1 << 20:
        continue
    with f.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    keys = [k for k in header if k != "__metadata__"]
    stem = "_".join(f.relative_to(models).with_suffix("").parts)
    put("lora_keys", f"{stem}.txt", "\n".join(keys[:40]))
    if "loras" in f.parts:
        # one key of each distinct shape (the name without digits)
        for k in keys:
            shape = "".join(c for c in k if not c.isdigit())
            if shape not in seen:
                seen.add(shape)
                put("lora_keys", f"key-{len(seen)}.txt", k)

# ---- prompt_tags: A1111 tags, including hostile names
prompts = [
    "a cat <lora:style:0.7> in a hat",
    "<lora:style>",
    "<lora:style:1.0>, <lora:nested:-0.5> two tags",
    "<lora:sub/nested:1>",
    "<lora:nested>",
    "<lora:escape:1>",
    "<lora:escape.safetensors>",
    "<lora:outside/secret:1>",
    "<lora:outside/loras/style:1>",
    "<lora:secret>",
    "<lora:style.safetensors:1>",
    "<lora:../x:1>",
    "<lora:../../../../etc/passwd:1>",
    "<lora:/etc/passwd:1>",
    "<lora:/etc/hostname>",
    "<lora:..:1>",
    "<lora:.:1>",
    "<lora:sub/../style:1>",
    "<lora:<lora:style:1>:1>",
    "<<lora:style>>",
    "<lora:style:1:2>",
    "<lora::1>",
    "<lora:style:nan>",
    "<lora:style:1e39>",
    "<lora:style",
    "no tags <here>",
    "<lora:st\u00e9le:\u0661>",
]
for i, p in enumerate(prompts):
    put("prompt_tags", f"{i:02}.txt", p)


# ---- npy: format 1.0 / 2.0 headers written by hand (numpy's format.py layout)
def npy(descr, shape, payload, fortran=False, version=1):
    d = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (
        descr,
        "True" if fortran else "False",
        "(%s)" % "".join(f"{s}, " for s in shape) if len(shape) != 1 else f"({shape[0]},)",
    )
    len_size = 2 if version == 1 else 4
    fixed = 6 + 2 + len_size
    pad = -(fixed + len(d) + 1) % 64
    d = d + " " * pad + "\n"
    size = struct.pack("<H" if version == 1 else "<I", len(d))
    return b"\x93NUMPY" + bytes([version, 0]) + size + d.encode("latin1") + payload


vals = [0.5, -1.0, 2.25, 3.0, -0.0, 1e-3]
put("npy", "f4_2x3.npy", npy("<f4", (2, 3), struct.pack("<6f", *vals)))
put("npy", "f8_6.npy", npy("<f8", (6,), struct.pack("<6d", *vals)))
put("npy", "f2_3.npy", npy("<f2", (3,), struct.pack("<3e", *vals[:3])))
put("npy", "be_f4_2.npy", npy(">f4", (2,), struct.pack(">2f", *vals[:2])))
put("npy", "f4_fortran.npy", npy("<f4", (3, 2), struct.pack("<6f", *vals), fortran=True))
put("npy", "f4_scalar.npy", npy("<f4", (), struct.pack("<f", 7.0)))
put("npy", "f4_empty.npy", npy("<f4", (0, 4), b""))
put("npy", "i8_2.npy", npy("<i8", (2,), struct.pack("<2q", 1, -2)))
put("npy", "f4_v2.npy", npy("<f4", (2,), struct.pack("<2f", 1.0, 2.0), version=2))
put("npy", "f4_short.npy", npy("<f4", (4,), struct.pack("<2f", 1.0, 2.0)))

# ---- scheduler_config: variants beside the fixtures' scheduler_config.json
base = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
}
variants = {
    "euler_karras": {"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True},
    "dpm_sde": {
        "_class_name": "DPMSolverMultistepScheduler",
        "algorithm_type": "sde-dpmsolver++",
        "solver_order": 3,
        "use_lu_lambdas": True,
        "final_sigmas_type": "zero",
    },
    "ddpm_vpred": {
        "_class_name": "DDPMScheduler",
        "prediction_type": "v_prediction",
        "variance_type": "fixed_small_log",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
    },
    "lms_exp": {"_class_name": "LMSDiscreteScheduler", "use_exponential_sigmas": True},
    "ddim_defaults": {
        "_class_name": "DDIMScheduler",
        "clip_sample": True,
        "thresholding": True,
        "_use_default_values": ["beta_start", "thresholding"],
    },
    "trained_betas": {"num_train_timesteps": 4, "trained_betas": [0.1, 0.2, 0.3, 0.4]},
}
for name, v in variants.items():
    put("scheduler_config", f"{name}.json", json.dumps({**base, **v}, indent=1))
put(
    "scheduler_config",
    "python_specials.json",
    '{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,'
    ' "sigma_min": NaN, "sigma_max": Infinity, "beta_schedule": "squaredcos_cap_v2"}',
)

# ---- onnx: a model whose one initializer lives in weights.bin (the folder the target sets up)
def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(num, wire, payload):
    key = varint(num << 3 | wire)
    if wire == 0:
        return key + varint(payload)
    return key + varint(len(payload)) + payload


def entry(k, v):
    return field(1, 2, k.encode()) + field(2, 2, v.encode())


tensor = (
    field(1, 0, 4) + field(1, 0, 4)  # dims [4, 4]
    + field(2, 0, 1)  # FLOAT
    + field(8, 2, b"proj.weight")
    + field(13, 2, entry("location", "weights.bin"))
    + field(13, 2, entry("offset", "64"))
    + field(13, 2, entry("length", "64"))
    + field(14, 0, 1)  # EXTERNAL
)
node = (
    field(1, 2, b"x") + field(1, 2, b"proj.weight") + field(2, 2, b"y")
    + field(3, 2, b"/proj/MatMul") + field(4, 2, b"MatMul")
)
graph = field(1, 2, node) + field(2, 2, b"g") + field(5, 2, tensor)
model = field(1, 0, 8) + field(7, 2, graph) + field(8, 2, field(2, 0, 17))
put("onnx", "external_weights_bin.onnx", model)
