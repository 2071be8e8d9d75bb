#!/usr/bin/env python3
"""Trains the shipped base model: the tiny SD 1.x architecture of make_tiny.py (UNet 790 k parameters,
CLIP text encoder with the real tokenizer, AutoencoderKL with scale factor 8), from its seeded random
init, on generated captioned scenes (shapes.py: "a red circle on a white background"), with diffusers
on the GPU machine. Reference tooling like make_tiny.py: diffusers' modules, DDPMScheduler and
StableDiffusionPipeline; nothing of lorafuse.

    python3 models/scripts/train_base.py --out DIR [--device cuda]      # models/README.md

Two phases, as Stable Diffusion was made: (1) the VAE learns to reconstruct the scenes, stars included (L1 + MSE + a
small KL term; the UNet never sees a star); its latents are then centred and scaled so that `latents * 0.18215` has unit variance
(folded into quant_conv / post_quant_conv, so the config's scaling_factor stays SD's); (2) the UNet
and the text encoder learn epsilon prediction on the frozen VAE's latents (diffusers'
train_text_to_image.py maths: DDPMScheduler.add_noise, uniform timesteps, MSE with its --snr_gamma
Min-SNR weighting, 5 by default), with 10 % empty
captions for classifier-free guidance and an EMA of the weights, which is what gets saved.
Writes DIR (a diffusers pipeline folder laid out by make_tiny.save_pipeline), DIR/../train_base.json
(settings, losses, timings, device, the evaluation) and DIR/../train_base_samples.png.

Determinism: every random draw comes from --seed (data: numpy; training: torch generators on the
device); torch.use_deterministic_algorithms(warn_only) — a re-run on the same GPU kind and software
gives the same weights; other GPUs give a model of the same quality, not the same bits.
"""

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import make_tiny as mt  # noqa: E402
import shapes  # noqa: E402


def log(msg):
    print(f"[train_base] {msg}", flush=True)


def _render_chunk(args):
    seed, chunk, n, kinds = args
    imgs, caps, _ = shapes.render_many([seed, chunk], n, kinds)
    return imgs, caps


def render_dataset(seed, n, workers, kinds=shapes.BASE_SHAPES):
    chunk = 1000
    jobs = [(seed, i, min(chunk, n - i * chunk), kinds) for i in range(math.ceil(n / chunk))]
    with ProcessPoolExecutor(workers) as ex:
        parts = list(ex.map(_render_chunk, jobs))
    images = np.concatenate([p[0] for p in parts])
    captions = [c for p in parts for c in p[1]]
    return images, captions


def cosine(opt, warmup, total):
    from diffusers.optimization import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total)


class FittedCosine:
    """diffusers' get_cosine_schedule_with_warmup (linear warm-up, half cosine to 0) whose step count
    may be fixed after training started: `fit(total)` once the time per step is known, so a run given
    --unet-seconds still ends its schedule; the fixed count is logged and --unet-steps N reproduces it."""

    def __init__(self, opt, warmup, total):
        self.warmup, self.total = warmup, total
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, self.factor)

    def factor(self, step):
        if step < self.warmup:
            return step / max(1, self.warmup)
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    def step(self):
        self.sched.step()

    def get_last_lr(self):
        return self.sched.get_last_lr()


def to_pixels(u8):
    """uint8 [B, H, W, 3] on the device -> float [-1, 1] [B, 3, H, W]."""
    return u8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(vae, data, args, dev, g, stats):
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = cosine(opt, 200, args.vae_steps)
    n = data.shape[0]
    t0 = time.time()
    for step in range(1, args.vae_steps + 1):
        idx = torch.randint(n, (args.vae_batch,), device=dev, generator=g)
        x = to_pixels(data[idx])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, device=dev, generator=g)
        rec = vae.decode(z).sample
        err = rec - x
        kl = post.kl().mean() / z[0].numel()
        loss = err.abs().mean() + err.square().mean() + args.vae_kl * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 500 == 0 or step == 1:
            stats["vae_loss"].append([step, float(loss), float(err.square().mean()), float(kl)])
            log(f"vae step {step}/{args.vae_steps} loss {float(loss):.5f} mse {float(err.square().mean()):.5f} kl {float(kl):.3f} ({time.time() - t0:.0f} s)")
    vae.eval()
    stats["vae_seconds"] = time.time() - t0


