"""What the two command-line entry points (`cli.py` and `batch.py`) share: the argument groups of the edit's
settings, the user-error type and exit code, device parsing, and the editor built from parsed arguments.

Every option of an argument group is a field of a settings dataclass (`imagic.settings`) under the same name: its
default, its choices and its check come from there, and `settings_from` turns parsed arguments back into one."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Type, TypeVar

from .recipes import RECIPES
from .settings import FINETUNE, KERNELS, PRECISIONS, SQUARE, FitSettings, RuntimeSettings, SampleSettings

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
    from .memory_check import NotEnoughMemory
    from .images import ImageError
    from .rundir import RunError
    from .training import NumericalError, OutOfMemory, ResumeError

    return (UserError, CheckpointError, ConfigError, ImageError, OutputError, RunError, ResumeError, NumericalError,
            OutOfMemory, NotEnoughMemory, ResolutionError)


def number(kind: type) -> Callable[[str], Any]:
    """An argparse type for an int or a float, with a one-line message for anything else."""
    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a{'n integer' if kind is int else ' number'}, got {text!r}") from None
    return parse


def positive(kind: type, minimum: float = 0, inclusive: bool = False) -> Callable[[str], float]:
    """An argparse type that rejects out-of-range numbers with a one-line message."""
    def parse(text: str):
        value = number(kind)(text)
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


S = TypeVar("S", FitSettings, SampleSettings, RuntimeSettings)


def setting(kind: type, name: str) -> Callable[[str], Any]:
    """An argparse type for the field `name` of the settings dataclass `kind`: parsed as the field's number type
    (one item of a tuple field), and checked by the dataclass itself, whose message becomes argparse's."""
    hint = typing.get_type_hints(kind)[name]
    parse_number = number(next(a for a in (*typing.get_args(hint), hint) if a in (int, float)))

    def parse(text: str) -> Any:
        value = parse_number(text)
        try:
            kind(**{name: value})
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value
    return parse


def settings_from(kind: Type[S], args: argparse.Namespace) -> S:
    """The settings of `kind` the parsed `args` hold (a field the command has no option for keeps its default)."""
    names = [f.name for f in dataclasses.fields(kind)]
    return kind(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def add_model_args(p: argparse.ArgumentParser, ckpt_required: bool = True) -> None:
    """Which checkpoint, where and how it runs (RuntimeSettings, but gradient checkpointing: `add_fit_args`)."""
    d = RuntimeSettings()
    p.add_argument("--ckpt", required=ckpt_required, help="SD checkpoint (.safetensors / .ckpt)")
    p.add_argument("--config", help="original LDM inference yaml (default: <checkpoint>.yaml if present)")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--precision", choices=list(PRECISIONS), default=d.precision,
                   help=f"frozen weights and autocast precision; trainable tensors stay fp32 (default {d.precision})")
    p.add_argument("--use-ema", action="store_true", help="use the UNet's EMA weights when the file has them")
    p.add_argument("--resolution", type=setting(RuntimeSettings, "resolution"),
                   help="image size in pixels (default: the model's native size: 512 SD 1.x / SD 2 base, 768 SD 2-v, "
                        "1024 SDXL; `imagic sample` defaults to the run's)")
    p.add_argument("--kernels", choices=list(KERNELS), default=d.kernels,
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
    d = FitSettings()
    modes = " / ".join(f"{m.steps} ({name})" for name, m in FINETUNE.items())
    rates = " / ".join(f"{m.lr:g} ({name})" for name, m in FINETUNE.items())
    p.add_argument("--square", choices=list(SQUARE), default=d.square,
                   help="non-square images: centre-crop or pad to a square")
    p.add_argument("--finetune", choices=list(FINETUNE), default=d.finetune)
    p.add_argument("--embed-steps", type=setting(FitSettings, "embed_steps"), default=d.embed_steps)
    p.add_argument("--embed-lr", type=setting(FitSettings, "embed_lr"), default=d.embed_lr)
    p.add_argument("--finetune-steps", type=setting(FitSettings, "finetune_steps"), help=f"default {modes}")
    p.add_argument("--finetune-lr", type=setting(FitSettings, "finetune_lr"), help=f"default {rates}")
    p.add_argument("--lora-rank", type=setting(FitSettings, "lora_rank"), default=d.lora_rank)
    p.add_argument("--lora-alpha", type=setting(FitSettings, "lora_alpha"), help="LoRA alpha (default: = rank)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the training noise and timesteps")
    p.add_argument("--save-every", type=setting(FitSettings, "save_every"), default=d.save_every,
                   help="steps between resumable saves")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    if recipe in RECIPES:
        p.set_defaults(**RECIPES[recipe].fit)


def add_sample_args(p: argparse.ArgumentParser, recipe: str = "paper") -> None:
    """The stage 3 settings (SampleSettings); `recipe`'s values as defaults."""
    d = SampleSettings()
    p.add_argument("--alpha", type=setting(SampleSettings, "alpha"), nargs="+", default=list(d.alpha),
                   help="interpolation weights of the target embedding (paper eq. 4)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    p.add_argument("--guidance-scale", type=setting(SampleSettings, "guidance_scale"), default=d.guidance_scale)
    p.add_argument("--steps", type=setting(SampleSettings, "steps"), default=d.steps, help="DDIM steps")
    p.add_argument("--ddim-eta", type=setting(SampleSettings, "ddim_eta"), default=d.ddim_eta)
    p.add_argument("--negative-prompt", default=d.negative_prompt)
    if recipe in RECIPES:
        p.set_defaults(**RECIPES[recipe].sample)


def parse_device(name: str) -> "torch.device":
    """`--device`: auto (cuda when available), cpu, cuda, cuda:N; a device this machine lacks is a UserError."""
    import torch

    try:
        dev = RuntimeSettings(device=name).torch_device()
    except ValueError as e:
        raise UserError(str(e)) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} asked for, but CUDA is not available here")
    return dev


def make_editor(args: argparse.Namespace, ckpt: str) -> "Editor":
    """The editor for `ckpt` with the model options of `add_model_args` (and gradient checkpointing, where the
    command has it)."""
    from .editor import Editor

    runtime = dataclasses.replace(settings_from(RuntimeSettings, args), device=str(parse_device(args.device)))
    return Editor.from_checkpoint(ckpt, config=args.config, runtime=runtime, use_ema=args.use_ema,
                                  progress=not args.quiet)
