"""The shapes model's recipe (weights/shapes/train.py and the train_*.py files beside it): two gloo processes that
average their gradients take the step one process takes on the whole batch; the loss weights, timestep sampler,
compact vocabulary and architecture options; the defaults, resuming, and workers that exit with their launcher."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from imagic import shapes as S
from imagic.schedule import NoiseSchedule
from imagic.unet import UNetModel
from imagic.vae import AutoencoderKL

SHAPES = Path(__file__).resolve().parents[1] / "weights" / "shapes"
TRAIN_PY = SHAPES / "train.py"
# The recipe is scripts, not a package: train.py and its parts import each other from their folder, the first entry
# of sys.path when train.py runs. Appended (not prepended) here, so it shadows nothing installed.
if str(SHAPES) not in sys.path:
    sys.path.append(str(SHAPES))

import train as train_cli  # noqa: E402  (weights/shapes/train.py)
import train_data  # noqa: E402
import train_outputs  # noqa: E402
import train_parallel  # noqa: E402
import train_recipe  # noqa: E402
import train_stages  # noqa: E402


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 5)  # like the token embedding: only the rows of USED get gradients
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
        self.unused = torch.nn.Linear(2, 2)  # never called: its gradient stays None

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.net(x + self.embed(ids))


USED = torch.tensor([2, 5, 7])


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return Tiny()


def batch() -> tuple:
    g = torch.Generator().manual_seed(1)
    ids = USED[torch.randint(0, len(USED), (8,), generator=g)]
    return torch.randn(8, 5, generator=g), ids, torch.randn(8, 3, generator=g)


def loss_of(model: torch.nn.Module, x: torch.Tensor, ids: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x, ids) - y).pow(2).mean()


def worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=Path(store).as_uri(), rank=rank, world_size=2)
    group = train_parallel.Group(rank, 2)
    model = tiny_model()
    part = group.share(8, "batch")
    loss_of(model, *(v[rank * part:(rank + 1) * part] for v in batch())).backward()
    params = list(model.parameters())
    group.average_gradients(params)
    logs = group.average_logs({"loss": float(rank), "two": 2.0})
    streams = group.gather(rank * 10)
    if rank == 0:
        torch.save({"grads": [p.grad.clone() for p in params], "logs": logs, "streams": streams}, out)
    group.barrier()
    dist.destroy_process_group()


def test_two_processes_average_to_the_full_batch_gradient(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(worker, args=(str(tmp_path / "store"), str(out)), nprocs=2)
    got = torch.load(out, weights_only=True)
    model = tiny_model()
    loss_of(model, *batch()).backward()  # equal halves: the mean of the half-batch means is the full-batch mean
    for p, g in zip(model.parameters(), got["grads"]):
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(g, expected, rtol=1e-6, atol=1e-7)
    assert got["logs"] == {"loss": 0.5, "two": 2.0}
    assert got["streams"] == [0, 10]


def test_a_single_process_group_changes_nothing():
    group = train_parallel.Group()
    model = tiny_model()
    loss_of(model, *batch()).backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    group.average_gradients(list(model.parameters()))
    assert all((a is None and p.grad is None) or torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))
    assert group.average_logs({"loss": 3.0}) == {"loss": 3.0}
    assert group.gather("x") == ["x"] and group.main


def test_a_batch_that_does_not_split_is_refused_clearly():
    assert train_parallel.Group(1, 2).share(32, "--batch") == 16
    with pytest.raises(SystemExit, match="--batch 33 does not split over 2 processes"):
        train_parallel.Group(0, 2).share(33, "--batch")


def shapes_schedule():
    return NoiseSchedule.from_config(train_recipe.model_config())


def test_importance_sampled_timesteps_keep_the_min_snr_objective():
    """E[weight * f(t)] is the same for both samplers (the Min-SNR objective) for any per-timestep loss f; the
    importance sampler's weights are constant, so the t-part of its variance is gone."""
    schedule = shapes_schedule()
    w = train_recipe.min_snr_weight(schedule, torch.arange(schedule.num_timesteps), 5.0)
    f = torch.linspace(2.0, 0.1, schedule.num_timesteps) ** 2  # a per-timestep loss, large at low noise
    exact = float((w * f).mean())
    n = 400_000
    for mode in ("importance", "uniform"):
        t, weight = train_recipe.timestep_sampler(schedule, 5.0, mode)(n, torch.Generator().manual_seed(0))
        values = weight * f[t]
        error = float(values.std()) / n ** 0.5
        assert abs(float(values.mean()) - exact) < 4 * error, mode
    t, weight = train_recipe.timestep_sampler(schedule, 5.0, "importance")(n, torch.Generator().manual_seed(1))
    assert torch.all(weight == w.mean())
    _, uniform_weight = train_recipe.timestep_sampler(schedule, 5.0, "uniform")(n, torch.Generator().manual_seed(1))
    assert float(uniform_weight.var()) > 0.05  # what importance sampling removes