@torch.no_grad()
def vae_check(vae, dev):
    """Reconstruction of 64 held-out scenes of each shape: MSE and how often shapes.read_scene reads
    the reconstruction as the shape drawn."""
    out = {}
    for kind in (*shapes.BASE_SHAPES, shapes.CONCEPT_SHAPE):
        imgs, _, _ = shapes.render_many(99, 64, (kind,))
        x = to_pixels(torch.from_numpy(imgs).to(dev))
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        u8 = ((rec + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        read = sum(shapes.read_scene(im)["shape"] == kind for im in u8) / len(u8)
        out[kind] = {"mse": float((rec - x).square().mean()), "read_as_drawn": read}
    log("VAE reconstruction (MSE, read back as drawn): " + "; ".join(f"{k} {v['mse']:.4f} {v['read_as_drawn']:.0%}" for k, v in out.items()))
    return out


@torch.no_grad()
def fold_latent_scale(vae, data, dev):
    """Centre each latent channel and scale so that latents * scaling_factor have unit std, folded
    into quant_conv (mean half: affine; logvar half: + 2 log k) and post_quant_conv (inverse)."""
    sf = vae.config.scaling_factor
    x = to_pixels(data[:4096])
    mu = torch.cat([vae.encode(x[i : i + 512]).latent_dist.mean for i in range(0, x.shape[0], 512)])
    m = mu.mean(dim=(0, 2, 3))
    std = (mu - m[None, :, None, None]).std()
    k = float(1.0 / sf / std)
    c = m.numel()
    qc, pqc = vae.quant_conv, vae.post_quant_conv
    before = vae.decode(mu[:64]).sample
    qc.weight[:c] *= k
    qc.bias[:c] = (qc.bias[:c] - m) * k
    qc.bias[c:] += 2.0 * math.log(k)
    # post_quant_conv(z / k + m) = (W / k) z + (W m + b)
    w = pqc.weight[:, :, 0, 0]
    pqc.bias += w @ m
    pqc.weight /= k
    mu2 = torch.cat([vae.encode(x[i : i + 512]).latent_dist.mean for i in range(0, 512, 512)])
    after = vae.decode(mu2[:64]).sample
    drift = float((after - before).abs().max())
    log(f"latent fold: channel means {m.tolist()}, std {float(std):.4f} -> k {k:.4f}; scaled std {float((mu2 * sf).std()):.3f}; decode drift {drift:.2e}")
    return {"channel_mean": m.tolist(), "std": float(std), "k": k, "decode_drift": drift}


@torch.no_grad()
def latent_posterior(vae, x, chunk):
    """Mean and std of the VAE's latent distribution for pixels x, encoded `chunk` images at a
    time (diffusers' DiagonalGaussianDistribution: logvar clamped to [-30, 20])."""
    params = torch.cat([vae.encode(x[i : i + chunk]).latent_dist.parameters for i in range(0, x.shape[0], chunk)])
    mean, logvar = params.chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


def train_unet(unet, te, vae, tok, data, captions, args, dev, g, stats):
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(mt.sd15_scheduler_config())
    sf = vae.config.scaling_factor
    mean, std = latent_posterior(vae, to_pixels(data), 1024)
    uniq = sorted(set(captions))
    cap_idx = torch.tensor([uniq.index(c) for c in captions], device=dev)
    ids = tok(uniq + [""], padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids.to(dev)
    empty = ids.shape[0] - 1
    stats["captions"] = len(uniq)
    unet.train()
    te.train()
    params_all = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params_all, lr=args.lr, weight_decay=0.0)
    total = args.unet_steps
    sched = FittedCosine(opt, 500, total)
    ema = [p.detach().clone() for p in params_all]
    alphas = noise_sched.alphas_cumprod.to(dev)
    n = data.shape[0]
    t0 = time.time()
    done = 0
    step = 0
    while step < total:
        step += 1
        idx = torch.randint(n, (args.batch,), device=dev, generator=g)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, device=dev, generator=g)) * sf
        noise = torch.randn(z.shape, device=dev, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (args.batch,), device=dev, generator=g)
        a = alphas[t].sqrt()[:, None, None, None]
        s = (1 - alphas[t]).sqrt()[:, None, None, None]
        noisy = a * z + s * noise  # DDPMScheduler.add_noise
        drop = torch.rand(args.batch, device=dev, generator=g) < args.caption_dropout
        cap = torch.where(drop, torch.full_like(cap_idx[idx], empty), cap_idx[idx])
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            # the text encoder runs once per distinct caption (73 rows, not a batch of 512)
            enc = te(ids)[0][cap]
            pred = unet(noisy, t, enc).sample
        err = (pred.float() - noise.float()).square().mean(dim=(1, 2, 3))
        if args.snr_gamma:
            # Min-SNR weighting (Hang et al. 2023), as train_text_to_image.py's --snr_gamma for epsilon
            # prediction: weight = min(SNR, gamma) / SNR, SNR = alpha_bar / (1 - alpha_bar)
            snr = alphas[t] / (1 - alphas[t])
            err = err * torch.clamp(snr, max=args.snr_gamma) / snr
        loss = err.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params_all, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params_all], 1.0 - decay)
        done = step
        if args.unet_seconds and step == 300:
            torch.cuda.synchronize() if dev.type == "cuda" else None
            per = (time.time() - t0) / step
            total = max(step + 1, int(args.unet_seconds / per))
            sched.total = total
            stats["unet_steps_fitted"] = total
            log(f"{per * 1000:.1f} ms/step: {total} steps fit --unet-seconds {args.unet_seconds:g} (re-run with --unet-steps {total} to reproduce)")
        if step % 500 == 0 or step == 1:
            el = time.time() - t0
            stats["unet_loss"].append([step, float(loss)])
            log(f"unet step {step}/{total} loss {float(loss):.5f} lr {sched.get_last_lr()[0]:.2e} ({el:.0f} s, {el / step * 1000:.1f} ms/step)")
    stats["unet_steps_done"] = done
    stats["unet_seconds"] = time.time() - t0
    with torch.no_grad():
        for p, e in zip(params_all, ema):
            p.copy_(e)
    unet.eval()
    te.eval()
    stats["text_effect"] = text_effect(unet, te, ids, mean, std, cap_idx, alphas, sf, dev)


