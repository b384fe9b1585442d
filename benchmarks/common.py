"""Shared benchmark utilities: what machine this ran on, timing, and writing result tables.

Every table under benchmarks/results/ starts with the machine (CPU model / GPU name and driver), library versions,
the date and the exact command, so a number can always be traced back to how it was produced.
"""
from __future__ import annotations

import datetime as _dt
import importlib
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from imagic.fileio import write_text

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception:  # a broken optional install must not stop a benchmark from reporting
        return "not installed"


def _gpu() -> Dict[str, str]:
    import torch

    if not torch.cuda.is_available():
        return {}
    info = {"gpu": torch.cuda.get_device_name(0), "cuda": str(torch.version.cuda)}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "?"
    except (OSError, subprocess.SubprocessError):
        info["driver"] = "?"
    return info


def machine_info() -> Dict[str, str]:
    """CPU model and core count, GPU name/driver when present, versions, date and the command line."""
    import torch

    info = {"cpu": f"{_cpu_model()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"}
    info.update(_gpu())
    info.update({"python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
                 "diffusers": _version("diffusers"), "imagic": _version("imagic"),
                 "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])})
    return info


def time_call(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1, sync: Optional[Callable[[], None]] = None
              ) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` runs after `warmup` runs (`sync` e.g. cuda.synchronize)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_table(name: str, title: str, header: Sequence[str], rows: Sequence[Sequence[Any]],
                notes: Sequence[str] = ()) -> Path:
    """Print the table and write it, with the machine description, to benchmarks/results/<name>.md."""
    info = machine_info()
    parts: List[str] = [f"# {title}", ""]
    parts += [f"- {k}: `{v}`" if k == "command" else f"- {k}: {v}" for k, v in info.items()]
    parts += ["", markdown_table(header, rows), ""]
    parts += [f"{n}" for n in notes]
    text = "\n".join(parts).rstrip() + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    write_text(path, text)
    return path
