"""The `imagic` CLI end to end on a tiny checkpoint, and its one-line errors for user mistakes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from imagic.cli import main
from tests.helpers import read_png_metadata
from tests.tiny import write_tiny_checkpoint

STEPS = ["--embed-steps", "3", "--finetune-steps", "3", "--steps", "2", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    ckpt = write_tiny_checkpoint(d / "tiny.safetensors", "sd1")
    img = d / "photo.png"
    Image.new("RGBA", (50, 30), (200, 10, 10, 128)).save(img)  # RGBA and non-square on purpose
    return d, ckpt, img


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_edit_then_sample_again(files, capsys, tmp_path):
    d, ckpt, img = files
    out = tmp_path / "run"
    code, stdout, err = _run(["edit", "--ckpt", str(ckpt), "--image", str(img), "--prompt", "a red square",
                              "--out", str(out), "--alpha", "0", "1", "--seeds", "0", "1", *STEPS], capsys)
    assert code == 0, err
    assert "grid.png" in stdout
    assert (out / "grid.png").is_file() and len(list((out / "samples").glob("*.png"))) == 4
    meta = read_png_metadata(out / "samples" / "seed1_alpha1_cfg7.5_steps2_eta0.png")
    assert json.loads(meta["seed"]) == 1 and json.loads(meta["alpha"]) == 1.0
    args = json.loads((out / "args.json").read_text())
    assert args["settings"]["embed_steps"] == 3 and len(args["checkpoint_sha256"]) == 64
    assert "torch" in args["versions"]
    code, stdout, err = _run(["sample", "--run", str(out), "--alpha", "0.5", "--seeds", "7", "--steps", "2",
                              "--quiet", "--device", "cpu"], capsys)
    assert code == 0, err
    assert (out / "samples" / "seed7_alpha0.5_cfg7.5_steps2_eta0.png").is_file()


def _files(directory):
    return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file() and
            p.name != ".lock"}


def test_sampling_again_never_replaces_earlier_outputs(files, capsys, tmp_path):
    """An edit, then `imagic sample` with other settings twice: every earlier file is still there, byte for byte;
    each call has its own grid, named in run.log; a sample with the edit's settings is not written twice."""
    d, ckpt, img = files
    out = tmp_path / "run"
    assert _run(["edit", "--ckpt", str(ckpt), "--image", str(img), "--prompt", "a red square", "--out", str(out),
                 "--alpha", "0", "1", "--seeds", "0", "1", *STEPS], capsys)[0] == 0
    after_edit = _files(out)
    calls = [["--alpha", "1", "--seeds", "0"],  # one cell of the edit's sweep: the same image, already saved
             ["--alpha", "1", "--seeds", "0", "--guidance-scale", "3", "--ddim-eta", "1", "--negative-prompt", "x"]]
    snapshots = [after_edit]
    for extra in calls:
        code, stdout, err = _run(["sample", "--run", str(out), "--steps", "2", "--quiet", "--device", "cpu",
                                  *extra], capsys)
        assert code == 0, err
        now = _files(out)
        for earlier in snapshots:
            kept = {k: v for k, v in earlier.items() if k.name != "run.log"}
            assert all(now.get(k) == v for k, v in kept.items()), [k for k, v in kept.items() if now.get(k) != v]
            assert now[Path("run.log")].startswith(earlier[Path("run.log")])  # appended to, never rewritten
        snapshots.append(now)
    grids = sorted(p.name for p in out.glob("grid*.png"))
    assert grids == ["grid-2.png", "grid-3.png", "grid.png"]
    log = (out / "run.log").read_text()
    assert all(f"sample: {g} " in log for g in grids)
    samples = sorted(p.name for p in (out / "samples").iterdir())
    assert len(samples) == 5  # the edit's 4, the first call's cell already there, one with the other settings
    negative = [s for s in samples if "_cfg3_" in s]
    assert negative and "_eta1_neg" in negative[0]


def test_train_resumes_and_txt2img_img2img(files, capsys, tmp_path):
    d, ckpt, img = files
    argv = ["train", "--ckpt", str(ckpt), "--image", str(img), "--prompt", "a red square", "--out",
            str(tmp_path / "run"), "--square", "pad", *STEPS[:4], "--quiet", "--device", "cpu"]
    assert _run(argv, capsys)[0] == 0
    assert _run(argv, capsys)[0] == 0  # finished stages are skipped
    assert not (tmp_path / "run" / "grid.png").exists()
    code, stdout, err = _run(["txt2img", "--ckpt", str(ckpt), "--prompt", "a cat", "--out", str(tmp_path / "t"),
                              "--seeds", "0", "--steps", "2", "--quiet", "--device", "cpu"], capsys)
    assert code == 0, err
    assert (tmp_path / "t" / "txt2img_seed0.png").is_file()
    code, stdout, err = _run(["img2img", "--ckpt", str(ckpt), "--image", str(img), "--prompt", "a cat",
                              "--out", str(tmp_path / "i"), "--strength", "0.5", "--steps", "4", "--quiet",
                              "--device", "cpu"], capsys)
    assert code == 0, err
    assert (tmp_path / "i" / "img2img_seed0.png").is_file()


