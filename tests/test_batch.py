"""`imagic batch` on a tiny model: manifests (JSONL, CSV, TEdBench's JSON), one process and two under torchrun
(gloo), done markers on restart, a bad image recorded as failed while the others finish, the summary, metrics and
contact sheet."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from imagic import batch as B
from imagic.manifest import ManifestError, read_manifest, shard
from tests.tiny import write_tiny_checkpoint

TEDBENCH = Path(__file__).resolve().parents[2] / "shared" / "tedbench"
FAST = ["--embed-steps", "3", "--finetune-steps", "3", "--finetune-lr", "1e-2", "--save-every", "2", "--steps", "2",
        "--alpha", "0.5", "1.0", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", "sd1")


def photo(path: Path, color) -> Path:
    img = Image.new("RGB", (48, 40), color)
    ImageDraw.Draw(img).ellipse([10, 8, 30, 28], fill=(250, 250, 250))
    img.save(path)
    return path


def manifest(folder: Path, entries) -> Path:
    path = folder / "edits.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def read_csv(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def done_record(out: Path, name: str) -> dict:
    return json.loads((out / name / "DONE").read_text())


# --- manifests --------------------------------------------------------------------------------------------------

def test_manifest_formats_and_overrides(tmp_path):
    (tmp_path / "a.png").touch()
    rows = "image,target_text,seed,alpha,embed_steps,lora_alpha\na.png,a red ball,3,0.5 1,7,\na.png,a cat,,,,2.5\n"
    (tmp_path / "edits.csv").write_text(rows)
    edits = read_manifest(tmp_path / "edits.csv")
    assert [e.image for e in edits] == [tmp_path / "a.png"] * 2
    assert edits[0].overrides == {"seed": 3, "alpha": [0.5, 1.0], "embed_steps": 7}
    assert edits[1].overrides == {"lora_alpha": 2.5}
    assert edits[0].name == "000-a-a-red-ball" and edits[1].name.startswith("001-")
    jl = manifest(tmp_path, [{"image": "a.png", "target_text": "x", "seeds": [1, 2], "finetune": "full"}])
    assert read_manifest(jl)[0].overrides == {"seeds": [1, 2], "finetune": "full"}
    # Errors name the entry and fail before any work.
    for entry, message in (({"image": "a.png", "target_text": "x", "embed_step": 3}, "unknown setting.*embed_step"),
                           ({"image": "a.png"}, "no target_text"), ({"target_text": "x"}, "no image"),
                           ({"image": "a.png", "target_text": "x", "steps": "many"}, "bad value")):
        with pytest.raises(ManifestError, match=message):
            read_manifest(manifest(tmp_path, [{"image": "b.png", "target_text": "y"}, entry]))
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ManifestError, match="unknown manifest type"):
        read_manifest(tmp_path / "x.txt")


@pytest.mark.skipif(not TEDBENCH.is_dir(), reason="../shared/tedbench is not present")
def test_tedbench_input_list_is_a_manifest():
    edits = read_manifest(TEDBENCH / "input_list.json")
    assert len(edits) == 100 and all(e.image.is_file() for e in edits)
    assert edits[0].image == TEDBENCH / "originals" / "dog2_standing.png"
    assert edits[0].target_text == "A photo of a sitting dog."
    assert len({e.name for e in edits}) == 100


def test_static_sharding_covers_everything_once():
    for n in (1, 5, 100):
        for world in (1, 2, 3, 8):
            parts = [shard(n, r, world) for r in range(world)]
            assert sorted(i for p in parts for i in p) == list(range(n))
            assert all(i % world == r for r, p in enumerate(parts) for i in p)


# --- one process ------------------------------------------------------------------------------------------------

def test_single_process_failures_restart_and_summary(ckpt, tmp_path, capsys):
    from tests.test_metrics import TINY_CLIP, random_lpips_file, tiny_clip

    images = tmp_path / "images"
    images.mkdir()
    photo(images / "red.png", (200, 30, 30))
    (images / "broken.png").write_text("not an image")
    first = {"image": "images/red.png", "target_text": "a red circle", "seed": 1}
    if TEDBENCH.is_dir():  # a real photo (EXIF, large) through the image path
        first = {"image": str(TEDBENCH / "originals" / "dog2_standing.png"), "target_text": "a sitting dog"}
    entries = [first, {"image": "images/broken.png", "target_text": "a broken image"},
               {"image": "images/red.png", "target_text": "a blue circle", "alpha": [1.0], "seeds": [0, 1]}]
    path = manifest(tmp_path, entries)
    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    torch.save(tiny_clip().state_dict(), clip_dir / "open_clip_pytorch_model.bin")
    metrics = ["--clip-weights", str(clip_dir), "--lpips-weights", str(random_lpips_file(tmp_path / "lpips.st"))]
    out = tmp_path / "out"
    argv = [str(path), "--ckpt", str(ckpt), "--out", str(out), *FAST, *metrics]

    assert B.main(argv) == 1  # one edit failed
    edits = read_manifest(path)
    summary = read_csv(out / "summary.csv")
    assert [r["status"] for r in summary] == ["done", "failed", "done"]
    assert "broken.png" in summary[1]["error"] and "not an image" in summary[1]["error"]
    assert "not an image" in (out / edits[1].name / "FAILED").read_text()
    assert summary[0]["grid"] == str(out / edits[0].name / "grid.png") and Path(summary[0]["grid"]).is_file()
    assert summary[0]["clip_score (alpha:mean over seeds)"].startswith("0.5:")
    samples = read_csv(out / "metrics.csv")
    assert [(r["index"], r["seed"], r["alpha"]) for r in samples] == [
        ("0", "0", "0.5"), ("0", "0", "1.0"), ("2", "0", "1.0"), ("2", "1", "1.0")]
    assert all(float(r["psnr"]) > 0 and -1 <= float(r["ssim"]) <= 1 and float(r["lpips"]) >= 0
               and 0 <= float(r["clip_score"]) <= 100 for r in samples)
    assert (out / edits[0].name / "tradeoff.png").is_file()
    assert json.loads((out / edits[2].name / "args.json").read_text())["settings"]["embed_steps"] == 3
    with Image.open(out / "contact_sheet.png") as sheet:  # 3 rows of 128 px cells (+ labels)
        assert 3 * 128 <= sheet.height < 4 * 128
    stamps = {i: (out / edits[i].name / "DONE").stat().st_mtime_ns for i in (0, 2)}
    capsys.readouterr()

    # Restart through the `imagic` command itself: finished edits are skipped, the failed one is tried again.
    from imagic.cli import main as imagic

    assert imagic(["batch", *argv]) == 1
    printed = capsys.readouterr().out
    assert printed.count("skip") == 2 and f"start {edits[1].name}" in printed
    assert all((out / edits[i].name / "DONE").stat().st_mtime_ns == stamps[i] for i in (0, 2))

    photo(images / "broken.png", (20, 200, 20))  # repaired: now it finishes too
    assert B.main(argv) == 0
    assert [r["status"] for r in read_csv(out / "summary.csv")] == ["done"] * 3
    assert not (out / edits[1].name / "FAILED").exists()
    # Nothing left to do: the checkpoint is not even loaded. With work to do, a bad one is a one-line user error.
    missing = ["--ckpt", str(tmp_path / "missing.safetensors")]
    assert B.main([*argv, *missing]) == 0
    assert B.main([*argv, *missing, "--out", str(tmp_path / "out2")]) == 2
    assert "missing.safetensors: no such file" in capsys.readouterr().err


# --- torchrun ---------------------------------------------------------------------------------------------------

def test_torchrun_two_processes(ckpt, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    entries = [{"image": str(photo(images / f"{i}.png", (40 * i, 90, 200))), "target_text": f"edit number {i}"}
               for i in range(3)]
    path = manifest(tmp_path, entries)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "imagic.batch", str(path), "--ckpt", str(ckpt), "--out", str(out), *FAST, "--alpha", "1.0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    edits = read_manifest(path)
    assert [done_record(out, e.name)["rank"] for e in edits] == [0, 1, 0]  # i % world_size
    assert [r["status"] for r in read_csv(out / "summary.csv")] == ["done"] * 3
    assert "nothing is downloaded" in proc.stdout
    assert proc.stdout.count("wrote") == 1  # only rank 0 writes the summary
