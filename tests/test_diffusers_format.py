"""Diffusers model folders: a tiny SD1 / SD2 saved as a diffusers pipeline by diffusers itself (its single-file
converters turn our LDM-named weights into UNet2DConditionModel / AutoencoderKL / CLIPTextModel, then
`save_pretrained`) must load through `imagic.diffusers_format` into the same model as the single file: same config,
same weights, same outputs. The structural renaming is also checked against diffusers' converter on the full-size
SD 1.x and 2.x key sets (meta device, no memory)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict

import pytest
import torch

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_open_clip_checkpoint,
    create_unet_diffusers_config_from_ldm, create_vae_diffusers_config_from_ldm)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from imagic import detect as D
from imagic.checkpoint import CheckpointError
from imagic.config import ModelConfig, preset, to_ldm_yaml
from imagic.diffusers_format import (
    diffusers_key, is_diffusers_folder, load_diffusers_folder, unet_paths, vae_paths)
from imagic.export import ldm_state_dict
from imagic.assemble import StableDiffusion
from imagic.loader import load_checkpoint
from imagic.tokenizer import load_bpe
from imagic.unet import UNetModel
from imagic.vae import AutoencoderKL as OurVAE
from tests.tiny import write_tiny_checkpoint

PROMPTS = ["a photo of a dog", "A CAT, painted by van Gogh!"]


# --- writing a diffusers folder with diffusers' own code -------------------------------------------------------

def clip_tokenizer(folder: Path, pad: str) -> CLIPTokenizer:
    """transformers' CLIPTokenizer on CLIP's BPE files (written from the vocabulary open_clip ships)."""
    encoder, ranks = load_bpe()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(encoder))
    merges = sorted(ranks, key=ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad, model_max_length=77)


def diffusers_text_encoder(model: StableDiffusion, ckpt: Dict[str, torch.Tensor]) -> CLIPTextModel:
    """SD1: the HF names as they are. SD2: diffusers' OpenCLIP converter, keeping all but the last layer (diffusers
    drops `resblocks.23` of the real 24-layer tower, i.e. the last one) and no text projection (CLIPTextModel has
    none)."""
    t = model.config.text
    sd2 = t.kind == "openclip"
    layers = t.layers - 1 if sd2 else t.layers
    hf = CLIPTextModel(CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_width,
                                      num_hidden_layers=layers, num_attention_heads=t.heads,
                                      max_position_embeddings=t.context_length, hidden_act=t.act,
                                      layer_norm_eps=1e-5, projection_dim=t.projection_dim))
    if sd2:
        state = convert_open_clip_checkpoint(hf, ckpt)
        state = {k: v for k, v in state.items()
                 if f"layers.{t.layers - 1}." not in k and not k.startswith("text_projection")}
    else:
        state = convert_ldm_clip_checkpoint(ckpt)
    hf.load_state_dict({k.removeprefix("text_model."): v for k, v in state.items()}, strict=True)
    return hf.eval()


def diffusers_pipeline(model: StableDiffusion, tokenizer_dir: Path) -> StableDiffusionPipeline:
    cfg = model.config
    ckpt = ldm_state_dict(model.unet, model.vae, model.text_encoder, cfg)
    yaml = to_ldm_yaml(cfg)
    unet_cfg = {**create_unet_diffusers_config_from_ldm(yaml, ckpt), "sample_size": cfg.latent_size}
    unet = UNet2DConditionModel(**unet_cfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, unet_cfg), strict=True)
    vae_cfg = {**create_vae_diffusers_config_from_ldm(yaml, ckpt), "sample_size": cfg.image_size}
    vae = AutoencoderKL(**vae_cfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, vae_cfg), strict=True)
    scheduler = DDIMScheduler(beta_start=cfg.linear_start, beta_end=cfg.linear_end, beta_schedule="scaled_linear",
                              num_train_timesteps=cfg.timesteps, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1,
                              prediction_type="v_prediction" if cfg.prediction_type == "v" else "epsilon")
    pad = "!" if cfg.text.kind == "openclip" else "<|endoftext|>"
    return StableDiffusionPipeline(vae=vae.eval(), text_encoder=diffusers_text_encoder(model, ckpt),
                                   tokenizer=clip_tokenizer(tokenizer_dir, pad), unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.fixture(scope="module", params=["sd1", "sd2-v"])
def pair(request, tmp_path_factory):
    """(model from the single file, diffusers pipeline, the folder it was saved to)."""
    tmp = tmp_path_factory.mktemp(request.param)
    single = load_checkpoint(write_tiny_checkpoint(tmp / "tiny.safetensors", request.param))
    pipe = diffusers_pipeline(single, tmp / "vocab")
    pipe.save_pretrained(tmp / "folder")
    return single, pipe, tmp / "folder"


def inputs(cfg: ModelConfig):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.unet.in_channels, cfg.latent_size, cfg.latent_size, generator=g)
    ctx = torch.randn(2, 5, cfg.unet.context_dim, generator=g)
    img = torch.rand(1, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    return x, torch.tensor([10, 981]), ctx, img


def assert_same_model(a: StableDiffusion, b: StableDiffusion) -> None:
    x, t, ctx, img = inputs(a.config)
    with torch.no_grad():
        assert torch.equal(a.unet(x, t, ctx), b.unet(x, t, ctx))
        assert torch.equal(a.vae.encode(img).mean, b.vae.encode(img).mean)
        assert torch.equal(a.vae.decode(x[:1]), b.vae.decode(x[:1]))
        ids_a, ids_b = a.tokenizer(PROMPTS), b.tokenizer(PROMPTS)
        assert torch.equal(ids_a, ids_b)
        out_a, out_b = a.text_encoder(ids_a), b.text_encoder(ids_b)
        assert (out_a - out_b).abs().max() <= 1e-6 * out_a.std(), (out_a - out_b).abs().max()


# --- tests -----------------------------------------------------------------------------------------------------

def test_folder_loads_as_the_single_file(pair):
    single, _, folder = pair
    assert is_diffusers_folder(folder) and not is_diffusers_folder(folder / "unet")
    loaded = load_diffusers_folder(folder)
    a, b = single.config, loaded.config
    assert (b.family, b.prediction_type, b.image_size, b.scale_factor) == (a.family, a.prediction_type,
                                                                            a.image_size, a.scale_factor)
    assert (b.linear_start, b.linear_end, b.timesteps) == (a.linear_start, a.linear_end, a.timesteps)
    assert b.unet == a.unet and b.vae == dataclasses.replace(a.vae, resolution=b.vae.resolution)
    if a.text.kind == "openclip":  # the penultimate layer of N is the last of the N - 1 stored ones
        assert (b.text.layers, b.text.layer) == (a.text.layers - 1, "last")
    else:
        assert b.text == a.text
    for part in ("unet", "vae"):
        sa, sb = getattr(single, part).state_dict(), getattr(loaded, part).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), part
    assert_same_model(single, loaded)


def test_tokenizer_pads_like_the_folders_tokenizer(pair):
    """Our ids equal transformers' CLIPTokenizer saved in the folder (SD2 pads with "!" = 0, SD1 with 49407)."""
    _, _, folder = pair
    theirs = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    # Without "!": SD2's transformers tokenizer, whose pad token is "!", also turns a "!" in the prompt into the
    # pad id 0, where OpenCLIP's tokenizer (SD2's own, and ours) gives "!</w>" = 256.
    prompts = [p.replace("!", ".") for p in PROMPTS]
    ref = theirs(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(load_diffusers_folder(folder).tokenizer(prompts), ref)


def test_outputs_match_the_diffusers_pipeline(pair):
    """The loaded modules against the diffusers modules they came from (different code, same weights)."""
    from tests.helpers import rel_err

    _, pipe, folder = pair
    ours = load_diffusers_folder(folder)
    x, t, ctx, img = inputs(ours.config)
    with torch.no_grad():
        assert rel_err(ours.unet(x, t, ctx), pipe.unet(x, t, encoder_hidden_states=ctx).sample) < 1e-4
        assert rel_err(ours.vae.decode(x[:1]), pipe.vae.decode(x[:1]).sample) < 1e-4
        ids = ours.tokenizer(PROMPTS)
        assert rel_err(ours.text_encoder(ids), pipe.text_encoder(ids).last_hidden_state) < 1e-4


def test_bin_weights_fp16_dtype_and_load_checkpoint(pair, tmp_path):
    """`.bin` files (torch.load with weights_only=True), and the folder through `load_checkpoint` itself."""
    single, pipe, _ = pair
    pipe.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "unet" / "diffusion_pytorch_model.bin").is_file()
    loaded = load_checkpoint(tmp_path / "bin", dtype=torch.float16)
    assert next(loaded.unet.parameters()).dtype == torch.float16
    assert next(loaded.vae.parameters()).dtype == torch.float32
    assert loaded.path == tmp_path / "bin"
    assert_same_model(single, load_checkpoint(tmp_path / "bin"))


