"""Noise schedule and samplers against diffusers' DDPMScheduler / DDIMScheduler, plus exact identities."""
from __future__ import annotations

from typing import Optional

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor

from imagic.config import preset
from imagic.samplers import StepOutput, ddim_step, ddim_timesteps, guided_model_output, initial_latents, sdedit_start
from imagic.schedule import NoiseSchedule
from imagic.steps import sample_ddim
from tests.helpers import rel_err

TOL = 1e-5
SHAPE = (2, 4, 8, 8)
CTX_DIM = 16
DIFFUSERS_PRED = {"epsilon": "epsilon", "v": "v_prediction"}
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)


class FakeModel:
    """A deterministic stand-in for the UNet: a fixed random channel mix of x, a function of t, a projection of
    the context. Per-sample (no batch mixing), bounded, and sensitive to each of its inputs."""

    def __init__(self, channels: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.randn(channels, channels, generator=g) / channels ** 0.5
        self.proj = torch.randn(CTX_DIM, channels, generator=g) / CTX_DIM ** 0.5
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        self.calls += 1
        mixed = torch.einsum("dc,bchw->bdhw", self.mix, x)
        time = torch.cos(t.float() / 97.0).view(-1, 1, 1, 1)
        ctx = (context.mean(1) @ self.proj).view(x.shape[0], -1, 1, 1)
        return torch.tanh(mixed + 0.3 * time + 0.5 * ctx)


def _contexts(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE[0], 5, CTX_DIM, generator=g), torch.randn(1, 5, CTX_DIM, generator=g)


def _ddim_ref(prediction_type: str, steps: int) -> DDIMScheduler:
    s = DDIMScheduler(**SD_SCHEDULE, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                      prediction_type=DIFFUSERS_PRED[prediction_type])
    s.set_timesteps(steps)
    return s


# --- schedule ---------------------------------------------------------------------------------------------------

def test_schedule_matches_diffusers_and_float64():
    ours = NoiseSchedule.linear()
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    # diffusers keeps fp32: compare at fp32 precision.
    assert (ours.betas.float() - ref.betas).abs().max() <= 1e-6 * ref.betas.max()
    assert (ours.alphas_cumprod.float() - ref.alphas_cumprod).abs().max() <= 1e-6
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    assert ours.betas.dtype == torch.float64 and ours.alphas_cumprod.dtype == torch.float64
    np.testing.assert_allclose(ours.betas.numpy(), betas, rtol=1e-13)
    np.testing.assert_allclose(ours.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12)


def test_from_config():
    assert NoiseSchedule.from_config(preset("sd1")).prediction_type == "epsilon"
    v = NoiseSchedule.from_config(preset("sd2-v"))
    assert v.prediction_type == "v" and v.num_timesteps == 1000
    with pytest.raises(ValueError):
        NoiseSchedule(v.betas, "v_prediction")  # type: ignore[arg-type]


def test_add_noise_and_velocity_match_diffusers():
    ours, ref = NoiseSchedule.linear(), DDPMScheduler(**SD_SCHEDULE)
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.tensor([3, 917])
    assert rel_err(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t)) <= TOL
    assert rel_err(ours.velocity(x0, noise, t), ref.get_velocity(x0, noise, t)) <= TOL
    half = ours.add_noise(x0.half(), noise.half(), t)
    assert half.dtype == torch.float16 and rel_err(half, ref.add_noise(x0, noise, t)) <= 1e-2


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
def test_training_target_and_x0_eps_roundtrip(prediction_type):
    s = NoiseSchedule.linear(prediction_type=prediction_type)
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.tensor([0, 999])
    target = s.training_target(x0, noise, t)
    expected = noise if prediction_type == "epsilon" else s.velocity(x0, noise, t)
    assert torch.equal(target, expected)
    x0_hat, eps_hat = s.predict_x0_and_eps(target, s.add_noise(x0, noise, t), t)
    assert rel_err(x0_hat, x0) <= 1e-4 and rel_err(eps_hat, noise) <= 1e-5  # x0 at t=999 amplifies by 1/0.07


