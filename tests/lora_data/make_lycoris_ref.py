#!/usr/bin/env python3
"""Writes lycoris_ref.safetensors (LyCORIS state dicts under kohya names) and
lycoris_ref_expected.safetensors (ΔW per module, key = canonical diffusers module path).

ΔW is computed here with LyCORIS's own formulas, restated in torch (see
KohakuBlueleaf/LyCORIS lycoris/modules/{loha,lokr,locon}.py and lycoris/functional/{loha,lokr,general}.py):
  LoHa   ΔW = (w1a@w1b) * (w2a@w2b) * scale;  Tucker: einsum("i j ..., j r, i p -> p r ...", t, w_b, w_a)
  LoKr   ΔW = kron(w1, w2) * scale, w1 = w1 or w1a@w1b, w2 = w2 or w2a@w2b or
         einsum("i j ..., i p, j r -> p r ...", t2, w2a, w2b); both factors full -> scale 1
  LoCon  Tucker: einsum("m n ..., i m, n j -> i j ...", mid, up, down) * scale
  scale = alpha / rank (rank: rows of the `_b` / `lora_down` factor)
Run: models/.venv-ref/bin/python tests/lora_data/make_lycoris_ref.py
"""
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
g = torch.Generator().manual_seed(1234)


def r(*shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64).float()


def kohya(path):
    return "lora_unet_" + path.replace(".", "_")


sd, exp = {}, {}

# LoHa on a Linear [8, 6], r=2, alpha=1 -> scale 0.5
p = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
w1a, w1b, w2a, w2b = r(8, 2), r(2, 6), r(8, 2), r(2, 6)
sd.update({f"{kohya(p)}.hada_w1_a": w1a, f"{kohya(p)}.hada_w1_b": w1b, f"{kohya(p)}.hada_w2_a": w2a,
           f"{kohya(p)}.hada_w2_b": w2b, f"{kohya(p)}.alpha": torch.tensor(1.0)})
exp[p] = ((w1a @ w1b) * (w2a @ w2b)) * 0.5

# LoHa on a Conv [8, 6, 3, 3] without Tucker: w_b [r, in*9], alpha=4, r=2 -> 2
p = "down_blocks.0.resnets.0.conv1"
w1a, w1b, w2a, w2b = r(8, 2), r(2, 54), r(8, 2), r(2, 54)
sd.update({f"{kohya(p)}.hada_w1_a": w1a, f"{kohya(p)}.hada_w1_b": w1b, f"{kohya(p)}.hada_w2_a": w2a,
           f"{kohya(p)}.hada_w2_b": w2b, f"{kohya(p)}.alpha": torch.tensor(4.0, dtype=torch.float16)})
exp[p] = (((w1a @ w1b) * (w2a @ w2b)) * 2.0).reshape(8, 6, 3, 3)

# LoHa Tucker on a Conv [8, 6, 3, 3]: t [r, r, 3, 3], w_a [r, out], w_b [r, in], alpha=2, r=2 -> 1
p = "down_blocks.0.resnets.0.conv2"
t1, w1a, w1b, t2, w2a, w2b = r(2, 2, 3, 3), r(2, 8), r(2, 6), r(2, 2, 3, 3), r(2, 8), r(2, 6)
sd.update({f"{kohya(p)}.hada_t1": t1, f"{kohya(p)}.hada_w1_a": w1a, f"{kohya(p)}.hada_w1_b": w1b,
           f"{kohya(p)}.hada_t2": t2, f"{kohya(p)}.hada_w2_a": w2a, f"{kohya(p)}.hada_w2_b": w2b,
           f"{kohya(p)}.alpha": torch.tensor(2, dtype=torch.int64)})
rb1 = torch.einsum("i j ..., j r, i p -> p r ...", t1, w1b, w1a)
rb2 = torch.einsum("i j ..., j r, i p -> p r ...", t2, w2b, w2a)
exp[p] = rb1 * rb2 * 1.0

# LoKr on a Linear [8, 6]: w1 [2, 2] full, w2 = w2a [4, r] @ w2b [r, 3], r=2, alpha=3 -> 1.5
p = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
w1, w2a, w2b = r(2, 2), r(4, 2), r(2, 3)
sd.update({f"{kohya(p)}.lokr_w1": w1, f"{kohya(p)}.lokr_w2_a": w2a, f"{kohya(p)}.lokr_w2_b": w2b,
           f"{kohya(p)}.alpha": torch.tensor(3.0)})
