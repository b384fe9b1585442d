"""SDXL's models against code we did not write: the UNet (per-level transformer depth, `label_emb` vector
conditioning) against diffusers' UNet2DConditionModel with weights converted by diffusers' own single-file code;
the CLIP-L hidden state against transformers; the bigG context and pooled vector against open_clip and diffusers'
`text_encoder_2` conversion; the size/crop embedding against diffusers' `add_time_proj`; full-size key and shape
sets on the meta device; the original sd_xl_base.yaml read into our preset.

Tolerance: max |diff| <= 1e-4 x the reference's std (tests/helpers.py rel_err), as in the rest of the suite: fp32
rounding differences between two implementations of the same maths are ~1e-6 of the output's scale here.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, List, Tuple

import open_clip
import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    CHECKPOINT_KEY_NAMES, convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_open_clip_checkpoint,
    create_unet_diffusers_config_from_ldm)
from diffusers.models.embeddings import Timesteps
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from imagic import detect as D
from imagic.checkpoint import CheckpointError
from imagic.config import (ConfigError, ModelConfig, TextConfig, UNetConfig, from_ldm_yaml, preset,
                           to_ldm_yaml)
from imagic.export import ldm_state_dict as file_state_dict
from imagic.export import save_checkpoint
from imagic.loader import inspect_checkpoint, load_checkpoint
from imagic.sdxl import Conditioner, size_embedding
from imagic.tokenizer import Tokenizer
from imagic.unet import UNetModel
from imagic.vae import AutoencoderKL
from tests.helpers import randomize_, rel_err
from tests.tiny import tiny_config

TOL = 1e-4
PREFIX = "model.diffusion_model."
PROMPTS = ["a photo of a dog sitting on a bench", "", "A CAT, painted by van Gogh!"]

# Stability-AI/generative-models configs/inference/sd_xl_base.yaml (the parts that give sizes; the rest is
# loss, autocast and attention-backend settings).
SD_XL_BASE_YAML = """
model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    disable_first_stage_autocast: True
    denoiser_config:
      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser
      params:
        num_idx: 1000
        scaling_config:
          target: sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling
        discretization_config:
          target: sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: 2816
        num_classes: sequential
        use_checkpoint: True
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [4, 2]
        num_res_blocks: 2
        channel_mult: [1, 2, 4]
        num_head_channels: 64
        use_linear_in_transformer: True
        transformer_depth: [1, 2, 10]
        context_dim: 2048
        spatial_transformer_attn_type: softmax-xformers
    conditioner_config:
      target: sgm.modules.GeneralConditioner
      params:
        emb_models:
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenCLIPEmbedder
            params:
              layer: hidden
              layer_idx: 11
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2
            params:
              arch: ViT-bigG-14
              version: laion2b_s39b_b160k
              freeze: True
              layer: penultimate
              always_return_pooled: True
              legacy: False
          - is_trainable: False
            input_key: original_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
          - is_trainable: False
            input_key: crop_coords_top_left
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
          - is_trainable: False
            input_key: target_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
    first_stage_config:
      target: sgm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          attn_type: vanilla-xformers
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [1, 2, 4, 4]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
"""

SMALL_TEXT = dict(width=64, layers=3, heads=4, mlp_width=128)


def small_sdxl(widths: Tuple[int, int], pooled: int, size_dim: int) -> ModelConfig:
    """SDXL's structure at small widths: three levels, no attention at the first, a different transformer depth
    at each of the others (the middle block takes the last level's), 16-channel heads, linear projections;
    text towers of widths[0] and widths[1] (the context is both), a pooled vector of `pooled`."""
    context_dim = sum(widths)
    unet = UNetConfig(model_channels=32, channel_mult=(1, 2, 4), attention_resolutions=(4, 2), num_res_blocks=2,
                      num_heads=-1, num_head_channels=16, transformer_depth=(1, 2, 3), context_dim=context_dim,
                      use_linear_in_transformer=True, num_classes="sequential", adm_in_channels=pooled + 6 * size_dim)
    text2 = TextConfig(kind="openclip", act="gelu", layer="penultimate", final_norm=False, projection_dim=pooled,
                       **dict(SMALL_TEXT, width=widths[1]))
    text = TextConfig(kind="openai", layer="penultimate", final_norm=False, **dict(SMALL_TEXT, width=widths[0]))
    # image_size: sgm yamls hold no resolution, so an SDXL-structured model reads back as SDXL's 1024.
    return ModelConfig(family="sdxl", scale_factor=0.13025, image_size=1024, unet=unet, text=text, text2=text2)


def ldm_state_dict(model: UNetModel) -> Dict[str, torch.Tensor]:
    return {PREFIX + k: v for k, v in model.state_dict().items()}


def diffusers_config(cfg: ModelConfig, ckpt: Dict[str, torch.Tensor]) -> dict:
    """diffusers' own UNet config for our yaml. Its single-file code recognises SDXL only by context_dim 2048 or
    1280 and then fixes the size-embedding width at 256; at other widths it would read `num_classes: sequential`
    as a class projection, so there the SDXL settings are given as the SDXL config has them."""
    config = create_unet_diffusers_config_from_ldm(to_ldm_yaml(cfg), ckpt)
    if cfg.unet.context_dim not in (2048, 1280):
        config.update(class_embed_type=None, addition_embed_type="text_time",
                      addition_time_embed_dim=cfg.size_embed_dim)
    assert config["addition_embed_type"] == "text_time"
    assert config["transformer_layers_per_block"] == list(cfg.unet.transformer_depth)  # type: ignore[arg-type]
    return config


def diffusers_twin(model: UNetModel, cfg: ModelConfig) -> UNet2DConditionModel:
    ckpt = ldm_state_dict(model)
    config = diffusers_config(cfg, ckpt)
    converted = convert_ldm_unet_checkpoint(ckpt, config)
    ref = UNet2DConditionModel(**config)
    ref.load_state_dict(converted, strict=True)
    return ref.eval()


def time_ids(batch: int) -> torch.Tensor:
    """(original h, w, crop top, left, target h, w) per row, as SDXL's pipeline builds `add_time_ids`."""
    rows = [[1024.0, 768.0, 0.0, 128.0, 1024.0, 1024.0], [512.0, 512.0, 37.0, 0.0, 1024.0, 1024.0]]
    return torch.tensor(rows[:batch])


# --- config: the original yaml, round trips, refusals ----------------------------------------------------------

def test_sd_xl_base_yaml_is_the_preset():
    cfg = from_ldm_yaml(yaml.safe_load(SD_XL_BASE_YAML))
    expected = preset("sdxl")
    assert cfg.unet.use_checkpoint  # the yaml asks for gradient checkpointing; the preset leaves it to the user
    assert dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, use_checkpoint=False)) == expected
    assert (cfg.family, cfg.image_size, cfg.latent_size, cfg.size_embed_dim) == ("sdxl", 1024, 128, 256)


