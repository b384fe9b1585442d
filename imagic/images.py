"""Images in and out: robust loading to a square [-1, 1] tensor, grids of results, PNGs that carry settings.

Loading follows what the original Stable Diffusion scripts do (`scripts/img2img.py: load_img` converts to RGB,
resizes, maps to [-1, 1]), plus the cases real user photos bring: EXIF orientation (phone pictures are stored
sideways), alpha channels, palettes, 16-bit PNGs (PIL's own `convert` clips them to 255 instead of scaling),
CMYK JPEGs, animations (first frame), and decompression bombs (the pixel count is checked from the header,
before anything is decoded). Every failure is an `ImageError` whose one-line message names the file.

Choices: transparency is composited over white, and `square="pad"` pads with white too, so the two agree and
the result does not depend on image content. ICC colour profiles are not applied (neither do the SD scripts).
"""
from __future__ import annotations

import json
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from .fileio import atomic_write
from .settings import SQUARE

PathLike = Union[str, os.PathLike]

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000: above any camera photo, far below a decompression bomb
WHITE = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
# 16-bit greyscale (PNG, TIFF). "I" is how older Pillow versions open 16-bit PNGs; values above 65535 clip.
_WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


class ImageError(ValueError):
    """An input image could not be used; the message is one line naming the file and the reason."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _check_file(path: Path) -> None:
    """Refuse what is not a regular, non-empty file before opening it: a FIFO would block the open forever,
    a device like /dev/zero never ends, and /proc-style pseudo-files (size 0) can block on read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except OSError as e:  # symlink loops (ELOOP), a file used as a directory (ENOTDIR), permissions, ...
        raise ImageError(f"{path}: cannot read ({e.strerror or _one_line(e)})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(f"{path}: is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError(f"{path}: not a regular file")
    if st.st_size == 0:
        raise ImageError(f"{path}: not an image (empty file)")


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open (not decode) an image file, refusing missing files, non-images and oversized images.

    PIL's own bomb guard (`Image.MAX_IMAGE_PIXELS`, a process-wide setting we leave alone) warns above its
    limit and raises above twice it; our `max_pixels` replaces the warning, and PIL's error is reported too.
    """
    _check_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: too large, refused as a possible decompression bomb ({_one_line(e)})") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{path}: not an image (unrecognised or unsupported format)") from e
    except OSError as e:
        raise ImageError(f"{path}: cannot read ({e.strerror or _one_line(e)})") from e
    except Exception as e:  # Pillow's header parsers raise ValueError, struct.error, ... on broken headers
        raise ImageError(f"{path}: corrupt image header ({_one_line(e)})") from e
    w, h = im.size
    if w * h == 0 or w * h > max_pixels:
        im.close()
        why = "zero-size image" if w * h == 0 else f"too large ({w * h} pixels > limit of {max_pixels})"
        raise ImageError(f"{path}: {why}, {w}x{h}")
    return im


def _wide_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit greyscale to 8-bit RGB by scaling 0..65535 onto 0..255 (PIL's `convert` would clip at 255)."""
    wide = np.asarray(img.convert("I"), dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)).convert("RGB")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparent pixels (alpha channel or palette/colour-key transparency) become white."""
    if img.mode in _WIDE_MODES:
        return _wide_to_rgb(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba).convert("RGB")
    return img.convert("RGB")


def open_image(path: PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file at full resolution: first frame, EXIF orientation applied, RGB."""
    path = Path(path)
    with _open(path, max_pixels) as im:
        try:  # a freshly opened file is on its first frame, which is the one we use for animations
            im.load()
            upright = ImageOps.exif_transpose(im)
        except Image.DecompressionBombError as e:
            raise ImageError(f"{path}: too large, refused as a possible decompression bomb ({_one_line(e)})") from e
        except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, TypeError, ... on bad data
            raise ImageError(f"{path}: truncated or corrupt image ({_one_line(e)})") from e
        try:
            return _to_rgb(upright)
        except ValueError as e:
            raise ImageError(f"{path}: unsupported image mode {upright.mode} ({_one_line(e)})") from e


@dataclass(frozen=True)
class Squared:
    """An input image made square at the size the model works at, and where that cut the original: SDXL's size
    conditioning (`original_size`, `crop_top_left`) comes from here."""

    image: Image.Image  # size x size, RGB
    original_size: Tuple[int, int]  # (height, width) as it came
    crop_top_left: Tuple[int, int]  # (top, left) in the frame resized so the square is `size` wide; (0, 0) padded


def square_input(img: Image.Image, size: int, how: str) -> Squared:
    """Centre-crop an image to a square ("crop") or pad it with white to one ("pad"), then resize it to
    `size` x `size` with LANCZOS. The crop's corner is reported as SDXL's crop_coords_top_left: in the frame of
    the image resized so that its short side is the target (sgm resizes, then crops)."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    w, h = img.size
    if how == "crop":
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
        corner = (round(top * size / s), round(left * size / s))
    elif how == "pad":
        s = max(w, h)
        canvas = Image.new("RGB", (s, s), WHITE)
        canvas.paste(img, ((s - w) // 2, (s - h) // 2))
        img, corner = canvas, (0, 0)
    else:
        raise ValueError(f"square must be one of {', '.join(SQUARE)}, got {how!r}")
    return Squared(img.resize((size, size), Image.Resampling.LANCZOS), (h, w), corner)


def square(img: Image.Image, size: int, how: str) -> Image.Image:
    """`square_input`'s image alone."""
    return square_input(img, size, how).image


