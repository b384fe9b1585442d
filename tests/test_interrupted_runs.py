"""Interrupted and starved runs: `kill -9` in each Imagic stage of a real `python -m imagic.cli` process (with
the threads a user gets), then resume; a full or read-only disk at every kind of output write, then resume; a
second process on the same run directory. The final outputs (embeddings, LoRA weights, loss curves and plot,
samples and grid) must equal those of an uninterrupted run with the same seed on the CPU, byte for byte, and
nothing half-written may be left.
"""
from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from imagic import fileio
from imagic.cli import main
from tests.tiny import write_tiny_checkpoint

# Small enough for CI, long enough that each stage is still running when the test looks at it: 2 steps per save.
TRAIN = ["--embed-steps", "16", "--finetune-steps", "16", "--save-every", "2", "--device", "cpu", "--quiet"]
SAMPLE = ["--steps", "12", "--alpha", "0.5", "1", "--seeds", "0", "1"]
# The threads a user's process gets (torch's default, nothing pinned): a run and its resumed twin must give the
# same bytes as the CLI runs them.
ENV = {**{k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR")},
       "PYTHONDONTWRITEBYTECODE": "1"}
DEADLINE_S = 240  # generous: CI machines are shared


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("interrupted")
    ckpt = write_tiny_checkpoint(d / "tiny.safetensors", "sd1")
    img = Image.new("RGB", (40, 32), (20, 30, 200))
    ImageDraw.Draw(img).ellipse([12, 8, 28, 24], fill=(220, 20, 20))
    img.save(d / "photo.png")
    return ckpt, d / "photo.png"


def _argv(command: str, inputs, out: Path) -> List[str]:
    ckpt, img = inputs
    argv = [command, "--ckpt", str(ckpt), "--image", str(img), "--prompt", "a red square", "--out", str(out), *TRAIN]
    return argv + (SAMPLE if command == "edit" else [])


def _spawn(argv: List[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "imagic.cli", *argv], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=DEADLINE_S)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _stop_when(proc: subprocess.Popen, ready: Callable[[], bool], what: str) -> None:
    """Freeze the process (SIGSTOP) the moment `ready()` holds, so the test decides where it stands."""
    end = time.monotonic() + DEADLINE_S
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {what}: rc {proc.returncode}, stderr {proc.stderr.read()}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.002)
    proc.send_signal(signal.SIGSTOP)


def _kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == -signal.SIGKILL


def _outputs(run: Path) -> Dict[str, bytes]:
    """Every file of a run directory except the log (it records timings and memory) and the lock."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in ("run.log", ".lock")}


def _assert_same_outputs(got: Path, want: Path) -> None:
    a, b = _outputs(got), _outputs(want)
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name] == b[name], f"{name} differs from the uninterrupted run"


def _assert_intact(run: Path) -> None:
    """What a crash leaves behind must parse: no partial file is ever visible under its final name."""
    for p in run.rglob("*"):
        if p.suffix == ".safetensors":
            load_file(str(p))
        elif p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".png":
            with Image.open(p) as im:
                im.load()
        elif p.suffix == ".pt":
            torch.load(p, weights_only=True)
        elif p.suffix == ".csv":
            lines = p.read_text().splitlines()
            assert lines[0] == "step,loss" and all(float(x.split(",")[1]) > 0 for x in lines[1:])


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory) -> Path:
    """An uninterrupted `edit` run in its own process."""
    out = tmp_path_factory.mktemp("reference") / "run"
    r = _finish(_spawn(_argv("edit", inputs, out)))
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.timeout(900)
def test_kill9_in_each_stage_then_resume_equals_uninterrupted(inputs, reference, tmp_path):
    run = tmp_path / "run"
    argv = _argv("edit", inputs, run)
    # Stage 1 (embedding optimisation): stop it once it has saved state, show the lock, then kill -9.
    proc = _spawn(argv)
    _stop_when(proc, lambda: (run / "stage1.resume.pt").exists(), "stage 1 saved its state")
    assert not (run / "optimized_embedding.safetensors").exists()
    second = _finish(_spawn(argv))  # a real second process on the same directory, while the first holds it
    assert second.returncode == 2, second.stderr
    assert second.stderr.startswith("imagic: error:") and second.stderr.count("\n") == 1
    assert "another imagic process" in second.stderr
    _kill9(proc)
    _assert_intact(run)
    # A writer killed between creating and renaming its temporary file leaves one behind; the next process
    # (holding the lock) removes it.
    (run / ".optimized_embedding.safetensors.0123abcd.tmp").write_bytes(b"half of an embedding")
    # Stage 2 (fine-tuning): kill -9 as soon as it has saved state.
    proc = _spawn(argv)
    _stop_when(proc, lambda: (run / "stage2.resume.pt").exists(), "stage 2 saved its state")
    assert (run / "optimized_embedding.safetensors").exists() and not (run / "lora.safetensors").exists()
    assert not (run / ".optimized_embedding.safetensors.0123abcd.tmp").exists()
    _kill9(proc)
    _assert_intact(run)
    # Stage 3 (sampling): the loss plot is written when training ends; kill -9 while sampling.
    proc = _spawn(argv)
    _stop_when(proc, lambda: (run / "losses.png").exists(), "training finished")
    assert not (run / "grid.png").exists()
    _kill9(proc)
    _assert_intact(run)
    # Resume to the end.
    r = _finish(_spawn(argv))
    assert r.returncode == 0, r.stderr
    assert not list(run.rglob("*.tmp")) and not list(run.glob("*.resume.pt"))
    _assert_same_outputs(run, reference)


@pytest.mark.timeout(600)
def test_file_size_limit_in_a_real_process(inputs, reference, tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse writes past a size (EFBIG), like a disk filling up mid-run. With
    96 KB, stage 1 fits and the first stage-2 state (LoRA weights and Adam moments) does not."""
    run = tmp_path / "run"
    argv = _argv("edit", inputs, run)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (96 * 1024, resource.RLIM_INFINITY))

    starved = _finish(_spawn(argv, preexec_fn=limit_file_size))  # Python ignores SIGXFSZ: writes get EFBIG
    assert starved.returncode == 2, starved.stderr
    assert starved.stderr.startswith("imagic: error:") and starved.stderr.count("\n") == 1, starved.stderr
    assert "stage2.resume.pt" in starved.stderr and "File too large" in starved.stderr
    assert "Traceback" not in starved.stderr
    assert (run / "optimized_embedding.safetensors").exists() and not list(run.rglob("*.tmp"))
    _assert_intact(run)
    r = _finish(_spawn(argv))
    assert r.returncode == 0, r.stderr
    _assert_same_outputs(run, reference)


