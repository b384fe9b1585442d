"""Image loading (modes, EXIF, crop/pad, 16-bit, animation, errors), grids and PNG metadata.

Expected pixels are computed with numpy from the EXIF and PNG specifications, not with the PIL calls the
loader itself uses, so a wrong mapping shows up.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, features

from imagic.images import ImageError, from_pil, make_grid, open_image, save_png, square, to_pil
from tests.helpers import load_image, read_png_metadata

TEDBENCH = Path(__file__).resolve().parents[1].parent / "shared" / "tedbench" / "originals"


def _pixels(t: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) float 0..255 for comparisons in 8-bit units."""
    assert t.dtype == torch.float32 and t.ndim == 4 and t.shape[:2] == (1, 3)
    assert t.min() >= -1 and t.max() <= 1
    return ((t[0].permute(1, 2, 0) + 1) * 127.5).numpy()


def _blocks(h: int, w: int, rows: int = 2, cols: int = 3) -> np.ndarray:
    """An asymmetric pattern: rows x cols blocks of distinct colours (no flip or rotation maps it to itself)."""
    colours = np.array([[230, 20, 20], [20, 200, 20], [20, 20, 220], [240, 240, 20], [20, 220, 230], [200, 20, 210]],
                       np.uint8)
    yi = np.arange(h)[:, None] * rows // h
    xi = np.arange(w)[None, :] * cols // w
    return colours[(yi * cols + xi) % len(colours)]


# EXIF 2.3, tag 0x0112: where the stored 0th row and 0th column appear when displayed. S = stored, U = upright.
_STORED_FROM_UPRIGHT = {
    1: lambda u: u,
    2: lambda u: u[:, ::-1],                          # 0th row top, 0th column right
    3: lambda u: u[::-1, ::-1],                       # bottom, right
    4: lambda u: u[::-1, :],                          # bottom, left
    5: lambda u: u.transpose(1, 0, 2),                # 0th row left, 0th column top: S[i, j] = U[j, i]
    6: lambda u: u[:, ::-1].transpose(1, 0, 2),       # right, top:    S[i, j] = U[j, W-1-i]
    7: lambda u: u[::-1, ::-1].transpose(1, 0, 2),    # right, bottom: S[i, j] = U[H-1-j, W-1-i]
    8: lambda u: u[::-1, :].transpose(1, 0, 2),       # left, bottom:  S[i, j] = U[H-1-j, i]
}


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation(tmp_path, orientation, fmt):
    upright = _blocks(32, 48)
    stored = np.ascontiguousarray(_STORED_FROM_UPRIGHT[orientation](upright))
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f"o{orientation}.{fmt.lower()}"
    Image.fromarray(stored).save(p, format=fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    got = _pixels(load_image(p, 32, how="crop"))  # the upright 48x32 centre crop is 32x32: no resampling
    want = upright[:, 8:40].astype(np.float64)
    if fmt == "PNG":
        np.testing.assert_allclose(got, want, atol=1e-3)
    else:  # JPEG: compare block means away from edges (compression blurs them)
        assert np.abs(np.median(got - want, axis=(0, 1))).max() < 4
        assert np.mean(np.abs(got - want) < 30) > 0.9


def test_crop_keeps_centre_and_pad_keeps_everything(tmp_path):
    wide = _blocks(20, 60, rows=1, cols=3)  # three 20x20 squares
    p = tmp_path / "wide.png"
    Image.fromarray(wide).save(p)
    np.testing.assert_allclose(_pixels(load_image(p, 20, "crop")), wide[:, 20:40], atol=1e-3)
    padded = np.full((60, 60, 3), 255, np.uint8)
    padded[20:40] = wide
    np.testing.assert_allclose(_pixels(load_image(p, 60, "pad")), padded, atol=1e-3)
    tall_p = tmp_path / "tall.png"
    Image.fromarray(np.ascontiguousarray(wide.transpose(1, 0, 2))).save(tall_p)
    np.testing.assert_allclose(_pixels(load_image(tall_p, 20, "crop")), wide[:, 20:40].transpose(1, 0, 2), atol=1e-3)
    with pytest.raises(ValueError, match="square"):
        load_image(p, 20, "stretch")


def test_resize_shape_range_and_smoothness(tmp_path):
    grad = np.repeat(np.linspace(0, 255, 300)[None, :, None], 200, 0).repeat(3, 2).astype(np.uint8)
    p = tmp_path / "g.png"
    Image.fromarray(grad).save(p)
    for size, how in [(64, "crop"), (17, "pad"), (512, "crop")]:
        t = load_image(p, size, how)
        assert t.shape == (1, 3, size, size) and t.is_contiguous()
        assert -1 <= t.min() and t.max() <= 1
    row = _pixels(load_image(p, 64, "crop"))[32, :, 0]
    assert np.all(np.diff(row) > 0)  # a horizontal ramp stays a ramp (no transposed axes)
    np.testing.assert_allclose(row.mean(), grad[:, 50:250, 0].mean(), atol=1.0)


def _mode_cases():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :4, 3] = 255  # opaque red on the left, fully transparent on the right, half on the bottom row
    rgba[7, :, 3] = 128
    want_rgba = np.zeros((8, 8, 3))
    a = rgba[..., 3:4] / 255.0
    want_rgba[:] = a * np.array([255, 0, 0]) + (1 - a) * 255
    gray = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    la = np.stack([gray, np.where(np.arange(8)[None, :] < 4, 255, 0).repeat(8, 0).astype(np.uint8)], -1)
    want_la = np.where(la[..., 1:2] == 255, la[..., :1], 255).repeat(3, -1)
    bits = (np.indices((8, 8)).sum(0) % 2).astype(bool)
    return {
        "RGBA": (Image.fromarray(rgba), want_rgba, 1),
        "LA": (Image.fromarray(la), want_la, 0),
        "L": (Image.fromarray(gray), gray[..., None].repeat(3, -1), 0),
        "1": (Image.fromarray(bits).convert("1"), bits[..., None].repeat(3, -1) * 255.0, 0),
        "RGB": (Image.fromarray(_blocks(8, 8)), _blocks(8, 8), 0),
    }


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "1", "RGB"])
def test_modes(tmp_path, mode):
    img, want, atol = _mode_cases()[mode]
    assert img.mode == mode
    p = tmp_path / f"{mode}.png"
    img.save(p)
    assert Image.open(p).mode == mode
    np.testing.assert_allclose(_pixels(load_image(p, 8)), want, atol=atol + 1e-3)