@pytest.mark.parametrize("cfg", [preset("sdxl"), small_sdxl((16, 32), 16, 8)], ids=["sdxl", "small"])
def test_sdxl_yaml_round_trip(cfg: ModelConfig):
    doc = to_ldm_yaml(cfg)
    assert doc["model"]["target"] == "sgm.models.diffusion.DiffusionEngine"
    assert from_ldm_yaml(yaml.safe_load(yaml.safe_dump(doc))) == cfg


def test_sd1_and_sd2_yamls_have_no_sdxl_keys():
    for name in ("sd1", "sd2-v"):
        doc = to_ldm_yaml(preset(name))
        unet = doc["model"]["params"]["unet_config"]["params"]
        assert "num_classes" not in unet and "adm_in_channels" not in unet and unet["transformer_depth"] == 1
        assert from_ldm_yaml(doc) == preset(name)


def _edited(edit) -> dict:
    doc = yaml.safe_load(SD_XL_BASE_YAML)
    edit(doc["model"]["params"])
    return doc


@pytest.mark.parametrize("edit,message", [
    (lambda p: p["network_config"]["params"].update(transformer_depth=[1, 2]), "one depth per level"),
    (lambda p: p["network_config"]["params"].update(adm_in_channels=2560), "adm_in_channels 2560"),
    (lambda p: p["network_config"]["params"].update(num_classes=1000), "num_classes 1000"),
    (lambda p: p["network_config"]["params"].update(context_dim=1280), "768 \\+ 1280"),
    (lambda p: p["conditioner_config"]["params"]["emb_models"].pop(0), "1 text models"),
    (lambda p: p["conditioner_config"]["params"]["emb_models"][1]["params"].update(always_return_pooled=False),
     "pooled"),
    (lambda p: p["conditioner_config"]["params"]["emb_models"][0]["params"].update(layer_idx=5), "layer_idx 5"),
    (lambda p: p["denoiser_config"]["params"].update(
        scaling_config={"target": "sgm.modules.diffusionmodules.denoiser_scaling.EDMScaling"}), "EDMScaling"),
], ids=["depth-length", "adm", "class-labels", "context", "one-tower", "no-pooled", "layer-idx", "edm"])
def test_sdxl_yaml_refusals(edit, message: str):
    with pytest.raises(ConfigError, match=message) as e:
        from_ldm_yaml(_edited(edit))
    assert "\n" not in str(e.value)


