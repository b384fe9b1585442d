"""The check before a GPU run: when the plan says a stage will not fit the device's free
memory, the command stops within seconds with one line (what it needs, what is free, a setting that would fit);
`--force` runs anyway. The device's memory is faked (`memory_check.device_memory`), the plan is the real one."""
from __future__ import annotations

import time

import pytest
from PIL import Image

from imagic import memory_check
from imagic.cli import main
from imagic.editor import Editor
from tests.tiny import write_tiny_checkpoint

STEPS = ["--embed-steps", "2", "--finetune-steps", "2", "--steps", "2", "--alpha", "1", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("fit")
    ckpt = write_tiny_checkpoint(d / "tiny.safetensors", "sd1")
    Image.new("RGB", (32, 32), (10, 200, 30)).save(d / "photo.png")
    return ckpt, d / "photo.png"


def _worst(editor: Editor, **settings) -> int:
    p = editor.plan(**settings)
    return max(p.stages[s].device_bytes for s in ("stage1", "stage2", "vae_encode"))


def _fake_memory(monkeypatch, free: int, allocated: int = 0) -> None:
    monkeypatch.setattr(memory_check, "device_memory", lambda device: (free, allocated))


def test_an_edit_that_does_not_fit_stops_at_once_with_one_line(inputs, tmp_path, monkeypatch, capsys):
    ckpt, img = inputs
    argv = ["edit", "--ckpt", str(ckpt), "--image", str(img), "--prompt", "a green square", "--out",
            str(tmp_path / "run"), *STEPS]
    _fake_memory(monkeypatch, free=1024)
    start = time.monotonic()
    assert main(argv) == 2
    assert time.monotonic() - start < 60
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("imagic: error: stage"), err
    assert "iB on cpu" in err and "more is free" in err and "--force runs anyway" in err
    assert not (tmp_path / "run" / "optimized_embedding.safetensors").exists()
    assert main(argv + ["--force"]) == 0
    assert (tmp_path / "run" / "grid.png").is_file()


def test_the_hint_names_a_setting_that_fits(inputs, monkeypatch):
    ckpt, _ = inputs
    editor = Editor.from_checkpoint(ckpt, device="cpu", progress=False)
    full, lora = _worst(editor, finetune="full"), _worst(editor, finetune="lora")
    assert lora < full
    _fake_memory(monkeypatch, free=(full + lora) // 2)
    p = editor.plan(finetune="full")
    with pytest.raises(memory_check.NotEnoughMemory, match="stage2 needs .* would make it fit") as raised:
        memory_check.check(p, ("stage1", "stage2"), editor.device, lambda o: editor.plan(**{"finetune": "full", **o}))
    named = dict(memory_check.alternatives(p.settings, bf16=True))
    flag = next(f for f in named if f"{f} would make it fit" in str(raised.value))
    assert _worst(editor, **{"finetune": "full", **named[flag]}) <= (full + lora) // 2  # and it does fit
    _fake_memory(monkeypatch, free=full)  # exactly enough
    memory_check.check(p, ("stage1", "stage2"), editor.device, lambda o: editor.plan(**{"finetune": "full", **o}))
    _fake_memory(monkeypatch, free=full // 2, allocated=full // 2)  # half of it is on the device already
    memory_check.check(p, ("stage1", "stage2"), editor.device, lambda o: editor.plan(**{"finetune": "full", **o}))


def test_the_plan_is_one_call_from_the_package():
    import imagic

    p = imagic.plan("sd1", device="cuda", precision="bf16")  # presets need no weights
    assert isinstance(p, imagic.Plan) and set(p.stages) == {"stage1", "stage2", "sample", "vae_encode", "vae_decode"}


def test_alternatives_spell_the_command_line():
    settings = {"precision": "fp32", "finetune": "full", "gradient_checkpointing": False}
    flags = [flag for flag, _ in memory_check.alternatives(settings, bf16=False)]
    assert flags == ["--precision fp16", "--finetune lora", "--gradient-checkpointing",
                     "--precision fp16 --finetune lora --gradient-checkpointing"]
    done = {"precision": "bf16", "finetune": "lora", "gradient_checkpointing": True}
    assert memory_check.alternatives(done, bf16=True) == []