@torch.no_grad()
def text_effect(unet, te, ids, mean, std, cap_idx, alphas, sf, dev):
    """Does the UNet use the caption? Epsilon MSE on 2048 held draws at t = 200, 500, 800 with the
    scene's own caption, a wrong caption (shuffled) and the empty one: a model that ignores the text
    scores the same three times."""
    g = torch.Generator(dev).manual_seed(7)
    n = mean.shape[0]
    idx = torch.randint(n, (2048,), device=dev, generator=g)
    z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, device=dev, generator=g)) * sf
    noise = torch.randn(z.shape, device=dev, generator=g)
    enc_all = te(ids)[0]
    own = cap_idx[idx]
    wrong = own[torch.randperm(own.shape[0], device=dev, generator=g)]
    empty = torch.full_like(own, ids.shape[0] - 1)
    out = {}
    for tv in (200, 500, 800):
        t = torch.full((2048,), tv, device=dev)
        noisy = alphas[t].sqrt()[:, None, None, None] * z + (1 - alphas[t]).sqrt()[:, None, None, None] * noise
        out[str(tv)] = {k: float(torch.cat([(unet(noisy[i : i + 512], t[i : i + 512], enc_all[c[i : i + 512]]).sample - noise[i : i + 512]).square().mean().reshape(1) for i in range(0, 2048, 512)]).mean())
                        for k, c in (("own", own), ("wrong", wrong), ("empty", empty))}
    log(f"text effect (epsilon MSE own / wrong / empty caption): " + "; ".join(f"t={k}: {v['own']:.4f} / {v['wrong']:.4f} / {v['empty']:.4f}" for k, v in out.items()))
    return out