def from_pil(img: Image.Image) -> torch.Tensor:
    """PIL image (any mode) -> float32 tensor (1, 3, H, W) in [-1, 1]."""
    arr = np.asarray(_to_rgb(img) if img.mode != "RGB" else img, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).div(127.5).sub(1.0).contiguous()


def to_pil(t: torch.Tensor) -> List[Image.Image]:
    """Tensor (B, 3, H, W) or (3, H, W) in [-1, 1] -> list of RGB images (clamped, rounded to 8 bits)."""
    t = t.detach().to("cpu", torch.float32)
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"to_pil expects (B, 3, H, W) or (3, H, W), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("to_pil: the tensor has NaN or Inf values (a diverged model or fp16 VAE overflow?)")
    arr = ((t.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def _labels(labels: Optional[Sequence[Any]], n: int, what: str) -> List[str]:
    if labels is None:
        return []
    if len(labels) != n:
        raise ValueError(f"make_grid: {len(labels)} {what} labels for {n} {what}s")
    return [str(x) for x in labels]


def _font(px: int) -> ImageFont.ImageFont:
    """PIL's built-in font at `px` pixels; the fixed-size bitmap version without FreeType or on Pillow < 10.1."""
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> List[str]:
    """Lines of `text` at most `width` pixels wide: breaks at each newline, then greedily between words (a word
    wider than `width` gets a line of its own)."""
    lines: List[str] = []
    for paragraph in text.split("\n"):
        line, *words = paragraph.split(" ")
        for word in words:
            if font.getbbox(f"{line} {word}")[2] <= width:
                line = f"{line} {word}"
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def make_grid(images: Sequence[Sequence[Image.Image]], row_labels: Optional[Sequence[Any]] = None,
              col_labels: Optional[Sequence[Any]] = None, gap: int = 2) -> Image.Image:
    """Paste `images[r][c]` into a rows x columns grid (the editor: rows = seeds, columns = alphas).

    Cells are as large as the largest image; `gap` pixels of white separate them. Labels (anything `str`
    accepts) go to the left of each row and above each column, in PIL's built-in font scaled to the cell;
    column labels break at newlines and wherever they would be wider than a cell.
    """
    rows = [list(r) for r in images]
    n_cols = len(rows[0]) if rows else 0
    if n_cols == 0 or any(len(r) != n_cols for r in rows):
        raise ValueError("make_grid: need a non-empty list of rows of equal length")
    rl, cl = _labels(row_labels, len(rows), "row"), _labels(col_labels, n_cols, "column")
    cw = max(im.width for r in rows for im in r)
    ch = max(im.height for r in rows for im in r)
    font, pad = _font(max(10, ch // 24)), 4
    left = max(font.getbbox(s)[2] for s in rl) + 2 * pad if rl else 0
    wrapped = [_wrap(s, font, cw) for s in cl]
    line_h = font.getbbox("Ag")[3] + 2
    heights = [(len(lines) - 1) * line_h + max(font.getbbox(s)[3] for s in lines) for lines in wrapped]
    top = max(heights) + 2 * pad if cl else 0
    grid = Image.new("RGB", (left + n_cols * (cw + gap) - gap, top + len(rows) * (ch + gap) - gap), WHITE)
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(_to_rgb(im), (left + c * (cw + gap), top + r * (ch + gap)))
    for c, lines in enumerate(wrapped):
        for i, s in enumerate(lines):
            x0, _, x1, _ = font.getbbox(s)
            draw.text((left + c * (cw + gap) + (cw - x0 - x1) // 2, pad + i * line_h), s, fill="black", font=font)
    for r, s in enumerate(rl):
        _, y0, _, y1 = font.getbbox(s)
        draw.text((pad, top + r * (ch + gap) + (ch - y0 - y1) // 2), s, fill="black", font=font)
    return grid


def save_png(img: Image.Image, path: PathLike, metadata: Optional[Dict[str, Any]] = None) -> None:
    """Save a PNG atomically with `metadata` as text chunks (non-string values JSON-encoded, `str` fallback).

    PNG keywords are 1-79 Latin-1 characters; values that are not Latin-1 go into iTXt (UTF-8) chunks.
    """
    info = PngInfo()
    for key, value in (metadata or {}).items():
        if not 0 < len(key) < 80:
            raise ValueError(f"save_png: PNG text keys must be 1-79 characters, got {key!r}")
        info.add_text(key, value if isinstance(value, str) else json.dumps(value, default=str))
    with atomic_write(path) as f:
        img.save(f, format="PNG", pnginfo=info)
