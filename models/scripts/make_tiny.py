#!/usr/bin/env python3
"""Fixture generator for lorafuse: a tiny random-weight SD 1.x pipeline plus reference outputs.

Everything here is computed by diffusers / transformers / peft / optimum (never by lorafuse itself).
Run with the reference venv (see scripts/setup_venvs.sh):

    models/.venv-ref/bin/python models/scripts/make_tiny.py            # every step, in order
    models/.venv-ref/bin/python models/scripts/make_tiny.py loras ...  # chosen steps only

The ONNX steps run scripts/export_onnx.py inside models/.venv-export (optimum needs transformers 4.x).
One function per artifact (like onnxruntime's generate-models.py); every random draw comes from a
fixed seed, so re-running gives the same files.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import ast  # noqa: E402
import copy  # noqa: E402
import gzip  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger("transformers").setLevel(logging.ERROR)
import diffusers.utils.logging as _dlog  # noqa: E402
import transformers.utils.logging as _tlog  # noqa: E402

_dlog.disable_progress_bar()
_dlog.set_verbosity_error()
_tlog.disable_progress_bar()
_tlog.set_verbosity_error()

torch.set_num_threads(2)
torch.use_deterministic_algorithms(True)

MODELS = Path(__file__).resolve().parents[1]
TINY = MODELS / "tiny"
DIFF = TINY / "diffusers"
ONNX = TINY / "onnx"
ONNX16 = TINY / "onnx-fp16"
ONNX_DYN = TINY / "onnx-dynamo"
EXPECTED = TINY / "expected"
LORAS = TINY / "loras"
DATASET = TINY / "dataset"
CONCEPT = TINY / "concept"
CONCEPT_HELDOUT = TINY / "concept-heldout"
EXPORT_PY = MODELS / ".venv-export" / "bin" / "python"
OPEN_CLIP_VERSION = "3.3.0"

# SD 1.5's scheduler/scheduler_config.json, verbatim (timestep_spacing "leading" and
# prediction_type "epsilon" are diffusers' defaults, not written in the original file).
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=24,
    attention_head_dim=4,
    norm_num_groups=8,
    use_linear_projection=False,
)
TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    projection_dim=24,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.18215,
)

SEED_UNET, SEED_TEXT, SEED_VAE = 1001, 1002, 1003
PROMPTS_IO = ["a photo of a cat", "an oil painting of a lighthouse at night, dramatic lighting"]


# ----------------------------------------------------------------------------- helpers


def gen(seed):
    return torch.Generator("cpu").manual_seed(seed)


def randn(shape, seed, scale=1.0, dtype=torch.float32):
    return (torch.randn(shape, generator=gen(seed), dtype=torch.float64) * scale).to(dtype)


def save_tensors(path, tensors, metadata=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for k, v in tensors.items():
        t = v.detach().cpu().contiguous() if isinstance(v, torch.Tensor) else torch.tensor(v)
        out[k] = t.clone()
    save_file(out, str(path), metadata=metadata)


def canonicalize_safetensors(path):
    """Sort the `__metadata__` entries of a safetensors header.

    The safetensors writer keeps metadata in a Rust HashMap, so a file with two or more metadata keys
    comes out with a different key order (different bytes) on every run. Rewrite the header with the
    metadata sorted and the tensor entries untouched; data offsets are relative to the end of the
    header, so only the header changes (padded with spaces to 8 bytes, as safetensors does)."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        header = {"__metadata__": header.pop("__metadata__"), **header}
    hb = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hb += b" " * ((8 - len(hb) % 8) % 8)
    Path(path).write_bytes(len(hb).to_bytes(8, "little") + hb + raw[8 + n :])


def save_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def log(msg):
    print(f"[make_tiny] {msg}", flush=True)


def versions():
    import diffusers
    import onnx
    import onnxruntime
    import peft
    import safetensors
    import transformers

    import huggingface_hub

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "lycoris-lora": importlib.metadata.version("lycoris-lora"),
    }


def randomize_(model, seed):
    """Deterministic, non-trivial random weights; every tensor distinct (no equal constants).

    matrices / conv kernels: N(0, 1/fan_in); embeddings: N(0, 0.3); 1-D `weight` (norms): 1 + N(0, 0.1);
    biases and every other 1-D tensor: N(0, 0.05). Parameters are visited in named_parameters() order,
    all from one generator.
    """
    g = gen(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = p.shape
            noise = torch.randn(shape, generator=g, dtype=torch.float64)
            if "embedding" in name and p.dim() == 2 and ("token" in name or "position" in name):
                val = noise * 0.3
            elif p.dim() >= 2:
                fan_in = int(np.prod(shape[1:]))
                val = noise / np.sqrt(fan_in)
            elif name.endswith("weight"):
                val = 1.0 + 0.1 * noise
            else:
                val = 0.05 * noise
            p.copy_(val.to(p.dtype))
    return model


def load_pipe(dtype=torch.float32):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(DIFF), torch_dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_scheduler_config():
    """SD 1.5's scheduler_config.json as stored (11 keys)."""
    return dict(SD15_SCHEDULER_CONFIG)


def sd15_pipe_scheduler_config():
    """`pipe.scheduler.config` of an SD 1.5 pipeline: the file above loaded into PNDMScheduler, i.e. with
    PNDM's defaults filled in (timestep_spacing "leading", prediction_type "epsilon") and listed in
    `_use_default_values`. This is what a diffusers user passes to `OtherScheduler.from_config(
    pipe.scheduler.config, ...)`. Because of `_use_default_values`, from_config drops those two keys
    again, so every other class gets ITS OWN default timestep_spacing: "linspace" for Euler,
    EulerAncestral, LMS and DPMSolverMultistep, "leading" for DDIM (observed, diffusers 0.42.1)."""
    from diffusers import PNDMScheduler

    return dict(PNDMScheduler.from_config(sd15_scheduler_config()).config)


# ----------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode():
    # identical to CLIP's / GPT-2's table
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _open_clip_bpe():
    """bpe_simple_vocab_16e6.txt.gz out of the open_clip_torch wheel (pip download, no install)."""
    cache = MODELS / ".venv-ref" / "open_clip_wheel"
    gz = cache / "bpe_simple_vocab_16e6.txt.gz"
    if not gz.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"open_clip_torch=={OPEN_CLIP_VERSION}", "-d", str(cache)],
            check=True,
        )
        whl = next(cache.glob("open_clip_torch-*.whl"))
        with zipfile.ZipFile(whl) as z:
            gz.write_bytes(z.read("open_clip/bpe_simple_vocab_16e6.txt.gz"))
    return gzip.open(gz).read().decode("utf-8")


