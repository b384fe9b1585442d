"""The shapes world (imagic/shapes.py), the shipped model trained on it (weights/shapes), and a small version of
benchmarks/shapes_eval.py: Imagic must beat txt2img and SDEdit on "edit happened AND identity kept"."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from imagic import shapes as S

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "weights" / "shapes" / "shapes.safetensors"
DEMO_INPUT = ROOT / "weights" / "shapes" / "example_red_circle.png"
DEMO_PROMPT = "a red square on a blue background"  # the Makefile's demo edit: a shape edit


# --- renderer and captions -------------------------------------------------------------------------------------

def test_scenes_are_seeded_and_namespaced():
    assert S.scene_for_seed(3, 0) == S.scene_for_seed(3, 0)
    assert S.scene_for_seed(3, 0) != S.scene_for_seed(3, 1)
    assert np.array_equal(S.render(S.scene_for_seed(5)), S.render(S.scene_for_seed(5)))


def test_random_scenes_respect_the_rules():
    rng = np.random.default_rng(0)
    for _ in range(300):
        sc = S.random_scene(rng)
        assert sc.shape in S.SHAPES and sc.color in S.COLORS and sc.background in S.COLORS
        assert sc.color != sc.background
        assert S.MIN_SIZE <= sc.size <= S.MAX_SIZE
        for c in (sc.cx, sc.cy):
            assert S.MARGIN + sc.size <= c <= S.IMAGE_SIZE - S.MARGIN - sc.size


def test_caption_names_shape_colour_background_only():
    sc = S.Scene("circle", "red", "blue", 20.3, 40.1, 9.5)
    assert sc.caption == "a red circle on a blue background"
    assert sc.replace(cx=30.0, size=12.0).caption == sc.caption


def test_render_colours_and_box():
    sc = S.Scene("square", "yellow", "black", 32.0, 32.0, 10.0)
    img = S.render(sc)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert tuple(img[0, 0]) == S.COLORS["black"] and tuple(img[32, 32]) == S.COLORS["yellow"]
    inside = np.all(img == S.COLORS["yellow"], axis=-1)
    rows, cols = np.nonzero(inside)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (22, 41, 22, 41)  # [22, 42) on both axes


def test_shapes_fill_their_box_as_documented():
    """Coverage of the unit box: square 1, circle pi/4, triangle 1/2, star well below (concave)."""
    areas = {name: S.coverage(S.Scene(name, "red", "blue", 32.0, 32.0, 16.0), supersample=8).sum() / 32.0 ** 2
             for name in S.SHAPES}
    assert areas["square"] == pytest.approx(1.0, abs=0.01)
    assert areas["circle"] == pytest.approx(np.pi / 4, abs=0.01)
    assert areas["triangle"] == pytest.approx(0.5, abs=0.01)
    assert 0.3 < areas["star"] < 0.45


# --- analyser ------------------------------------------------------------------------------------------------

def test_analyser_recovers_every_attribute_of_clean_renders():
    n, wrong = 240, {}
    pos_err, size_err = [], []
    for seed in range(n):
        sc = S.scene_for_seed(seed, namespace=99)
        a = S.analyze(S.render(sc))
        for k, ok in a.matches(sc, position_tol=1.0, size_tol=0.15).items():
            wrong[k] = wrong.get(k, 0) + (not ok)
        pos_err.append(max(abs(a.cx - sc.cx), abs(a.cy - sc.cy)))
        size_err.append(abs(a.size - sc.size))
    assert wrong["shape"] == wrong["color"] == wrong["background"] == wrong["single"] == 0, wrong
    assert wrong["position"] == 0 and max(pos_err) <= 1.0
    assert wrong["size"] <= n // 50 and max(size_err) <= 1.5, (wrong, max(size_err))


def test_analyser_is_robust_to_noise_and_blur():
    """Decoded images are noisy and soft-edged: Gaussian noise plus a 3x3 box blur must not change the labels."""
    rng = np.random.default_rng(1)
    for seed in range(60):
        sc = S.scene_for_seed(seed, namespace=98)
        img = S.render(sc).astype(float)
        img = sum(np.roll(img, (dy, dx), (0, 1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        m = S.analyze(img).matches(sc, position_tol=1.5, size_tol=0.2)
        assert m["shape"] and m["color"] and m["background"] and m["position"], (sc, S.analyze(img))


def test_analyser_ignores_an_off_colour_edge_line():
    """Decoded samples sometimes carry a 2-px off-colour line along the edge (cyan on blue, measured on the shipped
    model); a border median read it as the background and the whole blue field as the shape."""
    for seed in range(20):
        sc = S.scene_for_seed(seed, namespace=97)
        img = S.render(sc)
        for edge in (np.s_[:2], np.s_[-2:]):
            img[edge] = (0, 140, 160)
            img[:, edge] = (0, 140, 160)
        assert all(S.analyze(img).matches(sc, position_tol=1.0, size_tol=0.15).values()), (sc, S.analyze(img))


def test_analyser_reports_missing_and_extra_shapes():
    blank = np.zeros((64, 64, 3), np.uint8) + np.array(S.COLORS["green"], np.uint8)
    a = S.analyze(blank)
    assert a.shape is None and a.background == "green" and not any(a.matches(S.scene_for_seed(0)).values())
    two = S.render(S.Scene("circle", "red", "green", 16.0, 16.0, 8.0))
    two[36:56, 36:56] = S.COLORS["red"]
    assert S.analyze(two).components == 2


def test_classify_thresholds_separate_the_shapes():
    assert S.classify(1.0, 1.0) == "square"
    assert S.classify(np.pi / 4, 0.97) == "circle"
    assert S.classify(0.5, 0.95) == "triangle"
    assert S.classify(0.4, 0.6) == "star"


# --- the shipped model -----------------------------------------------------------------------------------------

needs_model = pytest.mark.skipif(not CKPT.is_file(), reason="weights/shapes/shapes.safetensors not present")


@pytest.fixture(scope="module")
def editor():
    from imagic.editor import Editor
    from imagic.loader import load_checkpoint

    return Editor(load_checkpoint(CKPT), device="cpu", progress=False)


@needs_model
def test_shipped_model_is_small_fp16_and_loads_through_load_checkpoint(editor):
    from imagic.fileio import load_safetensors

    assert CKPT.stat().st_size < 20e6 and CKPT.with_suffix(".yaml").is_file()
    tensors = load_safetensors(CKPT)[0]
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {__import__("torch").float16}
    cfg = editor.config
    assert (cfg.image_size, cfg.latent_size, cfg.vae.downsample_factor) == (64, 16, 4)
    assert cfg.text.vocab_size == 49408 and editor.model.tokenizer.pad_token == 49407
    assert editor.model.tokenizer("a red circle on a blue background").shape == (1, 77)


@needs_model
def test_txt2img_draws_the_asked_colours_and_shapes_above_chance(editor):
    """The shipped model follows its captions: colour, background and shape (issue 30 asks 90% of shapes).
    48 samples and a bar of 43 (90%): a model drawing 80% of its shapes right passes with probability 0.02
    (binomial tail). The shipped 16000-step model passes here; on the 96 samples of
    weights/shapes/README.md (seeds 3-8, 25 steps) it drew 95/96 shapes (the 4000-step model: 23/48 here)."""
    prompts = [("circle", "red", "blue"), ("square", "yellow", "black"), ("triangle", "white", "green"),
               ("star", "blue", "yellow")]
    shapes = colours = n = 0
    for shape, color, bg in prompts:
        for img in editor.txt2img(S.caption(shape, color, bg), seeds=list(range(12)), guidance_scale=4.0, steps=20):
            a = S.analyze(img)
            shapes += a.shape == shape
            colours += (a.color, a.background) == (color, bg)
            n += 1
    assert colours >= n - 1, f"{colours}/{n} txt2img samples show the prompt's colour and background"
    assert shapes >= 43, f"{shapes}/{n} txt2img samples show the prompt's shape (chance: {n // 4})"


def _shapes_eval():
    """benchmarks/shapes_eval.py as a module (registered before it runs: its dataclasses look themselves up)."""
    if "shapes_eval" not in sys.modules:
        spec = importlib.util.spec_from_file_location("shapes_eval", ROOT / "benchmarks" / "shapes_eval.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["shapes_eval"] = module
        spec.loader.exec_module(module)
    return sys.modules["shapes_eval"]


def test_importing_the_eval_leaves_sys_path_alone():
    """Run in a fresh interpreter: importing benchmarks/shapes_eval.py must not put benchmarks/ on sys.path, where
    the kernel benchmark (then benchmarks/kernels.py) shadowed the `kernels` package that transformers imports and
    broke every later diffusers import in the same process (seen when the shapes tests ran before the diffusers
    ones). No module there may be named `kernels`."""
    import subprocess
    path = str(ROOT / "benchmarks" / "shapes_eval.py")
    code = ("import importlib.util, sys; before = list(sys.path); "
            f"spec = importlib.util.spec_from_file_location('shapes_eval', {path!r}); "
            "m = importlib.util.module_from_spec(spec); sys.modules['shapes_eval'] = m; spec.loader.exec_module(m); "
            "assert sys.path == before, set(sys.path) - set(before); "
            "k = importlib.util.find_spec('kernels'); assert k is None or 'benchmarks' not in str(k.origin), k.origin")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests")
    assert result.returncode == 0, result.stderr


def _demo_recipe() -> str:
    """The recipe `make demo` runs (its --recipe flag in the Makefile)."""
    return (ROOT / "Makefile").read_text().split("--recipe ", 1)[1].split()[0]


@needs_model
def test_demo_edit_is_made_at_the_demo_alpha_and_alpha_0_gives_back_the_input(editor):
    """Issues 3 and 30, on the shipped model, with `make demo`'s input, prompt and recipe: after stages 1 and 2,
    e_opt (alpha = 0) with the fine-tuned model gives back the input, and the headline alpha makes the shape edit:
    the red circle becomes a red square in the same place, at the same size, on the same blue. Both seeds."""
    from PIL import Image

    from imagic.recipes import recipe

    r, alpha = recipe(_demo_recipe()), _shapes_eval().Settings().alpha
    image = Image.open(DEMO_INPUT).convert("RGB")
    source = S.analyze(image)
    run = editor.fit(image, DEMO_PROMPT, **r.fit)
    sampling = {k: v for k, v in r.sample.items() if k != "alpha"}
    result = editor.sample(run, alpha=[0.0, alpha], seeds=[0, 1], save=False, **sampling)
    pixels = np.asarray(image, float)
    for seed in (0, 1):
        err = {a: float(((np.asarray(result.images[(seed, a)], float) - pixels) ** 2).mean()) for a in (0.0, alpha)}
        assert err[0.0] < err[alpha], (seed, err)
        kept, edited = (S.analyze(result.images[(seed, a)]) for a in (0.0, alpha))
        assert (kept.shape, kept.color, kept.background) == ("circle", "red", "blue"), (seed, kept)
        assert (edited.shape, edited.color, edited.background) == ("square", "red", "blue"), (seed, edited)
        for a in (kept, edited):  # the eval's identity tolerances (benchmarks/shapes_eval.py)
            assert max(abs(a.cx - source.cx), abs(a.cy - source.cy)) <= 3.0, (seed, a, source)
            assert abs(a.size - source.size) <= 0.25 * source.size, (seed, a, source)


def test_make_demo_runs_the_tested_recipe_edit_and_alphas():
    """`make demo` is what the test above measures: this prompt, this input, two seeds, a recipe whose alpha sweep
    holds 0 and the eval's headline alpha, and no flag that overrides the recipe's stage settings."""
    from imagic.recipes import recipe

    makefile = (ROOT / "Makefile").read_text()
    assert f'--prompt "{DEMO_PROMPT}"' in makefile and f"--image {DEMO_INPUT.relative_to(ROOT)}" in makefile
    assert "--seeds 0 1" in makefile
    sweep = recipe(_demo_recipe()).sample["alpha"]
    assert 0.0 in sweep and _shapes_eval().Settings().alpha in sweep
    settings = next(line for line in makefile.splitlines() if line.startswith("DEMO_SETTINGS :="))
    for flag in ("--embed-steps", "--embed-lr", "--finetune", "--alpha", "--steps", "--guidance-scale", "--ddim-eta"):
        assert f"{flag} " not in settings, flag


@needs_model
def test_held_out_edits_are_well_formed():
    E = _shapes_eval()
    edits = E.make_edits(120)  # the eval's default
    assert [e.kind for e in edits[:3]] == list(E.KINDS) and len({e.source for e in edits}) == 120
    for e in edits:
        changed = [k for k in E.KINDS if getattr(e.source, k) != getattr(e.target, k)]
        assert changed == [e.kind] and e.target.color != e.target.background
        assert (e.source.cx, e.source.cy, e.source.size) == (e.target.cx, e.target.cy, e.target.size)
        assert E.score(S.render_pil(e.target), e) == (True, True)  # the ideal edit passes the judge
        assert E.score(S.render_pil(e.source), e) == (False, True)  # doing nothing keeps identity, edits nothing


@needs_model
def test_imagic_beats_txt2img_and_sdedit_on_edit_and_identity(editor):
    """The small version of benchmarks/shapes_eval.py: the first edits of the held-out set (each kind twice).
    Imagic at the eval's headline alpha must beat txt2img and the best SDEdit strength on "both"."""
    E = _shapes_eval()
    settings = E.Settings()
    settings = E.Settings(**{**settings.__dict__, "alphas": (settings.alpha,)})
    results = E.evaluate(editor, E.make_edits(6), settings)[0][settings.ddim_eta]
    summary = E.summarize(results)
    imagic = summary[f"imagic alpha={settings.alpha:g}"]["both"]
    sdedit_name, sdedit = E.best(summary, "sdedit")
    table = {m: round(r["both"], 2) for m, r in summary.items()}
    assert imagic > summary["txt2img"]["both"], table
    assert imagic > sdedit, table
