"""What the shapes recipe writes into `--out` once trained (`write_outputs`: the fp16 checkpoint and its yaml,
curves as CSV and PNG, the demo's input, a scored txt2img grid, train_summary.json), and the two diagnostics it and
the README use on any checkpoint: txt2img correctness (`sample_grid`) and where img2img loses shapes
(`img2img_shape_kept`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from imagic import shapes as S
from imagic.config import ModelConfig
from imagic.export import save_checkpoint
from imagic.fileio import write_csv, write_json
from imagic.images import make_grid, save_png
from imagic.rundir import plot_losses
from imagic.unet import UNetModel
from imagic.vae import AutoencoderKL

from train_data import write_example


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
    save_png(make_grid(rows, row_labels=labels, col_labels=[f"seed {s}" for s in seeds]), out)
    return {k: v / n for k, v in hits.items()}


def img2img_shape_kept(ckpt: Path, strengths: Sequence[float], n: int = 24) -> Dict[float, float]:
    """Where a model loses shapes: img2img (SDEdit) of `n` held-out scenes (tuning namespace 2, circles left out:
    a blob reads as a circle) with their own caption, from each strength; the fraction whose analysed shape is
    still the scene's. Strength 0.1 starts at t = 100 (SNR 7.6 on the 0.02 schedule), 0.3 at SNR 1, 0.7 at 0.03."""
    from imagic.editor import Editor
    from imagic.loader import load_checkpoint

    editor = Editor(load_checkpoint(ckpt), device="cpu", progress=False)
    scenes = [s for s in (S.scene_for_seed(i, namespace=2) for i in range(10 * n)) if s.shape != "circle"][:n]
    kept = {}
    for strength in strengths:
        hits = sum(S.analyze(editor.img2img(S.render_pil(s), S.caption(s.shape, s.color, s.background),
                                            strength=strength, seeds=[0], guidance_scale=4.0, steps=25)[0]).shape
                   == s.shape for s in scenes)
        kept[strength] = hits / len(scenes)
    return kept


def plot_curves(vae_rows: List[Dict[str, float]], unet_rows: List[Dict[str, float]], path: Path) -> None:
    curves = {}
    if vae_rows:
        curves["VAE L1 (per 25 steps)"] = [r["l1"] for r in vae_rows]
    if unet_rows:
        # The objective, comparable across --timesteps (the plain MSE is over differently drawn t); with
        # --weight-floor the weights are floored, so compare such runs by the logged "mse" instead.
        curves["UNet + text: Min-SNR-weighted v MSE (per 50 steps)"] = [r["loss"] for r in unet_rows]
    save_png(plot_losses(curves), path)


def write_outputs(cfg: ModelConfig, args: argparse.Namespace, vae: AutoencoderKL, unet: UNetModel,
                  text: torch.nn.Module, vae_rows: List[Dict[str, float]], unet_rows: List[Dict[str, float]]) -> None:
    """The checkpoint (fp16), curves, demo input, sample grid and train_summary.json into --out."""
    write_csv(args.out / "curve_unet.csv", list(unet_rows[0]), [list(r.values()) for r in unet_rows])
    ckpt = save_checkpoint(args.out / "shapes.safetensors", unet, vae, text, cfg, dtype=torch.float16)
    # Wall time depends on what else the machine runs; CPU time (all processes) is what the recipe needs.
    vae_s, vae_cpu = vae_rows[-1]["elapsed_s"], vae_rows[-1]["cpu_s"]
    unet_s, unet_cpu = unet_rows[-1]["elapsed_s"], unet_rows[-1]["cpu_s"]
    plot_curves(vae_rows, unet_rows, args.out / "curves.png")
    write_example(args.out)
    scores = sample_grid(ckpt, args.out / "samples.png")
    summary = {"wall_seconds": {"vae": vae_s, "unet_and_text": round(unet_s, 1), "total": round(vae_s + unet_s, 1)},
               "cpu_seconds": {"vae": vae_cpu, "unet_and_text": round(unet_cpu, 1),
                               "total": round(vae_cpu + unet_cpu, 1)},
               "scale_factor": cfg.scale_factor, "processes": args.procs, "torch_threads": args.threads,
               "args": {k: str(v) for k, v in vars(args).items()},
               "txt2img_correct": scores, "file_mb": round(ckpt.stat().st_size / 1e6, 2)}
    write_json(args.out / "train_summary.json", summary)
    print(json.dumps(summary, indent=1))