def make_tokenizer():
    """diffusers/tokenizer/: SD 1.x CLIP BPE (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json)."""
    out = DIFF / "tokenizer"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    lines = _open_clip_bpe().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # 48,894 merges, as open_clip's SimpleTokenizer
    assert len(merges) == 48894
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    for m in merges:
        vocab.append("".join(m.split()))
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    assert len(vocab) == 49408
    encoder = {tok: i for i, tok in enumerate(vocab)}
    assert len(encoder) == 49408
    (out / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")

    def added(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}

    save_json(
        out / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "bos_token": added("<|startoftext|>"),
            "do_lower_case": True,
            "eos_token": added("<|endoftext|>"),
            "errors": "replace",
            "model_max_length": 77,
            "pad_token": "<|endoftext|>",
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": added("<|endoftext|>"),
        },
    )
    sp = lambda c: {k: v for k, v in added(c).items() if k != "__type"}  # noqa: E731
    save_json(
        out / "special_tokens_map.json",
        {"bos_token": sp("<|startoftext|>"), "eos_token": sp("<|endoftext|>"), "pad_token": "<|endoftext|>", "unk_token": sp("<|endoftext|>")},
    )
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(out))
    ids = tok("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], ids
    log(f"tokenizer ok: {ids}")


# ----------------------------------------------------------------------------- pipeline


def random_modules():
    """The tiny architecture with the seeded random weights (`randomize_`): the starting point of
    train_base.py, which trains it into the shipped base model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = randomize_(UNet2DConditionModel(**UNET_CONFIG), SEED_UNET).eval()
    text_encoder = randomize_(CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)), SEED_TEXT).eval()
    vae = randomize_(AutoencoderKL(**VAE_CONFIG), SEED_VAE).eval()
    return unet, text_encoder, vae


def save_pipeline(unet, text_encoder, vae, dest=DIFF, tokenizer_dir=None):
    """dest/: unet, text_encoder (keys with `text_model.`), vae, scheduler, model_index.json, and the
    hand-written tokenizer folder (from tokenizer_dir, default dest/tokenizer)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    dest = Path(dest)
    tok_src = Path(tokenizer_dir) if tokenizer_dir else dest / "tokenizer"
    tok_backup = Path(tempfile.mkdtemp()) / "tokenizer"
    shutil.copytree(tok_src, tok_backup)
    scheduler = PNDMScheduler.from_config(sd15_scheduler_config())
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_backup))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    dest.mkdir(parents=True, exist_ok=True)
    for sub in ["unet", "text_encoder", "vae", "scheduler", "tokenizer", "model_index.json"]:
        p = dest / sub
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    pipe.save_pretrained(str(dest), safe_serialization=True)
    # keep the hand-written SD 1.5-style tokenizer folder (save_pretrained adds tokenizer.json etc.)
    shutil.rmtree(dest / "tokenizer")
    shutil.copytree(tok_backup, dest / "tokenizer")
    shutil.rmtree(tok_backup.parent)
    # scheduler: SD 1.5's file verbatim
    save_json(dest / "scheduler" / "scheduler_config.json", sd15_scheduler_config())
    # text encoder: transformers 5 writes keys without `text_model.`; 4.x (export venv) needs them.
    te_sd = {("" if k.startswith("text_model.") else "text_model.") + k: v.contiguous() for k, v in text_encoder.state_dict().items()}
    save_file(te_sd, str(dest / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
    # strip volatile fields so re-runs are byte-identical
    cfg = json.loads((dest / "text_encoder" / "config.json").read_text())
    cfg.pop("_name_or_path", None)
    save_json(dest / "text_encoder" / "config.json", cfg)


def load_text_encoder_(text_encoder, te_sd):
    """Loads a `text_model.`-keyed state dict into a CLIPTextModel of either transformers layout."""
    prefixed = next(iter(text_encoder.state_dict())).startswith("text_model.")
    sd = te_sd if prefixed else {k.removeprefix("text_model."): v for k, v in te_sd.items()}
    text_encoder.load_state_dict(sd, strict=True)


def make_pipeline():
    """diffusers/: the trained base model. Its weights come from train_base.py (GPU machine, from
    the seeded random init of `random_modules`; models/README.md); this step re-saves them in the
    canonical layout (byte-identical when unchanged) and checks that they reload."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    for sub in ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]:
        if not (DIFF / sub).is_file():
            sys.exit(f"{DIFF / sub} missing: run models/scripts/train_base.py on the GPU machine first (models/README.md)")
    unet = UNet2DConditionModel(**UNET_CONFIG)
    unet.load_state_dict(load_file(str(DIFF / "unet" / "diffusion_pytorch_model.safetensors")))
    vae = AutoencoderKL(**VAE_CONFIG)
    vae.load_state_dict(load_file(str(DIFF / "vae" / "diffusion_pytorch_model.safetensors")))
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    te_sd = load_file(str(DIFF / "text_encoder" / "model.safetensors"))
    load_text_encoder_(text_encoder, te_sd)
    unet, text_encoder, vae = unet.eval(), text_encoder.eval(), vae.eval()
    save_pipeline(unet, text_encoder, vae, DIFF)

    # reload and compare outputs with the in-memory modules
    pipe2 = load_pipe()
    ids = pipe2.tokenizer(PROMPTS_IO, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        a = text_encoder(ids)[0]
        b = pipe2.text_encoder(ids)[0]
    assert torch.equal(a, b), "text encoder reload mismatch"
    log(f"pipeline saved; text encoder hidden std {a.std():.3f}")


# ----------------------------------------------------------------------------- ONNX exports (export venv)


def _export(*args):
    if not EXPORT_PY.exists():
        sys.exit(f"{EXPORT_PY} missing: run models/scripts/setup_venvs.sh")
    cmd = [str(EXPORT_PY), str(MODELS / "scripts" / "export_onnx.py"), *map(str, args)]
    env = dict(os.environ, PYTHONHASHSEED="0")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in res.stdout.splitlines():
        if line.startswith("[export_onnx]"):
            print(line, flush=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout[-5000:] + res.stderr[-10000:])
        sys.exit(f"export failed: {' '.join(map(str, args))}")


def export_onnx_fp32():
    """onnx/: optimum-cli export onnx --task text-to-image --opset 17 (fp32)."""
    _export("optimum", DIFF, ONNX, "fp32")


def export_onnx_fp16():
    """onnx-fp16/: the same with --dtype fp16 (exported on CPU; validation atol loosened, see export_onnx.py).

    Its tokenizer/ is not kept: optimum writes the same bytes as onnx/tokenizer/ (checked here), and
    1.6 MB of CLIP BPE twice is too much for the tree every GPU-machine call carries. Tests assemble
    the complete fp16 pipeline at test time (tests/common `made("onnx-fp16")`)."""
    _export("optimum", DIFF, ONNX16, "fp16")
    tok16, tok = ONNX16 / "tokenizer", ONNX / "tokenizer"
    names = sorted(p.name for p in tok16.iterdir())
    assert names == sorted(p.name for p in tok.iterdir()), f"fp16 tokenizer files {names} differ from fp32's"
    for n in names:
        assert (tok16 / n).read_bytes() == (tok / n).read_bytes(), f"onnx-fp16/tokenizer/{n} differs from onnx/tokenizer/{n}"
    shutil.rmtree(tok16)
    log(f"onnx-fp16/tokenizer: the same {len(names)} files as onnx/tokenizer, not kept")


def export_onnx_dynamo():
    """onnx-dynamo/unet/: torch.onnx.export(dynamo=True, opset 18), optimum's I/O names."""
    _export("dynamo", DIFF, ONNX_DYN / "unet")


# ----------------------------------------------------------------------------- fixtures: tokenizer

TOKENIZER_PROMPTS = [
    "",
    "a photo of a cat",
    "A PHOTO OF A CAT",
    "Hello, world!!! What?! (yes) [no] {maybe} <tag> #hash @user ... ;-) -- ~~",
    "1girl, 2 cats, 1024x768, 3.14159, 100% 007 2024-01-31",
    "café crème brûlée, naïve façade in Zürich, Ångström, piñata",
    "emoji 🐱🚀✨ and a ❤️",
    "一只猫的照片",
    "東京タワー の 夜景, 서울",
    "   lots   of \t whitespace     here   ",
    "salt &amp; pepper &lt;b&gt; tom & jerry",
    "(masterpiece:1.2), best quality, ((detailed)), [blurry:0.5], <lora:foo:0.8>, BREAK",
    "don't stop, it's a dog's life, rock'n'roll, 'quoted'",
    "line one\nline two\r\nline three",
    "hyphen-ated and under_scored words, CamelCaseWord, ALLCAPSWORD",
    "кошка на крыше, γάτα",
    "ＦＵＬＬＷＩＤＴＨ text and ｃａｔ",
    "a very long prompt " + ", ".join(f"detail number {i} with extra words" for i in range(20)),
    "a photo of an astronaut riding a horse on mars",
    "</w> <|startoftext|> <|endoftext|> literal special tokens",
]


def fixture_tokenizer():
    """expected/tokenizer.json: SD pipeline input_ids (77, padded with eos, truncated) and untruncated ids."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(DIFF / "tokenizer"))
    rows = []
    for p in TOKENIZER_PROMPTS:
        ids = tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        full = tok(p, truncation=False).input_ids
        assert len(ids) == 77
        rows.append({"prompt": p, "input_ids": ids, "full_ids": full})
    save_json(
        EXPECTED / "tokenizer.json",
        {
            "tokenizer": "transformers.CLIPTokenizer.from_pretrained('models/tiny/diffusers/tokenizer') (what StableDiffusionPipeline loads)",
            "call": "tokenizer(prompt, padding='max_length', max_length=77, truncation=True).input_ids; full_ids: tokenizer(prompt, truncation=False).input_ids",
            "transformers": __import__("transformers").__version__,
            "cases": rows,
        },
    )
    log(f"tokenizer fixture: {len(rows)} prompts")


# ----------------------------------------------------------------------------- fixtures: schedulers

SCHEDULERS = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler_karras": ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "lms_karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
}


def _sched(cls_name, overrides):
    import diffusers

    return getattr(diffusers, cls_name).from_config(sd15_pipe_scheduler_config(), **overrides)


def _ts(t):
    """timesteps as saved: int stays int64, float is upcast (exactly) to float64."""
    return t.to(torch.float64) if t.is_floating_point() else t.to(torch.int64)


def fixture_schedulers():
    """expected/scheduler_<name>_<steps>.{safetensors,json}: timesteps, sigmas, scale_model_input, step."""
    import importlib
    import inspect

    for si, (name, (cls_name, overrides)) in enumerate(SCHEDULERS.items()):
        for steps in (4, 25):
            sched = _sched(cls_name, overrides)
            sched.set_timesteps(steps)
            t_out = {}
            t_out["timesteps"] = _ts(sched.timesteps)
            if getattr(sched, "sigmas", None) is not None:
                t_out["sigmas"] = sched.sigmas.clone()
            t_out["init_noise_sigma"] = torch.tensor(float(sched.init_noise_sigma), dtype=torch.float32)
            base_seed = 5000 + 100 * si + steps
            latents_randn = randn([1, 4, 8, 8], base_seed)
            sample = latents_randn * sched.init_noise_sigma
            t_out["latents_randn"] = latents_randn
            t_out["sample_0"] = sample.clone()

            # capture every noise draw of step() by wrapping the scheduler module's randn_tensor
            mod = importlib.import_module(type(sched).__module__)
            drawn = []
            orig = getattr(mod, "randn_tensor", None)
            if orig is not None:

                def rec(*a, _orig=orig, **k):
                    x = _orig(*a, **k)
                    drawn.append(x.clone())
                    return x

                mod.randn_tensor = rec
            generator = gen(base_seed + 50)
            try:
                for i, t in enumerate(sched.timesteps):
                    scaled = sched.scale_model_input(sample, t)
                    model_output = randn([1, 4, 8, 8], base_seed + 1000 + i)
                    n_before = len(drawn)
                    kw = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
                    prev = sched.step(model_output, t, sample, return_dict=True, **kw).prev_sample
                    t_out[f"model_output_{i}"] = model_output
                    t_out[f"scaled_{i}"] = scaled.clone()
                    if len(drawn) > n_before:
                        assert len(drawn) == n_before + 1
                        t_out[f"noise_{i}"] = drawn[-1]
                    t_out[f"prev_sample_{i}"] = prev.clone()
                    sample = prev
            finally:
                if orig is not None:
                    mod.randn_tensor = orig

            # add_noise on a fresh scheduler with the same timesteps
            s2 = _sched(cls_name, overrides)
            s2.set_timesteps(steps)
            original = randn([1, 4, 8, 8], base_seed + 2000)
            noise = randn([1, 4, 8, 8], base_seed + 2001)
            tstep = s2.timesteps[1:2].clone()
            noised = s2.add_noise(original, noise, tstep)
            t_out["add_noise_original"] = original
            t_out["add_noise_noise"] = noise
            t_out["add_noise_timestep"] = _ts(tstep)
            t_out["add_noise_out"] = noised
            save_tensors(EXPECTED / f"scheduler_{name}_{steps}.safetensors", t_out)
            save_json(
                EXPECTED / f"scheduler_{name}_{steps}.json",
                {
                    "class": cls_name,
                    "built_with": f"{cls_name}.from_config(pipe.scheduler.config, **overrides) where pipe.scheduler = PNDMScheduler.from_config(SD 1.5 scheduler_config.json)",
                    "sd15_scheduler_config_json": sd15_scheduler_config(),
                    "pipe_scheduler_config": sd15_pipe_scheduler_config(),
                    "overrides": overrides,
                    "config": {k: v for k, v in dict(sched.config).items()},
                    "num_inference_steps": steps,
                    "timesteps": sched.timesteps.tolist(),
                    "timesteps_dtype": str(sched.timesteps.dtype),
                    "timesteps_saved_as": str(t_out["timesteps"].dtype),
                    "sigmas": t_out["sigmas"].tolist() if "sigmas" in t_out else None,
                    "init_noise_sigma": float(sched.init_noise_sigma),
                    "order": getattr(sched, "order", None),
                    "noise_steps": sorted(int(k.split("_")[1]) for k in t_out if k.startswith("noise_")),
                    "generator_seed": base_seed + 50,
                    "add_noise_timestep": tstep.tolist(),
                    "notes": "sample_0 = latents_randn * init_noise_sigma; per step i: scaled_i = scale_model_input(sample_i, t_i); "
                    "prev_sample_i = step(model_output_i, t_i, sample_i[, generator=torch.Generator().manual_seed(generator_seed) where step() takes one, one generator for the whole loop, as StableDiffusionPipeline.prepare_extra_step_kwargs does]); "
                    "noise_i = the tensor step() drew through diffusers.utils.torch_utils.randn_tensor (captured by wrapping it), only where one was drawn. "
                    "add_noise_* used a fresh scheduler after set_timesteps(steps).",
                },
            )
        log(f"scheduler {name}: ok")

    # DDPM add_noise as the training scripts use it (batched int64 timesteps)
    from diffusers import DDPMScheduler

    ddpm = DDPMScheduler.from_config(sd15_scheduler_config())
    original = randn([3, 4, 8, 8], 4100)
    noise = randn([3, 4, 8, 8], 4101)
    ts = torch.tensor([0, 499, 999], dtype=torch.int64)
    save_tensors(
        EXPECTED / "scheduler_ddpm_add_noise.safetensors",
        {
            "add_noise_original": original,
            "add_noise_noise": noise,
            "add_noise_timestep": ts,
            "add_noise_out": ddpm.add_noise(original, noise, ts),
            "alphas_cumprod": ddpm.alphas_cumprod.clone(),
        },
    )
    save_json(EXPECTED / "scheduler_ddpm_add_noise.json", {"class": "DDPMScheduler", "config": dict(ddpm.config), "timesteps": ts.tolist()})


# ----------------------------------------------------------------------------- fixtures: model I/O


def io_inputs():
    """The fixed inputs shared by unet_io / text_encoder_io and every LoRA fixture."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(DIFF / "tokenizer"))
    ids = tok(PROMPTS_IO, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(torch.int64)
    return {
        "sample": randn([2, 4, 8, 8], 301),
        "timestep": torch.tensor(981.0, dtype=torch.float32),
        "encoder_hidden_states": randn([2, 77, 24], 302),
        "input_ids": ids,
    }


def run_io(pipe, inp):
    with torch.no_grad():
        u = pipe.unet(inp["sample"], inp["timestep"], inp["encoder_hidden_states"], return_dict=False)[0]
        te = pipe.text_encoder(inp["input_ids"])
    return u, te[0], te[1]


def fixture_model_io():
    """expected/{unet,text_encoder,vae_decoder,vae_encoder}_io.safetensors (diffusers fp32 PyTorch)."""
    pipe = load_pipe()
    inp = io_inputs()
    u, lh, po = run_io(pipe, inp)
    save_tensors(EXPECTED / "unet_io.safetensors", {"sample": inp["sample"], "timestep": inp["timestep"], "encoder_hidden_states": inp["encoder_hidden_states"], "out_sample": u})
    save_tensors(EXPECTED / "text_encoder_io.safetensors", {"input_ids": inp["input_ids"], "last_hidden_state": lh, "pooler_output": po})
    latent = randn([1, 4, 8, 8], 303) / 0.18215
    with torch.no_grad():
        img = pipe.vae.decode(latent, return_dict=False)[0]
    save_tensors(EXPECTED / "vae_decoder_io.safetensors", {"latent_sample": latent, "sample": img})
    # a smooth, image-like input in [-1, 1]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    pic = torch.stack([torch.sin(3 * xx) * torch.cos(2 * yy), xx * yy, torch.cos(4 * (xx + yy)) * 0.8])[None]
    pic = (pic + 0.1 * randn([1, 3, 64, 64], 304)).clamp(-1, 1)
    with torch.no_grad():
        dist = pipe.vae.encode(pic).latent_dist
    params = dist.parameters
    mean, logvar = torch.chunk(params, 2, dim=1)
    assert torch.equal(mean, dist.mean) and torch.equal(logvar, dist.logvar), "logvar clamp was active"
    save_tensors(EXPECTED / "vae_encoder_io.safetensors", {"sample": pic, "mean": mean, "logvar": logvar, "latent_parameters": torch.cat([mean, logvar], 1)})
    save_json(
        EXPECTED / "model_io.json",
        {
            "prompts": PROMPTS_IO,
            "unet_io": "pipe.unet(sample, timestep, encoder_hidden_states).sample; sample~N(0,1) seed 301, encoder_hidden_states~N(0,1) seed 302, timestep 0-d float32 981.0",
            "text_encoder_io": "pipe.text_encoder(input_ids) -> (last_hidden_state, pooler_output); input_ids = tokenizer(prompts, padding='max_length', max_length=77, truncation=True)",
            "vae_decoder_io": "pipe.vae.decode(latent_sample).sample (no scaling inside: the pipeline divides by scaling_factor 0.18215 before; latent_sample = N(0,1)/0.18215)",
            "vae_encoder_io": "pipe.vae.encode(sample).latent_dist: mean, logvar; latent_parameters = cat(mean, logvar, dim=1) = optimum's vae_encoder output",
        },
    )
    log(f"model io: unet out std {u.std():.3f}, te std {lh.std():.3f}, vae dec range [{img.min():.2f}, {img.max():.2f}]")


# ----------------------------------------------------------------------------- LoRA files

UNET_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
TE_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]
UNET_WIDE = UNET_ATTN + ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2", "conv_shortcut", "time_emb_proj"]
TE_WIDE = TE_ATTN + ["fc1", "fc2"]
# (file stem, unet targets, text targets, rank, alpha, seed)
LORA_SOURCES = {
    "diffusers": (UNET_ATTN, TE_ATTN, 4, 8, 7001),
    "diffusers_wide": (UNET_WIDE, TE_WIDE, 2, 3, 7002),
}
LORA_REL = 0.3  # |ΔW| ≈ LORA_REL · |W| per element at scale 1


def _lora_metadata(cfg):
    d = cfg.to_dict()
    for k, v in list(d.items()):
        if isinstance(v, set):
            d[k] = sorted(v)
        elif hasattr(v, "value") and not isinstance(v, (str, int, float, bool)):
            d[k] = v.value
    return d


def _fill_lora_(model, rank, alpha, seed):
    """lora_A ~ N(0, 1/fan_in); lora_B ~ N(0, σ) with σ chosen so (alpha/r)·B·A ≈ LORA_REL·W in scale."""
    g = gen(seed)
    scaling = alpha / rank
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if ".lora_A." in name:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / np.sqrt(fan_in))
            elif ".lora_B." in name:
                sigma = LORA_REL / (np.sqrt(rank) * scaling)
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * sigma)