def _paths(doc: Any, prefix: tuple = ()) -> List[tuple]:
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    return [p for k, v in items for p in [prefix + (k,)] + _paths(v, prefix + (k,))]


def test_mutated_sdxl_yaml_gives_a_config_or_one_line_config_error():
    """Every node of sd_xl_base.yaml replaced by each of a few hostile values, or deleted: the reader returns a
    validated config or raises ConfigError with a one-line message, nothing else."""
    base = yaml.safe_load(SD_XL_BASE_YAML)
    outcomes = {"config": 0, "error": 0}
    for path in _paths(base):
        for value in (None, -1, 0, "x", [], {}, True, 1.5, [1, 2, 0], "delete"):
            doc = copy.deepcopy(base)
            node = doc
            for key in path[:-1]:
                node = node[key]
            if value == "delete":
                if not isinstance(node, dict):
                    continue
                del node[path[-1]]
            else:
                node[path[-1]] = value
            try:
                from_ldm_yaml(doc)
                outcomes["config"] += 1
            except ConfigError as e:
                assert "\n" not in str(e), (path, value, str(e))
                outcomes["error"] += 1
    assert outcomes["config"] > 50 and outcomes["error"] > 500, outcomes  # both kinds really occur


# --- UNet parity at small widths -----------------------------------------------------------------------------

@pytest.mark.parametrize("widths,pooled,size_dim", [((768, 1280), 32, 256), ((16, 32), 16, 8)],
                         ids=["sdxl-context", "any-width"])
def test_unet_matches_diffusers(widths: Tuple[int, int], pooled: int, size_dim: int):
    cfg = small_sdxl(widths, pooled, size_dim)
    context_dim = cfg.unet.context_dim
    ours = randomize_(UNetModel(cfg.unet)).eval()
    ref = diffusers_twin(ours, cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 981])
    ctx = torch.randn(2, 7, context_dim, generator=g)
    text_embeds = torch.randn(2, pooled, generator=g)
    ids = time_ids(2)
    ctx_ours, ctx_ref = ctx.clone().requires_grad_(True), ctx.clone().requires_grad_(True)
    pooled_ours, pooled_ref = text_embeds.clone().requires_grad_(True), text_embeds.clone().requires_grad_(True)

    y = torch.cat([pooled_ours, size_embedding(ids, size_dim)], dim=1)  # what Conditioner.vector builds
    out = ours(x, t, ctx_ours, y)
    expected = ref(x, t, encoder_hidden_states=ctx_ref,
                   added_cond_kwargs={"text_embeds": pooled_ref, "time_ids": ids}).sample
    assert rel_err(out, expected) <= TOL
    # y really matters: another size conditioning moves the output far beyond the tolerance.
    with torch.no_grad():
        other = ours(x, t, ctx, torch.cat([text_embeds, size_embedding(ids.flip(0), size_dim)], dim=1))
    assert rel_err(other, expected) > 100 * TOL

    # Imagic differentiates the loss w.r.t. the context and the pooled vector: same upstream gradient.
    upstream = torch.randn(out.shape, generator=g)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    assert rel_err(ctx_ours.grad, ctx_ref.grad) <= TOL
    assert rel_err(pooled_ours.grad, pooled_ref.grad) <= TOL