def test_importance_sampling_draws_timesteps_in_proportion_to_their_weight():
    schedule = shapes_schedule()
    w = train_recipe.min_snr_weight(schedule, torch.arange(schedule.num_timesteps), 5.0)
    t, _ = train_recipe.timestep_sampler(schedule, 5.0, "importance")(200_000, torch.Generator().manual_seed(0))
    seen = torch.bincount(t // 100, minlength=10).double() / len(t)
    expected = (w / w.sum()).reshape(10, 100).sum(dim=1).double()
    assert torch.allclose(seen, expected, atol=0.005)
    assert float(expected[8:].sum()) < 0.01  # the nearly pure-noise end is rarely drawn ...
    assert float(expected[1:4].sum()) > 0.6  # ... the mid-noise steps, where shapes form, most often


def test_an_unknown_timestep_sampling_is_refused():
    schedule = shapes_schedule()
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        train_recipe.timestep_sampler(schedule, 5.0, "logit-normal")


@pytest.mark.parametrize("prediction, floor", [("v", 0.0), ("epsilon", 0.0), ("v", 0.3)])
def test_min_snr_weights_match_diffusers(prediction, floor):
    """The weights both samplers rest on, against diffusers' `compute_snr` and the Min-SNR weighting of its
    train_text_to_image.py example, on the shapes schedule (scaled linear, 0.00085 to 0.02)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    cfg = train_recipe.model_config(prediction=prediction)
    schedule = NoiseSchedule.from_config(cfg)
    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=cfg.linear_end,
                              beta_schedule="scaled_linear",
                              prediction_type="v_prediction" if prediction == "v" else "epsilon")
    t = torch.arange(1000)
    snr = compute_snr(reference, t)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1 if prediction == "v" else snr)
    expected = torch.maximum(expected, torch.full_like(expected, floor))  # --weight-floor
    torch.testing.assert_close(train_recipe.min_snr_weight(schedule, t, 5.0, floor), expected, rtol=1e-4, atol=1e-7)


def test_a_weight_floor_raises_only_the_weights_below_it():
    """`--weight-floor`: Min-SNR weights under the floor become the floor (the high-noise end of the v weights),
    the others stay; the importance sampler then draws the noisy end in proportion to the floor."""
    schedule = shapes_schedule()
    t = torch.arange(schedule.num_timesteps)
    plain, floored = (train_recipe.min_snr_weight(schedule, t, 5.0),
                      train_recipe.min_snr_weight(schedule, t, 5.0, floor=0.3))
    low = plain < 0.3
    assert 0.4 < float(low.double().mean()) < 0.7 and bool(low[-1]) and not bool(low[200])
    assert torch.all(floored[low] == 0.3) and torch.equal(floored[~low], plain[~low])
    draw = train_recipe.timestep_sampler(schedule, 5.0, "importance", floor=0.3)
    draws, _ = draw(200_000, torch.Generator().manual_seed(0))
    expected = float(floored[800:].sum() / floored.sum())
    assert abs(float((draws >= 800).double().mean()) - expected) < 0.005 and expected > 0.1


def test_a_short_context_fixed_heads_and_an_f8_latent_round_trip_through_the_loader(tmp_path):
    """`--context-length 16 --head-channels 16 --vae-ch-mult 1,2,2,2 --latent-channels 16 --unet-ch-mult 1,2,2`:
    the saved file says so (positional embedding rows, latent depth, UNet widths, yaml), loads through
    load_checkpoint with the same shapes, its tokenizer pads every prompt to 16 tokens, and the autoencoder maps
    64x64 images to 8x8x16 latents and back."""
    from imagic.loader import load_checkpoint
    from imagic.export import save_checkpoint
    from imagic.clip import build_text_encoder

    cfg = train_recipe.model_config(head_channels=16, context_length=16, vae_ch_mult=(1, 2, 2, 2),
                                    latent_channels=16, unet_ch_mult=(1, 2, 2))
    torch.manual_seed(0)
    unet, vae, text = UNetModel(cfg.unet), AutoencoderKL(cfg.vae), build_text_encoder(cfg.text)
    model = load_checkpoint(save_checkpoint(tmp_path / "m.safetensors", unet, vae, text, cfg))
    assert model.config.text.context_length == 16 and model.config.unet.num_head_channels == 16
    assert model.config.unet.channel_mult == (1, 2, 2)
    assert (model.config.latent_size, model.config.vae.downsample_factor, model.config.unet.in_channels) == (8, 8, 16)
    ids = model.tokenizer([S.caption("star", "yellow", "black")])
    assert ids.shape == (1, 16)
    torch.testing.assert_close(model.text_encoder(ids), text.eval()(ids))
    x = train_data.images_tensor([S.scene_for_seed(0)])
    z = model.vae.encode(x).mean
    assert z.shape == (1, 16, 8, 8)
    torch.testing.assert_close(model.vae.decode(z), vae.eval().decode(vae.encode(x).mean))
    t = torch.tensor([500])
    torch.testing.assert_close(model.unet(z, t, model.text_encoder(ids)), unet.eval()(z, t, text(ids)))


def test_the_default_recipe_is_the_one_that_made_the_shipped_file():
    """`python weights/shapes/train.py` with no flags reproduces the shipped file: its architecture is the one
    load_checkpoint reads from the shipped yaml, and every setting equals what the shipped run recorded in
    train_summary.json (where the output folders were the run's own)."""
    import json
    from imagic.config import from_ldm_yaml

    defaults = train_cli.parser().parse_args([])
    built, shipped = train_recipe.args_config(defaults), from_ldm_yaml(TRAIN_PY.parent / "shapes.yaml")
    assert (built.unet, built.vae, built.text) == (shipped.unet, shipped.vae, shipped.text)
    assert (built.prediction_type, built.linear_end) == (shipped.prediction_type, shipped.linear_end)
    recorded = json.loads((TRAIN_PY.parent / "train_summary.json").read_text())["args"]
    default_args = {k: str(v) for k, v in vars(defaults).items()}
    for run_specific in ("out", "work"):
        recorded.pop(run_specific), default_args.pop(run_specific)
    assert default_args == recorded


@pytest.mark.parametrize("kind", ["openai", "openclip"])
def test_a_compact_vocabulary_trains_what_the_full_table_trains(kind):
    """`CompactVocabulary` against the reference, training the whole 49,408-row token table: the same AdamW steps
    with the recipe's clipping give the same text encoder in both CLIP layouts, untouched rows included."""
    import copy
    from dataclasses import replace
    from imagic.clip import build_text_encoder
    from imagic.tokenizer import Tokenizer

    cfg = replace(train_recipe.model_config().text, kind=kind)
    tokenizer = Tokenizer.for_text_config(cfg)
    ids = tokenizer(train_data.world_captions()[::15] + [""])
    torch.manual_seed(0)
    full = build_text_encoder(cfg)
    compact = copy.deepcopy(full)
    vocab = train_recipe.CompactVocabulary(compact, tokenizer(train_data.world_captions() + [""]))
    target = torch.randn(len(ids), cfg.context_length, cfg.width, generator=torch.Generator().manual_seed(1))
    for model, inputs in ((full, ids), (compact, vocab.remap(ids))):
        params = list(model.parameters())
        opt = train_recipe.adamw(params, 1e-2)
        for _ in range(5):
            opt.zero_grad(set_to_none=True)
            (model(inputs) - target).pow(2).mean().backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
    expected, got = full.state_dict(), vocab.full(compact).state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    table = next(v for k, v in got.items() if k.endswith("token_embedding.weight"))
    assert table.shape == (cfg.vocab_size, cfg.width)
    assert not torch.allclose(table[vocab.used], vocab.initial[vocab.used])  # the used rows did train
    with pytest.raises(ValueError, match="outside the compact vocabulary"):
        vocab.remap(tokenizer(["a purple hexagon"]))


def test_gradient_l1_is_zero_for_equal_images_and_counts_a_softened_edge():
    """The autoencoder's `--edge-weight` term, against numpy's differences: a step edge blurred over three pixels
    has the same pixel means as the sharp one but a measurable difference in its gradients."""
    sharp = torch.zeros(1, 1, 4, 8)
    sharp[..., 4:] = 1.0
    soft = sharp.clone()
    soft[..., 3], soft[..., 4] = 1 / 3, 2 / 3
    assert train_recipe.gradient_l1(sharp, sharp).item() == 0.0
    a, b = sharp.numpy(), soft.numpy()
    expected = sum(np.abs(np.diff(b, axis=ax) - np.diff(a, axis=ax)).mean() for ax in (-1, -2))
    assert train_recipe.gradient_l1(soft, sharp).item() == pytest.approx(expected) and expected > 0.05


def test_img2img_keeps_shapes_from_low_and_high_strengths():
    """`img2img_shape_kept`, the diagnostic of weights/shapes/README.md, on the shipped model, with each scene's own
    caption: from strength 0.1 the shape survives from the input, from 0.85 the model must draw it from the
    caption. The 4000-step model shipped until issue 30 kept 14/16 from 0.1 and only 3/16 from 0.85 (blobs); the
    16000-step model keeps 15/16 and 14/16 (measured on 2026-12-07)."""
    kept = train_outputs.img2img_shape_kept(TRAIN_PY.parent / "shapes.safetensors", [0.1, 0.85], n=16)
    assert set(kept) == {0.1, 0.85}
    assert kept[0.1] >= 0.75 and kept[0.85] >= 0.75, kept


def test_an_interrupted_run_reuses_only_an_autoencoder_trained_with_the_same_settings(tmp_path):
    """`--stage all` run again after an interruption skips the ~7-minute autoencoder only when --work holds one
    saved with the same deciding arguments; a missing file, an older file without settings, or another seed
    train it again."""
    import argparse
    args = argparse.Namespace(seed=0, procs=2, vae_steps=1100, vae_crop_steps=600, vae_batch=16, vae_lr=1e-3,
                              kl_weight=1e-8, edge_weight=0.0, vae_ch_mult=(1, 2, 2), latent_channels=4,
                              unet_steps=4000)
    vae_file, group = tmp_path / "vae.pt", train_parallel.Group()
    assert not train_stages.vae_done(vae_file, args, group)
    torch.save({"vae": {}, "scale_factor": 1.0, "rows": []}, vae_file)
    assert not train_stages.vae_done(vae_file, args, group)
    torch.save({"vae": {}, "scale_factor": 1.0, "rows": [], "settings": train_stages.vae_settings(args)}, vae_file)
    assert train_stages.vae_done(vae_file, args, group)
    assert train_stages.vae_done(vae_file, argparse.Namespace(**{**vars(args), "unet_steps": 10}), group)
    assert not train_stages.vae_done(vae_file, argparse.Namespace(**{**vars(args), "seed": 1}), group)
    f8 = argparse.Namespace(**{**vars(args), "vae_ch_mult": (1, 2, 2, 2)})
    assert not train_stages.vae_done(vae_file, f8, group)


def _workers_of(launcher: int) -> list:
    """Pids of the mp.spawn workers whose parent is `launcher` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == launcher and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for a parent that no longer reaps it."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads the process table from /proc")
def test_workers_exit_when_their_launcher_is_killed(tmp_path):
    """`exit_with`: a SIGKILLed `train.py` leaves no worker behind to go on training and saving into --work."""
    import os
    import signal
    import subprocess
    import time

    launcher = subprocess.Popen([sys.executable, str(TRAIN_PY), "--work", str(tmp_path), "--out", str(tmp_path / "out"),
                                 "--stage", "vae", "--vae-steps", "100000"], cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.2)
            workers = _workers_of(launcher.pid)
        assert len(workers) == 2, f"the launcher started {workers} (exit status {launcher.poll()})"
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 30
        while any(map(_running, workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in workers if _running(p)], "workers outlived their launcher"
    finally:
        launcher.kill()
        for pid in filter(_running, workers):
            os.kill(pid, signal.SIGKILL)
