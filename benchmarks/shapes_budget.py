"""Quality against compute: Imagic's "both" (edit made and identity kept) against the step budget on the shapes world.

The grid is stage-1 (embedding) steps x stage-2 (fine-tuning) steps, for full fine-tuning and for LoRA, on the
tuning edits (namespace 2) of benchmarks/shapes_eval.py, judged as there (`shapes_eval.score`) at its headline alpha
and at the best alpha of a small sweep. One fit per (edit, mode, stage-1 budget) runs stage 2 to the largest budget
and keeps the weights at the smaller ones on the way: both stages are Adam at a constant learning rate on a seeded
noise stream (`imagic.training.run_loop`), so the weights after k of N steps are exactly those of a k-step fit
(tests/test_shapes_budget.py checks that on a tiny model).

    python benchmarks/shapes_budget.py --edits 4 --no-write        # quick look
    # on two cores: two shards, then the table and plot from their results
    python benchmarks/shapes_budget.py --shard 0/2 --save b0.json &
    python benchmarks/shapes_budget.py --shard 1/2 --save b1.json
    python benchmarks/shapes_budget.py --combine b0.json b1.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

import shapes_eval as E  # run as a script: benchmarks/ is sys.path[0]
from imagic import shapes as S
from imagic.fileio import write_text
from imagic.fitting import finetuned_state
from imagic.images import save_png

PLOT = E.ROOT / "benchmarks" / "results" / "shapes_budget.png"
Cell = Tuple[str, int, int]  # (mode, stage-1 steps, stage-2 steps)


def int_list(text: str) -> Tuple[int, ...]:
    return tuple(sorted(int(v) for v in text.split(",")))


def fit_prefixes(editor, edit: E.Edit, settings: E.Settings, mode: str, lr: float, embed_steps: int,
                 finetune_steps: Sequence[int]) -> Tuple[Dict[int, object], Dict[str, float]]:
    """One fit of `edit` to max(finetune_steps) stage-2 steps; a Run per stage-2 budget (the weights after that
    many steps) and the measured CPU seconds per step of each stage."""
    s = dataclasses.replace(settings, embed_steps=embed_steps, finetune=mode, finetune_lr=lr,
                            finetune_steps=max(finetune_steps))
    snaps, ticks = {}, {"stage 1": [], "stage 2": []}

    def grab(stage: str, step: int, _loss: float) -> None:
        ticks[stage[:7]].append(time.process_time())
        if stage.startswith("stage 2") and step in finetune_steps:
            snaps[step] = finetuned_state(editor.unet, mode)

    run = editor.fit(S.render_pil(edit.source), edit.prompt, callback=grab, **s.fit_kwargs(edit.index))
    per_step = {k: float(np.mean(np.diff(v))) for k, v in ticks.items() if len(v) > 1}
    return {k: dataclasses.replace(run, finetuned=snaps[k],
                                   settings=dataclasses.replace(run.settings, finetune_steps=k))
            for k in finetune_steps}, per_step


def run_grid(editor, edits: Sequence[E.Edit], settings: E.Settings, modes: Dict[str, float],
             embed_steps: Sequence[int], finetune_steps: Sequence[int], alphas: Sequence[float], log=print
             ) -> Tuple[Dict[str, List[Tuple[bool, bool, str]]], Dict[str, List[float]]]:
    """Per cell (key "mode/e/f") and alpha, a (success, identity, kind) triple per edit; per mode and stage, CPU
    seconds per step."""
    results: Dict[str, List[Tuple[bool, bool, str]]] = {}
    cost: Dict[str, List[float]] = {}
    for edit in edits:
        t0 = time.time()
        for mode, lr in modes.items():
            for e in embed_steps:
                runs, per_step = fit_prefixes(editor, edit, settings, mode, lr, e, finetune_steps)
                for stage, sec in per_step.items():
                    cost.setdefault(f"{mode}/{stage}", []).append(sec)
                for f, run in runs.items():
                    res = editor.sample(run, alpha=list(alphas), seeds=[edit.index], save=False,
                                        **settings.sampling_kwargs())
                    for a in alphas:
                        results.setdefault(f"{mode}/{e}/{f}/{a:g}", []).append(
                            (*E.score(res.images[(edit.index, a)], edit), edit.kind))
        log(f"edit {edit.index} ({edit.kind}) done in {time.time() - t0:.0f}s")
    return results, cost


def both(rows: Sequence[Tuple[bool, bool, str]], kind: str = "") -> float:
    picked = [s and i for s, i, k in rows if not kind or k == kind]
    return float(np.mean(picked)) if picked else float("nan")


def cells_of(results: Dict[str, List]) -> List[Cell]:
    keys = {tuple(k.split("/")[:3]) for k in results}
    return sorted(((m, int(e), int(f)) for m, e, f in keys), key=lambda c: (c[0], c[1], c[2]))


def fastest_within(scores: Dict[Cell, float], seconds: Dict[Cell, float], points: float = 0.05) -> Cell:
    """The cheapest cell whose "both" is within `points` of the best cell's (the rule for a fast recipe, issue 30)."""
    top = max(scores.values())
    return min((c for c in scores if scores[c] >= top - points - 1e-9), key=lambda c: (seconds[c], -scores[c]))