def test_y_is_required_exactly_when_the_unet_is_vector_conditioned():
    xl = UNetModel(small_sdxl((16, 32), 16, 8).unet)
    sd = UNetModel(dataclasses.replace(small_sdxl((16, 32), 16, 8).unet, num_classes=None, adm_in_channels=None))
    x, t, ctx = torch.zeros(1, 4, 8, 8), torch.tensor([1]), torch.zeros(1, 2, 48)  # context 16 + 32
    with pytest.raises(ValueError, match="y must be given"):
        xl(x, t, ctx)
    with pytest.raises(ValueError, match="y must be given"):
        sd(x, t, ctx, torch.zeros(1, 64))
    assert "label_emb.0.0.weight" in xl.state_dict() and not any("label_emb" in k for k in sd.state_dict())


def test_size_embedding_matches_diffusers_add_time_proj():
    ids = time_ids(2)
    ours = size_embedding(ids, 256)
    # UNet2DConditionModel's text_time path: add_time_proj(time_ids.flatten()).reshape(batch, -1)
    theirs = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(ids.flatten()).reshape(2, -1)
    assert ours.shape == (2, 6 * 256)
    # sin/cos of fp32 arguments up to 1024: one rounding of the argument (ulp 1024 * 2**-23) bounds the error.
    assert (ours - theirs).abs().max() <= 4 * ids.max() * torch.finfo(torch.float32).eps


# --- text towers ---------------------------------------------------------------------------------------------

def conditioner_pair() -> Tuple[Conditioner, Dict[str, torch.Tensor], ModelConfig]:
    cfg = small_sdxl((64, 80), 48, 8)
    ours = randomize_(Conditioner(cfg)).eval()
    ckpt = {"conditioner." + k: v for k, v in ours.state_dict().items()}
    assert CHECKPOINT_KEY_NAMES["clip_sdxl"] in ckpt and CHECKPOINT_KEY_NAMES["open_clip_sdxl"] in ckpt
    return ours, ckpt, cfg


def hf_config(t: TextConfig) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_width,
                          num_hidden_layers=t.layers, num_attention_heads=t.heads,
                          max_position_embeddings=t.context_length, hidden_act=t.act, layer_norm_eps=1e-5,
                          projection_dim=t.projection_dim, bos_token_id=49406, eos_token_id=49407)


def open_clip_text(t: TextConfig) -> open_clip.model.CLIP:
    """An OpenCLIP CLIP whose vision tower is deleted, as FrozenOpenCLIPEmbedder2 does (`del model.visual`)."""
    text_cfg = open_clip.model.CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
                                           heads=t.heads, layers=t.layers, mlp_ratio=t.mlp_width / t.width)
    vision_cfg = open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
    model = open_clip.model.CLIP(embed_dim=t.projection_dim, vision_cfg=vision_cfg, text_cfg=text_cfg)
    del model.visual
    return model.eval()


def sgm_encode_with_transformer(model: open_clip.model.CLIP, text: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """sgm FrozenOpenCLIPEmbedder2.encode_with_transformer with layer "penultimate", legacy False: the input of
    the last resblock, no ln_final; pooled = ln_final(last)[eot] @ text_projection. (The original permutes to
    sequence-first for the open_clip of its day; open_clip 3.x blocks are batch-first.)"""
    x = model.token_embedding(text) + model.positional_embedding
    for i, r in enumerate(model.transformer.resblocks):
        if i == len(model.transformer.resblocks) - 1:
            penultimate = x
        x = r(x, attn_mask=model.attn_mask)
    pooled = model.ln_final(x)[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ model.text_projection
    return penultimate, pooled


@torch.no_grad()
def test_clip_l_hidden_state_matches_transformers():
    ours, ckpt, cfg = conditioner_pair()
    theirs = CLIPTextModel(hf_config(cfg.text)).eval()
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level), as diffusers' loader also handles
    converted = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ckpt).items()}
    theirs.load_state_dict(converted, strict=True)
    ids = Tokenizer.for_text_config(cfg.text)(PROMPTS)
    hidden = theirs(ids, output_hidden_states=True).hidden_states
    # layer "hidden", layer_idx 11 of 12: hidden_states[layers - 1], no final LayerNorm
    assert rel_err(ours.embedders[0](ids), hidden[cfg.text.layers - 1]) <= TOL
    assert rel_err(ours.embedders[0](ids), theirs(ids).last_hidden_state) > 1e-2