exp[p] = torch.kron(w1, w2a @ w2b) * 1.5

# LoKr on a Linear [8, 6], both factors full: scale 1 whatever alpha says
p = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"
w1, w2 = r(2, 3), r(4, 2)
sd.update({f"{kohya(p)}.lokr_w1": w1, f"{kohya(p)}.lokr_w2": w2, f"{kohya(p)}.alpha": torch.tensor(9.0)})
exp[p] = torch.kron(w1, w2)

# LoKr on a Conv [8, 6, 3, 3], both decomposed: w1a [2, r] w1b [r, 2]; w2a [4, r] w2b [r, 3*9]; alpha=1, r=2
p = "down_blocks.0.resnets.1.conv1"
w1a, w1b, w2a, w2b = r(2, 2), r(2, 2), r(4, 2), r(2, 27)
sd.update({f"{kohya(p)}.lokr_w1_a": w1a, f"{kohya(p)}.lokr_w1_b": w1b, f"{kohya(p)}.lokr_w2_a": w2a,
           f"{kohya(p)}.lokr_w2_b": w2b, f"{kohya(p)}.alpha": torch.tensor(1.0)})
exp[p] = (torch.kron(w1a @ w1b, w2a @ w2b) * 0.5).view(8, 6, 3, 3)

# LoKr Tucker on a Conv [8, 6, 3, 3]: w1 [2, 2]; t2 [r, r, 3, 3], w2a [r, 4], w2b [r, 3]; alpha=2, r=2
p = "down_blocks.0.resnets.1.conv2"
w1, t2, w2a, w2b = r(2, 2), r(2, 2, 3, 3), r(2, 4), r(2, 3)
sd.update({f"{kohya(p)}.lokr_w1": w1, f"{kohya(p)}.lokr_t2": t2, f"{kohya(p)}.lokr_w2_a": w2a,
           f"{kohya(p)}.lokr_w2_b": w2b, f"{kohya(p)}.alpha": torch.tensor(2.0)})
w2 = torch.einsum("i j ..., i p, j r -> p r ...", t2, w2a, w2b)
exp[p] = torch.kron(w1.unsqueeze(-1).unsqueeze(-1), w2.contiguous()) * 1.0  # make_kron

# LoCon Tucker (lora_mid) on a Conv [8, 6, 3, 3]: down [r, 6, 1, 1], mid [r, r, 3, 3], up [8, r, 1, 1]; alpha=1, r=2
p = "up_blocks.0.resnets.0.conv1"
down, mid, up = r(2, 6, 1, 1), r(2, 2, 3, 3), r(8, 2, 1, 1)
sd.update({f"{kohya(p)}.lora_down.weight": down, f"{kohya(p)}.lora_mid.weight": mid,
           f"{kohya(p)}.lora_up.weight": up, f"{kohya(p)}.alpha": torch.tensor(1.0)})
exp[p] = torch.einsum("m n ..., i m, n j -> i j ...", mid, up.reshape(8, 2), down.reshape(2, 6)) * 0.5

# Standard LoCon 3x3 on a Conv [8, 6, 3, 3]: (up.flatten(1) @ down.flatten(1)).reshape; alpha=2, r=2
p = "up_blocks.0.resnets.0.conv2"
down, up = r(2, 6, 3, 3), r(8, 2, 1, 1)
sd.update({f"{kohya(p)}.lora_down.weight": down, f"{kohya(p)}.lora_up.weight": up, f"{kohya(p)}.alpha": torch.tensor(2.0)})
exp[p] = (up.flatten(1) @ down.flatten(1)).reshape(8, 6, 3, 3) * 1.0

save_file({k: v.contiguous() for k, v in sd.items()}, str(HERE / "lycoris_ref.safetensors"), metadata={"ss_network_module": "lycoris.kohya"})
save_file({k: v.contiguous().float() for k, v in exp.items()}, str(HERE / "lycoris_ref_expected.safetensors"))
print(f"{len(sd)} LyCORIS tensors, {len(exp)} expected deltas")