def test_palette_with_transparency(tmp_path):
    idx = np.zeros((8, 8), np.uint8)
    idx[:, 4:] = 1
    idx[0, 0] = 2
    img = Image.fromarray(idx, "L").convert("P")
    img.putpalette([10, 20, 30, 200, 100, 50, 0, 0, 255] + [0] * (3 * 253))
    img.info["transparency"] = 1  # palette index 1 is transparent
    p = tmp_path / "p.png"
    img.save(p, transparency=1)
    im = Image.open(p)
    assert im.mode == "P" and "transparency" in im.info
    got = _pixels(load_image(p, 8))
    np.testing.assert_allclose(got[1, 0], [10, 20, 30], atol=1e-3)
    np.testing.assert_allclose(got[0, 0], [0, 0, 255], atol=1e-3)
    np.testing.assert_allclose(got[:, 4:], 255, atol=1e-3)  # transparent -> white


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    wide = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(wide).save(p)
    assert Image.open(p).mode in ("I;16", "I")
    got = _pixels(load_image(p, 64))
    want = wide.astype(np.float64) * 255 / 65535
    np.testing.assert_allclose(got, want[..., None].repeat(3, -1), atol=0.51)
    assert got[32, 32, 0] < 200  # PIL's convert would give 255 for anything above 255/65535


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p, quality=95)  # no cyan, full magenta+yellow: red
    assert Image.open(p).mode == "CMYK"
    np.testing.assert_allclose(_pixels(load_image(p, 16)), np.broadcast_to([255, 0, 0], (16, 16, 3)), atol=3)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_first_frame(tmp_path, fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    p = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(p, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0,
                   **({"lossless": True} if fmt == "WEBP" else {}))
    with Image.open(p) as im:
        assert getattr(im, "n_frames", 1) == 3
        im.seek(2)
        assert im.convert("RGB").getpixel((0, 0)) == (0, 255, 0)  # the frames really differ
    np.testing.assert_allclose(_pixels(load_image(p, 16)), np.broadcast_to([255, 0, 0], (16, 16, 3)), atol=1e-3)


def test_errors(tmp_path):
    def fails(path, match, **kw):
        with pytest.raises(ImageError, match=match) as ei:
            load_image(path, 16, **kw)
        msg = str(ei.value)
        assert str(path) in msg and "\n" not in msg
        assert isinstance(ei.value, ValueError)

    fails(tmp_path / "missing.png", "no such file")
    fails(tmp_path, "directory")
    (tmp_path / "notes.png").write_text("this is not a picture\n")
    fails(tmp_path / "notes.png", "not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    fails(tmp_path / "empty.jpg", "not an image")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    fails(tmp_path / "cut.jpg", "truncated or corrupt")
    Image.new("RGB", (20, 20)).save(tmp_path / "big.png")
    fails(tmp_path / "big.png", "too large", max_pixels=399)
    assert load_image(tmp_path / "big.png", 4, max_pixels=400).shape == (1, 3, 4, 4)


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims w x h pixels and holds no pixel data: what a decompression bomb looks like
    before decoding (the real ones are a few KB of compressed zeros)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_decompression_bomb_checked_before_decoding(tmp_path, recwarn):
    limit = Image.MAX_IMAGE_PIXELS
    _png_header_only(tmp_path / "bomb.png", 10_000, 10_000)  # 1e8 px: over our default, under 2x PIL's limit
    with pytest.raises(ImageError, match="too large"):
        load_image(tmp_path / "bomb.png", 16)  # would allocate 300 MB and then fail if it decoded
    _png_header_only(tmp_path / "huge.png", 30_000, 30_000)  # PIL's own guard raises at open
    with pytest.raises(ImageError, match="too large") as ei:
        load_image(tmp_path / "huge.png", 16, max_pixels=10**12)
    assert "\n" not in str(ei.value)
    assert Image.MAX_IMAGE_PIXELS == limit  # the process-wide setting is untouched
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_zero_size(tmp_path, monkeypatch):
    """PIL refuses to open zero-size PNGs itself; other plugins might not, so the loader checks too."""
    _png_header_only(tmp_path / "zero.png", 0, 10)
    with pytest.raises(ImageError, match="not an image|zero-size"):
        load_image(tmp_path / "zero.png", 16)
    monkeypatch.setattr(Image, "open", lambda fp: Image.new("RGB", (0, 10)))
    with pytest.raises(ImageError, match="zero-size"):
        load_image(tmp_path / "zero.png", 16)


def test_pil_round_trips():
    t = torch.rand(2, 3, 5, 7) * 2 - 1
    imgs = to_pil(t)
    assert len(imgs) == 2 and imgs[0].size == (7, 5) and imgs[0].mode == "RGB"
    back = torch.cat([from_pil(im) for im in imgs])
    assert (back - t).abs().max() <= 1 / 127.5 / 2 + 1e-6
    assert to_pil(back)[1].tobytes() == imgs[1].tobytes()
    assert to_pil(torch.full((3, 2, 2), 5.0))[0].getpixel((0, 0)) == (255, 255, 255)  # clamped
    with pytest.raises(ValueError, match="NaN"):
        to_pil(torch.full((1, 3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        to_pil(torch.zeros(1, 4, 2, 2))


def test_open_image_keeps_full_resolution(tmp_path):
    Image.fromarray(_blocks(30, 50)).save(tmp_path / "a.png")
    im = open_image(tmp_path / "a.png")
    assert im.size == (50, 30) and im.mode == "RGB"
    assert square(im, 10, "pad").size == (10, 10)


@pytest.mark.parametrize("rows,cols", [(1, 1), (2, 3), (3, 2)])
def test_grid_geometry(rows, cols):
    cells = [[Image.fromarray(np.full((12, 10, 3), 10 * (r * cols + c), np.uint8)) for c in range(cols)]
             for r in range(rows)]
    plain = make_grid(cells, gap=0)
    assert plain.size == (cols * 10, rows * 12)
    for r in range(rows):
        for c in range(cols):
            assert plain.getpixel((c * 10 + 5, r * 12 + 6)) == (10 * (r * cols + c),) * 3
    gapped = make_grid(cells, gap=3)
    assert gapped.size == (cols * 10 + (cols - 1) * 3, rows * 12 + (rows - 1) * 3)
    labelled = make_grid(cells, row_labels=[f"seed {r}" for r in range(rows)],
                         col_labels=[0.5 * c for c in range(cols)], gap=0)
    left, top = labelled.width - plain.width, labelled.height - plain.height
    assert left > 0 and top > 0
    assert labelled.crop((left, top, labelled.width, labelled.height)).tobytes() == plain.tobytes()
    label_area = np.asarray(labelled.crop((0, top, left, labelled.height)))
    assert label_area.min() < 128  # some text was drawn
    only_cols = make_grid(cells, col_labels=list(range(cols)), gap=0)
    assert only_cols.width == plain.width and only_cols.height > plain.height


def test_long_column_labels_wrap_inside_their_column():
    cells = [[Image.new("RGB", (96, 96), (255, 255, 255))] * 3]
    short = make_grid(cells, col_labels=["a", "b", "c"], gap=0)
    wrapped = make_grid(cells, col_labels=["a", "reference: target through the VAE", "c"], gap=0)
    assert wrapped.width == short.width and wrapped.height > short.height + 10  # more than one line of text
    ink = np.asarray(wrapped.convert("L"))[: wrapped.height - 96] < 128
    cols_with_ink = np.flatnonzero(ink.any(axis=0))
    middle = cols_with_ink[(cols_with_ink >= 96) & (cols_with_ink < 192)]
    assert middle.size > 0 and not ink[:, 93:96].any() and not ink[:, 192:195].any()  # none spills over
    two_lines = make_grid(cells, col_labels=["a", "imagic\nalpha=0.8", "c"], gap=0)
    assert two_lines.height > short.height + 10  # an explicit newline breaks the line although the text would fit


def test_grid_errors():
    im = Image.new("RGB", (4, 4))
    with pytest.raises(ValueError):
        make_grid([[im, im], [im]])
    with pytest.raises(ValueError):
        make_grid([])
    with pytest.raises(ValueError, match="row labels"):
        make_grid([[im]], row_labels=["a", "b"])


def test_png_metadata_round_trip(tmp_path):
    meta = {"prompt": "a dog jumping", "alpha": 0.9, "seed": 3, "steps": [1000, 1500], "note": "caf\u00e9 \u03b1",
            "empty": "", "flag": True}
    img = Image.fromarray(_blocks(8, 12))
    p = tmp_path / "out.png"
    save_png(img, p, meta)
    got = read_png_metadata(p)
    assert got == {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    assert json.loads(got["steps"]) == [1000, 1500]
    assert np.array_equal(np.asarray(Image.open(p)), np.asarray(img))
    assert sorted(q.name for q in tmp_path.iterdir()) == ["out.png"]
    with pytest.raises(ValueError, match="1-79"):
        save_png(img, tmp_path / "bad.png", {"k" * 80: "v"})
    Image.new("RGB", (4, 4)).save(tmp_path / "x.jpg")
    with pytest.raises(ImageError, match="not a PNG"):
        read_png_metadata(tmp_path / "x.jpg")


@pytest.mark.skipif(not TEDBENCH.is_dir(), reason="TEdBench not found at ../shared/tedbench")
def test_tedbench_photos_load():
    photos = sorted(p for p in TEDBENCH.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})
    assert photos
    for p in photos:
        t = load_image(p, 64)
        assert t.shape == (1, 3, 64, 64) and t.dtype == torch.float32, p
        assert torch.isfinite(t).all() and -1 <= t.min() and t.max() <= 1, p
        assert t.std() > 0.01, p  # a real photo, not a blank