@torch.no_grad()
def test_bigg_context_and_pooled_match_open_clip_and_diffusers():
    ours, ckpt, cfg = conditioner_pair()
    ids = Tokenizer.for_text_config(cfg.text2)(PROMPTS)
    context, pooled = ours.embedders[1](ids)

    theirs = open_clip_text(cfg.text2)
    prefix = "conditioner.embedders.1.model."
    theirs.load_state_dict({k.removeprefix(prefix): v for k, v in ckpt.items() if k.startswith(prefix)}, strict=True)
    ref_context, ref_pooled = sgm_encode_with_transformer(theirs, ids)
    errs = {"context": rel_err(context, ref_context), "pooled": rel_err(pooled, ref_pooled),
            "pooled vs encode_text": rel_err(pooled, theirs.encode_text(ids))}

    # diffusers' SDXL text_encoder_2: the pipeline takes hidden_states[-2] and text_embeds.
    hf = CLIPTextModelWithProjection(hf_config(cfg.text2)).eval()
    hf.load_state_dict(convert_open_clip_checkpoint(hf, ckpt, prefix=prefix), strict=True)
    out = hf(ids, output_hidden_states=True)
    errs.update({"diffusers context": rel_err(context, out.hidden_states[-2]),
                 "diffusers pooled": rel_err(pooled, out.text_embeds)})
    assert all(e <= TOL for e in errs.values()), errs
    assert rel_err(context, theirs.ln_final(ref_context)) > 1e-2  # SD 2.x's ln_final really is left out


@torch.no_grad()
def test_conditioner_concatenates_contexts_and_builds_y():
    ours, _, cfg = conditioner_pair()
    ids, ids2 = Tokenizer.for_text_config(cfg.text)(PROMPTS), Tokenizer.for_text_config(cfg.text2)(PROMPTS)
    context, pooled = ours(ids, ids2)
    assert context.shape == (3, 77, cfg.unet.context_dim)
    assert torch.equal(context[..., :cfg.text.width], ours.embedders[0](ids))
    assert torch.equal(context[..., cfg.text.width:], ours.embedders[1](ids2)[0])
    y = ours.vector(pooled, (1024, 768), (0, 128), (1024, 1024))
    assert y.shape == (3, cfg.unet.adm_in_channels)
    assert torch.equal(y[:, :48], pooled)
    assert torch.equal(y[:, 48:], size_embedding(time_ids(1).expand(3, -1), cfg.size_embed_dim))


# --- full-size key and shape sets on the meta device -------------------------------------------------------

