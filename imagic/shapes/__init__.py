"""The "shapes world": procedural scenes for the small shipped model (weights/shapes), its demo, tests and eval.

`world` draws and renders scenes; `analysis` reads every attribute back from an image by plain image analysis.
A scene's caption names its shape, colour and background ("a red circle on a blue background"); everything else
that makes it *this* scene (position, size, the stripes on the shape, the shading of the background) is identity
the text never names, which is what Imagic keeps and a text-to-image model cannot regenerate."""
from imagic.shapes.analysis import Analysis, analyze, classify, nearest_color
from imagic.shapes.world import (COLORS, IMAGE_SIZE, MARGIN, MAX_SIZE, MIN_SIZE, RAMP_DIRECTIONS, RAMP_STRENGTH,
                                 SHAPES, STRIPE_ANGLES, STRIPE_PERIOD, STRIPE_WIDTH, Scene, caption, coverage,
                                 inside, random_scene, render, render_pil, scene_for_seed, stripe_coverage)

__all__ = ["Analysis", "COLORS", "IMAGE_SIZE", "MARGIN", "MAX_SIZE", "MIN_SIZE", "RAMP_DIRECTIONS", "RAMP_STRENGTH",
           "SHAPES", "STRIPE_ANGLES", "STRIPE_PERIOD", "STRIPE_WIDTH", "Scene", "analyze", "caption", "classify",
           "coverage", "inside", "nearest_color", "random_scene", "render", "render_pil", "scene_for_seed",
           "stripe_coverage"]