def test_user_errors_are_one_line(files, capsys, tmp_path):
    d, ckpt, img = files
    (d / "notes.png").write_text("not an image")
    base = ["edit", "--ckpt", str(ckpt), "--out", str(tmp_path / "o"), *STEPS]
    cases = {
        "missing image": (base + ["--image", str(d / "nope.jpg"), "--prompt", "x"], "nope.jpg"),
        "not an image": (base + ["--image", str(d / "notes.png"), "--prompt", "x"], "notes.png"),
        "bad checkpoint": (["edit", "--ckpt", str(img), "--image", str(img), "--prompt", "x", "--out",
                            str(tmp_path / "o2"), *STEPS], "not a checkpoint"),
        "cuda absent": (base[:-2] + ["--device", "cuda:0", "--image", str(img), "--prompt", "x"], "CUDA"),
        "unfinished run": (["sample", "--run", str(tmp_path), "--quiet"], "not a run directory"),
    }
    for name, (argv, needle) in cases.items():
        code, out, err = _run(argv, capsys)
        assert code == 2, (name, err)
        assert err.startswith("imagic: error:") and err.count("\n") == 1 and needle in err, (name, err)


@pytest.mark.parametrize("argv", [
    ["edit", "--prompt", "   "], ["edit", "--embed-steps", "-3"], ["edit", "--lora-rank", "0"],
    ["edit", "--finetune", "dreambooth"], ["sample"],
])
def test_bad_arguments_exit_2_with_usage(files, argv, capsys):
    d, ckpt, img = files
    full = argv + ["--ckpt", str(ckpt), "--image", str(img), "--out", "x"] if argv[0] == "edit" else argv
    if argv[0] == "edit" and "--prompt" not in argv:
        full += ["--prompt", "ok"]
    with pytest.raises(SystemExit) as e:
        main(full)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_no_traceback_in_a_real_process(files, tmp_path):
    d, ckpt, img = files
    r = subprocess.run([sys.executable, "-m", "imagic.cli", "edit", "--ckpt", str(ckpt), "--image",
                        str(d / "missing.png"), "--prompt", "x", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_an_edit_decodes_its_image_once_and_crops_it_once(files, capsys, tmp_path, monkeypatch):
    """The command decodes the photo before loading the checkpoint (a bad one fails first) and hands the decoded
    image on: one decode and one crop per edit, the crop also giving SDXL's size conditioning."""
    from imagic import editor as editor_module
    from imagic import images

    d, ckpt, img = files
    calls = {"open_image": 0, "square_input": 0}

    def counted(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return call

    for name in calls:
        wrapper = counted(name, getattr(images, name))
        for module in (images, editor_module):
            monkeypatch.setattr(module, name, wrapper)
    code, _, err = _run(["edit", "--ckpt", str(ckpt), "--image", str(img), "--prompt", "a red square", "--out",
                         str(tmp_path / "run"), "--alpha", "1", *STEPS], capsys)
    assert code == 0, err
    assert calls == {"open_image": 1, "square_input": 1}


def test_the_kernel_choice_is_a_setting_not_an_environment_variable(files, capsys, tmp_path, monkeypatch):
    """`--kernels` reaches the editor as its setting; the command leaves the process environment alone."""
    import os

    from imagic import arguments

    d, ckpt, img = files
    monkeypatch.delenv("IMAGIC_KERNELS", raising=False)
    made = []
    real = arguments.make_editor
    monkeypatch.setattr("imagic.cli.make_editor", lambda args, path: made.append(real(args, path)) or made[-1])
    code, _, err = _run(["train", "--ckpt", str(ckpt), "--image", str(img), "--prompt", "a red square", "--out",
                         str(tmp_path / "run"), "--kernels", "torch", *STEPS[:4], "--quiet", "--device", "cpu"],
                        capsys)
    assert code == 0, err
    assert made[0].runtime.kernels == "torch" and "IMAGIC_KERNELS" not in os.environ