def test_sample_timesteps():
    s = NoiseSchedule.linear()
    t = s.sample_timesteps(4096, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999 and t.unique().numel() > 900
    assert torch.equal(t, s.sample_timesteps(4096, torch.Generator().manual_seed(0)))


# --- DDIM ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [50, 20, 10, 30, 7])
def test_ddim_timesteps_match_diffusers(steps):
    ours = ddim_timesteps(steps)
    assert torch.equal(ours, _ddim_ref("epsilon", steps).timesteps)
    if 1000 % steps == 0:  # then also LDM's make_ddim_timesteps("uniform") exactly
        assert ours.flip(0).tolist() == [t + 1 for t in range(0, 1000, 1000 // steps)]


def test_ddim_timesteps_rejects_impossible():
    for steps in (0, 1000):
        with pytest.raises(ValueError):
            ddim_timesteps(steps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_trajectory_matches_diffusers(prediction_type, eta):
    steps, schedule, model = 20, NoiseSchedule.linear(prediction_type=prediction_type), FakeModel()
    ref = _ddim_ref(prediction_type, steps)
    context, _ = _contexts()
    g = torch.Generator().manual_seed(5)
    x_ours = x_ref = torch.randn(SHAPE, generator=g)
    timesteps = ddim_timesteps(steps).tolist()
    for i, t in enumerate(timesteps):
        noise = torch.randn(SHAPE, generator=g) if eta > 0 else None
        t_prev = timesteps[i + 1] if i + 1 < steps else -1
        x_ours = ddim_step(schedule, model(x_ours, torch.full((2,), t), context), x_ours, t, t_prev, eta,
                           noise=noise).prev_sample
        x_ref = ref.step(model(x_ref, torch.full((2,), t), context), t, x_ref, eta=eta,
                         variance_noise=noise).prev_sample
        assert rel_err(x_ours, x_ref) <= TOL, (i, t)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sample_ddim_with_guidance_matches_diffusers_loop(prediction_type, eta):
    steps, g_scale, model = 10, 7.5, FakeModel()
    schedule, ref = NoiseSchedule.linear(prediction_type=prediction_type), _ddim_ref(prediction_type, steps)
    context, uncond = _contexts()
    latents = initial_latents(SHAPE, seed=3)
    seen = []
    ours = sample_ddim(model, schedule, latents, context, uncond, steps=steps, guidance_scale=g_scale,
                       ddim_eta=eta, generator=torch.Generator().manual_seed(9), progress=False,
                       callback=lambda i, t, x, x0: seen.append((i, t)))
    assert model.calls == steps and seen == list(enumerate(ddim_timesteps(steps).tolist()))
    # The reference: the diffusers SD pipeline's loop (two model halves, guidance on the output, scheduler.step).
    gen, x = torch.Generator().manual_seed(9), latents
    for t in ref.timesteps:
        tt = torch.full((2,), int(t))
        out_u, out_c = model(x, tt, uncond.expand(2, -1, -1)), model(x, tt, context)
        x = ref.step(out_u + g_scale * (out_c - out_u), t, x, eta=eta, generator=gen if eta > 0 else None).prev_sample
    assert rel_err(ours, x) <= TOL


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
def test_ddim_with_oracle_model_stays_on_the_forward_path(prediction_type):
    """Fed the true noise (or velocity), deterministic DDIM lands exactly on q(x_{t_prev} | x0, eps)."""
    schedule = NoiseSchedule.linear(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(11)
    x0, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)

    def oracle(x, t, context):
        return schedule.training_target(x0, eps, t)

    for t, t_prev in [(999, 0), (981, 961), (500, 37), (1, -1), (250, 249)]:
        step = ddim_step(schedule, oracle(None, torch.tensor(t), None), schedule.add_noise(x0, eps, t), t, t_prev)
        expected = schedule.add_noise(x0, eps, max(t_prev, 0))  # t_prev < 0: the LDM final alpha abar[0]
        assert rel_err(step.prev_sample, expected) <= TOL and rel_err(step.pred_x0, x0) <= 1e-4

    steps = 25
    start = schedule.add_noise(x0, eps, int(ddim_timesteps(steps)[0]))
    x0_preds = []
    out = sample_ddim(oracle, schedule, start, torch.zeros(1, 1, 1), None, steps=steps, guidance_scale=1.0,
                      ddim_eta=0.0, progress=False, callback=lambda i, t, x, x0_hat: x0_preds.append(x0_hat))
    assert rel_err(x0_preds[-1], x0) <= TOL
    # The last DDIM step lands on abar[0] (LDM convention), i.e. x0 plus sqrt(1 - abar[0]) ~ 0.03 of the noise.
    assert rel_err(out, schedule.add_noise(x0, eps, 0)) <= TOL


def test_sdedit_start_matches_diffusers_img2img():
    steps, strength = 50, 0.6
    schedule, ref, model = NoiseSchedule.linear(), _ddim_ref("epsilon", steps), FakeModel()
    context, uncond = _contexts()
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    x_t, start = sdedit_start(schedule, x0, strength, steps, noise)
    # diffusers StableDiffusionImg2ImgPipeline.get_timesteps / prepare_latents
    t_start = max(steps - min(int(steps * strength), steps), 0)
    timesteps = ref.timesteps[t_start:]
    x = ref.add_noise(x0, noise, timesteps[:1])
    assert start == t_start and rel_err(x_t, x) <= TOL
    ours = sample_ddim(model, schedule, x_t, context, uncond, steps=steps, guidance_scale=3.0, ddim_eta=0.0,
                       progress=False, start_step=start)
    assert model.calls == len(timesteps)
    for t in timesteps:
        tt = torch.full((2,), int(t))
        out_u, out_c = model(x, tt, uncond.expand(2, -1, -1)), model(x, tt, context)
        x = ref.step(out_u + 3.0 * (out_c - out_u), t, x).prev_sample
    assert rel_err(ours, x) <= TOL
    same, none_left = sdedit_start(schedule, x0, 0.0, steps, noise)
    assert same is x0 and none_left == steps
    with pytest.raises(ValueError):
        sdedit_start(schedule, x0, 1.5, steps, noise)


# --- DDPM ---------------------------------------------------------------------------------------------------------

def _ddpm_ref(prediction_type: str, schedule: Optional[NoiseSchedule] = None) -> DDPMScheduler:
    ref = DDPMScheduler(**SD_SCHEDULE, variance_type="fixed_small", prediction_type=DIFFUSERS_PRED[prediction_type])
    if schedule is not None:
        # diffusers takes beta_t = 1 - abar_t / abar_prev from fp32 alphas, which cancels at small t (2.7e-5 off
        # at t = 1); we take these scalars in float64. Given float64 alphas (0-d tensors), diffusers does the same
        # while the tensors (and its noise draws) stay fp32.
        ref.alphas_cumprod, ref.one = schedule.alphas_cumprod, torch.tensor(1.0, dtype=torch.float64)
    return ref


def ddpm_step(schedule: NoiseSchedule, model_output: Tensor, x: Tensor, t: int, t_prev: Optional[int] = None,
              noise: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> StepOutput:
    """One ancestral step from the DDPM posterior q(x_{t_prev} | x_t, x0) with its own ("fixed small") variance
    (ldm/models/diffusion/ddpm.py `q_posterior`, `p_sample`); `t_prev` defaults to t - 1, and a larger stride
    uses beta = 1 - abar_t / abar_prev as diffusers' DDPMScheduler does. No noise at t = 0. No sampler of the
    library takes it: it lives here to check the schedule's posterior against diffusers' DDPMScheduler.
    """
    t_prev = t - 1 if t_prev is None else t_prev
    abar = schedule.alphas_cumprod
    a_t = abar[t].item()
    a_prev = abar[t_prev].item() if t_prev >= 0 else 1.0
    beta = 1 - a_t / a_prev
    x0, _ = schedule.predict_x0_and_eps(model_output.float(), x.float(), t)
    mean = (a_prev ** 0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x.float()
    if t > 0:
        variance = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)  # the original clips the log-variance at 1e-20
        z = noise if noise is not None else torch.randn(x.shape, generator=generator, dtype=x.dtype)
        mean = mean + variance ** 0.5 * z.float()
    return StepOutput(mean.to(x.dtype), x0.to(x.dtype))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v"])
def test_ddpm_step_matches_diffusers(prediction_type):
    schedule, model = NoiseSchedule.linear(prediction_type=prediction_type), FakeModel()
    ref, ref_fp32 = _ddpm_ref(prediction_type, schedule), _ddpm_ref(prediction_type)
    context, _ = _contexts()
    x = torch.randn(SHAPE)
    for t in (999, 500, 1, 0):
        out = model(x, torch.full((2,), t), context)
        expected = ref.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        seeded = ddpm_step(schedule, out, x, t, generator=torch.Generator().manual_seed(t)).prev_sample
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t))
        explicit = ddpm_step(schedule, out, x, t, noise=noise).prev_sample
        assert rel_err(seeded, expected) <= TOL and rel_err(explicit, expected) <= TOL, t
        as_is = ref_fp32.step(out, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        assert rel_err(seeded, as_is) <= 1e-4, t
    # Strided DDPM (diffusers' set_timesteps): beta = 1 - abar_t / abar_prev over the stride.
    ref.set_timesteps(20)
    ts = ref.timesteps.tolist()
    for i in (0, 10, len(ts) - 1):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        out = model(x, torch.full((2,), ts[i]), context)
        expected = ref.step(out, ts[i], x, generator=torch.Generator().manual_seed(i)).prev_sample
        ours = ddpm_step(schedule, out, x, ts[i], t_prev, generator=torch.Generator().manual_seed(i)).prev_sample
        assert rel_err(ours, expected) <= TOL, ts[i]


# --- guidance and latents -----------------------------------------------------------------------------------------

def test_cfg_scale_one_is_the_conditional_model():
    model, (context, _uncond), x = FakeModel(), _contexts(), torch.randn(SHAPE)
    out = guided_model_output(model, x, 500, context, None, 1.0)
    assert model.calls == 1 and torch.equal(out, model(x, torch.full((2,), 500), context))


def test_cfg_batched_equals_two_calls():
    model, (context, uncond), x = FakeModel(), _contexts(), torch.randn(SHAPE)
    t = torch.tensor([10, 700])
    out = guided_model_output(model, x, t, context, uncond, 7.5)
    assert model.calls == 1
    u, c = model(x, t, uncond.expand(2, -1, -1)), model(x, t, context)
    assert rel_err(out, u + 7.5 * (c - u)) <= TOL
    assert rel_err(out, c) > 1e-2  # guidance did something
    with pytest.raises(ValueError):
        guided_model_output(model, x, t, context, None, 7.5)


def test_cfg_shares_a_single_context_across_the_batch():
    model, (context, uncond), x = FakeModel(), _contexts(), torch.randn(SHAPE)
    one = guided_model_output(model, x, 300, context[:1], uncond, 5.0)
    expanded = guided_model_output(model, x, 300, context[:1].expand(2, -1, -1), uncond.expand(2, -1, -1), 5.0)
    assert torch.equal(one, expanded)


def test_initial_latents_seeded():
    a, b = initial_latents(SHAPE, seed=42), initial_latents(SHAPE, seed=42)
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert not torch.allclose(a, initial_latents(SHAPE, seed=43))
    half = initial_latents(SHAPE, seed=42, dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, a.half())


def test_initial_latents_match_diffusers_randn_tensor_with_a_cpu_generator():
    """Seeded like diffusers pipelines given a CPU generator, so a seed means the same start on CPU and GPU."""
    from diffusers.utils.torch_utils import randn_tensor

    shape = (1, 4, 8, 8)
    ours = initial_latents(shape, seed=1234)
    theirs = randn_tensor(shape, generator=torch.Generator().manual_seed(1234), dtype=torch.float32)
    assert torch.equal(ours, theirs)