# --- in-process: a full or read-only disk at every kind of write ---------------------------------------------------
IN_PROCESS = ["--embed-steps", "4", "--finetune-steps", "4", "--save-every", "2", "--device", "cpu", "--quiet",
              "--steps", "2", "--alpha", "1", "--seeds", "0"]


def _edit(inputs, out: Path) -> List[str]:
    ckpt, img = inputs
    return ["edit", "--ckpt", str(ckpt), "--image", str(img), "--prompt", "a red square", "--out", str(out),
            *IN_PROCESS]


def _kind(path: Path) -> str:
    """The output a path is (or, for `atomic_path`'s temporary files, will become): samples count as one kind."""
    name = re.sub(r"^\.(.+)\.[0-9a-f]{8}\.tmp$", r"\1", path.name)
    return "samples/*.png" if path.parent.name == "samples" else name


def _inject(monkeypatch, kind: str, code: int) -> str:
    """Make every write of `kind` fail with `code`; returns the strerror the message must carry.

    ENOSPC comes from the fsync before the rename (where NFS and quotas report it), EROFS from creating the
    temporary file (a directory remounted read-only), and the log's plain append gets EDQUOT.
    """
    real_fsync, real_create, real_open = fileio._fsync_file, fileio._create_temp, open

    def fsync(path: Path) -> None:
        if _kind(path) == kind:
            raise OSError(code, os.strerror(code))
        real_fsync(path)

    def create(path: Path) -> Path:
        if _kind(path) == kind:
            raise OSError(code, os.strerror(code))
        return real_create(path)

    def append(file, mode="r", *args, **kwargs):
        if Path(file).name == kind and "a" in mode:
            raise OSError(code, os.strerror(code))
        return real_open(file, mode, *args, **kwargs)

    if kind == "run.log":
        monkeypatch.setattr("imagic.rundir.open", append, raising=False)
    elif code == errno.EROFS:
        monkeypatch.setattr(fileio, "_create_temp", create)
    else:
        monkeypatch.setattr(fileio, "_fsync_file", fsync)
    return os.strerror(code)