def plot(scores: Dict[Cell, float], seconds: Dict[Cell, float], title: str, width: int = 640,
         height: int = 400) -> Image.Image:
    """ "both" (y) against the estimated fit CPU seconds per edit (x); a line per (mode, stage-1 steps) joining
    its stage-2 budgets. Drawn with PIL, like the run directory's loss plot (no plotting dependency)."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, 170, 30, 40
    w, h = width - left - right, height - top - bottom
    x_hi = max(seconds.values()) * 1.05
    at = lambda x, y: (left + w * x / x_hi, top + h * (1 - y))  # noqa: E731
    draw.rectangle([left, top, left + w, top + h], outline="gray")
    draw.text((left, 8), title, fill="black")
    draw.text((left + w // 2 - 80, height - 18), "fit CPU seconds per edit (1 thread)", fill="black")
    for y in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.text((8, at(0, y)[1] - 6), f"{100 * y:.0f}%", fill="black")
        draw.line([at(0, y), at(x_hi, y)], fill=(230, 230, 230))
    for x in np.linspace(0, x_hi, 5)[1:]:
        draw.text((at(x, 0)[0] - 10, top + h + 4), f"{x:.0f}", fill="black")
    series = sorted({(m, e) for m, e, _ in scores})
    for n, (m, e) in enumerate(series):
        same_mode = [s for s in series if s[0] == m]
        shade = 110 + 145 * same_mode.index((m, e)) // max(1, len(same_mode) - 1)  # darker: fewer stage-1 steps
        colour = (shade, 40, 40) if m == "full" else (40, 40, shade)
        pts = [at(seconds[c], scores[c]) for c in sorted(c for c in scores if c[:2] == (m, e))]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for px, py in pts:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        y = top + 16 * n + 6
        draw.line([(width - right + 10, y), (width - right + 30, y)], fill=colour, width=2)
        draw.text((width - right + 36, top + 16 * n), f"{m}, stage 1: {e}", fill="black")
    return img


def report(results: Dict[str, List[Tuple[bool, bool, str]]], cost: Dict[str, List[float]], settings: E.Settings,
           lrs: Dict[str, float], n: int, cpu_s: float, write: bool) -> None:
    from common import markdown_table, write_table

    per_step = {k: float(np.median(v)) for k, v in cost.items()}
    cells = cells_of(results)
    seconds = {c: c[1] * per_step[f"{c[0]}/stage 1"] + c[2] * per_step[f"{c[0]}/stage 2"] for c in cells}
    at_alpha = {c: results[f"{c[0]}/{c[1]}/{c[2]}/{settings.alpha:g}"] for c in cells}
    scores = {c: both(rows) for c, rows in at_alpha.items()}
    pct = lambda v: "n/a" if np.isnan(v) else f"{100 * v:.0f}%"  # noqa: E731
    rows = []
    for c in cells:
        swept = [k for k in results if k.startswith(f"{c[0]}/{c[1]}/{c[2]}/")]  # shards may sweep more alphas
        best_a = float(max(swept, key=lambda k: both(results[k])).rsplit("/", 1)[1])
        rows.append([c[0], c[1], c[2], f"{seconds[c]:.1f}", f"**{pct(scores[c])}**",
                     *(pct(both(at_alpha[c], k)) for k in E.KINDS),
                     f"{pct(both(results[f'{c[0]}/{c[1]}/{c[2]}/{best_a:g}']))} (alpha {best_a:g})"])
    fast = fastest_within(scores, seconds)
    lr_text = ", ".join(f"{m} {lrs[m]:g}" for m in sorted({c[0] for c in cells}))
    swept = sorted({k.rsplit("/", 1)[1] for k in results}, key=float)
    header = ["fine-tune", "stage-1 steps", "stage-2 steps", "fit CPU s per edit", f"both at alpha {settings.alpha:g}",
              "shape", "colour", "background", "best alpha"]
    notes = [
        f"{n} tuning edits (namespace {E.TUNE_NAMESPACE} of benchmarks/shapes_eval.py), judged as there. Settings "
        f"otherwise {settings}; fine-tuning lr: {lr_text}. Alphas swept: {', '.join(swept)}.",
        "Fit CPU seconds per edit = steps x the median measured CPU seconds per step of that stage and mode "
        "(" + ", ".join(f"{k} {v:.3f}" for k, v in sorted(per_step.items())) + "), 1 thread; sampling is not counted.",
        f"Cheapest cell within 5 points of the best ({pct(max(scores.values()))}): {fast[0]}, stage 1 {fast[1]}, "
        f"stage 2 {fast[2]} ({pct(scores[fast])}, {seconds[fast]:.1f} s).",
        f"CPU time of the whole grid {cpu_s / 60:.1f} min.",
    ]
    if not write:
        print(markdown_table(header, rows))
        print("\n".join(notes))
        return
    write_table("shapes_budget", "Imagic on the shipped shapes model: quality against the step budget", header,
                rows, notes)
    save_png(plot(scores, seconds, f'"both" at alpha {settings.alpha:g} on {n} tuning edits'), PLOT)
    print(f"wrote {PLOT}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--edits", type=int, default=30, help="tuning edits (a third of each kind)")
    p.add_argument("--embed-steps", type=int_list, default=(25, 50, 100))
    p.add_argument("--finetune-steps", type=int_list, default=(75, 150, 300))
    p.add_argument("--full-lr", type=float, default=E.Settings().finetune_lr)
    p.add_argument("--lora-lr", type=float, default=3e-3,
                   help="(of 1e-2 and 3e-3 on 6 tuning edits at 300 and 600 steps, 3e-3 did better)")
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--alphas", type=lambda t: tuple(float(v) for v in t.split(",")), default=None,
                   help="default: the headline alpha and 0.2 either side")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="override shapes_eval Settings fields")
    p.add_argument("--shard", default="0/1")
    p.add_argument("--save", type=Path)
    p.add_argument("--combine", type=Path, nargs="+")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    settings = E.with_overrides(E.Settings(), args.set)
    alphas = args.alphas or tuple(round(settings.alpha + d, 2) for d in (-0.2, 0.0, 0.2))
    if settings.alpha not in alphas:
        raise SystemExit(f"--alphas must hold the headline alpha {settings.alpha:g} (or --set alpha=...)")
    lrs = {"full": args.full_lr, "lora": args.lora_lr}  # a combining run is given its shards' learning rates
    if args.combine:
        # Shards may split the edits, the modes, or both: cells and costs are merged by key.
        shards = [json.loads(f.read_text()) for f in args.combine]
        results, cost = {}, {}
        for sh in shards:
            for k, rows in sh["results"].items():
                results.setdefault(k, []).extend(tuple(r) for r in rows)
            for k, v in sh["cost"].items():
                cost.setdefault(k, []).extend(v)
        if len({len(rows) for rows in results.values()}) != 1:
            raise SystemExit("--combine: the shards do not cover the same edits for every cell")
        return report(results, cost, settings, lrs, len(next(iter(results.values()))),
                      sum(sh["cpu_s"] for sh in shards), not args.no_write)
    modes = {m: lrs[m] for m in args.modes.split(",")}
    i, n_shards = (int(v) for v in args.shard.split("/"))
    edits = E.make_edits(args.edits, E.TUNE_NAMESPACE)[i::n_shards]
    editor = E.load_editor(threads=1)
    c0 = time.process_time()
    results, cost = run_grid(editor, edits, settings, modes, args.embed_steps, args.finetune_steps, alphas)
    cpu_s = time.process_time() - c0
    if args.save:
        return write_text(args.save, json.dumps({"results": results, "cost": cost, "n": len(edits), "cpu_s": cpu_s}))
    return report(results, cost, settings, lrs, len(edits), cpu_s, not args.no_write)


if __name__ == "__main__":
    main()
