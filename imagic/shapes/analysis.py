"""Reading a shapes-world image back into its attributes by plain image analysis, no learned metric.

- background: the median colour just inside the image's edge, named by the nearest palette entry;
- the shape: pixels at least half way from the background to one of the shape's two colours (its own and its
  stripes'); its largest 4-connected blob gives position and size (bounding box) and the class (fill of the box and
  solidity: square ~1.0, circle ~0.79, triangle ~0.5 of the box, and a star is the only non-convex one);
- colours: inside the blob, pixels within PURE of a palette entry vote; the most voted entry is the shape's colour
  (60% of a striped shape), the next the stripes' if it holds at least STRIPE_SHARE of the votes;
- stripe angle: the stripe-colour fraction of each interior pixel, correlated with a wave of the stripe period
  along each of the four candidate angles' normals (a matched filter, blind to the stripes' phase): the strongest
  wins;
- shading: a plane fitted to how far each background pixel has moved from its palette colour towards grey; its
  slope's direction, to the nearest of the four, when the slope is at least RAMP_MIN of the world's strength.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from imagic.shapes.world import (COLORS, GREY, RAMP_DIRECTIONS, RAMP_STRENGTH, STRIPE_ANGLES, STRIPE_PERIOD,
                                 Scene)

MIN_BLOB = 6
PURE = 70.0  # a pixel votes for a palette colour within this distance (mixed edge pixels are further from all)
STRIPE_SHARE = 0.12  # clean renders: stripes hold 25-55% of a shape's votes; a plain shape's noise, under 2%
RAMP_MIN = 0.25  # a shading slope under a quarter of the world's (RAMP_STRENGTH) counts as a flat background


@dataclass
class Analysis:
    """What `analyze` reads from an image. `shape` is None when no foreground was found."""

    background: str
    color: Optional[str]
    shape: Optional[str]
    cx: float = float("nan")  # bounding-box centre and half-extent, as Scene
    cy: float = float("nan")
    size: float = float("nan")
    area: int = 0
    fill: float = float("nan")  # area / bounding-box area
    solidity: float = float("nan")  # area / convex-hull area
    components: int = 0  # foreground blobs of at least MIN_BLOB pixels (1 for a clean scene)
    stripe_color: Optional[str] = None
    stripe_angle: Optional[int] = None
    stripe_contrast: float = 0.0  # the winning matched-filter response (0.2-0.45 on clean renders)
    ramp: Optional[int] = None
    ramp_strength: float = 0.0  # the fitted shading slope across the image (RAMP_STRENGTH on clean renders)

    def matches(self, scene: Scene, position_tol: float = 3.0, size_tol: float = 0.2) -> Dict[str, bool]:
        """Attribute by attribute: does this analysis agree with `scene`? Size within a relative tolerance."""
        found = self.shape is not None
        return {"shape": self.shape == scene.shape, "color": self.color == scene.color,
                "background": self.background == scene.background,
                "position": found and max(abs(self.cx - scene.cx), abs(self.cy - scene.cy)) <= position_tol,
                "size": found and abs(self.size - scene.size) <= size_tol * scene.size,
                "single": self.components == 1, "stripe_color": self.stripe_color == scene.stripe_color,
                "stripe_angle": scene.stripe_color is None or self.stripe_angle == scene.stripe_angle,
                "ramp": self.ramp == scene.ramp}


_PALETTE = np.array(list(COLORS.values()), dtype=float)
_NAMES = list(COLORS)


def nearest_color(rgb: Sequence[float]) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - np.asarray(rgb, float)) ** 2).sum(1)))]


def _as_array(image: Union[Image.Image, np.ndarray]) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=float)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {arr.shape}")
    return arr


def _components(mask: np.ndarray) -> List[np.ndarray]:
    """4-connected components of a boolean mask, as index arrays of (row, col), largest first."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    out = []
    for r0, c0 in zip(*np.nonzero(mask)):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        stack, pix = [(r0, c0)], []
        while stack:
            r, c = stack.pop()
            pix.append((r, c))
            for rr, cc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        out.append(np.array(pix))
    return sorted(out, key=len, reverse=True)


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (Andrew's monotone chain, then the shoelace formula)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq):
        chain: List[Tuple[float, float]] = []
        for p in seq:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1]) -
                                       (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = np.array(half(pts) + half(pts[::-1]), dtype=float)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def classify(fill: float, solidity: float) -> str:
    """Shape class from two scale-free numbers, fill of the bounding box and solidity. Clean renders: square
    fill 1.0, circle 0.79, triangle 0.5, all solidity > 0.9; the star is the only concave shape (solidity
    0.6-0.7). The autoencoder rounds corners and points (its reconstructions of clean renders: star solidity
    up to 0.83, triangle fill up to 0.65, circle 0.75-0.82, square from 0.92), so each threshold sits between
    the classes' ranges over both clean renders and reconstructions."""
    if solidity < 0.85:
        return "star"
    if fill > 0.885:
        return "square"
    return "circle" if fill > 0.69 else "triangle"


def _votes(pixels: np.ndarray, exclude: str) -> List[Tuple[str, int]]:
    """Palette colours voted for by pixels within PURE of them (`exclude`, the background, left out), most first."""
    d = np.sqrt(((pixels[:, None, :] - _PALETTE[None]) ** 2).sum(-1))
    near, best = d.min(1) < PURE, d.argmin(1)
    counts = [(_NAMES[k], int((near & (best == k)).sum())) for k in range(len(_NAMES)) if _NAMES[k] != exclude]
    return sorted([c for c in counts if c[1] > 0], key=lambda c: -c[1])


def _toward(arr: np.ndarray, origin: np.ndarray, target: np.ndarray) -> np.ndarray:
    """How far each pixel lies from `origin` towards `target` (0 at origin, 1 at target), along that line."""
    d = target - origin
    return ((arr - origin) @ d) / max(float(d @ d), 1e-6)


def _coverage(arr: np.ndarray, bg: np.ndarray, colours: Sequence[np.ndarray]) -> np.ndarray:
    """How much of each pixel is shape: its colour written as bg + sum_k w_k (colour_k - bg) by least squares, and
    sum_k w_k. An anti-aliased edge pixel then counts by its coverage (so the area is the true one), and a pixel
    mixing the shape's two colours counts whole, even where that mix lies nearer the background than either."""
    basis = np.stack([c - bg for c in colours], axis=1)  # (3, K)
    weights, *_ = np.linalg.lstsq(basis, (arr - bg).reshape(-1, 3).T, rcond=None)
    return weights.sum(0).reshape(arr.shape[:2])


def _stripe_angle(q: np.ndarray, interior: np.ndarray) -> Tuple[Optional[int], float]:
    """The candidate angle whose normal carries the strongest wave of the stripe period in the stripe fraction `q`
    over the interior pixels, and that response (mean |sum q e^(2 pi i s / P)| per pixel)."""
    rows, cols = np.nonzero(interior)
    if len(rows) < 12:
        return None, 0.0
    values = q[rows, cols] - q[rows, cols].mean()
    responses = []
    for angle in STRIPE_ANGLES:
        a = np.deg2rad(angle)
        across = -cols * np.sin(a) + rows * np.cos(a)
        responses.append(abs(np.sum(values * np.exp(2j * np.pi * across / STRIPE_PERIOD))) / len(rows))
    k = int(np.argmax(responses))
    return STRIPE_ANGLES[k], float(responses[k])


def _ramp(arr: np.ndarray, background: np.ndarray, colour: str, size: int) -> Tuple[Optional[int], float]:
    """The shading direction of the background pixels (`background`: a mask) and the slope's size across the image,
    from a least-squares plane through how far each has moved from the palette colour towards grey."""
    rows, cols = np.nonzero(background)
    if len(rows) < 30:
        return None, 0.0
    u = _toward(arr[rows, cols], np.array(COLORS[colour], float), np.array(GREY))
    h, w = background.shape
    design = np.stack([np.ones(len(rows)), cols - w / 2, rows - h / 2], axis=1)
    (_, bx, by), *_ = np.linalg.lstsq(design, u, rcond=None)
    strength = float(np.hypot(bx, by)) * size
    if strength < RAMP_MIN * RAMP_STRENGTH:
        return None, strength
    direction = np.rad2deg(np.arctan2(by, bx)) % 360
    gaps = [abs((direction - d + 180) % 360 - 180) for d in RAMP_DIRECTIONS]
    return RAMP_DIRECTIONS[int(np.argmin(gaps))], strength


def _grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """The mask dilated by `steps` pixels (4-neighbourhood)."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def analyze(image: Union[Image.Image, np.ndarray], frame: int = 2, ring: int = 2) -> Analysis:
    """Every attribute of the one shape in an image and its background (see the module docstring).

    The outermost `frame` pixels are ignored: shapes keep MARGIN = 3 pixels from the edge, and a decoder's
    zero-padded convolutions leave an off-colour line there in some samples (measured on the shipped model:
    a cyan edge on blue backgrounds, which a border median took for the background). The background is read
    from the `ring` pixels just inside. Coordinates are reported in the whole image's pixels."""
    arr = _as_array(image)
    arr = arr[frame:arr.shape[0] - frame, frame:arr.shape[1] - frame]
    border = np.concatenate([arr[:ring].reshape(-1, 3), arr[-ring:].reshape(-1, 3),
                             arr[:, :ring].reshape(-1, 3), arr[:, -ring:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    bg_name = nearest_color(bg)
    rough = np.sqrt(((arr - bg) ** 2).sum(-1)) > 60.0  # well away from the background (shading moves it <= 41)
    votes = _votes(arr[rough], bg_name)
    if rough.sum() < MIN_BLOB or not votes:
        return Analysis(background=bg_name, color=None, shape=None)
    mask = _coverage(arr, bg, [np.array(COLORS[name], float) for name, _ in votes[:2]]) > 0.5
    blobs = [b for b in _components(mask) if len(b) >= MIN_BLOB]
    if not blobs:
        return Analysis(background=bg_name, color=None, shape=None)
    pix = blobs[0]
    rows, cols = pix[:, 0], pix[:, 1]
    blob = np.zeros_like(mask)
    blob[rows, cols] = True
    y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    area = len(pix)
    corners = np.concatenate([pix + off for off in ((0, 0), (0, 1), (1, 0), (1, 1))])
    fill = area / float((y1 - y0) * (x1 - x0))
    solidity = area / max(_hull_area(corners), 1.0)
    inner = _votes(arr[blob], bg_name)
    color = inner[0][0] if inner else nearest_color(np.median(arr[blob], axis=0))
    stripe = inner[1][0] if len(inner) > 1 and inner[1][1] >= STRIPE_SHARE * sum(n for _, n in inner) else None
    angle, contrast = None, 0.0
    if stripe is not None:
        q = _toward(arr, np.array(COLORS[color], float), np.array(COLORS[stripe], float)).clip(0, 1)
        interior = blob & ~_grow(~blob, 1)
        angle, contrast = _stripe_angle(q, interior)
    ramp, ramp_strength = _ramp(arr, ~_grow(mask, 2), bg_name, arr.shape[0] + 2 * frame)
    return Analysis(background=bg_name, color=color, shape=classify(fill, solidity), cx=frame + (x0 + x1) / 2.0,
                    cy=frame + (y0 + y1) / 2.0, size=max(x1 - x0, y1 - y0) / 2.0, area=area, fill=fill,
                    solidity=solidity, components=len(blobs), stripe_color=stripe, stripe_angle=angle,
                    stripe_contrast=contrast, ramp=ramp, ramp_strength=ramp_strength)
