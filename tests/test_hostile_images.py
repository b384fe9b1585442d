"""Property-based tests of `load_image` on whatever users and strangers hand it: every PIL mode the loader claims
(1, L, LA, P, PA, RGB, RGBA, CMYK, I, I;16, F) in every format that can hold it (PNG, JPEG, WebP, GIF, BMP, TIFF),
sizes from 1x1 up to a pixel limit, truncated and mutated files, non-images with image extensions, animations,
CMYK JPEGs, 16-bit PNGs, every EXIF orientation, and things that are not files (FIFO, /dev/zero, symlink loops).

The contract: a (1, 3, S, S) float32 tensor in [-1, 1], or an `ImageError` with a one-line message naming the
file; never another exception, never a hang. Where the right pixels are known (lossless formats, the documented
16-bit and CMYK mappings, EXIF), they are computed here with numpy, not with the PIL calls the loader uses.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from functools import lru_cache
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image, features

from imagic.cli import main
from imagic.images import ImageError
from tests.helpers import load_image
from tests.test_images import _STORED_FROM_UPRIGHT, _blocks, _pixels

MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I", "I;16", "F"]
FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"]
LOSSLESS = ["PNG", "BMP", "TIFF"] + (["WEBP"] if features.check("webp") else [])
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def make_image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    """Random content in `mode`, built from numpy arrays of that mode's natural range."""
    rng = np.random.default_rng(seed)
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (h, w)).astype(bool))
    if mode == "F":
        return Image.fromarray((rng.normal(size=(h, w)) * 300).astype(np.float32))
    if mode == "I":  # 32-bit signed: negative and above-16-bit values too
        return Image.fromarray(rng.integers(-2**20, 2**20, (h, w)).astype(np.int32), "I")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16))
    if mode in ("P", "PA"):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).convert("P")
        return im.convert("PA") if mode == "PA" else im
    bands = len(Image.new(mode, (1, 1)).getbands())
    return Image.frombytes(mode, (w, h), rng.integers(0, 256, w * h * bands).astype(np.uint8).tobytes())


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}), **kw)
    return buf.getvalue()


@lru_cache(maxsize=None)
def savable() -> List[Tuple[str, str]]:
    """The (mode, format) pairs this Pillow can write (e.g. no CMYK PNG, no 16-bit JPEG)."""
    pairs = []
    for mode in MODES:
        for fmt in FORMATS:
            if fmt == "WEBP" and not features.check("webp"):
                continue
            try:
                encode(make_image(mode, 3, 2, 0), fmt)
            except (OSError, ValueError, KeyError):
                continue
            pairs.append((mode, fmt))
    return pairs


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile_images")


def _write(folder: Path, name: str, data: bytes) -> Path:
    p = folder / name
    p.write_bytes(data)
    return p


def check_loaded(t: torch.Tensor, size: int) -> None:
    assert t.shape == (1, 3, size, size) and t.dtype == torch.float32 and t.is_contiguous()
    assert torch.isfinite(t).all() and t.min() >= -1 and t.max() <= 1


def load_or_image_error(path: Path, size: int, **kw) -> bool:
    """The contract. True when it loaded, False when it was refused with a proper ImageError."""
    try:
        t = load_image(path, size, **kw)
    except ImageError as e:
        msg = str(e)
        assert str(path) in msg and "\n" not in msg, msg
        return False
    check_loaded(t, size)
    return True


# --- every mode x format x size ----------------------------------------------------------------------------------
@settings(max_examples=100, **SETTINGS)
@given(pair=st.sampled_from(savable()), w=st.integers(1, 40), h=st.integers(1, 40), seed=st.integers(0, 2**16),
       size=st.integers(1, 24), how=st.sampled_from(["crop", "pad"]))
def test_every_mode_and_format_loads(folder, pair, w, h, seed, size, how):
    mode, fmt = pair
    p = _write(folder, f"any.{fmt.lower()}", encode(make_image(mode, w, h, seed), fmt))
    check_loaded(load_image(p, size, how=how), size)


