"""load_checkpoint / inspect: formats, dtypes, EMA, yaml override, detection, and every error path."""
from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from imagic import detect as D
from imagic.checkpoint import CheckpointError, read_state_dict
from imagic.cli import main
from imagic.config import preset, to_ldm_yaml
from imagic.export import ldm_state_dict
from imagic.loader import load_checkpoint
from tests.tiny import tiny_config, tiny_models, write_tiny_checkpoint


def _same_weights(a: torch.nn.Module, b: torch.nn.Module, dtype=None) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        ref = sb[k] if dtype is None else sb[k].to(dtype).to(sa[k].dtype)
        assert torch.equal(sa[k], ref), k


@pytest.fixture(scope="module")
def tiny_sd1(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd1")
    cfg = tiny_config("sd1")
    return cfg, tiny_models(cfg), d


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_round_trip_bit_exact(tiny_sd1, suffix):
    cfg, (unet, vae, text), d = tiny_sd1
    path = write_tiny_checkpoint(d / f"m{suffix}", "sd1")
    m = load_checkpoint(path)
    _same_weights(m.unet, unet)
    _same_weights(m.vae, vae)
    _same_weights(m.text_encoder, text)
    assert m.config.unet == cfg.unet and m.config.text.width == cfg.text.width
    ids = m.tokenizer(["a red circle"])
    assert ids.shape == (1, 77)
    torch.testing.assert_close(m.text_encoder(ids), text(ids), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_file_into_fp32_model(tiny_sd1, dtype):
    cfg, (unet, _, _), d = tiny_sd1
    path = write_tiny_checkpoint(d / f"half_{str(dtype)[6:]}.safetensors", "sd1", dtype=dtype)
    m = load_checkpoint(path, dtype=torch.float32)
    assert next(m.unet.parameters()).dtype == torch.float32
    assert next(m.vae.parameters()).dtype == torch.float32
    _same_weights(m.unet, unet, dtype=dtype)
    m16 = load_checkpoint(path, dtype=torch.float16)
    assert next(m16.unet.parameters()).dtype == torch.float16
    assert next(m16.vae.parameters()).dtype == torch.float32  # the VAE stays fp32 by default


def _with_ema(sd, offset=1.0):
    out = dict(sd)
    for k, v in sd.items():
        if k.startswith(D.UNET):
            out[D.ema_key(k)] = v + offset
    out["model_ema.decay"] = torch.tensor(0.9999)
    out["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return out


def test_ema_selection(tiny_sd1):
    cfg, (unet, vae, text), d = tiny_sd1
    sd = _with_ema(ldm_state_dict(unet, vae, text, cfg))
    sd.update({"betas": torch.rand(1000, dtype=torch.float64), "alphas_cumprod": torch.rand(1000)})
    path = d / "ema.safetensors"
    save_file(sd, str(path))
    (d / "ema.yaml").write_text(json.dumps(to_ldm_yaml(cfg)))  # JSON is YAML
    plain = load_checkpoint(path)
    _same_weights(plain.unet, unet)
    ema = load_checkpoint(path, use_ema=True)
    for k, v in ema.unet.state_dict().items():
        torch.testing.assert_close(v, unet.state_dict()[k] + 1.0, rtol=0, atol=0)
    assert any("EMA" in e for e in ema.evidence)
    no_ema = write_tiny_checkpoint(d / "noema.safetensors", "sd1")
    with pytest.warns(UserWarning, match="no EMA"):
        load_checkpoint(no_ema, use_ema=True)


def test_detection_without_yaml(tmp_path):
    for fam in ("sd1", "sd2"):
        path = write_tiny_checkpoint(tmp_path / f"{fam}.safetensors", fam, write_yaml=False)
        det = D.detect(read_state_dict(path))
        cfg = tiny_config(fam)
        assert (det.config.family, det.config.unet, det.config.vae, det.config.text) == \
            (fam, cfg.unet, cfg.vae, cfg.text)
        m = load_checkpoint(path)
        assert m.config.family.startswith(fam)
        if fam == "sd2":  # SD2 files cannot say epsilon or v: the probe decides and says so
            assert any("probe" in e for e in m.evidence)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_full_size_detection_on_meta(name):
    """A full-size SD1.5 / SD2.1 key+shape set (our models on meta) is detected as exactly the preset."""
    from imagic.clip import build_text_encoder
    from imagic.unet import UNetModel
    from imagic.vae import AutoencoderKL

    cfg = preset(name)
    with torch.device("meta"):
        models = UNetModel(cfg.unet), AutoencoderKL(cfg.vae), build_text_encoder(cfg.text)
    sd = ldm_state_dict(*models, cfg)
    det = D.detect(sd)
    assert det.config.unet == cfg.unet
    assert det.config.vae == cfg.vae
    assert det.config.text == cfg.text
    assert D.count_params(sd)["unet"] == (859_520_964 if name == "sd1" else 865_910_724)


def test_yaml_override_sizes_and_parameterization(tmp_path):
    path = write_tiny_checkpoint(tmp_path / "m.safetensors", "sd2-v")
    assert load_checkpoint(path).config.prediction_type == "v"  # from the yaml beside the file
    cfg_eps = to_ldm_yaml(tiny_config("sd2"))
    assert load_checkpoint(path, config=cfg_eps).config.prediction_type == "epsilon"
    wrong = tiny_config("sd2")
    wrong.unet.model_channels = 128
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_checkpoint(path, config=to_ldm_yaml(wrong))


def test_old_sd1_file_without_text_model_prefix(tiny_sd1):
    cfg, (unet, vae, text), d = tiny_sd1
    sd = {k.replace("transformer.text_model.", "transformer."): v for k, v in ldm_state_dict(unet, vae, text, cfg).items()}
    path = d / "old.safetensors"
    save_file(sd, str(path))
    m = load_checkpoint(path, config=to_ldm_yaml(cfg))
    _same_weights(m.text_encoder, text)


def test_absent_components_are_none_with_warning(tiny_sd1):
    cfg, (unet, vae, text), d = tiny_sd1
    sd = {k: v for k, v in ldm_state_dict(unet, vae, text, cfg).items() if not k.startswith(D.VAE)}
    save_file(sd, str(d / "novae.safetensors"))
    with pytest.warns(UserWarning, match="no VAE"):
        m = load_checkpoint(d / "novae.safetensors", config=to_ldm_yaml(cfg))
    assert m.vae is None and m.unet is not None


def test_strict_keys(tiny_sd1):
    cfg, (unet, vae, text), d = tiny_sd1
    sd = ldm_state_dict(unet, vae, text, cfg)
    extra = dict(sd, **{"model.diffusion_model.bogus.weight": torch.zeros(1)})
    save_file(extra, str(d / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="1 unexpected: bogus.weight"):
        load_checkpoint(d / "extra.safetensors", config=to_ldm_yaml(cfg))
    missing = {k: v for k, v in sd.items() if k != "model.diffusion_model.out.2.bias"}
    save_file(missing, str(d / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="1 missing: out.2.bias"):
        load_checkpoint(d / "missing.safetensors", config=to_ldm_yaml(cfg))


def test_probe_decides_v_from_behaviour():
    class Fake(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(k))

        def forward(self, x, t, c):
            return self.w * x

    assert D.probe_v_prediction(Fake(1.0), 8)[0] is False  # eps model: predicts ~its input at t=999
    assert D.probe_v_prediction(Fake(-3.0), 8)[0] is True  # v model: strongly negative mean(out - x)


# --- .ckpt safety --------------------------------------------------------------------------------------------
def test_lightning_ckpt_loads_without_lightning(tiny_sd1, monkeypatch):
    """A v1.x-style Lightning file: ModelCheckpoint class as a dict key, numpy scalars. Loads via stand-ins."""
    import numpy as np

    cfg, (unet, vae, text), d = tiny_sd1
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = mod.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        monkeypatch.setitem(sys.modules, name, mod if name == mod.__name__ else types.ModuleType(name))
    payload = {"epoch": 6, "global_step": 470000, "state_dict": ldm_state_dict(unet, vae, text, cfg),
               "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.1), "monitor": "val/loss"}}}
    torch.save(payload, d / "lightning.ckpt")
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        monkeypatch.delitem(sys.modules, name)
    m = load_checkpoint(d / "lightning.ckpt", config=to_ldm_yaml(cfg))
    _same_weights(m.unet, unet)


class _Evil:
    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


class _EvalEvil:
    def __init__(self, canary):
        self.canary = canary

    def __reduce__(self):
        return (eval, (f"open({str(self.canary)!r}, 'w').close()",))


@pytest.mark.parametrize("evil", [_Evil, _EvalEvil])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, evil):
    canary = tmp_path / "canary"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "payload": evil(canary)}, path)
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(path)
    assert not canary.exists()


# --- error paths and the CLI ---------------------------------------------------------------------------------
def _bad_files(tmp_path: Path, good: Path):
    data = good.read_bytes()
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "text.ckpt").write_text("hello, not a checkpoint\n")
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "header.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / "loop.ckpt").symlink_to(tmp_path / "loop.ckpt")
    ckpt = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1000)}}, ckpt)
    (tmp_path / "trunc.ckpt").write_bytes(ckpt.read_bytes()[:-300])
    sdxl = {"conditioner.embedders.0.transformer.x": torch.zeros(1), D.UNET + "input_blocks.0.0.weight": torch.zeros(1)}
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    save_file({D.UNET + "input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3)}, str(tmp_path / "inpaint.safetensors"))
    save_file({"lora_unet_down_blocks_0_x.alpha": torch.tensor(4.0)}, str(tmp_path / "lora.safetensors"))
    save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(1)}, str(tmp_path / "vae.safetensors"))
    save_file({"foo": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    return {
        "missing.safetensors": "no such file", "empty.safetensors": "empty file", "text.ckpt": "not a checkpoint",
        "trunc.safetensors": "truncated", "header.safetensors": "corrupt", "dir.safetensors": "is a directory",
        "loop.ckpt": "cannot open", "trunc.ckpt": "corrupt", "sdxl.safetensors": "SDXL",
        "inpaint.safetensors": "inpainting", "lora.safetensors": "LoRA file", "vae.safetensors": "standalone VAE",
        "other.safetensors": "not a Stable Diffusion checkpoint",
    }


def test_cli_inspect_errors_are_one_line(tmp_path, capsys):
    good = write_tiny_checkpoint(tmp_path / "good.safetensors", "sd1")
    for name, needle in _bad_files(tmp_path, good).items():
        code = main(["inspect", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert code == 2, name
        assert err.startswith("imagic: error:") and err.count("\n") == 1, (name, err)
        assert needle in err, (name, err)
        assert "Traceback" not in err


def test_cli_inspect_json(tmp_path, capsys):
    good = write_tiny_checkpoint(tmp_path / "good.safetensors", "sd2-v")
    assert main(["inspect", str(good), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sd2-v" and info["prediction_type"] == "v"
    assert info["components"] == {"unet": True, "vae": True, "text_encoder": True}
    assert info["parameters"]["unet"] == sum(p.numel() for p in tiny_models(tiny_config("sd2-v"))[0].parameters())
    assert info["dtypes"]["unet"] == ["float32"] and info["unknown_keys"] == [] and not info["ema"]
    assert main(["inspect", str(good)]) == 0
    assert "family:           sd2-v" in capsys.readouterr().out


def test_cli_subprocess_no_traceback(tmp_path):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "imagic.cli", "inspect", str(tmp_path / "nope.ckpt")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no such file" in r.stderr
