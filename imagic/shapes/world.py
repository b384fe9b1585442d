"""Scenes of the shapes world: what they are made of, how they are drawn at random, and how they are rendered.

A scene is one shape (circle, square, triangle, star) in a colour, at a position and size, over a background
colour; the shape carries stripes of a second colour at one of four angles, and the background is shaded towards
grey in one of four directions. The caption names the shape, its colour and the background, never the rest:
"a red circle on a blue background" is drawn with 4 stripe colours x 4 angles x 4 shadings x every position and
size. Those unnamed attributes are the scene's identity. SDEdit loses the stripes at the noise level a shape change
needs (they are the finest detail in the image), and txt2img has no way to know them; Imagic's fine-tuned model
has seen them (Kawar et al. 2023, Sec. 3: the model is fine-tuned to "fit" the input's appearance).

Geometry: every shape exactly fills its bounding box [cx - size, cx + size] x [cy - size, cy + size] (pixel
coordinates, pixel i covering [i, i + 1)), so the box centre and half-extent are the scene's position and size
whatever the shape. Stripes are anchored to the box centre (the centre lies midway between two stripes), so a
shape edit that keeps the box keeps the stripes where they were. Renders are generated on the fly from a seed.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star")
# Six colours far apart in RGB (closest pair: green/black at ~167 of 441), so nearest-colour labels are robust.
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (230, 25, 25), "green": (30, 180, 40), "blue": (30, 60, 220),
    "yellow": (240, 220, 30), "white": (245, 245, 245), "black": (15, 15, 15),
}
IMAGE_SIZE = 64
MIN_SIZE, MAX_SIZE = 10.0, 17.0  # half-extent of the bounding box, in pixels
MARGIN = 3.0  # the box stays this far from the image edge, so the border shows only background
STAR_INNER = 0.5  # inner / outer radius of the five-pointed star
# Stripes: 4 px wide every 12 px. 12 px is 3 latent pixels of the f = 4 autoencoder, well above the latent
# grid's Nyquist period (2) at every angle; the stripes cover 25-42% of a shape (clean renders of every class), so
# the shape's own colour keeps the majority of its pixels and its name (at 10 px, 49% in some stars).
STRIPE_PERIOD, STRIPE_WIDTH = 12.0, 4.0
STRIPE_ANGLES: Tuple[int, ...] = (0, 45, 90, 135)  # direction of the stripes, degrees (x right, y down)
# Shading: the background moves towards grey by up to RAMP_STRENGTH of the way, linearly across the image, in one
# of four directions (degrees, x right, y down: 0 = greyer to the right). At most 0.4 x 203 = 81 from its palette
# colour (white), under half the palette's closest distance (167), so the background's colour name never changes.
RAMP_DIRECTIONS: Tuple[int, ...] = (0, 90, 180, 270)
RAMP_STRENGTH = 0.4
GREY = (128.0, 128.0, 128.0)


def caption(shape: str, color: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"


@dataclass(frozen=True)
class Scene:
    """One scene. `stripe_color` None draws a plain shape and `ramp` None a flat background (not in the trained
    world, whose scenes all have both; handy for tests and figures)."""

    shape: str
    color: str
    background: str
    cx: float
    cy: float
    size: float
    stripe_color: Optional[str] = None
    stripe_angle: int = 0
    ramp: Optional[int] = None

    @property
    def caption(self) -> str:
        return caption(self.shape, self.color, self.background)

    def replace(self, **changes) -> "Scene":
        return dataclasses.replace(self, **changes)


def random_scene(rng: np.random.Generator, image_size: int = IMAGE_SIZE, shapes: Sequence[str] = SHAPES,
                 colors: Sequence[str] = tuple(COLORS)) -> Scene:
    """A uniformly random scene: shape, colour, a different background colour, size, a position that keeps the
    bounding box `MARGIN` pixels inside the image, then the unnamed attributes: a stripe colour other than both,
    a stripe angle and a shading direction."""
    shape = str(rng.choice(list(shapes)))
    color, background = (str(c) for c in rng.choice(list(colors), size=2, replace=False))
    size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
    lo, hi = MARGIN + size, image_size - MARGIN - size
    cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
    stripe = str(rng.choice([c for c in colors if c not in (color, background)]))
    angle, ramp = int(rng.choice(STRIPE_ANGLES)), int(rng.choice(RAMP_DIRECTIONS))
    return Scene(shape, color, background, cx, cy, size, stripe, angle, ramp)


def scene_for_seed(seed: int, namespace: int = 0, image_size: int = IMAGE_SIZE) -> Scene:
    """The scene of one seed in a namespace. Training draws from namespace 0 and evaluation from others, so
    evaluation scenes are generated by random streams the training never used."""
    return random_scene(np.random.default_rng([namespace, seed]), image_size)


# --- rendering -----------------------------------------------------------------------------------------------

def _star_polygon() -> np.ndarray:
    """The ten vertices of a five-pointed star (point up), stretched to fill [-1, 1]^2 exactly."""
    k = np.arange(10)
    radius = np.where(k % 2 == 0, 1.0, STAR_INNER)
    angle = -np.pi / 2 + k * np.pi / 5
    pts = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    lo, hi = pts.min(0), pts.max(0)
    return (pts - lo) / (hi - lo) * 2 - 1


def _inside_polygon(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule: a horizontal ray from (u, v) crosses the boundary an odd number of times."""
    inside = np.zeros(u.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0)):
        crosses = (y0 > v) != (y1 > v)
        x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0 + 1e-12)
        inside ^= crosses & (u < x_at)
    return inside


def inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership in the unit shape, in box coordinates u, v in [-1, 1] (v grows downwards)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return (v <= 1.0) & (np.abs(u) <= (v + 1.0) / 2.0)
    if shape == "star":
        return _inside_polygon(u, v, _star_polygon())
    raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")


def in_stripe(angle: float, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Whether offsets (dx, dy) from the box centre fall on a stripe running at `angle` degrees: stripes are
    STRIPE_WIDTH wide, centred half a period from the centre, so the centre itself shows the shape's colour."""
    a = np.deg2rad(angle)
    across = -dx * np.sin(a) + dy * np.cos(a)  # distance along the stripes' normal
    phase = np.mod(across / STRIPE_PERIOD, 1.0)
    return np.abs(phase - 0.5) * STRIPE_PERIOD < STRIPE_WIDTH / 2


def _samples(scene: Scene, image_size: int, supersample: int) -> Tuple[np.ndarray, np.ndarray]:
    n = image_size * supersample
    centres = (np.arange(n) + 0.5) / supersample
    y, x = np.meshgrid(centres, centres, indexing="ij")
    return x - scene.cx, y - scene.cy


def _pool(hit: np.ndarray, image_size: int, supersample: int) -> np.ndarray:
    return hit.reshape(image_size, supersample, image_size, supersample).mean(axis=(1, 3))


def coverage(scene: Scene, image_size: int = IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """(H, W) fraction of each pixel inside the shape, from `supersample`^2 samples per pixel (anti-aliasing)."""
    dx, dy = _samples(scene, image_size, supersample)
    return _pool(inside(scene.shape, dx / scene.size, dy / scene.size), image_size, supersample)


def stripe_coverage(scene: Scene, image_size: int = IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """(H, W) fraction of each pixel inside the shape and on a stripe (zero for a plain shape)."""
    if scene.stripe_color is None:
        return np.zeros((image_size, image_size))
    dx, dy = _samples(scene, image_size, supersample)
    hit = inside(scene.shape, dx / scene.size, dy / scene.size) & in_stripe(scene.stripe_angle, dx, dy)
    return _pool(hit, image_size, supersample)


def ramp_values(direction: float, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """(H, W) shading in [0, 1]: 0 on the image's side opposite `direction`, 1 on the side it points to."""
    a = np.deg2rad(direction)
    centres = np.arange(image_size) + 0.5 - image_size / 2
    y, x = np.meshgrid(centres, centres, indexing="ij")
    along = (x * np.cos(a) + y * np.sin(a)) / image_size  # -0.5 .. 0.5 on the axis-aligned directions
    return np.clip(along + 0.5, 0.0, 1.0)


def background(scene: Scene, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """(H, W, 3) float background: the palette colour, shaded towards grey if the scene has a ramp."""
    base = np.broadcast_to(np.array(COLORS[scene.background], float), (image_size, image_size, 3))
    if scene.ramp is None:
        return base.copy()
    toward = np.array(GREY) - base
    return base + RAMP_STRENGTH * ramp_values(scene.ramp, image_size)[..., None] * toward


def render(scene: Scene, image_size: int = IMAGE_SIZE, supersample: int = 4) -> np.ndarray:
    """The scene as an (H, W, 3) uint8 RGB array."""
    cov = coverage(scene, image_size, supersample)[..., None]
    stripes = stripe_coverage(scene, image_size, supersample)[..., None]
    body = np.array(COLORS[scene.color], float)
    second = np.array(COLORS[scene.stripe_color], float) if scene.stripe_color else body
    out = (cov - stripes) * body + stripes * second + (1 - cov) * background(scene, image_size)
    return np.round(out).astype(np.uint8)


def render_pil(scene: Scene, image_size: int = IMAGE_SIZE) -> Image.Image:
    return Image.fromarray(render(scene, image_size))
