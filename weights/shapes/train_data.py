"""The shapes recipe's data: scenes of the shapes world (`imagic.shapes`, rendered on the fly) as image tensors,
every caption of the world, the pool of latents the UNet stage trains on, and the demo's input image.

Training scenes come from namespace 0 of `imagic.shapes.scene_for_seed` (evaluation uses other namespaces)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch

from imagic import shapes as S
from imagic.images import save_png
from imagic.vae import AutoencoderKL

from train_parallel import Group


def images_tensor(scenes: Sequence[S.Scene]) -> torch.Tensor:
    """Renders as a (B, 3, H, W) float tensor in [-1, 1]."""
    arr = np.stack([S.render(s) for s in scenes]).astype(np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(127.5).sub(1.0)


def world_captions() -> List[str]:
    """Every caption of the shapes world (4 shapes x 6 colours x 5 other backgrounds = 120)."""
    return [S.caption(shape, color, bg) for shape in S.SHAPES for color in S.COLORS for bg in S.COLORS if bg != color]


def encode_pool(vae: AutoencoderKL, n: int, seed: int, group: Group, batch: int = 64
                ) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """Posterior mean and std of this process's share of n training scenes (namespace 0: every world-th one), and
    their captions. Each process samples its half batches from its own share."""
    scenes = [S.scene_for_seed(i, namespace=0) for i in range(seed * 10**6 + group.rank, seed * 10**6 + n, group.world)]
    means, stds = [], []
    with torch.no_grad():
        for k in range(0, len(scenes), batch):
            post = vae.encode(images_tensor(scenes[k:k + batch]))
            means.append(post.mean)
            stds.append(post.std)
    return torch.cat(means), torch.cat(stds), [s.caption for s in scenes]


EXAMPLE = S.Scene("circle", "red", "blue", cx=23.0, cy=38.0, size=11.0)  # off-centre, so a kept position shows


def write_example(out: Path) -> Path:
    """The demo's input image (`make demo`): a red circle on a blue background."""
    path = out / "example_red_circle.png"
    save_png(S.render_pil(EXAMPLE), path)
    return path