@torch.no_grad()
def evaluate(dest, dev, out_png, steps=25, guidance=7.5):
    """Every caption the data can have, one image each (seed 0 + index), read back by
    shapes.read_scene; accuracy of background, colour and shape, and a grid PNG."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    pipe = StableDiffusionPipeline.from_pretrained(str(dest), local_files_only=True).to(dev)
    pipe.set_progress_bar_config(disable=True)
    prompts = [(sh, c, b) for sh in shapes.BASE_SHAPES for c in shapes.COLORS for b in shapes.BACKGROUNDS]
    hits = {"background": 0, "color": 0, "shape": 0, "all": 0}
    tiles = []
    for i in range(0, len(prompts), 24):
        chunk = prompts[i : i + 24]
        gens = [torch.Generator(dev).manual_seed(i + j) for j in range(len(chunk))]
        imgs = pipe([shapes.caption(*p) for p in chunk], num_inference_steps=steps, guidance_scale=guidance, height=64, width=64, generator=gens).images
        for (sh, c, b), im in zip(chunk, imgs):
            r = shapes.read_scene(np.asarray(im))
            ok = [r["background"] == b, r["color"] == c, r["shape"] == sh]
            for k, v in zip(["background", "color", "shape"], ok):
                hits[k] += v
            hits["all"] += all(ok)
            tiles.append(np.asarray(im))
    cols = 12
    rows = math.ceil(len(tiles) / cols)
    grid = np.zeros((rows * 64, cols * 64, 3), dtype=np.uint8)
    for k, t in enumerate(tiles):
        grid[(k // cols) * 64 : (k // cols + 1) * 64, (k % cols) * 64 : (k % cols + 1) * 64] = t
    Image.fromarray(grid).save(out_png)
    acc = {k: v / len(prompts) for k, v in hits.items()}
    log(f"evaluation over {len(prompts)} captions ({steps} PNDM steps, CFG {guidance}): {acc}")
    return {"prompts": len(prompts), "steps": steps, "guidance": guidance, "accuracy": acc}


def finetune_decoder(args, dev):
    """Phase 3, on a trained folder (--out): the VAE decoder (and post_quant_conv) learns to draw
    stars as well — the encoder, hence the latent space the UNet learned, stays as it is. Run by the
    shipped model after its GPU run (the first GPU run's VAE saw only circles, squares and
    triangles); cheap enough for a CPU. Writes the VAE back and DIR/../train_base_decoder.json."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    dest = Path(args.out).resolve()
    t0 = time.time()
    vae = AutoencoderKL.from_pretrained(str(dest / "vae")).to(dev).eval()
    stats = {"settings": vars(args), "before": vae_check(vae, dev), "loss": []}
    kinds = (*shapes.BASE_SHAPES, shapes.CONCEPT_SHAPE)
    images, _ = render_dataset(args.seed + 2, args.decoder_images, args.workers, kinds)
    x_all = to_pixels(torch.from_numpy(images).to(dev))
    mean, std = latent_posterior(vae, x_all, 500)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    sched = cosine(opt, 0, args.decoder_finetune)
    g = torch.Generator(dev).manual_seed(args.seed + 2)
    vae.decoder.train()
    for step in range(1, args.decoder_finetune + 1):
        idx = torch.randint(x_all.shape[0], (args.decoder_batch,), device=dev, generator=g)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, device=dev, generator=g)
        err = vae.decode(z).sample - x_all[idx]
        loss = err.abs().mean() + err.square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 200 == 0 or step == 1:
            stats["loss"].append([step, float(loss)])
            log(f"decoder step {step}/{args.decoder_finetune} loss {float(loss):.5f} ({time.time() - t0:.0f} s)")
    vae.eval()
    stats["after"] = vae_check(vae, dev)
    unet = UNet2DConditionModel.from_pretrained(str(dest / "unet"))
    te = CLIPTextModel.from_pretrained(str(dest / "text_encoder"))
    mt.save_pipeline(unet, te, vae.cpu(), dest, tokenizer_dir=mt.DIFF / "tokenizer")
    stats["evaluation"] = [evaluate(dest, dev, dest.parent / f"train_base_samples_cfg{g:g}.png", guidance=g) for g in args.eval_guidance]
    stats["seconds"] = time.time() - t0
    (dest.parent / "train_base_decoder.json").write_text(json.dumps(stats, indent=1) + "\n")
    log(f"decoder fine-tuned and saved in {stats['seconds']:.0f} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="diffusers folder to write")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--images", type=int, default=60000)
    ap.add_argument("--vae-steps", type=int, default=4000)
    ap.add_argument("--vae-batch", type=int, default=128)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--vae-kl", type=float, default=1e-4)
    ap.add_argument("--vae-stars", action=argparse.BooleanOptionalAction, default=True,
                    help="the VAE also learns stars (the tutorial's concept); the UNet never sees one")
    ap.add_argument("--unet-steps", type=int, default=16000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--unet-seconds", type=float, default=None,
                    help="fit the UNet step count to this many seconds after 300 timed steps (the schedule still ends; the count is logged)")
    ap.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR loss weighting (0: plain MSE)")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast for the UNet and text encoder forward passes (weights, optimizer, EMA and the VAE stay fp32); default: on for CUDA")
    ap.add_argument("--eval-guidance", type=float, nargs="+", default=[1.0, 3.0, 7.5])
    ap.add_argument("--decoder-finetune", type=int, default=0, metavar="STEPS",
                    help="instead of training: fine-tune the VAE decoder of the folder --out on all four shapes, stars included (phase 3)")
    ap.add_argument("--decoder-images", type=int, default=8000)
    ap.add_argument("--decoder-batch", type=int, default=32)
    ap.add_argument("--decoder-lr", type=float, default=5e-4)
    args = ap.parse_args()

    dev = torch.device(args.device)
    if args.bf16 is None:
        args.bf16 = dev.type == "cuda"
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = True  # deterministic all the same
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = False
    torch.set_num_threads(max(1, min(8, args.workers)))
    if args.decoder_finetune:
        return finetune_decoder(args, dev)
    dest = Path(args.out).resolve()
    t_all = time.time()
    stats = {"settings": vars(args), "vae_loss": [], "unet_loss": []}
    stats["device"] = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    stats["versions"] = {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__, "transformers": __import__("transformers").__version__}

    t = time.time()
    images, captions = render_dataset(args.seed, args.images, args.workers)
    data = torch.from_numpy(images).to(dev)
    # the VAE is a general image codec (SD's saw every kind of picture): it also learns stars, the
    # tutorial's concept, so that a LoRA can draw them; the UNet and text encoder never see one
    # (--no-vae-stars: the VAE trains on the UNet's own scenes, as the shipped model's GPU run did)
    vae_kinds = (*shapes.BASE_SHAPES, shapes.CONCEPT_SHAPE) if args.vae_stars else shapes.BASE_SHAPES
    vae_data = torch.from_numpy(render_dataset(args.seed + 1, args.images, args.workers, vae_kinds)[0]).to(dev) if args.vae_stars else data
    log(f"data: {len(captions)} scenes, {len(set(captions))} captions; VAE: {vae_data.shape[0]} scenes of {', '.join(vae_kinds)} ({time.time() - t:.1f} s)")

    unet, te, vae = mt.random_modules()
    unet, te, vae = unet.to(dev), te.to(dev), vae.to(dev)
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(mt.DIFF / "tokenizer"))
    g = torch.Generator(dev).manual_seed(args.seed)

    train_vae(vae, vae_data, args, dev, g, stats)
    del vae_data
    stats["vae_reconstruction"] = vae_check(vae, dev)
    for p in vae.parameters():
        p.requires_grad_(False)
    stats["latent_fold"] = fold_latent_scale(vae, data, dev)
    train_unet(unet, te, vae, tok, data, captions, args, dev, g, stats)

    mt.save_pipeline(unet.cpu(), te.cpu(), vae.cpu(), dest, tokenizer_dir=mt.DIFF / "tokenizer")
    log(f"saved {dest}")
    # the saved folder must give the trained modules back (transformers versions differ in layout)
    from transformers import CLIPTextModel

    te2 = CLIPTextModel.from_pretrained(str(dest / "text_encoder")).to(dev).eval()
    probe = tok(["a red circle on a white background"], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(dev)
    with torch.no_grad():
        gap = float((te2(probe)[0] - te.to(dev)(probe)[0]).abs().max())
    log(f"text encoder reloaded from {dest.name}: max difference {gap:.2e}")
    assert gap < 1e-4, "the saved text encoder does not reload as trained"
    stats["evaluation"] = [
        evaluate(dest, dev, dest.parent / f"train_base_samples_cfg{g:g}.png", guidance=g) for g in args.eval_guidance
    ]
    stats["total_seconds"] = time.time() - t_all
    (dest.parent / "train_base.json").write_text(json.dumps(stats, indent=1) + "\n")
    log(f"done in {stats['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
