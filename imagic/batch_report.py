"""What `imagic batch` leaves behind for a person to read, rebuilt from the run directories on disk (so edits
finished by earlier invocations are included): `summary.csv` (one row per edit), `metrics.csv` (one row per sample)
and `contact_sheet.png` (one row per edit: the input, then its samples)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

from PIL import Image, ImageOps

from .fileio import PathLike, read_json, write_csv
from .images import ImageError, make_grid, open_image, save_png
from .manifest import BatchSettings, Edit

METRICS = ("psnr", "ssim", "clip_score", "lpips")


def edit_state(directory: Path) -> Tuple[str, Dict[str, Any], str]:
    if (directory / "DONE").is_file():
        return "done", read_json(directory / "DONE"), ""
    if (directory / "FAILED").is_file():
        return "failed", {}, (directory / "FAILED").read_text(encoding="utf-8").splitlines()[0]
    return "pending", {}, ""


def write_summary(edits: Sequence[Edit], out: PathLike, s: BatchSettings) -> Dict[str, Path]:
    """summary.csv (one row per edit), metrics.csv (one row per sample) and contact_sheet.png, from the run
    directories on disk (so edits finished by earlier invocations are included)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    states = [(edit, *edit_state(out / edit.name)) for edit in edits]
    names = [m for m in METRICS if any(m in r for _, _, rec, _ in states for r in rec.get("metrics", []))]
    summary, samples = [], []
    for edit, status, record, error in states:
        rows = record.get("metrics", [])
        alphas = sorted({r["alpha"] for r in rows})
        per_alpha = [" ".join(f"{a:g}:{mean_over_seeds(rows, a, m):.4g}" for a in alphas) for m in names]
        seed = edit.overrides.get("seed", s.fit.seed)
        summary.append([edit.index, str(edit.image), edit.target_text, seed, status, str(out / edit.name),
                        record.get("grid", ""), error, *per_alpha])
        samples += [[edit.index, str(edit.image), edit.target_text, r["seed"], r["alpha"],
                     *[r.get(m, "") for m in names]] for r in rows]
    paths = {"summary": out / "summary.csv", "metrics": out / "metrics.csv", "contact_sheet": out / "contact_sheet.png"}
    write_csv(paths["summary"], ["index", "image", "target_text", "seed", "status", "run_dir", "grid", "error",
                                 *[f"{m} (alpha:mean over seeds)" for m in names]], summary)
    write_csv(paths["metrics"], ["index", "image", "target_text", "seed", "alpha", *names], samples)
    save_png(contact_sheet(states, out, s.thumb_size), paths["contact_sheet"])
    return paths


def _thumb(path: Path, size: int) -> Image.Image:
    try:
        img = open_image(path)
    except ImageError:
        return Image.new("RGB", (size, size), (200, 200, 200))
    img = ImageOps.contain(img, (size, size), Image.Resampling.LANCZOS)  # shrink or enlarge to the cell
    canvas = Image.new("RGB", (size, size), "white")
    canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    return canvas


def contact_sheet(states: Sequence[Tuple[Edit, str, Dict[str, Any], str]], out: Path, size: int) -> Image.Image:
    """One row per edit: the input (as encoded when there is a run, else the file), then every sample in
    (seed, alpha) order; grey where an image is missing."""
    rows, labels, keys = [], [], []
    for edit, status, record, _ in states:
        source = out / edit.name / "input.png"
        row = [_thumb(source if source.is_file() else edit.image, size)]
        ordered = sorted(record.get("samples", {}).items(), key=lambda kv: tuple(map(float, kv[0].split(":"))))
        row += [_thumb(Path(p), size) for _, p in ordered]
        keys.append([k for k, _ in ordered])
        rows.append(row)
        labels.append(f"{edit.index} {status}: {edit.target_text[:36]}")
    width = max(len(r) for r in rows)
    blank = Image.new("RGB", (size, size), "white")
    rows = [r + [blank] * (width - len(r)) for r in rows]
    same = [k for k in keys if k]
    columns = None
    if same and all(k == same[0] for k in same) and len(same[0]) == width - 1:
        columns = ["input"] + [f"seed {k.split(':')[0]} a={k.split(':')[1]}" for k in same[0]]
    return make_grid(rows, row_labels=labels, col_labels=columns)


def mean_over_seeds(rows: Sequence[Dict[str, Any]], alpha: float, key: str) -> float:
    values = [r[key] for r in rows if r["alpha"] == alpha and key in r]
    return sum(values) / len(values) if values else float("nan")