def test_editor_runs_from_a_folder(pair):
    from imagic.editor import Editor

    _, _, folder = pair
    editor = Editor.from_checkpoint(folder, device="cpu", progress=False)
    run = editor.fit(torch.zeros(1, 3, 8, 8), "a photo", embed_steps=2, finetune_steps=2)
    assert len(editor.sample(run, alpha=1.0, steps=2).images) == 1


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_renaming_is_the_inverse_of_diffusers_converter_at_full_size(family: str):
    """Every full-size SD key maps to the key diffusers' converter gives it, with a reshape only where diffusers'
    converter changes the shape (the VAE's mid-attention 1x1 convs)."""
    cfg = preset(family)
    yaml = to_ldm_yaml(cfg)
    with torch.device("meta"):
        parts = {"unet": (UNetModel(cfg.unet), D.UNET, unet_paths(cfg.unet)),
                 "vae": (OurVAE(cfg.vae), D.VAE, vae_paths(cfg.vae))}
    for name, (module, prefix, paths) in parts.items():
        ours = {prefix + k: v for k, v in module.state_dict().items()}
        if name == "unet":
            theirs = convert_ldm_unet_checkpoint(ours, create_unet_diffusers_config_from_ldm(yaml, ours))
        else:
            theirs = convert_ldm_vae_checkpoint(ours, create_vae_diffusers_config_from_ldm(yaml, ours))
        mapped = {diffusers_key(k.removeprefix(prefix), paths): v.shape for k, v in ours.items()}
        assert mapped.keys() == theirs.keys(), sorted(set(mapped) ^ set(theirs))[:10]
        reshaped = [k for k in mapped if mapped[k] != theirs[k].shape]
        assert all(mapped[k].numel() == theirs[k].numel() for k in reshaped)
        assert all(".mid_block.attentions.0.to_" in k for k in reshaped), reshaped


def test_refusals(pair, tmp_path):
    _, _, folder = pair
    with pytest.raises(CheckpointError, match="not a diffusers model folder"):
        load_diffusers_folder(tmp_path)
    bad = tmp_path / "sdxl"
    bad.mkdir()
    (bad / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
         "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}))
    with pytest.raises(CheckpointError, match="text_encoder_2"):
        load_diffusers_folder(bad)
    # A config that disagrees with the weights names what is missing.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    conf = json.loads((broken / "unet" / "config.json").read_text())
    conf["layers_per_block"] = 2
    (broken / "unet" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="missing"):
        load_diffusers_folder(broken)
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (broken / "scheduler" / "scheduler_config.json").write_text(json.dumps({**sched, "beta_schedule": "linear"}))
    with pytest.raises(CheckpointError, match="scaled_linear"):
        load_diffusers_folder(broken)
