"""What `imagic batch` is asked to do: the manifest (JSON Lines, CSV, or a JSON list such as TEdBench's
`input_list.json`) read and validated into `Edit`s, the settings every edit starts from, and the static split of
the edits over processes. Formats and fields: `batch.py`'s docstring."""
from __future__ import annotations

import csv
import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

from .fileio import PathLike
from .metrics import EditMetrics
from .settings import FitSettings, SampleSettings


class ManifestError(ValueError):
    """A manifest that cannot be read; the message names the file and the entry."""


@dataclass
class Edit:
    """One manifest entry: what to edit, and the settings that differ from the command line's."""

    index: int
    image: Path
    target_text: str
    overrides: Dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """A stable run directory name: the index (the manifest order) plus slugs a person can read."""
        return f"{self.index:03d}-{_slug(self.image.stem, 24)}-{_slug(self.target_text, 40)}"


def _slug(text: str, length: int) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length].strip("-") or "x"


def _setting_types() -> Dict[str, Any]:
    """Every per-edit setting and its type, from the dataclasses that define them."""
    return {**typing.get_type_hints(FitSettings), **typing.get_type_hints(SampleSettings)}


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """A manifest value (typed in JSON, a string in CSV) as the setting's type."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        return None if value in (None, "") else _coerce(key, value, args[0])
    if typing.get_origin(hint) is tuple:  # Tuple[X, ...]: a list in JSON, space- or comma-separated in CSV
        items = value if isinstance(value, list) else [value] if isinstance(value, (int, float)) else \
            str(value).replace(",", " ").split()
        return [_coerce(key, v, args[0]) for v in items]
    if hint is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{value!r} is not an integer")
    return hint(value)


def _entries(path: Path) -> List[Dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ManifestError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not a UTF-8 text file") from None
    try:
        if path.suffix.lower() == ".csv":
            return [dict(row) for row in csv.DictReader(text.splitlines())]
        if path.suffix.lower() == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if path.suffix.lower() == ".json":
            doc = json.loads(text)
            return doc if isinstance(doc, list) else [doc]
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: invalid JSON ({e})") from None
    raise ManifestError(f"{path}: unknown manifest type (use .jsonl, .csv or a .json list)")


def read_manifest(path: PathLike) -> List[Edit]:
    """The edits of a manifest, validated up front so a typo fails before hours of work, not in the middle."""
    path = Path(path)
    types = _setting_types()
    edits = []
    for i, entry in enumerate(_entries(path)):
        where = f"{path}: entry {i + 1}"
        if not isinstance(entry, dict):
            raise ManifestError(f"{where}: not an object")
        entry = {k: v for k, v in entry.items() if v not in (None, "")}
        if "img_name" in entry:  # TEdBench: input_list.json beside originals/
            image = path.parent / "originals" / str(entry.pop("img_name"))
        elif "image" in entry:
            image = path.parent / str(entry.pop("image"))
        else:
            raise ManifestError(f"{where}: no image (an `image` path, or TEdBench's `img_name`)")
        text = str(entry.pop("target_text", "")).strip()
        if not text:
            raise ManifestError(f"{where}: no target_text")
        unknown = sorted(set(entry) - set(types))
        if unknown:
            raise ManifestError(f"{where}: unknown setting(s) {', '.join(unknown)}; per-edit settings are "
                                f"{', '.join(sorted(types))}")
        try:
            overrides = {k: _coerce(k, v, types[k]) for k, v in entry.items()}
            split(overrides)  # checked by the settings dataclasses now, not hours into the batch
        except (TypeError, ValueError) as e:
            raise ManifestError(f"{where}: bad value ({e})") from None
        edits.append(Edit(index=i, image=image, target_text=text, overrides=overrides))
    if not edits:
        raise ManifestError(f"{path}: no edits")
    return edits


def split(overrides: Dict[str, Any], fit: FitSettings = FitSettings(),
          sample: SampleSettings = SampleSettings()) -> Tuple[FitSettings, SampleSettings]:
    """`fit` and `sample` with an edit's overrides, each to the dataclass that has that field."""
    fit_names = {f.name for f in dataclasses.fields(FitSettings)}
    return (dataclasses.replace(fit, **{k: v for k, v in overrides.items() if k in fit_names}),
            dataclasses.replace(sample, **{k: v for k, v in overrides.items() if k not in fit_names}))


def shard(n: int, rank: int, world_size: int) -> List[int]:
    """The edits one process runs: static and deterministic, so a restart hands out the same work."""
    return list(range(rank, n, world_size))


@dataclass
class BatchSettings:
    """The command line's settings for every edit, the metrics to compute, the contact sheet size, and whether
    to run when the plan says an edit will not fit the GPU (`--force`)."""

    fit: FitSettings
    sample: SampleSettings
    metrics: EditMetrics = field(default_factory=EditMetrics)
    thumb_size: int = 128
    force: bool = False
