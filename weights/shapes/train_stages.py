"""The shapes recipe's training: one loop for both stages (cosine schedule, gradient clipping, gradients averaged
over the data-parallel group), the autoencoder stage, the UNet + text encoder stage, and `train`, which runs the
stages `--stage` asks for and resumes an interrupted run.

Resuming: the autoencoder (`--work/vae.pt`) is reused when it was trained with the same deciding settings
(`vae_settings`); the UNet stage saves its whole state every `--save-every` steps (`--work/unet_state.pt`:
weights, EMA, optimiser, every process's random stream) and continues from there exactly. Every process starts
from the same seeded weights and draws its own random stream; rank 0's is the one `--procs 1` draws."""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from imagic import shapes as S
from imagic.clip import build_text_encoder
from imagic.config import ModelConfig
from imagic.export import save_checkpoint
from imagic.fileio import atomic_path, write_csv
from imagic.schedule import NoiseSchedule
from imagic.tokenizer import Tokenizer
from imagic.unet import UNetModel
from imagic.vae import AutoencoderKL

from train_data import encode_pool, images_tensor, world_captions
from train_outputs import write_outputs
from train_parallel import Group
from train_recipe import CompactVocabulary, adamw, args_config, cosine_lr, gradient_l1, timestep_sampler


class Clock:
    """Wall and CPU seconds (of this process) since the start, carried over when a run is resumed."""

    def __init__(self, wall: float = 0.0, cpu: float = 0.0):
        self.wall0, self.cpu0 = time.time() - wall, time.process_time() - cpu

    def read(self) -> Dict[str, float]:
        return {"elapsed_s": round(time.time() - self.wall0, 1), "cpu_s": round(time.process_time() - self.cpu0, 1)}


