"""Running out of device memory in the middle of a run, injected on the CPU at a chosen step:
the command ends with one line (stage, step, what torch said, the step the run directory keeps, settings that need
less), exit code 2, and the same command then resumes to the result of an uninterrupted run."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from imagic import editor as editor_module
from imagic import steps
from imagic.cli import main
from tests.tiny import write_tiny_checkpoint

TORCH_SAYS = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.6 GiB"
STEPS = ["--embed-steps", "4", "--finetune-steps", "8", "--save-every", "2", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("oom")
    ckpt = write_tiny_checkpoint(d / "tiny.safetensors", "sd1")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(d / "photo.png")
    return ckpt, d / "photo.png"


def _train(inputs, out) -> list:
    ckpt, img = inputs
    return ["train", "--ckpt", str(ckpt), "--image", str(img), "--prompt", "a red square", "--out", str(out), *STEPS]


def _fail_at(monkeypatch, module, name: str, call: int) -> None:
    """Make the `call`-th call (1-based) of module.name raise torch's out-of-memory error."""
    real, calls = getattr(module, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise torch.cuda.OutOfMemoryError(TORCH_SAYS)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def test_out_of_memory_in_stage_2_is_one_line_and_the_run_resumes(inputs, tmp_path, monkeypatch, capsys):
    assert main(_train(inputs, tmp_path / "whole")) == 0
    with monkeypatch.context() as m:
        _fail_at(m, steps, "denoising_loss", 4 + 5)  # stage 1's 4 steps, then stage 2's 5th
        code = main(_train(inputs, tmp_path / "run"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("imagic: error: stage 2: lora fine-tune: step 5 of 8: out of memory (CUDA out of memory")
    assert "the run directory keeps step 4" in err and "rerun the same command to resume" in err
    assert "--gradient-checkpointing" in err and "Traceback" not in err
    assert (tmp_path / "run" / "stage2.resume.pt").is_file() and not (tmp_path / "run" / "lora.safetensors").exists()
    assert main(_train(inputs, tmp_path / "run")) == 0
    assert (tmp_path / "run" / "lora.safetensors").read_bytes() == (tmp_path / "whole" / "lora.safetensors").read_bytes()


def test_out_of_memory_while_sampling_keeps_the_trained_run(inputs, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(_train(inputs, run)) == 0
    capsys.readouterr()
    sample = ["sample", "--run", str(run), "--steps", "2", "--seeds", "0", "1", "--quiet", "--device", "cpu"]
    with monkeypatch.context() as m:
        _fail_at(m, editor_module, "sample_ddim", 2)
        code = main(sample)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("imagic: error: stage 3: sampling: out of memory (CUDA out of memory"), err
    assert not list(run.glob("grid*.png")) and (run / "lora.safetensors").is_file()
    assert main(sample) == 0 and (run / "grid.png").is_file()
