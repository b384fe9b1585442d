"""The `imagic` command line. User mistakes (bad path, bad image, bad checkpoint, bad argument) end with one line on
stderr and a non-zero exit code, never a Python traceback."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable, Dict, List, Optional

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in what the user asked for; printed as one line."""


def _user_errors() -> tuple:
    """The exception types that mean 'the input is bad', not 'the program is broken'."""
    from .checkpoint import CheckpointError
    from .config import ConfigError

    from .fileio import OutputError
    from .images import ImageError
    from .rundir import RunError
    from .training import NumericalError

    return (UserError, CheckpointError, ConfigError, ImageError, OutputError, RunError, NumericalError)


def _print_inspect(info: Dict) -> None:
    print(f"file:             {info['path']}")
    print(f"family:           {info['family']}")
    print(f"prediction type:  {info['prediction_type']}")
    print(f"native size:      {info['native_resolution']}px")
    print(f"EMA weights:      {'yes' if info['ema'] else 'no'}")
    print("evidence:")
    for line in info["evidence"]:
        print(f"  - {line}")
    print("components:")
    for name, present in info["components"].items():
        n = info["parameters"].get(name, 0)
        dt = ", ".join(info["dtypes"].get(name, [])) or "-"
        print(f"  {name:13s} {'present' if present else 'ABSENT':8s} {n:>13,d} params  dtype {dt}")
    if info["parameters"].get("ema"):
        print(f"  {'ema':13s} {'present':8s} {info['parameters']['ema']:>13,d} params")
    print(f"unknown keys:     {len(info['unknown_keys'])}")
    for k in info["unknown_keys"][:20]:
        print(f"  {k}")
    for p in info["problems"]:
        print(f"PROBLEM: {p}")


def cmd_inspect(args: argparse.Namespace) -> int:
    from .loader import inspect_checkpoint

    info = inspect_checkpoint(args.path, config=args.config, probe=not args.no_probe)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_inspect(info)
    return 1 if info["problems"] else 0


