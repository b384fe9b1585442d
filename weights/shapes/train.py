"""Train the small shipped model (weights/shapes/shapes.safetensors) from scratch on the shapes world, on a CPU.

Same architecture as Stable Diffusion 1.x at small widths: our AutoencoderKL (f = 4: 64x64 RGB -> 16x16x4), our
UNetModel with cross-attention, and an OpenAI-CLIP text encoder (2 layers, width 64) over the real 49,408-token
CLIP vocabulary and tokenizer. Two stages, as LDM trains them (Rombach et al. 2022, Sec. 3):

1. the autoencoder: L1 + MSE reconstruction plus a tiny KL term (no GAN or perceptual loss: the images are
   flat colours; a larger KL weight keeps the posterior noisy and the decoder learns to blur star points and
   triangle corners away). First on random 32x32 crops (the VAE is convolutional: a quarter of the pixels, a
   quarter of the cost, for the easy part: colours and edges), then on full 64x64 images, which the sharp
   corners need. `scale_factor` = 1 / std of the latents, LDM's `scale_by_std`.
2. the UNet and the text encoder together on the frozen autoencoder's latents, epsilon-prediction with SD's
   linear schedule, the caption dropped to "" 10% of the time (classifier-free guidance, Ho & Salimans 2022),
   Min-SNR loss weights and an EMA of the weights (what is saved), both because CPU time is short.
   The latents of a pool of scenes are computed once (posterior mean and std; a fresh posterior sample is drawn
   every time a scene is used): the encoder would otherwise cost as much as the UNet step.

Everything is seeded; training scenes come from namespace 0 of `imagic.shapes.scene_for_seed` (evaluation uses
other namespaces). Writes shapes.safetensors + shapes.yaml (fp16), curves (CSV, PNG), a txt2img sample grid and
train_summary.json into --out; intermediate state goes to --work.

    python weights/shapes/train.py                 # the shipped recipe
    python weights/shapes/train.py --stage unet    # reuse the VAE from --work
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from imagic import shapes as S
from imagic.clip import build_text_encoder
from imagic.config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from imagic.export import save_checkpoint
from imagic.fileio import write_csv, write_json
from imagic.images import make_grid
from imagic.rundir import plot_losses
from imagic.schedule import NoiseSchedule
from imagic.tokenizer import Tokenizer
from imagic.unet import UNetModel
from imagic.vae import AutoencoderKL

HERE = Path(__file__).resolve().parent


def model_config(scale_factor: float = 1.0) -> ModelConfig:
    """The shipped architecture: ~17 MB in fp16, half of it the CLIP token embedding (49408 x 64).

    SD's schedule ends at linear_end 0.012, where sqrt(alphas_cumprod) is still 0.07: on 16x16 latents of flat
    backgrounds the latents' mean survives that much, the model learns to read the background colour from the
    mean of the noise, and at sampling time (pure noise) backgrounds come out with random colours (the flaw
    described by Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", WACV 2024). With
    linear_end 0.02 the final signal is 0.016 and the colour has to come from the text."""
    return ModelConfig(
        family="custom", image_size=S.IMAGE_SIZE, scale_factor=scale_factor, linear_end=0.02,
        unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 4), attention_resolutions=(2, 4), num_res_blocks=1,
                        num_heads=4, context_dim=64),
        vae=VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=S.IMAGE_SIZE),
        text=TextConfig(kind="openai", width=64, layers=2, heads=2, mlp_width=256, projection_dim=64))


def images_tensor(scenes: Sequence[S.Scene]) -> torch.Tensor:
    """Renders as a (B, 3, H, W) float tensor in [-1, 1]."""
    arr = np.stack([S.render(s) for s in scenes]).astype(np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(127.5).sub(1.0)


def cosine_lr(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_loop(name: str, params: List[torch.nn.Parameter], loss_fn: Callable[[int], Dict[str, float]],
               steps: int, lr: float, log_every: int, t0: float,
               after_step: Optional[Callable[[int], None]] = None) -> List[Dict[str, float]]:
    """AdamW (no weight decay: most token embeddings are never used and must not shrink), cosine schedule, grad
    clipping at 1. `loss_fn(step)` runs forward and backward and returns the numbers to log; `after_step(step)`
    runs after each optimiser step."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rows, window = [], []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        logged = loss_fn(step)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        window.append(logged)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            row = {"step": step + 1, **{k: float(np.mean([w[k] for w in window])) for k in window[0]},
                   "lr": opt.param_groups[0]["lr"], "elapsed_s": round(time.time() - t0, 1),
                   "cpu_s": round(time.process_time(), 1)}
            rows.append(row)
            window = []
            print(f"{name} {row}", flush=True)
        if after_step is not None:
            after_step(step + 1)
    return rows


# --- stage 1: the autoencoder ----------------------------------------------------------------------------------

