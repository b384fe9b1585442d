"""Train the small shipped model (weights/shapes/shapes.safetensors) from scratch on the shapes world, on a CPU.

Same architecture as Stable Diffusion 1.x at small widths: our AutoencoderKL (f = 4: 64x64 RGB -> 16x16x4), our
UNetModel with cross-attention, and an OpenAI-CLIP text encoder (2 layers, width 64) over the real 49,408-token
CLIP vocabulary and tokenizer. Two stages, as LDM trains them (Rombach et al. 2022, Sec. 3):

1. the autoencoder: L1 + MSE reconstruction plus a tiny KL term (no GAN or perceptual loss: the images are
   flat colours; a larger KL weight keeps the posterior noisy and the decoder learns to blur star points and
   triangle corners away). First on random 32x32 crops (the VAE is convolutional: a quarter of the pixels, a
   quarter of the cost, for the easy part: colours and edges), then on full 64x64 images, which the sharp
   corners need. `scale_factor` = 1 / std of the latents, LDM's `scale_by_std`.
2. the UNet and the text encoder together on the frozen autoencoder's latents, velocity prediction (as SD 2.x-v)
   with SD's linear schedule ending at 0.02 instead of 0.012 (see `model_config`), the caption dropped to ""
   10% of the time (classifier-free guidance, Ho & Salimans 2022),
   Min-SNR loss weights (`--timesteps importance` draws the timesteps in proportion to them instead: the same
   objective, little compute spent on nearly pure noise; see `timestep_sampler`) and an EMA of the weights (what is
   saved), both because CPU time is short.
   The latents of a pool of scenes are computed once (posterior mean and std; a fresh posterior sample is drawn
   every time a scene is used): the encoder would otherwise cost as much as the UNet step.

Data parallel over `--procs` processes of `--threads` torch threads each (default 2 x 1, one per core of a
2-core machine: a UNet step of batch 32 of the 4-head model shipped until stop 23 took 1.53 s in one process, 0.91 s
in two on half batches; a second intra-op thread helps this tiny model less). The gradients are averaged across processes (one all-reduce of all of them per
step, gloo, over a file store in --work), so every process holds the same weights; the batch is the global one,
split. Rank 0 draws the random streams a single process draws, so `--procs 1` trains the same model in about twice
the time (up to rounding: the fused optimiser, the all-reduce's order of sums).

Everything is seeded; training scenes come from namespace 0 of `imagic.shapes.scene_for_seed` (evaluation uses
other namespaces). Writes shapes.safetensors + shapes.yaml (fp16), curves (CSV, PNG), a txt2img sample grid and
train_summary.json into --out; intermediate state goes to --work.

    python weights/shapes/train.py                 # the shipped recipe, two data-parallel processes
    python weights/shapes/train.py --procs 1       # the same in one process
    python weights/shapes/train.py --head-channels -1 --unet-ch-mult 1,2,4   # the model shipped until stop 23
    python weights/shapes/train.py --stage unet    # reuse the VAE from --work

Interrupted, the same command resumes: the autoencoder is reused when --work holds one trained with the same
settings (a half-trained one, ~7 minutes, starts over), and the UNet continues from its last resumable state.

This file is the command line and the process launcher; the recipe lives in the files beside it, which it imports
from its own folder (the first entry of sys.path when it runs as a script):
    train_data.py      scenes as tensors, the world's captions, the latent pool, the demo's input
    train_recipe.py    the architecture (`model_config`), optimiser, learning-rate schedule, loss weights
                       (`timestep_sampler`), compact vocabulary
    train_parallel.py  the data-parallel group (gloo collectives; a no-op for one process)
    train_stages.py    the training loop, both stages and resuming
    train_outputs.py   the checkpoint, curves, sample grid and summary written into --out
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train_parallel import Group
from train_stages import train

HERE = Path(__file__).resolve().parent


def int_tuple(text: str) -> Tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def parser() -> argparse.ArgumentParser:
    """The recipe's knobs; their defaults are the shipped file's settings (tests/test_shapes_train.py)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--work", type=Path, default=Path("runs/shapes_train"))
    p.add_argument("--stage", choices=["all", "vae", "unet"], default="all")
    p.add_argument("--procs", type=int, default=2, help="data-parallel processes (the batches split over them)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1100)
    p.add_argument("--vae-crop-steps", type=int, default=600, help="steps on 32x32 crops before full images")
    p.add_argument("--vae-batch", type=int, default=16, help="crops per step (half as many full images)")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-8)
    p.add_argument("--edge-weight", type=float, default=0.0,
                   help="weight of an L1 loss on the autoencoder's pixel differences (sharper edges)")
    p.add_argument("--pool", type=int, default=20000)
    p.add_argument("--unet-steps", type=int, default=16000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--uncond-prob", type=float, default=0.1)
    p.add_argument("--prediction", choices=["epsilon", "v"], default="v")
    p.add_argument("--linear-end", type=float, default=0.02, help="end of SD's linear beta schedule")
    p.add_argument("--offset-noise", type=float, default=0.0, help="std of a per-channel constant added to the noise")
    p.add_argument("--attention-resolutions", type=int_tuple, default=(1, 2, 4),
                   help="latent downsampling factors with cross-attention (1 = the full 16x16 latent)")
    p.add_argument("--head-channels", type=int, default=32,
                   help="channels per attention head (-1: 4 heads at every level, as SD 1.x fixes their number, "
                        "the model shipped until stop 23)")
    p.add_argument("--context-length", type=int, default=77,
                   help="text tokens per prompt (SD's 77; every shapes caption is 9 with start and end)")
    p.add_argument("--vae-ch-mult", type=int_tuple, default=(1, 2, 2),
                   help="autoencoder channel multipliers; one downsampling per entry after the first (f = 4)")
    p.add_argument("--latent-channels", type=int, default=4, help="channels of the latent (SD: 4)")
    p.add_argument("--unet-ch-mult", type=int_tuple, default=(1, 1, 4),
                   help="UNet channel multipliers of model_channels 32, one per level (16x16, 8x8, 4x4; "
                        "SD's pattern 1,2,4 is the model shipped until stop 23)")
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--weight-floor", type=float, default=0.0,
                   help="lowest loss weight of any timestep (0: plain Min-SNR, the shipped run)")
    p.add_argument("--timesteps", choices=["uniform", "importance"], default="uniform",
                   help="draw t uniformly and weight the loss (the shipped run), or in proportion to its Min-SNR "
                        "weight (the same objective, less variance)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the UNet and text encoder weights")
    p.add_argument("--snapshot-every", type=int, default=2000, help="UNet steps between snapshots in --work")
    p.add_argument("--save-every", type=int, default=250, help="UNet steps between resumable states in --work")
    return p