@settings(max_examples=40, **SETTINGS)
@given(mode=st.sampled_from(["L", "RGB", "1"]), fmt=st.sampled_from(LOSSLESS), w=st.integers(1, 40),
       h=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_lossless_pixels_are_exact(folder, mode, fmt, w, h, seed):
    """Centre crop at the crop's own size involves no resampling: the pixels must come back exactly."""
    img = make_image(mode, w, h, seed)
    assume((mode, fmt) in savable())
    arr = np.asarray(img.convert("L") if mode == "1" else img).astype(np.float64)
    if mode == "1":
        arr = np.where(arr > 0, 255.0, 0.0)
    rgb = arr[..., None].repeat(3, -1) if arr.ndim == 2 else arr
    s = min(w, h)
    top, left = (h - s) // 2, (w - s) // 2
    p = _write(folder, f"exact.{fmt.lower()}", encode(img, fmt))
    np.testing.assert_allclose(_pixels(load_image(p, s, how="crop")), rgb[top:top + s, left:left + s], atol=1e-3)


@settings(max_examples=40, **SETTINGS)
@given(w=st.integers(1, 64), h=st.integers(1, 64), limit=st.integers(1, 4096),
       fmt=st.sampled_from(["PNG", "BMP", "GIF", "TIFF"]))
def test_pixel_limit_is_enforced_from_the_header(folder, w, h, limit, fmt):
    p = _write(folder, f"limit.{fmt.lower()}", encode(Image.new("RGB", (w, h), (9, 99, 199)), fmt))
    if w * h > limit:
        with pytest.raises(ImageError, match="too large"):
            load_image(p, 8, max_pixels=limit)
    else:
        check_loaded(load_image(p, 8, max_pixels=limit), 8)


def _bomb_headers(folder: Path) -> List[Path]:
    """Tiny files whose headers claim far more pixels than any photo: BMP, GIF and PNG bombs."""
    bmp = bytearray(encode(Image.new("RGB", (2, 2)), "BMP"))
    bmp[18:26] = (60_000).to_bytes(4, "little") + (60_000).to_bytes(4, "little")
    gif = bytearray(encode(Image.new("P", (2, 2)), "GIF"))
    gif[6:10] = (65_535).to_bytes(2, "little") * 2  # the logical screen
    ihdr = (20_000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    png = b"\x89PNG\r\n\x1a\n" + len(ihdr).to_bytes(4, "big") + b"IHDR" + ihdr + \
        zlib.crc32(b"IHDR" + ihdr).to_bytes(4, "big") + b"\0\0\0\0IEND\xaeB`\x82"
    return [_write(folder, "bomb.bmp", bytes(bmp)), _write(folder, "bomb.gif", bytes(gif)),
            _write(folder, "bomb.png", png)]


def test_decompression_bombs_in_several_formats(folder):
    for p in _bomb_headers(folder):
        with pytest.raises(ImageError, match="too large") as ei:
            load_image(p, 8)
        assert "\n" not in str(ei.value)


# --- broken files ------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF/TIFF tags it skips
@settings(max_examples=150, **SETTINGS)
@given(pair=st.sampled_from(savable()), seed=st.integers(0, 2**16), cut=st.floats(0.0, 1.0),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), max_size=6))
def test_truncated_and_corrupted_files(folder, pair, seed, cut, flips):
    """Cut anywhere and bytes overwritten anywhere (headers, palettes, EXIF, pixel data)."""
    mode, fmt = pair
    exif = Image.Exif()
    exif[0x0112] = 6
    data = bytearray(encode(make_image(mode, 9, 7, seed), fmt, **({"exif": exif} if fmt != "GIF" else {})))
    for where, value in flips:
        data[int(where * len(data))] = value
    data = data[: max(1, int(cut * len(data)))]
    load_or_image_error(_write(folder, f"broken.{fmt.lower()}", bytes(data)), 8)


def _tiff(width_type: int = 3, offsets_type: int = 4) -> bytes:
    """A hand-built 2x2 greyscale TIFF; tag types can be made to lie (5 = RATIONAL where Pillow wants integers)."""
    def entry(tag: int, typ: int, value: int) -> bytes:
        if typ == 5:  # a rational is stored out of line: point at the 8 bytes after the pixels
            return struct.pack("<HHII", tag, typ, 1, 8 + 2 + 12 * 8 + 4 + 4)
        return struct.pack("<HHI", tag, typ, 1) + (struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value))

    pixels_at = 8 + 2 + 12 * 8 + 4
    ifd = [entry(256, width_type, 2), entry(257, 3, 2), entry(258, 3, 8), entry(259, 3, 1), entry(262, 3, 1),
           entry(273, offsets_type, pixels_at), entry(278, 3, 2), entry(279, 4, 4)]
    return b"II*\0" + struct.pack("<IH", 8, len(ifd)) + b"".join(ifd) + bytes(4) + bytes([16, 32, 48, 64]) + \
        struct.pack("<II", pixels_at, 1)