def _shapes(sd: Dict[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_full_size_unet_keys_match_diffusers_sdxl_converter():
    original = yaml.safe_load(SD_XL_BASE_YAML)
    with torch.device("meta"):
        ours = UNetModel(preset("sdxl").unet)
    ckpt = ldm_state_dict(ours)
    config = create_unet_diffusers_config_from_ldm(original, ckpt)
    assert config == create_unet_diffusers_config_from_ldm(to_ldm_yaml(preset("sdxl")), ckpt)
    assert (config["addition_embed_type"], config["projection_class_embeddings_input_dim"]) == ("text_time", 2816)
    converted = convert_ldm_unet_checkpoint(ckpt, config)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
    assert len(converted) == len(ckpt), "the converter dropped or merged some of our keys"
    assert _shapes(converted) == _shapes(ref.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == 2_567_463_684  # SDXL base's UNet


def test_full_size_text_keys_match_transformers_and_open_clip_vit_bigg():
    cfg = preset("sdxl")
    with torch.device("meta"):
        ours = Conditioner(cfg)
        clip_l = CLIPTextModel(hf_config(cfg.text))
        bigg = open_clip.create_model("ViT-bigG-14", pretrained=None, device="meta")
    sd = _shapes(ours.state_dict())
    first = {k.removeprefix("embedders.0.transformer.text_model."): v for k, v in sd.items()
             if k.startswith("embedders.0.")}
    second = {k.removeprefix("embedders.1.model."): v for k, v in sd.items() if k.startswith("embedders.1.")}
    assert len(first) + len(second) == len(sd)
    assert first == _shapes(clip_l.state_dict())
    assert second == {k: v for k, v in _shapes(bigg.state_dict()).items() if not k.startswith("visual.")}


# --- detection from keys and shapes, loading --------------------------------------------------------------------

def test_full_size_sdxl_is_detected_from_keys_and_shapes():
    cfg = preset("sdxl")
    with torch.device("meta"):
        sd = file_state_dict(UNetModel(cfg.unet), AutoencoderKL(cfg.vae), Conditioner(cfg), cfg)
    sd["denoiser.sigmas"] = torch.empty(1000, device="meta")  # sgm's DiscreteDenoiser buffer, in SDXL files
    sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.empty(1, 77, device="meta")
    det = D.detect(sd)
    assert det.config == cfg and det.prediction_known and det.has_text and det.has_vae
    assert any("family sdxl" in e for e in det.evidence) and any("[1, 2, 10]" in e for e in det.evidence)
    counts = D.count_params(sd)
    assert (counts["unet"], counts["text_encoder"]) == (2_567_463_684, 817_720_321)


def _sdxl_keys(**override: torch.Tensor) -> Dict[str, torch.Tensor]:
    cfg = preset("sdxl")
    with torch.device("meta"):
        sd = file_state_dict(UNetModel(cfg.unet), None, Conditioner(cfg), cfg)
    return {**sd, **override}


@pytest.mark.parametrize("sd,message", [
    (lambda: {k.replace("embedders.1.", "embedders.0."): v for k, v in _sdxl_keys().items()
              if not k.startswith(D.SDXL_CLIP_L)}, "SDXL refiner"),
    (lambda: _sdxl_keys(**{PREFIX + "input_blocks.0.0.weight": torch.empty(320, 9, 3, 3, device="meta")}),
     "SDXL inpainting model"),
    (lambda: {k: v for k, v in _sdxl_keys().items() if "label_emb" not in k}, "without label_emb"),
    (lambda: {k: v for k, v in _sdxl_keys().items() if not k.startswith(D.SDXL_BIGG)}, "two text towers"),
], ids=["refiner", "inpainting", "no-label-emb", "one-tower"])
def test_sdxl_look_alikes_are_refused_in_one_line(sd, message: str):
    with pytest.raises(CheckpointError, match=message) as e:
        D.detect(sd())
    assert "\n" not in str(e.value)


def tiny_sdxl() -> ModelConfig:
    """SDXL's structure at widths whose conventions detection can read back (tests/tiny.py)."""
    return tiny_config("sdxl")


@pytest.mark.parametrize("write_yaml", [True, False], ids=["yaml-beside", "shapes-only"])
def test_tiny_sdxl_file_loads_and_runs_like_its_models(tmp_path, write_yaml: bool):
    cfg = tiny_sdxl()
    unet, vae, cond = (randomize_(m, seed).eval() for seed, m in
                       enumerate([UNetModel(cfg.unet), AutoencoderKL(cfg.vae), Conditioner(cfg)]))
    path = save_checkpoint(tmp_path / "tiny_xl.safetensors", unet, vae, cond, cfg, write_yaml=write_yaml)
    loaded = load_checkpoint(path)
    assert loaded.config == cfg and isinstance(loaded.text_encoder, Conditioner)
    assert (loaded.tokenizer.pad_token, loaded.tokenizer2.pad_token) == (49407, 0)
    info = inspect_checkpoint(path)
    assert (info["family"], info["problems"], info["unknown_keys"]) == ("sdxl", [], [])

    ids, ids2 = loaded.tokenizer(PROMPTS[:2]), loaded.tokenizer2(PROMPTS[:2])
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)), torch.tensor([5, 700])
    with torch.no_grad():
        outs = []
        for u, c in ((unet, cond), (loaded.unet, loaded.text_encoder)):
            context, pooled = c(ids, ids2)
            outs.append(u(x, t, context, c.vector(pooled, (512, 512), (0, 0), (1024, 1024))))
    assert torch.equal(outs[0], outs[1])