def main() -> None:
    args = parser().parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.procs == 1:
        run(0, args)
        return
    store = args.work / "dist_store"  # gloo's rendezvous; a stale one from a killed run would hang the next
    store.unlink(missing_ok=True)
    mp.spawn(run, args=(args, os.getpid()), nprocs=args.procs)


def run(rank: int, args: argparse.Namespace, launcher: Optional[int] = None) -> None:
    """One data-parallel worker; rank 0 writes every output."""
    torch.set_num_threads(args.threads)
    if args.procs == 1:
        train(args, Group())
        return
    exit_with(launcher)
    dist.init_process_group("gloo", init_method=(args.work / "dist_store").resolve().as_uri(), rank=rank,
                            world_size=args.procs)
    try:
        train(args, Group(rank, args.procs))
    finally:
        dist.destroy_process_group()


def exit_with(launcher: Optional[int], every: float = 1.0) -> None:
    """Ends this worker as soon as its launching process is gone. `mp.spawn` workers outlive a launcher killed by a
    signal (SIGTERM or SIGKILL skip its clean-up), and would go on training and saving into `--work`, racing the run
    that resumes there. Every file is written atomically, so exiting at any point leaves the last saved state whole."""
    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(every)
        os._exit(1)

    if launcher is not None:
        threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()


if __name__ == "__main__":
    main()