def test_headers_that_crash_pillow_parsers(folder):
    """Found by fuzzing: Pillow raises ValueError / TypeError (not OSError) on these; the loader must not."""
    ok = _write(folder, "crafted.tif", _tiff())
    np.testing.assert_allclose(_pixels(load_image(ok, 2))[..., 0], [[16, 32], [48, 64]], atol=1e-3)
    ihdr = b"\0\0\0\x02\0"  # 5 bytes where PNG needs 13
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + \
        struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    for name, data, needle in [("rational_offsets.tif", _tiff(offsets_type=5), "truncated or corrupt"),
                               ("rational_width.tif", _tiff(width_type=5), "corrupt image header"),
                               ("short_ihdr.png", png, "corrupt image header")]:
        with pytest.raises(ImageError, match=needle) as ei:
            load_image(_write(folder, name, data), 2)
        assert "\n" not in str(ei.value)


MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"RIFF\0\0\0\0WEBPVP8L", b"GIF89a", b"BM", b"II*\0", b"MM\0*", b""]


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=100, **SETTINGS)
@given(magic=st.sampled_from(MAGIC), body=st.binary(min_size=0, max_size=300),
       ext=st.sampled_from(["png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff", "PNG"]))
def test_non_images_with_image_extensions(folder, magic, body, ext):
    """Random bytes, or random bytes behind a real format's magic number, named like an image."""
    assume(magic or body)
    load_or_image_error(_write(folder, f"fake.{ext}", magic + body), 8)


@pytest.mark.parametrize("text", ["this is not a picture\n", "<svg xmlns='http://www.w3.org/2000/svg'/>",
                                  "%PDF-1.4\n", "\0" * 64])
def test_text_and_other_formats_named_png(folder, text):
    with pytest.raises(ImageError, match="not an image"):
        load_image(_write(folder, "doc.png", text.encode()), 8)


# --- what real photos bring ----------------------------------------------------------------------------------------
@settings(max_examples=20, **SETTINGS)
@given(fmt=st.sampled_from(["GIF"] + (["WEBP"] if features.check("webp") else [])), n=st.integers(2, 4),
       colours=st.lists(st.sampled_from([(255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255), (0, 0, 0),
                                         (128, 128, 0)]), min_size=4, max_size=4, unique=True))
def test_animations_give_their_first_frame(folder, fmt, n, colours):
    frames = [Image.new("RGB", (8, 8), c) for c in colours[:n]]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=50, loop=0,
                   **({"lossless": True} if fmt == "WEBP" else {}))
    p = _write(folder, f"anim.{fmt.lower()}", buf.getvalue())
    with Image.open(p) as im:
        assert getattr(im, "n_frames", 1) == n
    np.testing.assert_allclose(_pixels(load_image(p, 8)), np.broadcast_to(colours[0], (8, 8, 3)), atol=1e-3)


@settings(max_examples=20, **SETTINGS)
@given(cmyk=st.tuples(*[st.integers(0, 255)] * 4))
def test_cmyk_jpeg_colours(folder, cmyk):
    """Uniform CMYK JPEGs: RGB = (255 - C)(255 - K) / 255 per channel, the naive conversion Pillow applies."""
    p = _write(folder, "cmyk.jpg", encode(Image.new("CMYK", (16, 16), cmyk), "JPEG", quality=95))
    want = np.array([(255 - cmyk[i]) * (255 - cmyk[3]) / 255 for i in range(3)])
    np.testing.assert_allclose(_pixels(load_image(p, 16))[4:12, 4:12], np.broadcast_to(want, (8, 8, 3)), atol=3)


@settings(max_examples=20, **SETTINGS)
@given(w=st.integers(1, 32), h=st.integers(1, 32), seed=st.integers(0, 2**16))
def test_sixteen_bit_png_scales(folder, w, h, seed):
    wide = np.random.default_rng(seed).integers(0, 65536, (h, w)).astype(np.uint16)
    p = _write(folder, "g16.png", encode(Image.fromarray(wide), "PNG"))
    s = min(w, h)
    top, left = (h - s) // 2, (w - s) // 2
    want = np.rint(wide[top:top + s, left:left + s] / 257.0)[..., None].repeat(3, -1)
    np.testing.assert_allclose(_pixels(load_image(p, s)), want, atol=1e-3)


