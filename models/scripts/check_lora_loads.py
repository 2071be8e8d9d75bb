#!/usr/bin/env python3
"""Load a LoRA file written by `lorafuse train` into a diffusers pipeline and report what did not fit.

    models/.venv-ref/bin/python models/scripts/check_lora_loads.py --model models/tiny/diffusers \
        --lora OUTPUT_DIR/pytorch_lora_weights.safetensors [--json]

Runs `StableDiffusionPipeline.load_lora_weights(dir, weight_name=file)` (what the diffusers LoRA
tutorial does), then compares the file with the peft layers diffusers injected:
- missing: modules the file has that got no LoRA layer,
- unexpected: LoRA layers that the file does not explain,
- value/scale mismatches: each injected layer's `scaling · B @ A` against the file's
  `(alpha / r) · up @ down` (diffusers and PEFT dialects; kohya files are checked by count),
- warnings diffusers / peft logged while loading (unexpected keys and the like).
Prints a JSON report and exits 1 when anything is off.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from safetensors import safe_open


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


# Logged by diffusers for every UNet-only LoRA, including the ones its own training script writes.
BENIGN = ("No LoRA keys associated to CLIPTextModel",)


def _relevant(msg):
    return ("lora" in msg.lower() or "key" in msg.lower()) and not msg.startswith(BENIGN)


def _file_modules(path):
    """module key -> (down, up, alpha or None), keys as in the file without the tensor suffix."""
    out, meta = {}, {}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        keys = list(f.keys())
        t = {k: f.get_tensor(k) for k in keys}
    suffixes = [
        (".lora.down.weight", ".lora.up.weight"),
        (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
        (".lora_A.weight", ".lora_B.weight"),
        (".lora_down.weight", ".lora_up.weight"),
    ]
    for k in keys:
        for d, u in suffixes:
            if k.endswith(d):
                base = k[: -len(d)]
                alpha = t.get(base + ".alpha")
                out[base] = (t[k].float(), t[base + u].float(), None if alpha is None else float(alpha))
    return out, meta, keys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="diffusers pipeline folder")
    ap.add_argument("--lora", required=True, help="LoRA safetensors file")
    ap.add_argument("--json", action="store_true", help="print only the JSON report")
    args = ap.parse_args(argv)

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlog

    collect = _Collect()
    for name in ("diffusers", "peft", "transformers"):
        logging.getLogger(name).addHandler(collect)
    dlog.set_verbosity_warning()

    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32, safety_checker=None, local_files_only=True)
    lora = Path(args.lora)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="lorafuse")

    modules, meta, keys = _file_modules(lora)
    kohya = any(k.startswith("lora_unet_") or k.startswith("lora_te") for k in keys)
    adapter_meta = json.loads(meta["lora_adapter_metadata"]) if "lora_adapter_metadata" in meta else {}

    injected = {}  # "unet.<path>" / "text_encoder.<path>" -> (A, B, scaling)
    for comp_name in ("unet", "text_encoder"):
        comp = getattr(pipe, comp_name)
        for name, mod in comp.named_modules():
            if hasattr(mod, "lora_A") and "lorafuse" in getattr(mod, "lora_A", {}):
                injected[f"{comp_name}.{name}"] = (
                    mod.lora_A["lorafuse"].weight.detach().float(),
                    mod.lora_B["lorafuse"].weight.detach().float(),
                    float(mod.scaling["lorafuse"]),
                )

    report = {"file": str(lora), "dialect": "kohya" if kohya else "diffusers", "file_modules": len(modules), "injected": len(injected)}
    missing, unexpected, mismatch = [], [], []
    if kohya:
        if len(injected) != len(modules):
            missing.append(f"{len(modules)} modules in the file, {len(injected)} LoRA layers injected")
    else:
        def norm(k):
            # text encoder keys may carry text_model. (transformers 4.x) or not
            return k.replace("text_encoder.text_model.", "text_encoder.")

        inj = {norm(k): v for k, v in injected.items()}
        for base, (down, up, alpha) in modules.items():
            key = norm(base)
            if key not in inj:
                missing.append(base)
                continue
            a, b, scaling = inj[key]
            r = down.shape[0]
            comp = key.split(".", 1)[0]
            path = key.split(".", 1)[1]
            want_alpha = alpha
            if want_alpha is None and adapter_meta:
                want_alpha = adapter_meta.get(f"{comp}.alpha_pattern", {}).get(path, adapter_meta.get(f"{comp}.lora_alpha"))
            want_scale = (want_alpha / r) if want_alpha is not None else 1.0
            d_file = want_scale * (up.flatten(1) @ down.flatten(1))
            d_got = scaling * (b.flatten(1) @ a.flatten(1))
            err = (d_file - d_got).abs().max().item() / max(d_file.abs().max().item(), 1e-30)
            if abs(scaling - want_scale) > 1e-6 or err > 1e-6:
                mismatch.append({"module": base, "scaling": scaling, "expected_scaling": want_scale, "rel_err": err})
        known = {norm(b) for b in modules}
        unexpected = [k for k in inj if k not in known]
    report.update(missing=missing, unexpected=unexpected, mismatch=mismatch, warnings=[w for w in collect.records if _relevant(w)])
    ok = not (missing or unexpected or mismatch or report["warnings"])
    report["ok"] = ok
    print(json.dumps(report, indent=None if args.json else 2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
