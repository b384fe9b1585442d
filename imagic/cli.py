"""The `imagic` command line. User mistakes (bad path, bad image, bad checkpoint, bad argument) end with one line on
stderr and a non-zero exit code, never a Python traceback."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Dict, List, Optional

from .arguments import (EXIT_USER_ERROR, UserError, add_fit_args, add_model_args, add_recipe_arg, add_sample_args,
                        make_editor, positive, prompt_text, recipe_in, setting, settings_from, user_errors)
from .batch import add_batch_parser
from .settings import KERNELS, PRECISIONS, SDEDIT_STRENGTH, SQUARE, FitSettings, RuntimeSettings, SampleSettings


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


def _add_train_args(p: argparse.ArgumentParser, recipe: str) -> None:
    p.add_argument("--image", required=True, help="input photo (any common format)")
    p.add_argument("--prompt", required=True, type=prompt_text, help='target text, e.g. "a photo of a sitting dog"')
    p.add_argument("--out", required=True, help="run directory (an existing one is resumed)")
    add_recipe_arg(p)
    add_fit_args(p, recipe)


def _train(args: argparse.Namespace):
    from .images import open_image

    image = open_image(args.image)  # decoded once, before the (slow) checkpoint load: a bad image fails first
    editor = make_editor(args, args.ckpt)
    run = editor.fit(image, args.prompt, out=args.out, settings=settings_from(FitSettings, args), force=args.force)
    print(f"trained: {run.directory} (stage 1 loss {_last(run.losses['stage1'])}, "
          f"stage 2 loss {_last(run.losses['stage2'])})")
    return editor, run


def _last(values: List[float]) -> str:
    return f"{values[-1]:.4f}" if values else "n/a"


def _sample(editor, run, args: argparse.Namespace) -> None:
    result = editor.sample(run, settings_from(SampleSettings, args), force=args.force)
    print(f"wrote {len(result.images)} samples to {run.directory / 'samples'} and the grid {result.grid_path}"
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
        recorded = read_json(args_file)
        ckpt = args.ckpt or recorded.get("checkpoint")
        trained = (recorded.get("model_config") or {}).get("image_size")
    except (ValueError, AttributeError) as e:  # not JSON / not UTF-8 / not an object
        raise UserError(f"{args_file}: not the settings of an imagic run ({' '.join(str(e).split())})") from None
    if args.resolution is None and isinstance(trained, int):
        args.resolution = trained  # sample at the size the run was trained at
    if not ckpt:
        raise UserError(f"{args.run}: the run does not name its checkpoint; pass --ckpt")
    editor = make_editor(args, ckpt)
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
    editor = make_editor(args, args.ckpt)
    images = editor.txt2img(args.prompt, settings_from(SampleSettings, args))
    _save_images(images, args.out, "txt2img", args.seeds, {"prompt": args.prompt, "steps": args.steps,
                                                           "guidance_scale": args.guidance_scale})
    return 0


def cmd_img2img(args: argparse.Namespace) -> int:
    from .images import open_image

    image = open_image(args.image)
    editor = make_editor(args, args.ckpt)
    images = editor.img2img(image, args.prompt, strength=args.strength, settings=settings_from(SampleSettings, args),
                            square=args.square)
    _save_images(images, args.out, "img2img", args.seeds, {"prompt": args.prompt, "strength": args.strength,
                                                           "steps": args.steps})
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .config import ModelConfig
    from .plan import plan

    resolution = args.resolution
    if args.ckpt:
        from .loader import inspect_checkpoint

        info = inspect_checkpoint(args.ckpt, config=args.config, probe=False)  # keys and shapes only
        if info["problems"]:
            raise UserError(info["problems"][0])
        model = ModelConfig.from_dict(info["config"])
        if info["prediction_type"].startswith("unknown") and resolution is None:
            resolution = 768  # an SD2 file without its yaml: plan for the larger, 768-v size
            print("imagic: epsilon or v is not known from the shapes alone: planned at 768 px (SD 2.x 768-v); "
                  "pass --resolution 512 for a 512 base model", file=sys.stderr)
    elif args.config:
        raise UserError("--config goes with --ckpt (a family's preset has its own sizes)")
    else:
        model = args.family
    try:
        p = plan(model, device=args.device, precision=args.precision, finetune=args.finetune,
                 lora_rank=args.lora_rank, resolution=resolution, gradient_checkpointing=args.gradient_checkpointing,
                 seeds=args.seeds, alphas=args.alpha, embed_steps=args.embed_steps,
                 finetune_steps=args.finetune_steps, ddim_steps=args.steps, kernels=args.kernels,
                 offload=args.offload)
    except ValueError as e:  # settings the model cannot take (a resolution it cannot divide, ...)
        raise UserError(str(e)) from None
    print(json.dumps(p.to_dict(), indent=2) if args.json else p.table())
    return 0


def build_parser(recipe: str = "paper") -> argparse.ArgumentParser:
    """The parser; the stage settings' defaults are `recipe`'s (imagic.recipes; `main` reads --recipe first)."""
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
    add_model_args(edit)
    _add_train_args(edit, recipe)
    add_sample_args(edit, recipe)
    edit.set_defaults(func=cmd_edit)

    train = sub.add_parser("train", help="stages 1-2 only (resumable); sample later with `imagic sample`")
    add_model_args(train)
    _add_train_args(train, recipe)
    train.set_defaults(func=cmd_train)

    sample = sub.add_parser("sample", help="stage 3 from a trained run directory, as often as you like")
    sample.add_argument("--run", required=True, help="run directory written by `imagic edit` / `imagic train`")
    add_model_args(sample, ckpt_required=False)
    add_recipe_arg(sample)
    add_sample_args(sample, recipe)
    sample.set_defaults(func=cmd_sample)

    t2i = sub.add_parser("txt2img", help="sanity-check a checkpoint: text to image")
    add_model_args(t2i)
    t2i.add_argument("--prompt", required=True, type=prompt_text)
    t2i.add_argument("--out", required=True, help="output directory")
    add_recipe_arg(t2i)
    add_sample_args(t2i, recipe)
    t2i.set_defaults(func=cmd_txt2img)

    i2i = sub.add_parser("img2img", help="sanity-check a checkpoint: SDEdit an image towards a prompt")
    add_model_args(i2i)
    i2i.add_argument("--image", required=True)
    i2i.add_argument("--prompt", required=True, type=prompt_text)
    i2i.add_argument("--out", required=True, help="output directory")
    i2i.add_argument("--strength", type=positive(float), default=SDEDIT_STRENGTH)
    i2i.add_argument("--square", choices=list(SQUARE), default=FitSettings.square,
                     help="non-square images: centre-crop or pad to a square")
    add_recipe_arg(i2i)
    add_sample_args(i2i, recipe)
    i2i.set_defaults(func=cmd_img2img)

    pl = sub.add_parser("plan", help="memory and compute of every stage of an edit, before it runs (reads no weights)")
    which = pl.add_mutually_exclusive_group(required=True)
    which.add_argument("--ckpt", help="SD checkpoint: only its keys and shapes are read")
    which.add_argument("--family", choices=["sd1", "sd2", "sd2-v", "sdxl"], help="a public model family's preset")
    pl.add_argument("--config", help="original LDM inference yaml (default: <checkpoint>.yaml if present)")
    pl.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where the edit would run")
    pl.add_argument("--precision", choices=list(PRECISIONS), default=RuntimeSettings.precision,
                    help=f"frozen weights and autocast precision, as for `imagic edit` (default "
                         f"{RuntimeSettings.precision})")
    pl.add_argument("--kernels", choices=list(KERNELS), default=RuntimeSettings.kernels,
                    help="CUDA: our Triton kernels (auto: when Triton is installed here) or the torch paths")
    pl.add_argument("--resolution", type=setting(RuntimeSettings, "resolution"),
                    help="image size in pixels (default: the model's native)")
    pl.add_argument("--offload", action="store_true",
                    help="plan for keeping only what each stage runs on the device (not what the editor does yet)")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    add_recipe_arg(pl)
    add_fit_args(pl, recipe)
    add_sample_args(pl, recipe)
    pl.set_defaults(func=cmd_plan)

    add_batch_parser(sub, recipe)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser(recipe_in(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    # Pillow logs an ERROR line for some broken images before raising what we report in one line anyway.
    logging.getLogger("PIL").setLevel(logging.INFO if args.verbose else logging.CRITICAL)
    try:
        return int(args.func(args) or 0)
    except user_errors() as e:
        print(f"imagic: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("imagic: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
