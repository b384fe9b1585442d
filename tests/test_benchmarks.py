"""Benchmark scripts run end to end in their smoke modes (tiny models; no timing is asserted)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_imagic_edit_smoke(tmp_path: Path) -> None:
    """benchmarks/imagic_edit.py's smoke mode: ours (torch path) runs a LoRA and a full edit through the Editor and
    the table is written with the machine and the command; without the community file that row is skipped with a
    one-line message (the file is diffusers' code, never in the repository, so CI has none)."""
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    for name in ("imagic_edit.py", "common.py", "unet_step.py"):  # a copy, so the table goes to the copy's results/
        shutil.copy(ROOT / "benchmarks" / name, bench / name)
    absent = tmp_path / "imagic_stable_diffusion.py"
    cmd = [sys.executable, str(bench / "imagic_edit.py"), "--device", "cpu", "--small", "--resolution", "64",
           "--embed-steps", "2", "--finetune-steps", "2", "--steps", "2",  # the smoke mode, as in the README
           "--cache", str(tmp_path / "cache"), "--community-file", str(absent)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert f"community pipeline skipped: {absent} not found" in out.stdout
    table = (bench / "results" / "imagic_edit_cpu_small.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ours")]
    assert [r.split(" | ")[1] for r in rows] == ["LoRA rank 4, 2 steps", "full, 2 steps"], table
    assert all(r.startswith("| ours torch |") for r in rows)
    assert "- command: `" in table and "--small" in table
    assert "Community pipeline not run" in table and "Partial table" not in table
