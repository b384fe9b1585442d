"""The text encoders against implementations we did not write: transformers' CLIPTextModel (SD1) and open_clip's
CLIP text tower (SD2), same random weights, small widths; full-size key manifests on the meta device."""
from __future__ import annotations

import dataclasses

import open_clip
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from imagic.clip import OpenAICLIPTextModel, OpenCLIPTextModel, build_text_encoder
from imagic.config import TextConfig, preset
from imagic.tokenizer import Tokenizer
from tests.helpers import randomize_, rel_err

TOL = 1e-4
PROMPTS = ["a photo of a dog sitting on a bench", "", "A CAT, painted by van Gogh!"]
SMALL = dict(width=64, layers=3, heads=4, mlp_width=128)


def hf_config(cfg: TextConfig) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_width,
                          num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                          max_position_embeddings=cfg.context_length, hidden_act=cfg.act, layer_norm_eps=1e-5,
                          projection_dim=cfg.projection_dim, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407)


def hf_keys(state_dict: dict) -> dict:
    """transformers 5 flattened CLIPTextModel (its `text_model.` level is renamed away on load); SD1 files and
    transformers 4 keep it, and so do we."""
    return {k.removeprefix("text_model."): v for k, v in state_dict.items()}


@pytest.mark.parametrize("act,context_length", [("quick_gelu", 77), ("gelu", 77), ("quick_gelu", 16)])
@torch.no_grad()
def test_sd1_matches_transformers(act, context_length):
    """16 tokens: the shapes recipe's --context-length (fewer positions, the same causal mask and EOT pooling)."""
    cfg = TextConfig(kind="openai", act=act, context_length=context_length, **SMALL)
    ours = randomize_(OpenAICLIPTextModel(cfg)).eval()
    config = hf_config(cfg)
    config._attn_implementation = "eager"  # explicit softmax: a different computation from our SDPA call
    theirs = CLIPTextModel(config).eval()
    theirs.load_state_dict(hf_keys(ours.state_dict()), strict=True)  # the same names, one to one
    ids = Tokenizer.for_text_config(cfg)(PROMPTS)
    out = theirs(ids, output_hidden_states=True)
    final_ln = theirs.final_layer_norm

    errs = {
        "last": rel_err(ours(ids), out.last_hidden_state),
        "clip_skip=2": rel_err(ours(ids, clip_skip=2), final_ln(out.hidden_states[-2])),
        "clip_skip=3": rel_err(ours(ids, clip_skip=3), final_ln(out.hidden_states[-3])),
        "pooled": rel_err(ours.pooled(ids), out.pooler_output),
    }
    assert all(e <= TOL for e in errs.values()), errs
    # The skip options must really change the output (else the comparisons above prove little).
    assert rel_err(ours(ids, clip_skip=2), out.last_hidden_state) > 1e-2


def open_clip_text(cfg: TextConfig) -> open_clip.model.CLIP:
    """An OpenCLIP CLIP with a tiny vision tower, which SD2's FrozenOpenCLIPEmbedder deletes (`del model.visual`)."""
    text_cfg = open_clip.model.CLIPTextCfg(context_length=cfg.context_length, vocab_size=cfg.vocab_size,
                                           width=cfg.width, heads=cfg.heads, layers=cfg.layers,
                                           mlp_ratio=cfg.mlp_width / cfg.width)
    vision_cfg = open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
    model = open_clip.model.CLIP(embed_dim=cfg.projection_dim, vision_cfg=vision_cfg, text_cfg=text_cfg)
    del model.visual
    return model.eval()


def ldm_encode_with_transformer(model: open_clip.model.CLIP, text: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """ldm/modules/encoders/modules.py FrozenOpenCLIPEmbedder.encode_with_transformer + text_transformer_forward.
    (The original permutes to sequence-first for the open_clip of its day; open_clip 3.x blocks are batch-first.)"""
    x = model.token_embedding(text) + model.positional_embedding
    for i, r in enumerate(model.transformer.resblocks):
        if i == len(model.transformer.resblocks) - layer_idx:
            break
        x = r(x, attn_mask=model.attn_mask)
    return model.ln_final(x)


@torch.no_grad()
def test_sd2_matches_open_clip():
    cfg = TextConfig(kind="openclip", act="gelu", layer="penultimate", projection_dim=48, **SMALL)
    ours = randomize_(OpenCLIPTextModel(cfg)).eval()
    theirs = open_clip_text(cfg)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ids = Tokenizer.for_text_config(cfg)(PROMPTS)

    errs = {
        "penultimate (default)": rel_err(ours(ids), ldm_encode_with_transformer(theirs, ids, 1)),
        "clip_skip=1 (last)": rel_err(ours(ids, clip_skip=1), ldm_encode_with_transformer(theirs, ids, 0)),
        "clip_skip=3": rel_err(ours(ids, clip_skip=3), ldm_encode_with_transformer(theirs, ids, 2)),
        "pooled": rel_err(ours.pooled(ids), theirs.encode_text(ids)),
    }
    assert all(e <= TOL for e in errs.values()), errs
    assert rel_err(ours(ids), ours(ids, clip_skip=1)) > 1e-2


def test_sd1_full_size_keys_match_transformers():
    cfg = preset("sd1").text
    with torch.device("meta"):
        ours = build_text_encoder(cfg)
        theirs = CLIPTextModel(hf_config(cfg))
    ours_sd = {k: tuple(v.shape) for k, v in hf_keys(ours.state_dict()).items()}
    theirs_sd = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert all(k.startswith("text_model.") for k in ours.state_dict())
    assert ours_sd == theirs_sd
    assert sum(p.numel() for p in ours.parameters()) == 123_060_480


def test_sd2_full_size_keys_match_open_clip_vit_h():
    cfg = preset("sd2").text
    with torch.device("meta"):
        ours = build_text_encoder(cfg)
        theirs = open_clip.create_model("ViT-H-14", pretrained=None, device="meta")
    ours_sd = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    theirs_sd = {k: tuple(v.shape) for k, v in theirs.state_dict().items() if not k.startswith("visual.")}
    assert ours_sd == theirs_sd


def test_clip_skip_bounds_and_dtype():
    cfg = TextConfig(kind="openai", **SMALL)
    model = build_text_encoder(cfg).to(torch.bfloat16)
    ids = Tokenizer.for_text_config(cfg)("a dog")
    assert model(ids).dtype == torch.bfloat16 and model.dtype == torch.bfloat16
    for bad in (0, cfg.layers + 1):
        with pytest.raises(ValueError, match="clip_skip"):
            model(ids, clip_skip=bad)
    with pytest.raises(ValueError, match="kind"):
        build_text_encoder(dataclasses.replace(cfg, kind="t5"))  # type: ignore[arg-type]