@settings(max_examples=40, **SETTINGS)
@given(orientation=st.integers(1, 8), fmt=st.sampled_from(["PNG", "TIFF"] + (["WEBP"] if features.check("webp")
                                                                               else [])),
       w=st.integers(2, 24), h=st.integers(2, 24))
def test_every_exif_orientation_lossless(folder, orientation, fmt, w, h):
    """Stored pixels + orientation tag -> the upright picture (padded to a square, so nothing is resampled)."""
    upright = _blocks(h, w)
    stored = np.ascontiguousarray(_STORED_FROM_UPRIGHT[orientation](upright))
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = _write(folder, f"exif.{fmt.lower()}", encode(Image.fromarray(stored), fmt, exif=exif))
    s = max(w, h)
    want = np.full((s, s, 3), 255.0)
    top, left = (s - h) // 2, (s - w) // 2
    want[top:top + h, left:left + w] = upright
    np.testing.assert_allclose(_pixels(load_image(p, s, how="pad")), want, atol=1e-3)


@pytest.mark.parametrize("orientation", [0, 9, 255, 65535])
def test_invalid_exif_orientation_is_ignored(folder, orientation):
    upright = _blocks(6, 10)
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = _write(folder, "badexif.png", encode(Image.fromarray(upright), "PNG", exif=exif))
    np.testing.assert_allclose(_pixels(load_image(p, 6, how="crop")), upright[:, 2:8], atol=1e-3)


@pytest.mark.parametrize("values", [[np.nan, 1.0], [np.inf, -np.inf], [1e30, -1e30]])
def test_float_images_with_non_finite_values(folder, values):
    arr = np.resize(np.array(values, np.float32), (6, 6))
    p = _write(folder, "f.tiff", encode(Image.fromarray(arr), "TIFF"))
    check_loaded(load_image(p, 6), 6)


# --- things that are not image files -------------------------------------------------------------------------------
def _not_files(folder: Path) -> List[Tuple[Path, str]]:
    d = folder / "not_files"
    d.mkdir(exist_ok=True)
    cases = [(d / "missing.png", "no such file"), (d, "is a directory")]
    (d / "empty.jpg").write_bytes(b"")
    cases.append((d / "empty.jpg", "not an image"))
    fifo = d / "pipe.png"
    if not fifo.exists():
        os.mkfifo(fifo)  # Image.open would block on it until a writer appears: forever
    cases.append((fifo, "not a regular file"))
    for name, target in [("loop.png", "loop.png"), ("dangling.png", "nowhere.png")]:
        if not (d / name).is_symlink():
            (d / name).symlink_to(d / target)
    cases += [(d / "loop.png", "cannot read"), (d / "dangling.png", "no such file")]
    if Path("/dev/zero").exists():
        if not (d / "zero.png").is_symlink():
            (d / "zero.png").symlink_to("/dev/zero")
        cases.append((d / "zero.png", "not a regular file"))
    if Path("/proc/self/status").exists():
        cases.append((Path("/proc/self/status"), "not an image"))
    return cases


@pytest.mark.timeout(60)
def test_things_that_are_not_image_files(folder):
    for path, needle in _not_files(folder):
        with pytest.raises(ImageError, match=needle) as ei:
            load_image(path, 8)
        assert str(path) in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.timeout(120)
def test_cli_refuses_bad_images_first_and_writes_nothing(folder, capsys, tmp_path):
    """`edit` checks the image before loading the (slow) checkpoint: a missing checkpoint is never reached."""
    cases = _not_files(folder) + [(p, "too large") for p in _bomb_headers(folder)]
    cases.append((_write(folder, "cut.png", encode(make_image("RGB", 30, 30, 1), "PNG")[:200]), "truncated"))
    for path, needle in cases:
        out = tmp_path / "run"
        code = main(["edit", "--ckpt", str(tmp_path / "never-read.safetensors"), "--image", str(path),
                     "--prompt", "a photo", "--out", str(out), "--device", "cpu", "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("imagic: error:") and err.count("\n") == 1, (path, err)
        assert needle in err and "never-read" not in err, (path, err)
        assert not out.exists()