def _positive(kind: type, minimum: float = 0, inclusive: bool = False) -> Callable[[str], float]:
    """An argparse type that rejects out-of-range numbers with a one-line message."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a{'n integer' if kind is int else ' number'}, got {text!r}") from None
        if value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum}, got {text}")
        return value
    return parse


def _prompt(text: str) -> str:
    from .tokenizer import clean

    if not clean(text):  # what the tokenizer reads: whitespace, NULs and other controls alone leave nothing
        raise argparse.ArgumentTypeError("the prompt is empty" + (" once cleaned" if text.strip() else ""))
    return text


def _add_model_args(p: argparse.ArgumentParser, ckpt_required: bool = True) -> None:
    p.add_argument("--ckpt", required=ckpt_required, help="SD checkpoint (.safetensors / .ckpt)")
    p.add_argument("--config", help="original LDM inference yaml (default: <checkpoint>.yaml if present)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="frozen weights and autocast precision; trainable tensors stay fp32 (default fp32)")
    p.add_argument("--use-ema", action="store_true", help="use the UNet's EMA weights when the file has them")
    p.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto",
                   help="fused Triton kernels (auto: on CUDA when Triton is installed) or the torch path")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="input photo (any common format)")
    p.add_argument("--prompt", required=True, type=_prompt, help='target text, e.g. "a photo of a sitting dog"')
    p.add_argument("--out", required=True, help="run directory (an existing one is resumed)")
    _add_fit_args(p)


def _add_fit_args(p: argparse.ArgumentParser) -> None:
    """The stage 1-2 settings (FitSettings), shared by `edit`, `train` and `batch`."""
    p.add_argument("--fit", choices=["crop", "pad"], default="crop", help="non-square images: centre-crop or pad")
    p.add_argument("--finetune", choices=["lora", "full"], default="lora")
    p.add_argument("--embed-steps", type=_positive(int, 0, True), default=1000)
    p.add_argument("--embed-lr", type=_positive(float), default=2e-3)
    p.add_argument("--finetune-steps", type=_positive(int, 0, True), help="default 500 (lora) / 1500 (full)")
    p.add_argument("--finetune-lr", type=_positive(float), help="default 2e-4 (lora) / 5e-7 (full)")
    p.add_argument("--lora-rank", type=_positive(int), default=4)
    p.add_argument("--lora-alpha", type=_positive(float), help="LoRA alpha (default: = rank)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training noise and timesteps")
    p.add_argument("--save-every", type=_positive(int), default=50, help="steps between resumable saves")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")


def _add_sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--alpha", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9, 1.0],
                   help="interpolation weights of the target embedding (paper eq. 4)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--guidance-scale", type=_positive(float, 0, True), default=7.5)
    p.add_argument("--steps", type=_positive(int), default=50, help="DDIM steps")
    p.add_argument("--ddim-eta", type=_positive(float, 0, True), default=0.0)
    p.add_argument("--negative-prompt", default="")


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} asked for, but CUDA is not available here")
    return dev


def _editor(args: argparse.Namespace, ckpt: str):
    import os

    from .editor import Editor

    os.environ["IMAGIC_KERNELS"] = args.kernels  # read by imagic.kernels.dispatch at every call

    return Editor.from_checkpoint(ckpt, config=args.config, device=_device(args.device), precision=args.precision,
                                  use_ema=args.use_ema, progress=not args.quiet,
                                  gradient_checkpointing=getattr(args, "gradient_checkpointing", False))


def _train(args: argparse.Namespace):
    from .images import open_image

    open_image(args.image).close()  # a bad image fails before the (slow) checkpoint load
    editor = _editor(args, args.ckpt)
    settings = dict(embed_steps=args.embed_steps, embed_lr=args.embed_lr, finetune=args.finetune,
                    finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr, lora_rank=args.lora_rank,
                    lora_alpha=args.lora_alpha, seed=args.seed, fit=args.fit, save_every=args.save_every)
    run = editor.fit(args.image, args.prompt, out=args.out, **settings)
    print(f"trained: {run.directory} (stage 1 loss {_last(run.losses['stage1'])}, "
          f"stage 2 loss {_last(run.losses['stage2'])})")
    return editor, run


def _last(values: List[float]) -> str:
    return f"{values[-1]:.4f}" if values else "n/a"


def _sample(editor, run, args: argparse.Namespace) -> None:
    result = editor.sample(run, alpha=args.alpha, seeds=args.seeds, guidance_scale=args.guidance_scale,
                           steps=args.steps, ddim_eta=args.ddim_eta, negative_prompt=args.negative_prompt)
    print(f"wrote {len(result.images)} samples to {run.directory / 'samples'} and the grid {run.directory / 'grid.png'}"
          " (rows: seeds, columns: alphas)")


def cmd_edit(args: argparse.Namespace) -> int:
    editor, run = _train(args)
    _sample(editor, run, args)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    _train(args)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .fileio import read_json

    args_file = Path(args.run) / "args.json"
    if not args_file.is_file():
        raise UserError(f"{args.run}: not a run directory (no args.json)")
    try:
        ckpt = args.ckpt or read_json(args_file).get("checkpoint")
    except (ValueError, AttributeError) as e:  # not JSON / not UTF-8 / not an object
        raise UserError(f"{args_file}: not the settings of an imagic run ({' '.join(str(e).split())})") from None
    if not ckpt:
        raise UserError(f"{args.run}: the run does not name its checkpoint; pass --ckpt")
    editor = _editor(args, ckpt)
    _sample(editor, editor.load_run(args.run), args)
    return 0


def _save_images(images, out: str, stem: str, seeds: List[int], meta: Dict) -> None:
    from pathlib import Path

    from .images import save_png

    Path(out).mkdir(parents=True, exist_ok=True)
    for seed, img in zip(seeds, images):
        path = Path(out) / f"{stem}_seed{seed}.png"
        save_png(img, path, {**meta, "seed": seed})
        print(f"wrote {path}")


def cmd_txt2img(args: argparse.Namespace) -> int:
    editor = _editor(args, args.ckpt)
    images = editor.txt2img(args.prompt, seeds=args.seeds, guidance_scale=args.guidance_scale, steps=args.steps,
                            ddim_eta=args.ddim_eta, negative_prompt=args.negative_prompt)
    _save_images(images, args.out, "txt2img", args.seeds, {"prompt": args.prompt, "steps": args.steps,
                                                           "guidance_scale": args.guidance_scale})
    return 0


def cmd_img2img(args: argparse.Namespace) -> int:
    from .images import open_image

    open_image(args.image).close()
    editor = _editor(args, args.ckpt)
    images = editor.img2img(args.image, args.prompt, strength=args.strength, seeds=args.seeds,
                            guidance_scale=args.guidance_scale, steps=args.steps, ddim_eta=args.ddim_eta,
                            negative_prompt=args.negative_prompt, fit=args.fit)
    _save_images(images, args.out, "img2img", args.seeds, {"prompt": args.prompt, "strength": args.strength,
                                                           "steps": args.steps})
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imagic", description="Imagic text-based real image editing on Stable Diffusion")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    ins = sub.add_parser("inspect", help="what a checkpoint is: family, prediction type, EMA, dtypes, sizes")
    ins.add_argument("path", help=".safetensors or .ckpt file")
    ins.add_argument("--config", help="original LDM inference yaml (default: <checkpoint>.yaml if present)")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--no-probe", action="store_true", help="skip the epsilon/v probe (no UNet forward)")
    ins.set_defaults(func=cmd_inspect)

    edit = sub.add_parser("edit", help="all three Imagic stages: optimise, fine-tune, sample an alpha sweep")
    _add_model_args(edit)
    _add_train_args(edit)
    _add_sample_args(edit)
    edit.set_defaults(func=cmd_edit)

    train = sub.add_parser("train", help="stages 1-2 only (resumable); sample later with `imagic sample`")
    _add_model_args(train)
    _add_train_args(train)
    train.set_defaults(func=cmd_train)

    sample = sub.add_parser("sample", help="stage 3 from a trained run directory, as often as you like")
    sample.add_argument("--run", required=True, help="run directory written by `imagic edit` / `imagic train`")
    _add_model_args(sample, ckpt_required=False)
    _add_sample_args(sample)
    sample.set_defaults(func=cmd_sample)

    t2i = sub.add_parser("txt2img", help="sanity-check a checkpoint: text to image")
    _add_model_args(t2i)
    t2i.add_argument("--prompt", required=True, type=_prompt)
    t2i.add_argument("--out", required=True, help="output directory")
    _add_sample_args(t2i)
    t2i.set_defaults(func=cmd_txt2img)

    i2i = sub.add_parser("img2img", help="sanity-check a checkpoint: SDEdit an image towards a prompt")
    _add_model_args(i2i)
    i2i.add_argument("--image", required=True)
    i2i.add_argument("--prompt", required=True, type=_prompt)
    i2i.add_argument("--out", required=True, help="output directory")
    i2i.add_argument("--strength", type=_positive(float), default=0.75)
    i2i.add_argument("--fit", choices=["crop", "pad"], default="crop")
    _add_sample_args(i2i)
    i2i.set_defaults(func=cmd_img2img)

    from .batch import add_batch_parser  # imported here: batch.py builds on this module's helpers
    add_batch_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    # Pillow logs an ERROR line for some broken images before raising what we report in one line anyway.
    logging.getLogger("PIL").setLevel(logging.INFO if args.verbose else logging.CRITICAL)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as e:
        print(f"imagic: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("imagic: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