def train_vae(cfg: ModelConfig, args: argparse.Namespace, t0: float):
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(cfg.vae).train()
    rng = np.random.default_rng([0, args.seed, 1])

    def loss_fn(step: int) -> Dict[str, float]:
        full = step >= args.vae_crop_steps
        x = images_tensor([S.random_scene(rng) for _ in range(args.vae_batch // (2 if full else 1))])
        if not full:  # one random 32x32 crop per batch, on the 4-pixel latent grid
            i, j = (int(v) * 4 for v in rng.integers(0, 9, size=2))
            x = x[:, :, i:i + 32, j:j + 32]
        post = vae.encode(x)
        rec = vae.decode(post.sample())
        l1, l2 = (rec - x).abs().mean(), F.mse_loss(rec, x)
        kl = 0.5 * (post.mean ** 2 + post.std ** 2 - 1 - post.logvar).sum(dim=(1, 2, 3)).mean()
        loss = l1 + l2 + args.kl_weight * kl
        loss.backward()
        return {"l1": l1.item(), "mse": l2.item(), "kl": kl.item()}

    rows = train_loop("vae", list(vae.parameters()), loss_fn, args.vae_steps, args.vae_lr, 25, t0)
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # LDM's scale_by_std: unit-variance latents for the diffusion model
        z = torch.cat([vae.encode(images_tensor([S.random_scene(rng) for _ in range(64)])).mean
                       for _ in range(4)])
    return vae, 1.0 / float(z.flatten().std()), rows


# --- stage 2: UNet + text encoder --------------------------------------------------------------------------

def encode_pool(vae: AutoencoderKL, n: int, seed: int, batch: int = 64):
    """Posterior mean and std of n training scenes (namespace 0), and their captions."""
    scenes = [S.scene_for_seed(i, namespace=0) for i in range(seed * 10**6, seed * 10**6 + n)]
    means, stds = [], []
    with torch.no_grad():
        for k in range(0, n, batch):
            post = vae.encode(images_tensor(scenes[k:k + batch]))
            means.append(post.mean)
            stds.append(post.std)
    return torch.cat(means), torch.cat(stds), [s.caption for s in scenes]


def train_unet(cfg: ModelConfig, vae: AutoencoderKL, args: argparse.Namespace, t0: float):
    torch.manual_seed(args.seed + 1)
    unet, text = UNetModel(cfg.unet).train(), build_text_encoder(cfg.text).train()
    tokenizer = Tokenizer.for_text_config(cfg.text)
    schedule = NoiseSchedule.from_config(cfg)
    means, stds, captions = encode_pool(vae, args.pool, args.seed)
    print(f"encoded a pool of {len(captions)} scenes at {time.time() - t0:.0f}s", flush=True)
    ids = tokenizer(captions)
    empty = tokenizer("")
    gen = torch.Generator().manual_seed(args.seed + 2)

    def loss_fn(step: int) -> Dict[str, float]:
        idx = torch.randint(0, len(captions), (args.batch,), generator=gen)
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * cfg.scale_factor
        drop = torch.rand(args.batch, generator=gen) < args.uncond_prob
        tok = torch.where(drop[:, None], empty, ids[idx])
        t = schedule.sample_timesteps(args.batch, gen)
        noise = torch.randn(z0.shape, generator=gen)
        pred = unet(schedule.add_noise(z0, noise, t), t, text(tok))
        mse = (pred - schedule.training_target(z0, noise, t)).pow(2).mean(dim=(1, 2, 3))
        loss = (min_snr_weight(schedule, t, args.min_snr_gamma) * mse).mean()
        loss.backward()
        return {"loss": loss.item(), "mse": mse.mean().item()}

    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    pairs = list(zip(ema_unet.parameters(), unet.parameters())) + list(zip(ema_text.parameters(), text.parameters()))

    def after_step(step: int) -> None:
        decay = min(args.ema, (1 + step) / (10 + step))  # short memory at first, as in LDM's LitEma
        with torch.no_grad():
            for e, p in pairs:
                e.lerp_(p, 1 - decay)
        if args.snapshot_every and step % args.snapshot_every == 0 and step < args.unet_steps:
            save_checkpoint(args.work / f"shapes_step{step}.safetensors", ema_unet, vae, ema_text, cfg)

    params = list(unet.parameters()) + list(text.parameters())
    rows = train_loop("unet", params, loss_fn, args.unet_steps, args.unet_lr, 50, t0, after_step)
    return ema_unet.eval(), ema_text.eval(), rows


def min_snr_weight(schedule: NoiseSchedule, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction, min(SNR, gamma) / SNR (Hang et al., ICCV 2023): the
    nearly clean timesteps stop dominating the gradient, which speeds up training several times."""
    abar = schedule.alphas_cumprod[t].float()
    snr = abar / (1 - abar)
    return snr.clamp(max=gamma) / snr


# --- outputs -------------------------------------------------------------------------------------------------

def sample_grid(ckpt: Path, out: Path, seeds: Sequence[int] = (0, 1, 2)) -> Dict[str, float]:
    """txt2img through the public loader and editor for one prompt per shape x colour pair (backgrounds
    rotate), scored with the analyser: the fraction of images showing the prompt's shape, colour, background."""
    from imagic.editor import Editor
    from imagic.loader import load_checkpoint

    editor = Editor(load_checkpoint(ckpt), device="cpu", progress=False)
    colors = list(S.COLORS)
    rows, labels, hits = [], [], {"shape": 0, "color": 0, "background": 0, "all": 0}
    n = 0
    for i, shape in enumerate(S.SHAPES):
        for j, color in enumerate(colors[:4]):
            bg = colors[(i + j + 1) % len(colors)]
            bg = bg if bg != color else colors[(i + j + 2) % len(colors)]
            imgs = editor.txt2img(S.caption(shape, color, bg), seeds=list(seeds), guidance_scale=4.0, steps=25)
            rows.append(imgs)
            labels.append(f"{color} {shape} / {bg}")
            for img in imgs:
                a = S.analyze(img)
                ok = {"shape": a.shape == shape, "color": a.color == color, "background": a.background == bg}
                for k, v in ok.items():
                    hits[k] += v
                hits["all"] += all(ok.values())
                n += 1
    make_grid(rows, row_labels=labels, col_labels=[f"seed {s}" for s in seeds]).save(out)
    return {k: v / n for k, v in hits.items()}


EXAMPLE = S.Scene("circle", "red", "blue", cx=23.0, cy=38.0, size=11.0)  # off-centre, so a kept position shows


def write_example(out: Path) -> Path:
    """The demo's input image (`make demo`): a red circle on a blue background."""
    path = out / "example_red_circle.png"
    S.render_pil(EXAMPLE).save(path)
    return path


def plot_curves(vae_rows: List[Dict[str, float]], unet_rows: List[Dict[str, float]], path: Path) -> None:
    curves = {}
    if vae_rows:
        curves["VAE L1 (per 25 steps)"] = [r["l1"] for r in vae_rows]
    if unet_rows:
        curves["UNet + text: eps MSE, unweighted (per 50 steps)"] = [r["mse"] for r in unet_rows]
    plot_losses(curves).save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--work", type=Path, default=Path("runs/shapes_train"))
    p.add_argument("--stage", choices=["all", "vae", "unet"], default="all")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1100)
    p.add_argument("--vae-crop-steps", type=int, default=600, help="steps on 32x32 crops before full images")
    p.add_argument("--vae-batch", type=int, default=16, help="crops per step (half as many full images)")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-8)
    p.add_argument("--pool", type=int, default=6000)
    p.add_argument("--unet-steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=5e-4)
    p.add_argument("--uncond-prob", type=float, default=0.1)
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the UNet and text encoder weights")
    p.add_argument("--snapshot-every", type=int, default=1000, help="UNet steps between snapshots in --work")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cfg = model_config()
    vae_file = args.work / "vae.pt"
    if args.stage in ("all", "vae"):
        vae, scale, vae_rows = train_vae(cfg, args, t0)
        torch.save({"vae": vae.state_dict(), "scale_factor": scale, "rows": vae_rows}, vae_file)
        write_csv(args.out / "curve_vae.csv", list(vae_rows[0]), [list(r.values()) for r in vae_rows])
        if args.stage == "vae":
            return
    saved = torch.load(vae_file, weights_only=True)
    vae = AutoencoderKL(cfg.vae)
    vae.load_state_dict(saved["vae"])
    vae.eval().requires_grad_(False)
    cfg.scale_factor, vae_rows = saved["scale_factor"], saved["rows"]
    unet, text, unet_rows = train_unet(cfg, vae, args, t0)
    write_csv(args.out / "curve_unet.csv", list(unet_rows[0]), [list(r.values()) for r in unet_rows])
    ckpt = save_checkpoint(args.out / "shapes.safetensors", unet, vae, text, cfg, dtype=torch.float16)
    # Wall time depends on what else the machine runs; CPU time is what a dedicated machine would need.
    vae_s, vae_cpu = vae_rows[-1]["elapsed_s"], vae_rows[-1]["cpu_s"]
    unet_s, unet_cpu = time.time() - t0, time.process_time()
    if args.stage == "all":  # this process trained the VAE too: its time is already counted
        unet_s, unet_cpu = unet_s - vae_s, unet_cpu - vae_cpu
    plot_curves(vae_rows, unet_rows, args.out / "curves.png")
    write_example(args.out)
    scores = sample_grid(ckpt, args.out / "samples.png")
    summary = {"wall_seconds": {"vae": vae_s, "unet_and_text": round(unet_s, 1), "total": round(vae_s + unet_s, 1)},
               "cpu_seconds": {"vae": vae_cpu, "unet_and_text": round(unet_cpu, 1),
                               "total": round(vae_cpu + unet_cpu, 1)},
               "scale_factor": cfg.scale_factor,
               "torch_threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(args).items()},
               "txt2img_correct": scores, "file_mb": round(ckpt.stat().st_size / 1e6, 2)}
    write_json(args.out / "train_summary.json", summary)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
