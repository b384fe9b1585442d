"""What the two command-line entry points (`cli.py` and `batch.py`) share: the argument groups of the edit's
settings, the user-error type and exit code, device parsing, and the editor built from parsed arguments."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from .recipes import RECIPES

if TYPE_CHECKING:
    import torch

    from .editor import Editor

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in what the user asked for; printed as one line."""


def user_errors() -> tuple:
    """The exception types that end a command with one line: the input is bad, or the run cannot go on here (out
    of memory, will not fit), not 'the program is broken'."""
    from .checkpoint import CheckpointError
    from .config import ConfigError, ResolutionError
    from .fileio import OutputError
    from .fit_check import WontFit
    from .images import ImageError
    from .rundir import RunError
    from .training import NumericalError, OutOfMemory

    return (UserError, CheckpointError, ConfigError, ImageError, OutputError, RunError, NumericalError, OutOfMemory,
            WontFit, ResolutionError)


def positive(kind: type, minimum: float = 0, inclusive: bool = False) -> Callable[[str], float]:
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


def prompt_text(text: str) -> str:
    """An argparse type for prompts: refuses one the tokenizer would read as empty."""
    from .tokenizer import clean

    if not clean(text):  # what the tokenizer reads: whitespace, NULs and other controls alone leave nothing
        raise argparse.ArgumentTypeError("the prompt is empty" + (" once cleaned" if text.strip() else ""))
    return text


def add_model_args(p: argparse.ArgumentParser, ckpt_required: bool = True) -> None:
    """Which checkpoint, where and how it runs."""
    p.add_argument("--ckpt", required=ckpt_required, help="SD checkpoint (.safetensors / .ckpt)")
    p.add_argument("--config", help="original LDM inference yaml (default: <checkpoint>.yaml if present)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="frozen weights and autocast precision; trainable tensors stay fp32 (default fp32)")
    p.add_argument("--use-ema", action="store_true", help="use the UNet's EMA weights when the file has them")
    p.add_argument("--resolution", type=positive(int),
                   help="image size in pixels (default: the model's native size: 512 SD 1.x / SD 2 base, 768 SD 2-v, "
                        "1024 SDXL; `imagic sample` defaults to the run's)")
    p.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto",
                   help="fused Triton kernels (auto: on CUDA when Triton is installed) or the torch path")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--force", action="store_true",
                   help="run even when the plan says it will not fit the GPU's free memory (see `imagic plan`)")


def add_recipe_arg(p: argparse.ArgumentParser) -> None:
    """`--recipe`, on every command with stage settings (`main` reads it first: it sets their defaults)."""
    p.add_argument("--recipe", choices=list(RECIPES), default="paper",
                   help="named settings; explicit flags override them. " +
                        "; ".join(f"{k}: {r.about}" for k, r in RECIPES.items()))


def recipe_in(argv: Optional[Sequence[str]]) -> str:
    """The --recipe named on a command line (before the full parse, whose defaults it sets; an unknown name is
    left for that parse to report)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default="paper")
    return pre.parse_known_args(argv)[0].recipe


def add_fit_args(p: argparse.ArgumentParser, recipe: str = "paper") -> None:
    """The stage 1-2 settings (FitSettings), shared by `edit`, `train` and `batch`; `recipe`'s values as defaults."""
    p.add_argument("--fit", choices=["crop", "pad"], default="crop", help="non-square images: centre-crop or pad")
    p.add_argument("--finetune", choices=["lora", "full"], default="lora")
    p.add_argument("--embed-steps", type=positive(int, 0, True), default=1000)
    p.add_argument("--embed-lr", type=positive(float), default=2e-3)
    p.add_argument("--finetune-steps", type=positive(int, 0, True), help="default 500 (lora) / 1500 (full)")
    p.add_argument("--finetune-lr", type=positive(float), help="default 2e-4 (lora) / 5e-7 (full)")
    p.add_argument("--lora-rank", type=positive(int), default=4)
    p.add_argument("--lora-alpha", type=positive(float), help="LoRA alpha (default: = rank)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training noise and timesteps")
    p.add_argument("--save-every", type=positive(int), default=50, help="steps between resumable saves")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    if recipe in RECIPES:
        p.set_defaults(**RECIPES[recipe].fit)


def add_sample_args(p: argparse.ArgumentParser, recipe: str = "paper") -> None:
    """The stage 3 settings (the arguments of `Editor.sample`); `recipe`'s values as defaults."""
    p.add_argument("--alpha", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9, 1.0],
                   help="interpolation weights of the target embedding (paper eq. 4)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--guidance-scale", type=positive(float, 0, True), default=7.5)
    p.add_argument("--steps", type=positive(int), default=50, help="DDIM steps")
    p.add_argument("--ddim-eta", type=positive(float, 0, True), default=0.0)
    p.add_argument("--negative-prompt", default="")
    if recipe in RECIPES:
        p.set_defaults(**RECIPES[recipe].sample)


def parse_device(name: str) -> "torch.device":
    """`--device`: auto (cuda when available), cpu, cuda, cuda:N; a device this machine lacks is a UserError."""
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


def make_editor(args: argparse.Namespace, ckpt: str) -> "Editor":
    """The editor for `ckpt` with the model options of `add_model_args`."""
    import os

    from .editor import Editor

    os.environ["IMAGIC_KERNELS"] = args.kernels  # read by imagic.kernels.dispatch at every call

    return Editor.from_checkpoint(ckpt, config=args.config, device=parse_device(args.device), precision=args.precision,
                                  use_ema=args.use_ema, progress=not args.quiet,
                                  gradient_checkpointing=getattr(args, "gradient_checkpointing", False),
                                  resolution=getattr(args, "resolution", None))
