"""The VAE against diffusers' AutoencoderKL, loaded through diffusers' own LDM single-file converter."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from imagic.config import ModelConfig, VAEConfig, preset, to_ldm_yaml
from imagic.vae import AutoencoderKL, decode_latents, encode_latents
from tests.helpers import randomize_, rel_err

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm)

PREFIX = "first_stage_model."
SMALL = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4, attn_resolutions=(),
                  resolution=32)


def _diffusers_vae(cfg: VAEConfig, state: dict, device: str = "cpu"):
    """A diffusers AutoencoderKL configured and loaded from our LDM-named tensors by diffusers' converter."""
    ldm = {PREFIX + k: v for k, v in state.items()}
    yaml_dict = to_ldm_yaml(dataclasses.replace(ModelConfig(), vae=cfg))
    config = create_vae_diffusers_config_from_ldm(yaml_dict, ldm)
    with torch.device(device):
        ref = diffusers.AutoencoderKL(**config)
    return ref, convert_ldm_vae_checkpoint(ldm, config)


@pytest.fixture(scope="module")
def pair():
    ours = randomize_(AutoencoderKL(SMALL), seed=1).eval()
    ref, converted = _diffusers_vae(SMALL, ours.state_dict())
    ref.load_state_dict(converted, strict=True)
    return ours, ref.eval()


# Low-contrast inputs make the GroupNorm eps (1e-6, not torch's 1e-5) visible: at full contrast it is not.
CONTRAST = pytest.mark.parametrize("contrast", [1.0, 0.1])


@CONTRAST
@torch.no_grad()
def test_encoder_matches_diffusers(pair, contrast):
    ours, ref = pair
    x = (torch.rand(1, 3, 32, 32) * 2 - 1) * contrast
    post, ref_post = ours.encode(x), ref.encode(x).latent_dist
    assert post.mean.shape == (1, 4, 16, 16)
    assert rel_err(post.mean, ref_post.mean) <= 1e-4
    assert rel_err(post.logvar, ref_post.logvar) <= 1e-4


@CONTRAST
@torch.no_grad()
def test_decoder_matches_diffusers(pair, contrast):
    ours, ref = pair
    z = torch.randn(1, 4, 16, 16) * contrast
    out, ref_out = ours.decode(z), ref.decode(z).sample
    assert out.shape == (1, 3, 32, 32)
    assert rel_err(out, ref_out) <= 1e-4


@torch.no_grad()
def test_seeded_sample_and_latent_helpers(pair):
    ours, _ = pair
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    post = ours.encode(x)
    noise = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(7))
    sample = post.sample(torch.Generator().manual_seed(7))
    torch.testing.assert_close(sample, post.mean + post.std * noise)
    assert not torch.equal(sample, post.mode())
    scale = 0.18215
    lat = encode_latents(ours, x, scale, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(lat, sample * scale)
    torch.testing.assert_close(encode_latents(ours, x, scale, sample=False), post.mean * scale)
    torch.testing.assert_close(decode_latents(ours, lat, scale), ours.decode(sample))


@torch.no_grad()
def test_half_inputs_run_in_vae_dtype(pair):
    ours, _ = pair
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    post = ours.encode(x.half())
    assert post.mean.dtype == torch.float32
    assert ours.decode(post.mean.bfloat16()).dtype == torch.float32


def test_full_size_keys_and_shapes_match_diffusers():
    cfg = preset("sd1").vae
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
    state = ours.state_dict()
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863
    # The original stores the decoder levels in resolution order: up.0 is full size (128 channels).
    assert state["decoder.up.0.block.0.conv1.weight"].shape == (128, 256, 3, 3)
    assert state["decoder.up.3.block.0.conv1.weight"].shape == (512, 512, 3, 3)
    ref, converted = _diffusers_vae(cfg, state, device="meta")
    ref_state = ref.state_dict()
    assert set(converted) == set(ref_state)
    # The converter already turns the mid-attention 1x1 conv weights (C, C, 1, 1) into Linear (C, C) ones.
    mismatched = [k for k in ref_state if converted[k].shape != ref_state[k].shape]
    assert not mismatched, mismatched
    assert state["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert ref_state["encoder.mid_block.attentions.0.to_q.weight"].shape == (512, 512)


def test_gradients_reach_the_input():
    cfg = VAEConfig(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), resolution=8)
    vae = randomize_(AutoencoderKL(cfg), seed=2)
    x = (torch.rand(1, 3, 8, 8) * 2 - 1).requires_grad_()
    vae.decode(vae.encode(x).mean).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in vae.parameters())
