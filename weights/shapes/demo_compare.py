"""The demo's comparison: Imagic's alpha sweep from a finished run beside SDEdit (img2img) at the strengths where it
starts changing a shape, same seeds, same model, same sampler. `make demo` runs it after `imagic edit`:

    python weights/shapes/demo_compare.py --run demo_out          # writes demo_out/compare.png

What to look for: SDEdit only changes a shape once its noise has wiped out the fine detail, so the stripes (their
colour and angle) come back redrawn at random, or not at all; Imagic's fine-tuned model has learnt this scene, so
the same stripes and the same shading come back on the new shape (Kawar et al. 2023, Sec. 3 and Fig. 5).
It prints what `imagic.shapes.analyze` reads in every cell: shape, stripes, shading.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from PIL import Image

from imagic import Editor, recipe
from imagic import shapes as S
from imagic.fileio import read_json
from imagic.images import make_grid, save_png

# Strengths of the eval's SDEdit sweep (benchmarks/shapes_eval.py) that change the shape at all on the shipped
# model; below 0.3 the input's shape survives (weights/shapes/README.md).
STRENGTHS = (0.3, 0.5, 0.7)
CELL = 96  # pixels per cell in the figure (the images are 64x64; nearest-neighbour, so pixels stay pixels)


def describe(image: Image.Image) -> str:
    """What the analyser reads: "square, yellow stripes at 45, shaded towards 0"."""
    a = S.analyze(image)
    stripes = f"{a.stripe_color} stripes at {a.stripe_angle}" if a.stripe_color else "no stripes"
    shading = f"shaded towards {a.ramp}" if a.ramp is not None else "flat"
    return f"{a.shape or 'no shape'}, {stripes}, {shading}"


def compare(editor: Editor, run_dir: Path, alphas: Sequence[float], strengths: Sequence[float],
            seeds: Sequence[int], sampling: Dict) -> Tuple[Image.Image, List[str]]:
    """The figure (rows: seeds; columns: the input, Imagic at each alpha, SDEdit at each strength) and one line
    per cell saying what the analyser reads in it."""
    run = editor.load_run(run_dir)
    result = editor.sample(run, alpha=list(alphas), seeds=list(seeds), save=False, **sampling)
    heads = ["input"] + [f"Imagic alpha {a:g}" for a in alphas] + [f"SDEdit strength {s:g}" for s in strengths]
    rows, lines = [], []
    for seed in seeds:
        cells = [run.input_image] + [result.images[(seed, a)] for a in alphas]
        cells += [editor.img2img(run.input_image, run.target_text, strength=s, seeds=[seed], **sampling)[0]
                  for s in strengths]
        lines += [f"seed {seed}, {head}: {describe(cell)}" for head, cell in zip(heads, cells)]
        rows.append([c.resize((CELL, CELL), Image.NEAREST) for c in cells])
    grid = make_grid(rows, row_labels=[f"seed {s}" for s in seeds], col_labels=[h.replace(" ", "\n", 1) for h in heads])
    return grid, lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="a finished `imagic edit --recipe shapes` run directory")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 1.0, 1.4])
    p.add_argument("--strengths", type=float, nargs="+", default=list(STRENGTHS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", type=Path, help="default: <run>/compare.png")
    args = p.parse_args()
    editor = Editor.from_checkpoint(read_json(args.run / "args.json")["checkpoint"], device="cpu", progress=False)
    sampling = {k: v for k, v in recipe("shapes").sample.items() if k != "alpha"}
    grid, lines = compare(editor, args.run, args.alphas, args.strengths, args.seeds, sampling)
    out = args.out or args.run / "compare.png"
    save_png(grid, out)
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