def train_loop(name: str, opt: torch.optim.Optimizer, loss_fn: Callable[[int], Dict[str, float]], steps: int,
               lr: float, log_every: int, clock: Clock, group: Group,
               after_step: Optional[Callable[[int, List], None]] = None,
               start: int = 0, rows: Optional[List[Dict[str, float]]] = None) -> List[Dict[str, float]]:
    """Cosine schedule, grad clipping at 1, from step `start`. `loss_fn(step)` runs forward and backward on this
    process's part of the batch and returns the numbers to log; the gradients are averaged over the group before
    clipping, so every process takes the same step.
    `after_step(step, rows)` runs after each optimiser step."""
    params = [p for g in opt.param_groups for p in g["params"]]
    rows, window = list(rows or []), []
    for step in range(start, steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        logged = loss_fn(step)
        group.average_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        window.append(logged)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            mean = group.average_logs({k: float(np.mean([w[k] for w in window])) for k in window[0]})
            times = clock.read()  # CPU seconds summed over the processes
            row = {"step": step + 1, **mean, "lr": opt.param_groups[0]["lr"], "elapsed_s": times["elapsed_s"],
                   "cpu_s": round(group.total({"cpu": times["cpu_s"]})["cpu"], 1)}
            rows.append(row)
            window = []
            if group.main:
                print(f"{name} {row}", flush=True)
        if after_step is not None:
            after_step(step + 1, rows)
    return rows


# --- stage 1: the autoencoder ----------------------------------------------------------------------------------

def train_vae(cfg: ModelConfig, args: argparse.Namespace, clock: Clock, group: Group
              ) -> Tuple[AutoencoderKL, float, List[Dict[str, float]]]:
    """Every process starts from the same seeded weights and draws its own scenes."""
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(cfg.vae).train()
    rng = np.random.default_rng([0, args.seed, 1] + ([group.rank] if group.rank else []))  # rank 0: --procs 1's
    crops, full_images = group.share(args.vae_batch, "--vae-batch"), group.share(args.vae_batch // 2, "--vae-batch/2")

    def loss_fn(step: int) -> Dict[str, float]:
        full = step >= args.vae_crop_steps
        x = images_tensor([S.random_scene(rng) for _ in range(full_images if full else crops)])
        if not full:  # one random 32x32 crop per batch, on the latent grid
            f = cfg.vae.downsample_factor
            i, j = (int(v) * f for v in rng.integers(0, (S.IMAGE_SIZE - 32) // f + 1, size=2))
            x = x[:, :, i:i + 32, j:j + 32]
        post = vae.encode(x)
        rec = vae.decode(post.sample())
        l1, l2 = (rec - x).abs().mean(), F.mse_loss(rec, x)
        kl = 0.5 * (post.mean ** 2 + post.std ** 2 - 1 - post.logvar).sum(dim=(1, 2, 3)).mean()
        edge = gradient_l1(rec if args.edge_weight else rec.detach(), x)  # logged either way; no backward at 0
        loss = l1 + l2 + args.kl_weight * kl + args.edge_weight * edge
        loss.backward()
        return {"l1": l1.item(), "mse": l2.item(), "kl": kl.item(), "edge": edge.item()}

    rows = train_loop("vae", adamw(list(vae.parameters()), args.vae_lr), loss_fn, args.vae_steps, args.vae_lr, 25,
                      clock, group)
    vae.eval().requires_grad_(False)
    with torch.no_grad():  # LDM's scale_by_std: unit-variance latents for the diffusion model
        z = torch.cat([vae.encode(images_tensor([S.random_scene(rng) for _ in range(64)])).mean
                       for _ in range(4)])
    return vae, 1.0 / float(z.flatten().std()), rows


# --- stage 2: UNet + text encoder --------------------------------------------------------------------------

def train_unet(cfg: ModelConfig, vae: AutoencoderKL, args: argparse.Namespace, group: Group
               ) -> Tuple[UNetModel, torch.nn.Module, List[Dict[str, float]]]:
    """Resumable: every `--save-every` steps the whole state (weights, EMA, optimiser, every process's random
    stream) goes to `--work/unet_state.pt`, and a run that finds it continues from there exactly (with as many
    processes). Every process starts from the same seeded weights; each has its own random stream."""
    torch.manual_seed(args.seed + 1)
    unet, text = UNetModel(cfg.unet).train(), build_text_encoder(cfg.text).train()
    tokenizer = Tokenizer.for_text_config(cfg.text)
    vocab = CompactVocabulary(text, tokenizer(world_captions() + [""]))
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = adamw(params, args.unet_lr)
    gen = torch.Generator().manual_seed(args.seed + 2 + 1000 * group.rank)
    batch = group.share(args.batch, "--batch")
    state_file = args.work / "unet_state.pt"
    modules = {"unet": unet, "text": text, "ema_unet": ema_unet, "ema_text": ema_text, "opt": opt}
    start, rows, clock = 0, [], Clock()
    if state_file.exists():
        state = torch.load(state_file, weights_only=True)
        for k, m in modules.items():
            m.load_state_dict(state[k])
        if len(state["rng"]) != group.world:
            raise SystemExit(f"{state_file} was saved by {len(state['rng'])} processes; resume with --procs "
                             f"{len(state['rng'])}")
        gen.set_state(state["rng"][group.rank])
        start, rows = state["step"], state["rows"]
        clock = Clock(rows[-1]["elapsed_s"], rows[-1]["cpu_s"] / group.world)
        if group.main:
            print(f"resuming from step {start}", flush=True)
    schedule = NoiseSchedule.from_config(cfg)
    means, stds, captions = encode_pool(vae, args.pool, args.seed, group)
    if group.main:
        print(f"encoded a pool of {args.pool} scenes at {clock.read()}", flush=True)
    ids = vocab.remap(tokenizer(captions))
    empty = vocab.remap(tokenizer(""))
    draw_timesteps = timestep_sampler(schedule, args.min_snr_gamma, args.timesteps, args.weight_floor)

    def loss_fn(step: int) -> Dict[str, float]:
        idx = torch.randint(0, len(captions), (batch,), generator=gen)
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * cfg.scale_factor
        drop = torch.rand(batch, generator=gen) < args.uncond_prob
        tok = torch.where(drop[:, None], empty, ids[idx])
        t, weight = draw_timesteps(batch, gen)
        noise = torch.randn(z0.shape, generator=gen)
        noise = noise + args.offset_noise * torch.randn(z0.shape[:2] + (1, 1), generator=gen)
        pred = unet(schedule.add_noise(z0, noise, t), t, text(tok))
        mse = (pred - schedule.training_target(z0, noise, t)).pow(2).mean(dim=(1, 2, 3))
        loss = (weight * mse).mean()
        loss.backward()
        return {"loss": loss.item(), "mse": mse.mean().item()}

    pairs = list(zip(ema_unet.parameters(), unet.parameters())) + list(zip(ema_text.parameters(), text.parameters()))

    def after_step(step: int, rows: List[Dict[str, float]]) -> None:
        decay = min(args.ema, (1 + step) / (10 + step))  # short memory at first, as in LDM's LitEma
        with torch.no_grad():
            for e, p in pairs:
                e.lerp_(p, 1 - decay)
        if step % args.save_every == 0 and step < args.unet_steps and rows and rows[-1]["step"] == step:
            streams = group.gather(gen.get_state())
            if group.main:
                with atomic_path(state_file) as tmp:
                    torch.save({**{k: m.state_dict() for k, m in modules.items()}, "rng": streams,
                                "step": step, "rows": rows}, tmp)
        if args.snapshot_every and step % args.snapshot_every == 0 and step < args.unet_steps and group.main:
            save_checkpoint(args.work / f"shapes_step{step}.safetensors", ema_unet, vae, vocab.full(ema_text), cfg)

    rows = train_loop("unet", opt, loss_fn, args.unet_steps, args.unet_lr, 50, clock, group, after_step, start, rows)
    return ema_unet.eval(), vocab.full(ema_text).eval(), rows


# --- both stages, resumable --------------------------------------------------------------------------------

def train(args: argparse.Namespace, group: Group) -> None:
    """The stages `--stage` asks for: the autoencoder (saved to --work/vae.pt), then UNet + text on it."""
    cfg = args_config(args)
    vae_file = args.work / "vae.pt"
    if args.stage == "vae" or (args.stage == "all" and not vae_done(vae_file, args, group)):
        vae, scale, vae_rows = train_vae(cfg, args, Clock(), group)
        if group.main:
            with atomic_path(vae_file) as tmp:
                torch.save({"vae": vae.state_dict(), "scale_factor": scale, "rows": vae_rows,
                            "settings": vae_settings(args)}, tmp)
            write_csv(args.out / "curve_vae.csv", list(vae_rows[0]), [list(r.values()) for r in vae_rows])
        group.barrier()  # the others read vae.pt next
        if args.stage == "vae":
            return
    saved = torch.load(vae_file, weights_only=True)
    vae = AutoencoderKL(cfg.vae)
    vae.load_state_dict(saved["vae"])
    vae.eval().requires_grad_(False)
    cfg.scale_factor, vae_rows = saved["scale_factor"], saved["rows"]
    unet, text, unet_rows = train_unet(cfg, vae, args, group)
    if group.main:
        write_outputs(cfg, args, vae, unet, text, vae_rows, unet_rows)


def vae_settings(args: argparse.Namespace) -> Dict[str, str]:
    """The arguments that decide the autoencoder: an interrupted run with the same ones reuses its vae.pt."""
    keys = ("seed", "procs", "vae_steps", "vae_crop_steps", "vae_batch", "vae_lr", "kl_weight", "edge_weight",
            "vae_ch_mult", "latent_channels")
    return {k: repr(getattr(args, k)) for k in keys}


def vae_done(vae_file: Path, args: argparse.Namespace, group: Group) -> bool:
    """Whether --work already holds the autoencoder these arguments would train."""
    if not vae_file.exists() or torch.load(vae_file, weights_only=True).get("settings") != vae_settings(args):
        return False
    if group.main:
        print(f"reusing the autoencoder in {vae_file} (trained with the same settings)", flush=True)
    return True