def _make_source(stem):
    """A pipeline with a peft adapter injected (unet via diffusers' add_adapter, text encoder via
    peft.inject_adapter_in_model as transformers 5.24 refuses peft 0.21.2 for add_adapter), random weights."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    unet_t, te_t, r, alpha, seed = LORA_SOURCES[stem]
    pipe = load_pipe()
    ucfg = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=unet_t)
    tcfg = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=te_t)
    pipe.unet.add_adapter(ucfg)
    inject_adapter_in_model(tcfg, pipe.text_encoder)
    _fill_lora_(pipe.unet, r, alpha, seed)
    _fill_lora_(pipe.text_encoder, r, alpha, seed + 1)
    usd = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(pipe.unet).items()}
    tsd = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(pipe.text_encoder).items()}
    return {"unet": usd, "te": tsd, "r": r, "alpha": alpha, "ucfg": ucfg, "tcfg": tcfg, "unet_targets": unet_t, "te_targets": te_t}


def _save_diffusers(stem, src, dtype=None):
    from diffusers import StableDiffusionPipeline

    cast = (lambda d: {k: v.to(dtype) for k, v in d.items()}) if dtype is not None else (lambda d: d)
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(LORAS),
        unet_lora_layers=cast(src["unet"]),
        text_encoder_lora_layers=cast(src["te"]),
        weight_name=f"{stem}.safetensors",
        unet_lora_adapter_metadata=_lora_metadata(src["ucfg"]),
        text_encoder_lora_adapter_metadata=_lora_metadata(src["tcfg"]),
    )


def _kohya_from(src, te_prefix, alpha_dtype, ss_metadata=None):
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    peft_sd = {f"unet.{k}": v for k, v in src["unet"].items()}
    # text encoder keys as a transformers-4 model names them (what sd-scripts / A1111 files carry)
    peft_sd.update({f"text_encoder.text_model.{k}": v for k, v in src["te"].items()})
    k = convert_state_dict_to_kohya(peft_sd)
    out = {}
    for key, v in k.items():
        if key.endswith(".alpha"):
            # diffusers' converter writes alpha = rank (I64); store the adapter's real lora_alpha
            v = torch.tensor(src["alpha"], dtype=alpha_dtype) if alpha_dtype != torch.int64 else torch.tensor(int(src["alpha"]), dtype=torch.int64)
        if te_prefix != "lora_te1_":
            key = key.replace("lora_te1_", te_prefix)
        out[key] = v.contiguous()
    return out


def _attn_procs_from(src):
    """Old diffusers 0.17-0.20 attn-procs layout; B pre-multiplied by alpha/r (the format has no alpha)."""
    s = src["alpha"] / src["r"]
    out = {}
    name_map = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}
    for key, v in src["unet"].items():
        mod, ab = key.rsplit(".lora_", 1)  # ab = "A.weight"
        parent, leaf = mod.rsplit(".", 1) if not mod.endswith("to_out.0") else (mod[: -len(".to_out.0")], "to_out.0")
        part = "down" if ab.startswith("A") else "up"
        out[f"unet.{parent}.processor.{name_map[leaf]}.{part}.weight"] = v if part == "down" else v * s
    te_map = {"q_proj": "to_q_lora", "k_proj": "to_k_lora", "v_proj": "to_v_lora", "out_proj": "to_out_lora"}
    for key, v in src["te"].items():
        mod, ab = key.rsplit(".lora_", 1)
        parent, leaf = mod.rsplit(".", 1)
        part = "down" if ab.startswith("A") else "up"
        out[f"text_encoder.text_model.{parent}.{te_map[leaf]}.{part}.weight"] = v if part == "down" else v * s
    return {k: v.contiguous() for k, v in out.items()}


def _legacy_from(src):
    """Older diffusers layout (what train_text_to_image_lora.py writes via convert_state_dict_to_diffusers):
    unet `<path>.lora.down/up.weight`, text `<path>.lora_linear_layer.down/up.weight`; no alpha, so B is
    pre-multiplied by alpha/r."""
    from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_diffusers

    s = src["alpha"] / src["r"]
    u = {k: (v * s if ".lora_B." in k else v) for k, v in src["unet"].items()}
    t = {k: (v * s if ".lora_B." in k else v) for k, v in src["te"].items()}
    u = convert_state_dict_to_diffusers(u, original_type=StateDictType.PEFT)
    t = convert_state_dict_to_diffusers(t, original_type=StateDictType.PEFT)
    out = {f"unet.{k}": v.contiguous() for k, v in u.items()}
    out.update({f"text_encoder.text_model.{k}": v.contiguous() for k, v in t.items()})
    return out


def _peft_save(src, out_file, out_cfg):
    """Raw PEFT: get_peft_model(unet, cfg).save_pretrained() -> adapter_model.safetensors + adapter_config.json."""
    from diffusers import UNet2DConditionModel
    from peft import get_peft_model, set_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(str(DIFF / "unet"))
    pm = get_peft_model(unet, copy.deepcopy(src["ucfg"]))
    res = set_peft_model_state_dict(pm, {f"base_model.model.{k}": v for k, v in src["unet"].items()})
    assert not [k for k in res.unexpected_keys if "lora" in k], res.unexpected_keys
    assert not [k for k in res.missing_keys if "lora" in k], res.missing_keys
    with tempfile.TemporaryDirectory() as td:
        pm.save_pretrained(td)
        shutil.copy(Path(td) / "adapter_model.safetensors", out_file)
        cfg = json.loads((Path(td) / "adapter_config.json").read_text())
        if isinstance(cfg.get("target_modules"), list):
            cfg["target_modules"] = sorted(cfg["target_modules"])
        save_json(out_cfg, cfg)


def _sdxl_kohya():
    """Keys only SDXL has (sgm UNet naming, 2 text encoders, 640/1280/2048 widths)."""
    g = gen(7100)
    out = {}

    def add(name, din, dout, r=2):
        out[f"{name}.lora_down.weight"] = torch.randn(r, din, generator=g) * 0.05
        out[f"{name}.lora_up.weight"] = torch.randn(dout, r, generator=g) * 0.05
        out[f"{name}.alpha"] = torch.tensor(1.0)

    add("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 640, 640)
    add("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 2048, 640)
    add("lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0", 1280, 1280)
    add("lora_unet_output_blocks_0_1_transformer_blocks_9_ff_net_2", 5120, 1280)
    add("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768)
    add("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280)
    add("lora_te2_text_model_encoder_layers_31_mlp_fc1", 1280, 5120)
    return out


def make_loras():
    """loras/*.safetensors: every dialect, built from two random peft adapters."""
    LORAS.mkdir(parents=True, exist_ok=True)
    for f in LORAS.glob("*"):
        f.unlink()
    srcs = {stem: _make_source(stem) for stem in LORA_SOURCES}
    d, w = srcs["diffusers"], srcs["diffusers_wide"]
    _save_diffusers("diffusers", d)
    _save_diffusers("diffusers_wide", w)
    _save_diffusers("diffusers_fp16", d, torch.float16)
    _peft_save(d, LORAS / "peft.safetensors", LORAS / "peft_adapter_config.json")
    ss = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(d["r"]),
        "ss_network_alpha": str(float(d["alpha"])),
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_output_name": "kohya",
    }
    kohya = _kohya_from(d, "lora_te_", torch.float32)
    save_file(kohya, str(LORAS / "kohya.safetensors"), metadata=ss)
    save_file({k: v.to(torch.bfloat16) for k, v in kohya.items()}, str(LORAS / "kohya_bf16.safetensors"), metadata=dict(ss, ss_output_name="kohya_bf16"))
    save_file(_kohya_from(w, "lora_te1_", torch.int64), str(LORAS / "kohya_wide.safetensors"))
    save_file(_attn_procs_from(d), str(LORAS / "attn_procs.safetensors"), metadata={"format": "pt"})
    save_file(_legacy_from(d), str(LORAS / "diffusers_legacy.safetensors"), metadata={"format": "pt"})
    save_file(_sdxl_kohya(), str(LORAS / "sdxl_kohya.safetensors"))
    for f in sorted(LORAS.glob("*.safetensors")):
        canonicalize_safetensors(f)
        log(f"lora {f.name}: {len(load_file(str(f)))} tensors, {f.stat().st_size} bytes")


# ----------------------------------------------------------------------------- fixtures: LoRA outputs

# LoRA file -> the source adapter whose fused weights it must reproduce (None: its own values)
LORA_FIXTURES = {
    "diffusers": "diffusers",
    "diffusers_wide": "diffusers_wide",
    "peft": "diffusers",  # unet only
    "kohya": "diffusers",
    "kohya_wide": "diffusers_wide",
    "attn_procs": "diffusers",
    "diffusers_legacy": "diffusers",
    "diffusers_fp16": None,  # fp16-rounded copy of diffusers
    "kohya_bf16": None,  # bf16-rounded copy of kohya
}


def _fused_weights(pipe):
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for comp in ("unet", "text_encoder"):
        model = getattr(pipe, comp)
        for name, mod in model.named_modules():
            if isinstance(mod, BaseTunerLayer) and mod.merged_adapters:
                path = name
                if comp == "text_encoder" and not path.startswith("text_model."):
                    path = "text_model." + path  # transformers 5 flattened CLIPTextModel; keep SD 1.x naming
                out[f"{comp}.{path}.weight"] = mod.get_base_layer().weight.detach().clone().contiguous()
    return out


def _lora_modules(pipe):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {comp: sum(isinstance(m, BaseTunerLayer) for m in getattr(pipe, comp).modules()) for comp in ("unet", "text_encoder")}


def _peft_reference(scale, inp):
    """Reference for peft.safetensors computed by peft itself: PeftModel.from_pretrained + set_scale + merge."""
    from diffusers import UNet2DConditionModel
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    unet = UNet2DConditionModel.from_pretrained(str(DIFF / "unet")).eval()
    with tempfile.TemporaryDirectory() as td:
        shutil.copy(LORAS / "peft.safetensors", Path(td) / "adapter_model.safetensors")
        shutil.copy(LORAS / "peft_adapter_config.json", Path(td) / "adapter_config.json")
        pm = PeftModel.from_pretrained(unet, td)
    n = 0
    for m in pm.modules():
        if isinstance(m, LoraLayer):
            m.set_scale("default", scale)
            n += 1
    merged = pm.merge_and_unload()
    with torch.no_grad():
        u = merged(inp["sample"], inp["timestep"], inp["encoder_hidden_states"], return_dict=False)[0]
    fused = {}
    for name, mod in merged.named_modules():
        if name.endswith(tuple(f".{t}" for t in UNET_ATTN)):
            fused[f"unet.{name}.weight"] = mod.weight.detach().clone()
    return u, fused, n


def fixture_loras():
    """expected/lora_<X>_s<s>.safetensors, fused_<X>.safetensors, lora_combo, lora_checks.json."""
    inp = io_inputs()
    base = load_pipe()
    base_u, base_te, _ = run_io(base, inp)
    base_w = {}
    checks = {"inputs": "unet_io.safetensors / text_encoder_io.safetensors inputs", "loras": {}}
    fused_by_stem = {}
    for stem, ref in LORA_FIXTURES.items():
        info = {"file": f"loras/{stem}.safetensors"}
        for s in (1.0, 0.5):
            if stem == "peft":
                u, fused, n = _peft_reference(s, inp)
                te = base_te
                info["how"] = "peft: PeftModel.from_pretrained(unet, dir with peft.safetensors as adapter_model.safetensors + adapter_config.json); LoraLayer.set_scale('default', s); merge_and_unload() (no text encoder in this file)"
                info["lora_modules"] = {"unet": n, "text_encoder": 0}
                # diffusers itself: what does load_lora_weights make of raw peft keys?
                if s == 1.0:
                    p2 = load_pipe()
                    try:
                        p2.load_lora_weights(str(LORAS), weight_name="peft.safetensors")
                        info["diffusers_load_lora_weights"] = f"no error; LoRA layers injected: {_lora_modules(p2)}"
                    except Exception as e:  # noqa: BLE001
                        info["diffusers_load_lora_weights"] = f"{type(e).__name__}: {e}"[:600]
            else:
                pipe = load_pipe()
                pipe.load_lora_weights(str(LORAS), weight_name=f"{stem}.safetensors", adapter_name=stem)
                info["lora_modules"] = _lora_modules(pipe)
                # documented alternative: no fuse, adapter weight s -- must agree with fuse_lora
                pipe.set_adapters([stem], adapter_weights=[s])
                u_unfused, te_unfused, _ = run_io(pipe, inp)
                pipe.set_adapters([stem], adapter_weights=[1.0])
                pipe.fuse_lora(lora_scale=s)
                u, te, _ = run_io(pipe, inp)
                fused = _fused_weights(pipe)
                info["how"] = f"pipe.load_lora_weights('models/tiny/loras', weight_name='{stem}.safetensors'); pipe.fuse_lora(lora_scale=s)"
                info[f"s{s}_fused_vs_set_adapters_maxabs"] = {"unet": float((u - u_unfused).abs().max()), "text_encoder": float((te - te_unfused).abs().max())}
            save_tensors(EXPECTED / f"lora_{stem}_s{s}.safetensors", {"unet_out_sample": u, "text_encoder_last_hidden_state": te})
            info[f"s{s}_effect_rel"] = {
                "unet": float((u - base_u).norm() / base_u.norm()),
                "text_encoder": float((te - base_te).norm() / base_te.norm()),
            }
            if s == 1.0:
                fused_by_stem[stem] = fused
                info["fused_modules"] = len(fused)
                cmp = ref if ref is not None else ("kohya" if stem == "kohya_bf16" else "diffusers")
                r = fused_by_stem[cmp]
                fk = sorted(fused)
                if stem == "peft":
                    r = {k: v for k, v in r.items() if k.startswith("unet.")}
                assert sorted(r) == fk, f"{stem}: fused module set differs from {cmp}: {set(r) ^ set(fk)}"
                maxabs = max(float((fused[k] - r[k]).abs().max()) for k in fk)
                info["fused_vs_" + cmp + "_maxabs"] = maxabs
                if ref is not None and ref != stem:
                    # same adapter, other dialect: diffusers fused bit-identical weights (checked), so the
                    # source's fused_<ref>.safetensors is the reference (saves duplicate megabytes)
                    assert maxabs == 0.0, f"{stem}: fused weights differ from {ref} by {maxabs}"
                    info["fused_file"] = f"expected/fused_{ref}.safetensors" + (" (unet.* keys only)" if stem == "peft" else "")
                else:
                    save_tensors(EXPECTED / f"fused_{stem}.safetensors", fused)
                    info["fused_file"] = f"expected/fused_{stem}.safetensors"
        checks["loras"][stem] = info
        log(f"lora fixture {stem}: {info['lora_modules']} effect {info['s1.0_effect_rel']}")

    # fused weight sanity: W' - W must be non-zero for every touched module
    for stem, fused in fused_by_stem.items():
        if not base_w:
            base_w = {f"unet.{k}": v for k, v in base.unet.state_dict().items()}
            base_w.update({f"text_encoder.text_model.{k.removeprefix('text_model.')}": v for k, v in base.text_encoder.state_dict().items()})
        for k, v in fused.items():
            assert k in base_w, f"{stem}: {k} is no base weight"
            assert (v - base_w[k]).abs().max() > 0, f"{stem}: {k} unchanged"

    # two LoRAs at once, weights 0.7 / 0.4 via set_adapters (diffusers' documented multi-adapter way)
    pipe = load_pipe()
    pipe.load_lora_weights(str(LORAS), weight_name="diffusers.safetensors", adapter_name="diffusers")
    pipe.load_lora_weights(str(LORAS), weight_name="diffusers_wide.safetensors", adapter_name="diffusers_wide")
    weights = [0.7, 0.4]
    pipe.set_adapters(["diffusers", "diffusers_wide"], adapter_weights=weights)
    u, te, _ = run_io(pipe, inp)
    pipe.fuse_lora(lora_scale=1.0, adapter_names=["diffusers", "diffusers_wide"])
    u_f, te_f, _ = run_io(pipe, inp)
    save_tensors(EXPECTED / "lora_combo.safetensors", {"unet_out_sample": u, "text_encoder_last_hidden_state": te})
    # Only the modules both adapters touch are stored (0.2 MB instead of 2.9: the tree every GPU-machine
    # call carries has a size limit). Where one adapter acts alone, diffusers' combination is that
    # adapter's own fused weight (scale 1, fused_<X>.safetensors) scaled by its adapter weight;
    # checked here, and tests/lora_fixtures.rs rebuilds those modules from fused_<X>.safetensors.
    fused = _fused_weights(pipe)
    names = ["diffusers", "diffusers_wide"]
    both = sorted(set(fused_by_stem[names[0]]) & set(fused_by_stem[names[1]]))
    single_err = 0.0
    for k, v in fused.items():
        if k in both:
            continue
        (n, w), = [(n, w) for n, w in zip(names, weights) if k in fused_by_stem[n]]
        b = base_w[k]
        single_err = max(single_err, float((v - (b + w * (fused_by_stem[n][k] - b))).abs().max()))
    assert single_err <= 1e-6, f"combo: a single adapter's modules differ from its scaled fused weights by {single_err}"
    save_tensors(EXPECTED / "fused_combo.safetensors", {k: fused[k] for k in both})
    combo = {
        "loras": ["loras/diffusers.safetensors", "loras/diffusers_wide.safetensors"],
        "adapter_names": ["diffusers", "diffusers_wide"],
        "adapter_weights": weights,
        "how": "load_lora_weights(each, adapter_name=...); set_adapters(names, adapter_weights=[0.7, 0.4]); outputs unfused. "
        "fused_combo.safetensors: then fuse_lora(lora_scale=1.0, adapter_names=names), the weights of the modules both adapters touch.",
        "fused_combo_modules": len(both),
        "single_adapter_modules": len(fused) - len(both),
        "single_adapter_vs_scaled_fused_maxabs": single_err,
        "fused_vs_unfused_maxabs": {"unet": float((u - u_f).abs().max()), "text_encoder": float((te - te_f).abs().max())},
    }
    checks["combo"] = combo
    save_json(EXPECTED / "lora_combo.json", combo)

    # an SDXL LoRA into an SD 1.x pipeline: what diffusers says
    pipe = load_pipe()
    try:
        pipe.load_lora_weights(str(LORAS), weight_name="sdxl_kohya.safetensors")
        checks["sdxl_kohya"] = f"diffusers loaded it without error; LoRA layers injected: {_lora_modules(pipe)}"
    except Exception as e:  # noqa: BLE001
        checks["sdxl_kohya"] = f"{type(e).__name__}: {str(e)[:800]}"
    save_json(EXPECTED / "lora_checks.json", checks)
    log(f"sdxl_kohya: {checks['sdxl_kohya'][:200]}")


# ----------------------------------------------------------------------------- LyCORIS (LoHa, LoKr) from LyCORIS itself

# LyCORIS's sd-scripts network (lycoris.kohya.create_network, what `--network_module lycoris.kohya` trains),
# with its own module classes, state-dict writer and forward pass. A preset instead of "full": in 4.1.3 "full"
# names time_embedding.linear_1 twice on a diffusers UNet (TimestepEmbedding is also a target class).
LYCORIS_PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""
# stem: (algo, dim, alpha, conv_dim, conv_alpha, file dtype, seed)
LYCORIS_FILES = {
    "lycoris_loha": ("loha", 4, 2.0, 2, 1.0, torch.float16, 7101),
    "lycoris_lokr": ("lokr", 4, 2.0, 2, 1.0, torch.float32, 7102),
}


def _lycoris_network(pipe, algo, dim, alpha, conv_dim, conv_alpha):
    from lycoris import kohya

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(LYCORIS_PRESET)
    try:
        net = kohya.create_network(1.0, dim, alpha, pipe.vae, pipe.text_encoder, pipe.unet, algo=algo,
                                   conv_dim=conv_dim, conv_alpha=conv_alpha, use_tucker=True, preset=f.name)
    finally:
        os.unlink(f.name)
    net.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    return net.eval()


def fixture_lycoris():
    """loras/lycoris_{loha,lokr}.safetensors written by LyCORIS (kohya names, Tucker convs; LoKr with full and
    low-rank factors), expected/lora_lycoris_<algo>_s<s>.safetensors from LyCORIS's own forward at multiplier s,
    expected/lycoris_checks.json."""
    inp = io_inputs()
    checks = {"lycoris_lora": importlib.metadata.version("lycoris-lora"), "preset": LYCORIS_PRESET, "files": {}}
    base_u, base_te, _ = run_io(load_pipe(), inp)
    for stem, (algo, dim, alpha, conv_dim, conv_alpha, dtype, seed) in LYCORIS_FILES.items():
        pipe = load_pipe()
        net = _lycoris_network(pipe, algo, dim, alpha, conv_dim, conv_alpha)
        g = gen(seed)
        kinds = {}
        with torch.no_grad():
            for m in sorted(net.loras, key=lambda m: m.lora_name):
                params = list(m.named_parameters())
                for _, p in params:  # LyCORIS zero-inits one factor: fill every factor
                    fan_in = int(np.prod(p.shape[1:])) if p.dim() > 1 else 1
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / np.sqrt(fan_in))
                w = m.org_module[0].weight
                diff = m.get_diff_weight(1.0, w.shape)[0]
                # ΔW is linear in each factor: scaling the first one sets |ΔW| ≈ LORA_REL·|W| per element
                params[0][1].mul_(LORA_REL * w.norm() / diff.norm())
                for _, p in params:  # the reference runs on exactly what the file stores
                    p.copy_(p.to(dtype).float())
                key = "+".join(n for n, _ in params)
                kinds[key] = kinds.get(key, 0) + 1
        out = LORAS / f"{stem}.safetensors"
        net.save_weights(str(out), dtype, {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": algo, "conv_dim": conv_dim, "conv_alpha": conv_alpha, "use_tucker": True})})
        canonicalize_safetensors(out)
        info = {"file": f"loras/{stem}.safetensors", "algo": algo, "dim": dim, "alpha": alpha, "conv_dim": conv_dim,
                "conv_alpha": conv_alpha, "dtype": str(dtype), "modules": {"unet": len(net.unet_loras), "text_encoder": len(net.text_encoder_loras)},
                "factor_sets": kinds,
                "how": "lycoris.kohya.create_network(1.0, dim, alpha, vae, text_encoder, unet, algo, conv_dim, conv_alpha, use_tucker=True, preset=LYCORIS_PRESET); "
                "apply_to(te, unet, True, True); every factor random, the first rescaled so |ΔW| ≈ 0.3|W|; save_weights(file, dtype); "
                "outputs from LyCORIS's forward after set_multiplier(s) (unmerged)"}
        for s in (1.0, 0.5):
            net.set_multiplier(s)
            u, te, _ = run_io(pipe, inp)
            save_tensors(EXPECTED / f"lora_{stem}_s{s}.safetensors", {"unet_out_sample": u, "text_encoder_last_hidden_state": te})
            info[f"s{s}_effect_rel"] = {"unet": float((u - base_u).norm() / base_u.norm()), "text_encoder": float((te - base_te).norm() / base_te.norm())}
        checks["files"][stem] = info
        log(f"lycoris {stem}: {info['modules']} {kinds} effect {info['s1.0_effect_rel']}")
    save_json(EXPECTED / "lycoris_checks.json", checks)


# ----------------------------------------------------------------------------- fixtures: text-to-image

T2I = dict(prompt="a photo of a cat", negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.5, height=64, width=64)


def fixture_txt2img():
    """expected/txt2img_<sched>[_lora].safetensors: StableDiffusionPipeline, CPU fp32, 4 steps, CFG 7.5."""
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler

    init_latents = randn([1, 4, 8, 8], 901)
    settings = dict(T2I, output_type="np", latents="init_latents (N(0,1), seed 901), passed as latents=; the pipeline multiplies them by scheduler.init_noise_sigma")
    runs = {}
    for sched_name in ("pndm", "dpmpp_2m"):
        for lora in (False, True):
            pipe = load_pipe()
            if sched_name == "pndm":
                assert isinstance(pipe.scheduler, PNDMScheduler)  # as loaded from diffusers/scheduler
            else:
                pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2)
            if lora:
                pipe.load_lora_weights(str(LORAS), weight_name="diffusers.safetensors")
                pipe.fuse_lora(lora_scale=1.0)
            steps = {}

            def cb(p, i, t, kw, steps=steps):
                steps[f"latents_{i}"] = kw["latents"].detach().clone()
                steps[f"timestep_{i}"] = _ts(torch.as_tensor(t).reshape(()))
                return kw

            with torch.no_grad():
                pe, npe = pipe.encode_prompt(T2I["prompt"], "cpu", 1, True, T2I["negative_prompt"])
                out = pipe(**T2I, latents=init_latents.clone(), output_type="np", callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"])
            image = torch.from_numpy(np.ascontiguousarray(out.images)).to(torch.float32)
            name = f"txt2img_{sched_name}{'_lora' if lora else ''}"
            tensors = {"init_latents": init_latents, "image": image, "prompt_embeds": pe, "negative_prompt_embeds": npe, "timesteps": _ts(pipe.scheduler.timesteps)}
            tensors.update(steps)
            save_tensors(EXPECTED / f"{name}.safetensors", tensors)
            runs[name] = {
                "scheduler": type(pipe.scheduler).__name__,
                "scheduler_built": "as loaded (PNDMScheduler from diffusers/scheduler/scheduler_config.json)" if sched_name == "pndm" else "DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type='dpmsolver++', solver_order=2)",
                "scheduler_config": dict(pipe.scheduler.config),
                "lora": "loras/diffusers.safetensors, load_lora_weights + fuse_lora(lora_scale=1.0)" if lora else None,
                "timesteps": pipe.scheduler.timesteps.tolist(),
                "image_mean": float(image.mean()),
            }
            log(f"{name}: image mean {image.mean():.4f} min {image.min():.3f} max {image.max():.3f}")
    save_json(
        EXPECTED / "txt2img.json",
        {
            "settings": settings,
            "pipeline": "StableDiffusionPipeline.from_pretrained('models/tiny/diffusers'), CPU, float32",
            "tensors": "init_latents [1,4,8,8]; image [1,64,64,3] float 0..1 (output_type='np'); prompt_embeds / negative_prompt_embeds [1,77,24] "
            "(pipe.encode_prompt); timesteps; latents_<i> = latents after step i (callback_on_step_end), timestep_<i>",
            "runs": runs,
        },
    )


# ----------------------------------------------------------------------------- fixtures: one training step


def fixture_train_step():
    """expected/train_step.safetensors: one LoRA step as train_text_to_image_lora.py does it."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(str(DIFF / "unet"))
    unet.requires_grad_(False)
    cfg = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    unet.add_adapter(cfg)
    # deterministic values: lora_A like peft's gaussian init (std 1/r), lora_B non-zero so gradients reach A
    g = gen(8001)
    with torch.no_grad():
        for name, p in sorted(unet.named_parameters(), key=lambda kv: kv[0]):
            if ".lora_A." in name:
                p.copy_(torch.randn(p.shape, generator=g) / cfg.r)
            elif ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    unet.train()
    peft_names = {}  # named_parameters name -> peft (file) key
    for k in get_peft_model_state_dict(unet):
        peft_names[k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")] = k
    params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert set(params) == set(peft_names), set(params) ^ set(peft_names)
    init = {f"init.{peft_names[n]}": p.detach().clone() for n, p in params.items()}

    sched = DDPMScheduler.from_config(sd15_scheduler_config())
    latents = randn([2, 4, 8, 8], 8101)
    noise = randn([2, 4, 8, 8], 8102)
    timesteps = torch.randint(0, sched.config.num_train_timesteps, (2,), generator=gen(8103)).long()
    ehs = randn([2, 77, 24], 8104)
    noisy = sched.add_noise(latents, noise, timesteps)
    target = noise  # prediction_type epsilon
    model_pred = unet(noisy, timesteps, ehs, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(model_pred.float(), target.float(), reduction="mean")
    loss.backward()
    grads = {f"grad.{peft_names[n]}": p.grad.detach().clone() for n, p in params.items()}
    # tutorial optimiser: AdamW(lr 1e-4, betas (0.9, 0.999), weight_decay 1e-2, eps 1e-8), clip_grad_norm 1.0
    plist = [params[n] for n in sorted(params)]
    grad_norm = torch.nn.utils.clip_grad_norm_(plist, 1.0)
    opt = torch.optim.AdamW(plist, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    opt.step()
    after = {f"after.{peft_names[n]}": p.detach().clone() for n, p in params.items()}
    t = {
        "latents": latents,
        "noise": noise,
        "timesteps": timesteps,
        "encoder_hidden_states": ehs,
        "noisy_latents": noisy.detach(),
        "target": target,
        "model_pred": model_pred.detach(),
        "loss": loss.detach(),
        "grad_norm": grad_norm.detach().to(torch.float32),
    }
    t.update(init)
    t.update(grads)
    t.update(after)
    save_tensors(EXPECTED / "train_step.safetensors", t)
    save_json(
        EXPECTED / "train_step.json",
        {
            "lora_config": _lora_metadata(cfg),
            "how": "UNet2DConditionModel.from_pretrained(diffusers/unet); requires_grad_(False); unet.add_adapter(LoraConfig(r=4, lora_alpha=4, "
            "init_lora_weights='gaussian', target_modules=['to_k','to_q','to_v','to_out.0'])); lora_A/lora_B then overwritten (seed 8001: A ~ N(0,1)/r, B ~ N(0,0.05)); "
            "unet.train(); noisy_latents = DDPMScheduler.from_config(SD15).add_noise(latents, noise, timesteps); "
            "model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample; loss = mse_loss(model_pred, noise, 'mean'); loss.backward()",
            "keys": "init.<peft key> (before), grad.<peft key> (after backward, before clipping), after.<peft key> (after clip_grad_norm_(1.0) + one AdamW(lr=1e-4, betas=(0.9,0.999), weight_decay=1e-2, eps=1e-8) step); "
            "<peft key> = get_peft_model_state_dict naming, e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
            "timesteps": timesteps.tolist(),
            "loss": float(loss),
            "grad_norm": float(grad_norm),
            "n_lora_params": len(params),
        },
    )
    log(f"train step: loss {loss.item():.6f}, grad norm {grad_norm:.4f}, {len(params)} LoRA tensors")


# ----------------------------------------------------------------------------- dataset


def make_dataset():
    """dataset/: 12 PNGs of simple shapes + metadata.csv (file_name,caption), the imagefolder layout."""
    import csv

    from PIL import Image, ImageDraw

    if DATASET.exists():
        shutil.rmtree(DATASET)
    DATASET.mkdir(parents=True)
    rng = np.random.default_rng(1234)
    colors = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (235, 210, 40), "purple": (140, 60, 170), "orange": (240, 140, 30)}
    backgrounds = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128), "light blue": (190, 220, 250)}
    shapes = ["circle", "square", "triangle", "star"]
    sizes = [(64, 64)] * 9 + [(80, 64), (64, 96), (96, 72)]
    rows = []
    for i, (w, h) in enumerate(sizes):
        cname = list(colors)[i % len(colors)]
        bname = list(backgrounds)[(i // 2) % len(backgrounds)]
        shape = shapes[i % len(shapes)]
        img = Image.new("RGB", (w, h), backgrounds[bname])
        d = ImageDraw.Draw(img)
        cx, cy = w / 2 + rng.integers(-6, 7), h / 2 + rng.integers(-6, 7)
        r = min(w, h) * (0.25 + 0.1 * rng.random())
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colors[cname])
        elif shape == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colors[cname])
        elif shape == "triangle":
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colors[cname])
        else:
            pts = []
            for k in range(10):
                a = np.pi / 2 + k * np.pi / 5
                rr = r if k % 2 == 0 else r * 0.45
                pts.append((cx + rr * np.cos(a), cy - rr * np.sin(a)))
            d.polygon(pts, fill=colors[cname])
        fname = f"{i:04d}.png"
        img.save(DATASET / fname, format="PNG", optimize=False)
        article = "an" if cname[0] in "aeiou" else "a"
        rows.append((fname, f"{article} {cname} {shape} on a {bname} background"))
    with open(DATASET / "metadata.csv", "w", newline="") as f:
        wr = csv.writer(f, lineterminator="\n")
        wr.writerow(["file_name", "caption"])
        wr.writerows(rows)
    log(f"dataset: {len(rows)} images")


def make_concept():
    """concept/ (32 images) and concept-heldout/ (8): stars, the shape the base model never saw
    (shapes.py; train_base.py draws only circles, squares and triangles), in the tutorial's layout:
    metadata.csv with `file_name,en_text` (docs/tutorial.md). Different seeds, so no overlap."""
    import csv

    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import shapes

    for folder, seed, n in [(CONCEPT, 7001, 32), (CONCEPT_HELDOUT, 7002, 8)]:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        images, captions, _ = shapes.render_many(seed, n, shapes=(shapes.CONCEPT_SHAPE,))
        rows = []
        for i, (img, cap) in enumerate(zip(images, captions)):
            fname = f"{i:04d}.png"
            Image.fromarray(img).save(folder / fname, format="PNG", optimize=True)
            rows.append((fname, cap))
        with open(folder / "metadata.csv", "w", newline="") as f:
            wr = csv.writer(f, lineterminator="\n")
            wr.writerow(["file_name", "en_text"])
            wr.writerows(rows)
        log(f"{folder.name}: {n} images")


# ----------------------------------------------------------------------------- ORT vs diffusers check


def _ort_session(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _io_desc(sess):
    return {
        "inputs": [{"name": i.name, "type": i.type, "shape": i.shape} for i in sess.get_inputs()],
        "outputs": [{"name": o.name, "type": o.type, "shape": o.shape} for o in sess.get_outputs()],
    }


def _initializer_index(path, module_paths):
    """For a few LoRA targets: which initializer holds the weight, its shape/dtype and consumer op."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    consumers = {}
    for n in m.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    producers = {o: n for n in m.graph.node for o in n.output}
    out = {}
    for p in module_paths:
        entry = None
        if p + ".weight" in inits:
            t = inits[p + ".weight"]
            entry = {"initializer": t.name, "shape": list(t.dims), "dtype": onnx.TensorProto.DataType.Name(t.data_type), "consumer": [c.op_type for c in consumers.get(t.name, [])]}
        else:
            # node named /<path with . -> />/<Op> (legacy exporter) or name_scopes metadata (dynamo)
            for n in m.graph.node:
                scopes = None
                for md in n.metadata_props:
                    if md.key == "pkg.torch.onnx.name_scopes":
                        scopes = md.value
                hit = n.op_type in ("MatMul", "Gemm", "Conv") and n.name.startswith("/") and n.name[1:].rsplit("/", 1)[0].replace("/", ".") == p
                if not hit and scopes:
                    try:
                        sc = ast.literal_eval(scopes)  # a Python list repr, e.g. "['', 'down_blocks.0', …]"
                    except (ValueError, SyntaxError):
                        sc = scopes
                    hit = isinstance(sc, list) and len(sc) >= 2 and sc[-2] == p and n.op_type in ("MatMul", "Gemm", "Conv")
                if hit:
                    w = n.input[1]
                    chain = []
                    while w not in inits and w in producers and producers[w].op_type in ("Identity", "Cast", "Transpose"):
                        chain.append(producers[w].op_type)
                        w = producers[w].input[0]
                    t = inits.get(w)
                    entry = {"node": n.name, "op": n.op_type, "initializer": w, "through": chain}
                    if t is not None:
                        entry.update(shape=list(t.dims), dtype=onnx.TensorProto.DataType.Name(t.data_type), external=t.data_location == onnx.TensorProto.EXTERNAL)
                    break
        out[p] = entry
    return out


def check_onnx():
    """ORT (CPU) on every export vs the diffusers PyTorch fixtures; writes expected/onnx_check.json."""
    unet_io = load_file(str(EXPECTED / "unet_io.safetensors"))
    te_io = load_file(str(EXPECTED / "text_encoder_io.safetensors"))
    dec_io = load_file(str(EXPECTED / "vae_decoder_io.safetensors"))
    enc_io = load_file(str(EXPECTED / "vae_encoder_io.safetensors"))
    results = {}

    def run(tag, path, feeds, expected, half=False, name=None):
        sess = _ort_session(path)
        f = {}
        for k, v in feeds.items():
            a = v.numpy()
            if half and a.dtype == np.float32:
                a = a.astype(np.float16)
            f[k] = a
        outs = sess.run(None, f)
        names = [o.name for o in sess.get_outputs()]
        diffs = {}
        for n, ref in expected.items():
            got = outs[names.index(n)].astype(np.float32)
            diffs[n] = {"max_abs": float(np.abs(got - ref.numpy()).max()), "ref_max_abs": float(ref.abs().max())}
        results[tag] = {"path": name or str(Path(path).relative_to(MODELS)), **_io_desc(sess), "diff": diffs}
        log(f"ort {tag}: " + ", ".join(f"{n} {d['max_abs']:.3g}" for n, d in diffs.items()))

    unet_feeds = {"sample": unet_io["sample"], "timestep": unet_io["timestep"], "encoder_hidden_states": unet_io["encoder_hidden_states"]}
    for tag, root, half in (("fp32", ONNX, False), ("fp16", ONNX16, True)):
        run(f"{tag}/unet", root / "unet" / "model.onnx", unet_feeds, {"out_sample": unet_io["out_sample"]}, half)
        run(f"{tag}/text_encoder", root / "text_encoder" / "model.onnx", {"input_ids": te_io["input_ids"]}, {"last_hidden_state": te_io["last_hidden_state"], "pooler_output": te_io["pooler_output"]}, half)
        run(f"{tag}/vae_decoder", root / "vae_decoder" / "model.onnx", {"latent_sample": dec_io["latent_sample"]}, {"sample": dec_io["sample"]}, half)
        run(f"{tag}/vae_encoder", root / "vae_encoder" / "model.onnx", {"sample": enc_io["sample"]}, {"latent_parameters": enc_io["latent_parameters"]}, half)
    # the external-data UNet is not committed: the tests make it (tests/common `made`) with this script
    made = Path(tempfile.mkdtemp())
    subprocess.run([sys.executable, str(MODELS / "scripts" / "onnx_extdata_unet.py"), str(made)], check=True)
    ext_unet = made / "onnx-extdata" / "unet" / "model.onnx"
    run("extdata/unet", ext_unet, unet_feeds, {"out_sample": unet_io["out_sample"]}, name="test-time/onnx-extdata/unet/model.onnx")
    run("dynamo/unet", ONNX_DYN / "unet" / "model.onnx", unet_feeds, {"out_sample": unet_io["out_sample"]})

    targets = [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "mid_block.attentions.0.proj_in",
        "down_blocks.0.resnets.0.conv1",
        "down_blocks.1.resnets.0.conv_shortcut",
        "down_blocks.0.resnets.0.time_emb_proj",
    ]
    te_targets = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc2"]
    index = {}
    for tag, path in (("fp32", ONNX / "unet" / "model.onnx"), ("fp16", ONNX16 / "unet" / "model.onnx"), ("extdata", ext_unet), ("dynamo", ONNX_DYN / "unet" / "model.onnx")):
        index[f"{tag}/unet"] = _initializer_index(path, targets)
    for tag, root in (("fp32", ONNX), ("fp16", ONNX16)):
        index[f"{tag}/text_encoder"] = _initializer_index(root / "text_encoder" / "model.onnx", te_targets)
    save_json(EXPECTED / "onnx_check.json", {"ort_vs_diffusers": results, "initializers": index})
    shutil.rmtree(made)


def write_versions():
    """tiny/VERSIONS.json: the tool versions of both venvs."""
    exp = subprocess.run(
        [str(EXPORT_PY), "-c", "import json,importlib.metadata as m;print(json.dumps({p: m.version(p) for p in "
         "['torch','diffusers','transformers','huggingface-hub','optimum','optimum-onnx','onnx','onnxscript','onnx-ir','onnxruntime','safetensors','numpy']}))"],
        capture_output=True, text=True, check=True,
    ).stdout
    save_json(TINY / "VERSIONS.json", {"ref_venv": versions(), "export_venv": json.loads(exp)})


def fixture_schedulers_cr():
    """expected/scheduler_cr/: fixture_schedulers again with torch's float32 sqrt/log/exp (and
    x ** 0.5) correctly rounded (computed in float64, rounded once). torch's CPU float32 versions
    are MKL VML results that are not correctly rounded and differ between CPUs; with these
    patched, a faithful port must match bit for bit (tests/schedulers.rs)."""
    global EXPECTED
    saved_expected = EXPECTED
    saved = [(torch, n, getattr(torch, n)) for n in ("sqrt", "log", "exp")]
    saved += [(torch.Tensor, n, getattr(torch.Tensor, n)) for n in ("sqrt", "log", "exp", "__pow__")]

    def wrap(orig):
        def f(x, *a, **k):
            if isinstance(x, torch.Tensor) and x.dtype == torch.float32 and not a and not k:
                return orig(x.double()).float()
            return orig(x, *a, **k)

        return f

    pow_orig = torch.Tensor.__pow__

    def pow_(self, e):
        if isinstance(e, (int, float)) and e == 0.5 and self.dtype == torch.float32:
            return self.double().sqrt().float()
        return pow_orig(self, e)

    try:
        for owner, n, orig in saved:
            setattr(owner, n, pow_ if n == "__pow__" else wrap(orig))
        EXPECTED = saved_expected / "scheduler_cr"
        EXPECTED.mkdir(parents=True, exist_ok=True)
        fixture_schedulers()
    finally:
        for owner, n, orig in saved:
            setattr(owner, n, orig)
        EXPECTED = saved_expected


MANIFEST_RULES = [
    ("diffusers/tokenizer/", "make_tokenizer"),
    ("diffusers/", "make_pipeline"),
    ("onnx/", "export_onnx_fp32"),
    ("onnx-fp16/", "export_onnx_fp16"),
    ("onnx-dynamo/", "export_onnx_dynamo"),
    ("expected/tokenizer.json", "fixture_tokenizer"),
    ("expected/scheduler_cr/", "fixture_schedulers_cr"),
    ("expected/scheduler_", "fixture_schedulers"),
    ("expected/model_io.json", "fixture_model_io"),
    ("expected/unet_io", "fixture_model_io"),
    ("expected/text_encoder_io", "fixture_model_io"),
    ("expected/vae_", "fixture_model_io"),
    ("loras/lycoris_", "fixture_lycoris"),
    ("loras/", "make_loras"),
    ("expected/lora_lycoris_", "fixture_lycoris"),
    ("expected/lycoris_checks", "fixture_lycoris"),
    ("expected/lora_", "fixture_loras"),
    ("expected/fused_", "fixture_loras"),
    ("expected/txt2img", "fixture_txt2img"),
    ("expected/train_step", "fixture_train_step"),
    ("dataset/", "make_dataset"),
    ("concept/", "make_concept"),
    ("concept-heldout/", "make_concept"),
    ("expected/onnx_check.json", "check_onnx"),
    ("VERSIONS.json", "write_versions"),
]


def write_manifest():
    """tiny/MANIFEST.json: every file, its size, sha256 and the step that wrote it."""
    import hashlib

    files = {}
    for f in sorted(TINY.rglob("*")):
        rel = f.relative_to(TINY).as_posix()
        if not f.is_file() or rel == "MANIFEST.json":
            continue
        step = next((fn for pre, fn in MANIFEST_RULES if rel.startswith(pre)), None)
        files[rel] = {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "step": step}
    save_json(TINY / "MANIFEST.json", {"total_bytes": sum(v["bytes"] for v in files.values()), "files": files})
    log(f"manifest: {len(files)} files, {sum(v['bytes'] for v in files.values()) / 1e6:.1f} MB")


# ----------------------------------------------------------------------------- main

STEPS = [
    make_tokenizer,
    make_pipeline,
    export_onnx_fp32,
    export_onnx_fp16,
    export_onnx_dynamo,
    fixture_tokenizer,
    fixture_schedulers,
    fixture_schedulers_cr,
    fixture_model_io,
    make_loras,
    fixture_loras,
    fixture_lycoris,
    fixture_txt2img,
    fixture_train_step,
    make_dataset,
    make_concept,
    check_onnx,
    write_versions,
    write_manifest,
]


def main(argv):
    if os.environ.get("PYTHONHASHSEED") != "0":
        # set iteration order (peft/diffusers serialise sets into JSON metadata) must not vary per run
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, PYTHONHASHSEED="0"))
    names = {f.__name__: f for f in STEPS}
    chosen = argv or list(names)
    for n in chosen:
        if n not in names:
            sys.exit(f"unknown step {n}; steps: {' '.join(names)}")
    for n in chosen:
        log(f"== {n}")
        names[n]()


if __name__ == "__main__":
    main(sys.argv[1:])
