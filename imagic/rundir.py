"""The run directory: the on-disk state of one edit, so sampling never needs retraining.

    args.json                      every setting, the checkpoint's sha256, library versions
    input.png                      the preprocessed input image (what was encoded)
    target_embedding.safetensors   e_tgt (stage 0)
    optimized_embedding.safetensors e_opt (written when stage 1 finishes: its presence means "stage 1 done")
    lora.safetensors               stage 2 result, kohya layout (LoRA mode) -- or --
    unet.safetensors               the whole fine-tuned UNet (full mode)
    stage1.resume.pt / stage2.resume.pt   periodic state of an unfinished stage (deleted when it finishes)
    loss_stage1.csv, loss_stage2.csv, losses.png   loss curves
    samples/seed{S}_alpha{A}_cfg{G}_steps{N}_eta{E}[_neg{H}].png   stage 3 outputs, settings in PNG text metadata
    grid.png, grid-2.png, ...      one grid per sampling call (rows: seeds, columns: alphas), listed in run.log
    run.log                        what happened, with peak memory per stage

Every file is written atomically. An edit without a directory (`Editor.fit` without `out`) runs against `Unsaved`,
which has the same methods, writes nothing and finds nothing to resume, so the editor has one code path. A lock file keeps a second process out while one is working on the run; the
process that takes the lock removes the temporary files a killed predecessor may have left. Sampling never
replaces what an earlier call wrote: a sample's name carries every setting that changes its pixels, a name that is
taken by a different image gets a `-2`, `-3`, ... suffix, and each call's grid takes the next free grid name.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import itertools
import os
import platform
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw
from torch import Tensor

from .fileio import (OutputError, PathLike, load_safetensors, read_json, remove_stale_temporaries, save_safetensors,
                     write_csv, write_json)


class RunError(ValueError):
    """A run directory that cannot be used as asked (locked by another process, or holding another edit)."""


def library_versions() -> Dict[str, str]:
    import numpy
    import PIL
    import safetensors
    import torch

    from . import __version__

    return {"imagic": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "pillow": PIL.__version__, "safetensors": safetensors.__version__, "python": platform.python_version()}


class RunDir:
    """Paths and small helpers for one run directory. Use as a context manager to hold its lock."""

    def __init__(self, root: PathLike):
        self.root = Path(root)
        self._lock_fd: Optional[int] = None

    # --- layout -------------------------------------------------------------------------------------------
    args = property(lambda self: self.root / "args.json")
    input_image = property(lambda self: self.root / "input.png")
    target_embedding = property(lambda self: self.root / "target_embedding.safetensors")
    optimized_embedding = property(lambda self: self.root / "optimized_embedding.safetensors")
    lora = property(lambda self: self.root / "lora.safetensors")
    full_unet = property(lambda self: self.root / "unet.safetensors")
    samples = property(lambda self: self.root / "samples")
    grid = property(lambda self: self.root / "grid.png")
    log_file = property(lambda self: self.root / "run.log")
    loss_plot = property(lambda self: self.root / "losses.png")

    def resume_state(self, stage: int) -> Path:
        return self.root / f"stage{stage}.resume.pt"

    def loss_csv(self, stage: int) -> Path:
        return self.root / f"loss_stage{stage}.csv"

    def finetuned(self, mode: str) -> Path:
        return self.lora if mode == "lora" else self.full_unet

    # --- stages 1 and 2: what is done, what to resume from, what they leave --------------------------------------
    def record(self, make_args: Callable[[], Dict[str, Any]], identity: Sequence[str], image: Image.Image,
               target_text: str, target_embedding: Tensor) -> None:
        """Start or rejoin the edit: args.json (or the check that it is this edit), input.png, e_tgt."""
        from .images import save_png

        self.check_or_write_args(make_args(), identity)
        if not self.input_image.exists():
            save_png(image, self.input_image, {"target_text": target_text})
        if not self.target_embedding.exists():
            save_safetensors(self.target_embedding, {"embedding": target_embedding})

    def optimized(self) -> Optional[Tensor]:
        """e_opt when stage 1 is done (its file marks that), else None."""
        if not self.optimized_embedding.exists():
            return None
        self.resume_state(1).unlink(missing_ok=True)  # left behind if a kill came between the two writes
        return load_safetensors(self.optimized_embedding)[0]["embedding"]

    def finished_weights(self, mode: str) -> Optional[Path]:
        """The stage-2 file when stage 2 is done, else None."""
        if not self.finetuned(mode).exists():
            return None
        self.resume_state(2).unlink(missing_ok=True)
        return self.finetuned(mode)

    def resume_from(self, stage: int) -> Optional[Path]:
        """Where the stage's loop saves (and finds) its resume state (None: nowhere)."""
        return self.resume_state(stage)

    def finish_embedding(self, e_opt: Tensor, losses: Sequence[float], summary: str) -> None:
        """Stage 1 is done: e_opt written (its file marks that), its losses kept, its resume state dropped."""
        save_safetensors(self.optimized_embedding, {"embedding": e_opt})
        self._finished(1, losses, summary)

    def finish_weights(self, mode: str, write: Callable[[Path], None], losses: Sequence[float], summary: str) -> None:
        """Stage 2 is done: `write` puts the weights in their file (which marks that), and so on as stage 1."""
        write(self.finetuned(mode))
        self._finished(2, losses, summary)

    def _finished(self, stage: int, losses: Sequence[float], summary: str) -> None:
        self.write_losses(stage, losses)
        self.resume_state(stage).unlink(missing_ok=True)
        self.log(f"stage {stage} done: {summary}")

    def save_loss_plot(self, curves: Dict[str, Sequence[float]]) -> None:
        from .images import save_png

        save_png(plot_losses(curves), self.loss_plot)

    # --- stage 3 outputs: never replace an earlier call's files ----------------------------------------------
    def new_grid(self) -> Path:
        """The first free grid name: grid.png for the edit's own sweep, then grid-2.png, grid-3.png, ..."""
        return next(path for path in self._numbered(self.root, "grid") if not path.exists())

    def sample_path(self, stem: str, image: Image.Image) -> Tuple[Path, bool]:
        """Where a sample goes and whether to write it: the first of `stem.png`, `stem-2.png`, ... that is free
        (write) or already holds these very pixels (keep; nothing to write)."""
        path = next(p for p in self._numbered(self.samples, stem) if not p.exists() or _same_pixels(p, image))
        return path, not path.exists()

    def save_samples(self, images: Dict[Tuple[int, float], Image.Image], grid: Image.Image,
                     settings: Dict[str, Any]) -> Tuple[Dict[Tuple[int, float], Path], Path]:
        """Write one sampling call's images ((seed, alpha) -> image) and grid, `settings` (guidance_scale, steps,
        ddim_eta, negative_prompt, ...) in their PNG metadata, without replacing anything an earlier call wrote;
        say in run.log what was written. Hold the lock (`with RunDir(...)`) around it."""
        from . import __version__
        from .images import save_png

        common = {**settings, "sampler": "DDIM", "software": f"imagic {__version__}"}
        try:
            self.samples.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # e.g. a file named samples
            raise OutputError(e.errno, f"cannot write {self.samples}: {e.strerror or e}") from e
        paths: Dict[Tuple[int, float], Path] = {}
        for (seed, a), img in images.items():
            stem = sample_stem(seed, a, settings["guidance_scale"], settings["steps"], settings["ddim_eta"],
                               settings["negative_prompt"])
            paths[(seed, a)], new = self.sample_path(stem, img)
            if new:
                save_png(img, paths[(seed, a)], {**common, "seed": seed, "alpha": a})
        grid_path = self.new_grid()
        seeds, alphas = sorted({k[0] for k in images}), sorted({k[1] for k in images})
        save_png(grid, grid_path, {**common, "seeds": seeds, "alphas": alphas, "layout": "rows=seeds, columns=alphas"})
        self.log(f"sample: {grid_path.name} (seeds {seeds}, alphas {alphas}, guidance {settings['guidance_scale']:g}, "
                 f"{settings['steps']} steps, eta {settings['ddim_eta']:g}, negative prompt "
                 f"{settings['negative_prompt']!r}); samples: {', '.join(sorted(p.name for p in paths.values()))}")
        return paths, grid_path

    @staticmethod
    def _numbered(folder: Path, stem: str):
        yield folder / f"{stem}.png"
        for n in itertools.count(2):
            yield folder / f"{stem}-{n}.png"

    # --- lock ---------------------------------------------------------------------------------------------
    def __enter__(self) -> "RunDir":
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a path under a regular file, a read-only or full filesystem, ...
            raise OutputError(e.errno, f"cannot use {self.root} as a run directory: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunError(f"{self.root}: another imagic process is working on this run directory") from None
            raise
        self._lock_fd = fd
        for directory in (self.root, self.samples):
            remove_stale_temporaries(directory)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- contents -----------------------------------------------------------------------------------------
    def check_or_write_args(self, args: Dict[str, Any], identity: Sequence[str]) -> None:
        """Write args.json, or check that an existing one describes the same edit (the `identity` keys)."""
        if self.args.exists():
            old = self._read_args()
            diff = [k for k in identity if old.get(k) != args.get(k)]
            if diff:
                raise RunError(f"{self.root} holds another edit (different {', '.join(diff)}); "
                               "choose a new --out directory")
            return
        write_json(self.args, args)

    def _read_args(self) -> Dict[str, Any]:
        """The settings of an existing run; a damaged args.json is a RunError that says what to do."""
        try:
            old = read_json(self.args)
        except UnicodeDecodeError:
            raise RunError(f"{self.args}: unreadable (not UTF-8 text); choose a new --out directory") from None
        except ValueError as e:  # not JSON; read_json's message names the file
            raise RunError(f"{' '.join(str(e).split())}; choose a new --out directory") from None
        except OSError as e:
            raise RunError(f"{self.args}: unreadable ({e.strerror or e}); choose a new --out directory") from None
        if not isinstance(old, dict):
            raise RunError(f"{self.args}: not the settings of an imagic run; choose a new --out directory")
        return old

    def log(self, line: str) -> None:
        try:
            with open(self.log_file, "a", encoding="utf-8") as f:
                f.write(line.rstrip("\n") + "\n")
        except OSError as e:  # a full disk shows here too; say so in one line like every other output
            raise OutputError(e.errno, f"cannot write {self.log_file}: {e.strerror or e}") from e

    def write_losses(self, stage: int, losses: Sequence[float]) -> None:
        write_csv(self.loss_csv(stage), ["step", "loss"], [(i + 1, repr(float(v))) for i, v in enumerate(losses)])

    def read_losses(self, stage: int) -> List[float]:
        path = self.loss_csv(stage)
        if not path.exists():
            return []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()[1:]
            return [float(line.split(",")[1]) for line in lines if line]
        except (OSError, ValueError, IndexError) as e:  # ValueError: not UTF-8, or not a number
            raise RunError(f"{path}: unreadable loss curve ({' '.join(str(e).split())}); delete it (the results "
                           "stay, the curve is lost) or choose a new --out directory") from None


class Unsaved(RunDir):
    """An edit kept in memory only: the RunDir methods an edit calls, writing nothing, finding nothing done and
    nothing to resume, taking no lock."""

    def __init__(self) -> None:
        super().__init__(".")
        self.root = None  # type: ignore[assignment]

    def record(self, make_args: Callable[[], Dict[str, Any]], identity: Sequence[str], image: Image.Image,
               target_text: str, target_embedding: Tensor) -> None:
        pass

    def optimized(self) -> Optional[Tensor]:
        return None

    def finished_weights(self, mode: str) -> Optional[Path]:
        return None

    def resume_from(self, stage: int) -> Optional[Path]:
        return None

    def finish_embedding(self, e_opt: Tensor, losses: Sequence[float], summary: str) -> None:
        pass

    def finish_weights(self, mode: str, write: Callable[[Path], None], losses: Sequence[float], summary: str) -> None:
        pass

    def write_losses(self, stage: int, losses: Sequence[float]) -> None:
        pass

    def save_loss_plot(self, curves: Dict[str, Sequence[float]]) -> None:
        pass

    def save_samples(self, images: Dict[Tuple[int, float], Image.Image], grid: Image.Image,
                     settings: Dict[str, Any]) -> Tuple[Dict[Tuple[int, float], Path], Optional[Path]]:
        return {}, None

    def __enter__(self) -> "Unsaved":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def run_dir(root: Optional[PathLike]) -> RunDir:
    """The run directory at `root`, or an `Unsaved` one for None."""
    return Unsaved() if root is None else RunDir(root)


def sample_stem(seed: int, alpha: float, guidance_scale: float, steps: int, ddim_eta: float,
                negative_prompt: str) -> str:
    """A sample's file name without suffix, from every setting that changes its pixels (the negative prompt as a
    short hash: it is free text)."""
    stem = f"seed{seed}_alpha{alpha:g}_cfg{guidance_scale:g}_steps{steps}_eta{ddim_eta:g}"
    if negative_prompt:
        stem += "_neg" + hashlib.sha256(negative_prompt.encode("utf-8")).hexdigest()[:8]
    return stem


def _same_pixels(path: Path, image: Image.Image) -> bool:
    """Whether the PNG at `path` holds exactly `image`'s pixels (an unreadable file does not)."""
    try:
        with Image.open(path) as old:
            return old.size == image.size and old.convert("RGB").tobytes() == image.convert("RGB").tobytes()
    except (OSError, ValueError, SyntaxError):
        return False


def plot_losses(curves: Dict[str, Sequence[float]], width: int = 640, height: int = 240) -> Image.Image:
    """A small line chart of loss curves, one panel per stage, drawn with PIL (no plotting dependency)."""
    panels = [(name, list(v)) for name, v in curves.items() if len(v) > 0]
    img = Image.new("RGB", (width, height * max(1, len(panels))), "white")
    draw = ImageDraw.Draw(img)
    for i, (name, values) in enumerate(panels):
        top, left, pad = i * height, 50, 20
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0
        w, h = width - left - pad, height - 2 * pad
        pts = [(left + w * j / max(1, len(values) - 1), top + pad + h * (1 - (v - lo) / span))
               for j, v in enumerate(values)]
        draw.rectangle([left, top + pad, left + w, top + pad + h], outline="gray")
        if len(pts) > 1:
            draw.line(pts, fill=(30, 90, 200), width=1)
        draw.text((left + 4, top + 4), f"{name}: {len(values)} steps, last {values[-1]:.4g}", fill="black")
        draw.text((2, top + pad), f"{hi:.3g}", fill="black")
        draw.text((2, top + pad + h - 10), f"{lo:.3g}", fill="black")
    return img
