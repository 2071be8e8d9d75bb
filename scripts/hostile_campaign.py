#!/usr/bin/env python3
"""A bad-input campaign against the `lorafuse` binary (docs/reliability.md, "Campaign").

Each case runs one command on corrupted, oversized or hostile input made from the tiny pipeline's
fixtures, and is classified: a success (exit 0), a clean error (a message, any other exit
code), a panic (exit 101), an abort or crash (killed by a signal), a hang (over the time
limit), a leftover (a `.*.lorafuse-*` temporary or a `*.part` file stays), a partial output (an
error, yet the output exists) or a changed input (any byte of the input folder differs).

    python3 scripts/hostile_campaign.py --bin target/release/lorafuse --cases 2000 [--seed 1]

Standard library only; deterministic for a given --seed. Prints one row per surface and exits 1
if any case was not clean.
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "tiny"
TIMEOUT = 60


def tree_hash(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        h.update(str(p.relative_to(d)).encode())
        if p.is_symlink():
            h.update(b"L" + os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0 and b:  # truncate
        return bytes(b[: rng.randrange(len(b))])
    if kind == 1 and b:  # flip bytes in the first 4 KiB (headers)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(min(len(b), 4096))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 2 and b:  # flip bytes anywhere
        for _ in range(rng.randint(1, 32)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if kind == 3:  # a huge declared length up front
        return struct.pack("<Q", rng.choice([2**63 - 1, 2**32, 10**12, 0])) + bytes(b[8:])
    if kind == 4 and len(b) > 16:  # NaN/Inf floats written over the data
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(len(b) - 4) & ~3
            b[i : i + 4] = struct.pack("<f", rng.choice([float("nan"), float("inf"), -float("inf"), 3e38]))
        return bytes(b)
    return bytes(b) + os.urandom(rng.randint(1, 64))  # trailing junk


def mutate_safetensors_header(rng: random.Random, data: bytes) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    keys = [k for k in header if k != "__metadata__"]
    if not keys:
        return mutate_bytes(rng, data)
    k = rng.choice(keys)
    t = header[k]
    choice = rng.randrange(5)
    if choice == 0:
        t["shape"] = [rng.choice([10**9, 2**40, 0, 1]) for _ in t["shape"]] or [10**12]
    elif choice == 1:
        t["dtype"] = rng.choice(["I64", "BOOL", "U8", "F64", "F8_E4M3", "XX"])
    elif choice == 2:
        a, b = t["data_offsets"]
        t["data_offsets"] = [a, rng.choice([b * 1000, 2**62, a])]
    elif choice == 3:
        header["__metadata__"] = {"lora_adapter_metadata": rng.choice(
            ['{"unet.r": 0}', '{"unet.r": -4, "unet.lora_alpha": 8}', '{"unet.lora_alpha": 1e39}', "[", '{"unet.use_rslora": true, "unet.r": -1}'])}
    else:
        header[k + rng.choice(["x", ".alpha", ".lora_up.weight"])] = dict(t)
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data[8 + n :]


def npy_bytes(rng: random.Random) -> bytes:
    shape = rng.choice(["(1, 4, 8, 8)", "(10**12,)", "(100000, 4, 100000, 100000)", "()", "(1, 4, 8)", "(-1, 4)", "(18446744073709551615, 2)", "[1,4,8,8]"])
    descr = rng.choice(["<f4", "<f4", ">f4", "<i8", "|b1", "<f2", "<f8", "O"])
    order = rng.choice(["False", "False", "True", "maybe"])
    h = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (descr, order, shape)
    h += " " * ((64 - (10 + len(h) + 1) % 64) % 64) + "\n"
    ver = rng.choice([b"\x01\x00", b"\x02\x00", b"\x09\x00"])
    hl = struct.pack("<H", len(h)) if ver == b"\x01\x00" else struct.pack("<I", len(h))
    data = os.urandom(rng.choice([0, 4, 1024, 4 * 256]))
    out = b"\x93NUMPY" + ver + hl + h.encode() + data
    return out if rng.random() > 0.2 else mutate_bytes(rng, out)


HOSTILE_JSON_VALUES = [10**12, -1, 0, 1e308, "x", None, [], {}, [10**12, 10**12], 2**64, 0.5, True]


def case(rng: random.Random, surface: str, work: Path, binary: str):
    """Build one case; returns (argv, input folder to watch, output path or None, env)."""
    pipe = work / "pipe"
    shutil.copytree(TINY / "onnx", pipe, symlinks=True)
    loras = work / "loras"
    shutil.copytree(TINY / "loras", loras)
    out = work / "out"
    gen = [binary, "generate", "-m", str(pipe), "--steps", "1", "--threads", "1", "-o", str(out / "img.png")]
    if surface == "lora file":
        src = rng.choice(sorted(loras.glob("*.safetensors")))
        data = src.read_bytes()
        bad = mutate_safetensors_header(rng, data) if rng.random() < 0.5 else mutate_bytes(rng, data)
        f = loras / "hostile.safetensors"
        f.write_bytes(bad)
        cmd = rng.choice([
            [binary, "merge", "-m", str(pipe), "-l", f"{f}:{rng.choice(['1', '0.5', '-2'])}", "-o", str(out / "merged")],
            [binary, "inspect", str(f)],
            gen + ["-p", "x", "--lora", str(f)],
        ])
        return cmd, work, out
    if surface == "onnx model":
        comp = rng.choice(["unet", "text_encoder", "vae_decoder"])
        m = pipe / comp / "model.onnx"
        m.write_bytes(mutate_bytes(rng, m.read_bytes()))
        cmd = rng.choice([
            [binary, "merge", "-m", str(pipe), "-l", str(loras / "diffusers.safetensors"), "-o", str(out / "merged")],
            [binary, "inspect", str(pipe)],
            gen + ["-p", "x"],
        ])
        return cmd, work, out
    if surface == "configs":
        f = rng.choice(["scheduler/scheduler_config.json", "unet/config.json", "vae_decoder/config.json", "model_index.json", "tokenizer/tokenizer_config.json"])
        p = pipe / f
        if rng.random() < 0.2:
            p.write_bytes(mutate_bytes(rng, p.read_bytes()))
        else:
            v = json.loads(p.read_text())
            keys = list(v) or ["x"]
            for _ in range(rng.randint(1, 3)):
                v[rng.choice(keys + ["sample_size", "num_train_timesteps", "block_out_channels", "in_channels"])] = rng.choice(HOSTILE_JSON_VALUES)
            p.write_text(json.dumps(v))
        return gen + ["-p", "x"], work, out
    if surface == "npy latents":
        f = work / "lat.npy"
        f.write_bytes(npy_bytes(rng))
        return gen + ["-p", "x", "--init-latents", str(f)], work, out
    if surface == "prompt tags":
        names = ["diffusers", "../loras/diffusers", "/etc/passwd", "kohya:1e30", "x:nan", "", ":", "diffusers:1:2",
                 "a" * 5000, "sub/../../x", "peft:0.5", "\u00e9t\u00e9", "diffusers:-1", "loop"]
        (loras / "loop").symlink_to(loras)
        prompt = " ".join(
            rng.choice(["a cat", "<lora:%s>" % rng.choice(names), "<lora:", ">", "<<lora:x>>", "\x00"[:0] + "\u202e"])
            for _ in range(rng.randint(1, 6)))
        return gen + ["-p", prompt, "--lora-dir", str(loras)], work, out
    if surface == "arguments":
        cmd = gen + ["-p", "x"]
        flag = rng.choice(["-W", "-H", "--steps", "--batch-size", "--num-images", "--threads", "--seed", "--guidance-scale"])
        cmd += [flag, rng.choice(["0", "-1", "100000", "18446744073709551615", "1e30", "nan", "x", "65", "8"])]
        return cmd, work, out
    if surface == "output paths":
        target = rng.randrange(6)
        o = out / "x.png"
        out.mkdir()
        if target == 0:
            os.mkfifo(o)
        elif target == 1:
            o.mkdir()
        elif target == 2:
            o.symlink_to(work / "elsewhere.png")
        elif target == 3:
            return [binary, "merge", "-m", str(pipe), "-l", str(loras / "diffusers.safetensors"), "-o", str(pipe / "new" / "merged")], work, None
        elif target == 4:
            (pipe / "unet" / "model.onnx_data").symlink_to("/etc/hostname")
            return [binary, "merge", "-m", str(pipe), "-l", str(loras / "kohya.safetensors"), "-o", str(out / "merged")], work, out / "merged"
        else:
            (pipe / "tokenizer" / "secret.txt").symlink_to(work / "secret.txt")
            (work / "secret.txt").write_text("secret")
            return [binary, "merge", "-m", str(pipe), "-l", str(loras / "kohya.safetensors"), "-o", str(out / "merged")], work, out / "merged"
        cmd = [binary, "generate", "-m", str(pipe), "--steps", "1", "-p", "x", "-o", str(o)]
        return cmd, work, None
    raise ValueError(surface)


SURFACES = ["lora file", "onnx model", "configs", "npy latents", "prompt tags", "arguments", "output paths"]


def run_one(args):
    i, surface, seed, binary = args
    rng = random.Random(seed * 1_000_003 + i)
    with tempfile.TemporaryDirectory(prefix="lorafuse-campaign-") as d:
        work = Path(d)
        argv, watch, out = case(rng, surface, work, binary)
        # The input is the whole work folder minus the output folder.
        before = {p: tree_hash(p) for p in [work / "pipe", work / "loras"] if p.exists()}
        t0 = time.monotonic()
        try:
            r = subprocess.run(argv, capture_output=True, timeout=TIMEOUT, text=True, errors="replace",
                               env=dict(os.environ, RUST_BACKTRACE="0"))
            code, err = r.returncode, r.stderr
        except subprocess.TimeoutExpired:
            code, err = "hang", ""
        dt = time.monotonic() - t0
        changed = [str(p) for p, h in before.items() if tree_hash(p) != h]
        leftovers = [str(p) for p in work.rglob("*") if ".lorafuse-" in p.name or p.name.endswith(".part")]
        partial = code not in (0, "hang") and out is not None and out.exists() \
            and any(p.is_file() for p in out.rglob("*"))
        if code == "hang":
            verdict = "hang"
        elif code == 101 or "panicked" in err:
            verdict = "panic"
        elif isinstance(code, int) and code < 0:
            verdict = "abort" if code == -signal.SIGABRT else "crash"
        elif changed:
            verdict = "input changed"
        elif leftovers:
            verdict = "leftover"
        elif partial:
            verdict = "partial output"
        else:
            verdict = "clean error" if code != 0 else "success"
        return surface, verdict, dt, argv, err[-400:], code


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "lorafuse"))
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args()
    jobs = [(i, SURFACES[i % len(SURFACES)], a.seed, a.bin) for i in range(a.cases)]
    table = {s: {} for s in SURFACES}
    bad = []
    t0 = time.monotonic()
    with ThreadPoolExecutor(a.jobs) as ex:
        for surface, verdict, dt, argv, err, code in ex.map(run_one, jobs):
            table[surface][verdict] = table[surface].get(verdict, 0) + 1
            if verdict not in ("success", "clean error"):
                bad.append((surface, verdict, code, argv, err))
    cols = ["success", "clean error", "panic", "abort", "crash", "hang", "leftover", "partial output", "input changed"]
    print(f"| surface | cases | {' | '.join(cols)} |")
    print("|---|---:|" + "---:|" * len(cols))
    for s in SURFACES:
        row = table[s]
        print(f"| {s} | {sum(row.values())} | " + " | ".join(str(row.get(c, 0)) for c in cols) + " |")
    print(f"\n{a.cases} cases in {time.monotonic() - t0:.0f} s, seed {a.seed}")
    for surface, verdict, code, argv, err in bad[:20]:
        print(f"\n[{surface}] {verdict} (exit {code}): {' '.join(argv)}\n{err}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