@pytest.mark.timeout(900)
def test_full_or_readonly_disk_at_every_kind_of_write_then_resume(inputs, tmp_path, monkeypatch, capsys):
    """Learn which files a run writes, then make each kind of write fail in turn, resuming after each: every
    failure is one line naming the file, what was written before stays intact, and the end result equals a
    clean run."""
    written: List[Path] = []
    real_create = fileio._create_temp

    def recording_create(path: Path) -> Path:
        written.append(path)
        return real_create(path)

    monkeypatch.setattr(fileio, "_create_temp", recording_create)
    assert main(_edit(inputs, tmp_path / "clean")) == 0
    monkeypatch.undo()
    capsys.readouterr()
    kinds = list(dict.fromkeys(_kind(p) for p in written))
    assert {"args.json", "input.png", "target_embedding.safetensors", "stage1.resume.pt", "loss_stage1.csv",
            "optimized_embedding.safetensors", "stage2.resume.pt", "loss_stage2.csv", "lora.safetensors",
            "losses.png", "samples/*.png", "grid.png"} == set(kinds)
    # The log is appended when a stage finishes: right after stage 1's result is written.
    kinds.insert(kinds.index("optimized_embedding.safetensors") + 1, "run.log")

    run = tmp_path / "run"
    for i, kind in enumerate(kinds):
        reason = _inject(monkeypatch, kind, (errno.ENOSPC, errno.EROFS, errno.EDQUOT)[i % 3])
        before = _outputs(run) if run.exists() else {}
        rc = main(_edit(inputs, run))
        monkeypatch.undo()
        err = capsys.readouterr().err
        assert rc == 2, (kind, err)
        assert err.startswith("imagic: error:") and err.count("\n") == 1 and reason in err, (kind, err)
        assert ("samples" if kind.startswith("samples") else kind) in err, (kind, err)
        assert not list(run.rglob("*.tmp")), kind
        _assert_intact(run)
        after = _outputs(run)
        for name, data in before.items():  # earlier results stay; only resume states and loss logs advance
            if not name.endswith(".resume.pt") and not name.startswith("loss_stage"):
                assert after.get(name) == data, (kind, name)
    assert main(_edit(inputs, run)) == 0
    capsys.readouterr()
    _assert_same_outputs(run, tmp_path / "clean")


@pytest.mark.timeout(300)
def test_unusable_output_directories(inputs, tmp_path, capsys):
    """--out under a regular file, or naming a file: one line, exit 2, the file untouched."""
    blocker = tmp_path / "a_file"
    blocker.write_text("precious")
    for out, needle in [(blocker / "run", "Not a directory"), (blocker, "File exists")]:
        rc = main(_edit(inputs, out))
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("imagic: error:") and err.count("\n") == 1, err
        assert str(out) in err and needle in err, err
    assert blocker.read_text() == "precious"


# --- damaged run directories ------------------------------------------------------------------------------------
def _train(inputs, out: Path) -> List[str]:
    return ["train" if a == "edit" else a for a in _edit(inputs, out)[:-6]]


@pytest.mark.timeout(300)
def test_damaged_run_directory_files(inputs, tmp_path, capsys):
    """Our writes are atomic, but disks rot and people edit files: a damaged args.json, resume state or loss
    curve is named in one line with what to do, never a traceback."""
    done = tmp_path / "done"
    assert main(_train(inputs, done)) == 0
    cases = [("args.json", "{not json", "invalid JSON"), ("args.json", "[1, 2]", "not the settings"),
             ("args.json", b"\xff\xfe", "invalid|unreadable"), ("loss_stage1.csv", "step,loss\n1,abc\n", "loss curve"),
             ("loss_stage2.csv", "step,loss\n1\n", "loss curve")]
    for name, content, needle in cases:
        run = tmp_path / f"damaged_{name}_{cases.index((name, content, needle))}"
        shutil.copytree(done, run)
        (run / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        rc = main(_train(inputs, run))
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("imagic: error:") and err.count("\n") == 1, (name, err)
        assert name in err and re.search(needle, err), (name, err)
    for content in (b"", b"PK\x03\x04 truncated zip", b"\x80\x02garbage"):
        run = tmp_path / f"resume_{len(content)}"
        run.mkdir()
        (run / "stage1.resume.pt").write_bytes(content)
        rc = main(_train(inputs, run))
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "stage1.resume.pt: unreadable resume state" in err, err
        assert "delete it" in err
        (run / "stage1.resume.pt").unlink()
        assert main(_train(inputs, run)) == 0  # as the message says
        capsys.readouterr()


def test_sample_with_damaged_args_json(inputs, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train(inputs, run)) == 0
    (run / "args.json").write_text("{not json")
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "--steps", "2", "--alpha", "1", "--device", "cpu", "--quiet"]) == 2


def test_sample_refused_while_another_process_holds_the_run(inputs, tmp_path, capsys):
    """`imagic sample` writes into the run directory, so it takes the run's lock like `edit` and `train`."""
    from imagic.rundir import RunDir

    run = tmp_path / "run"
    assert main(_train(inputs, run)) == 0
    capsys.readouterr()
    with RunDir(run):  # flock is per open file: this holder excludes the CLI below even in the same process
        code = main(["sample", "--run", str(run), "--steps", "2", "--alpha", "1", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "another imagic process" in err and err.count("\n") == 1, err
    assert not (run / "grid.png").exists()
    assert main(["sample", "--run", str(run), "--steps", "2", "--alpha", "1", "--device", "cpu", "--quiet"]) == 0
    assert (run / "grid.png").exists()


def test_samples_path_taken_by_a_file(inputs, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_train(inputs, run)) == 0
    (run / "samples").write_text("not a directory")
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "--steps", "2", "--alpha", "1", "--device", "cpu", "--quiet"]) == 2
