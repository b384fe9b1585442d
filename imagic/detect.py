"""Telling what a checkpoint is from its keys and shapes, and inferring the sizes of its parts.

A single-file SD checkpoint is the state dict of the original `LatentDiffusion`, so its prefixes name the parts
(`model.diffusion_model.` UNet, `first_stage_model.` VAE, `cond_stage_model.` text encoder) and its shapes give
their sizes. SDXL files are the state dict of sgm's `DiffusionEngine`: the same UNet and VAE prefixes, and two text
towers under `conditioner.embedders.0.transformer.` (CLIP-L) and `conditioner.embedders.1.model.` (OpenCLIP bigG). What the weights cannot tell is the UNet's parameterisation (epsilon or v) and the number of heads;
those come from an LDM yaml when there is one, from the family's convention for heads, and for v from a numerical
probe of the UNet (see `probe_v_prediction`).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch

from .checkpoint import CheckpointError, StateDict
from .config import ConfigError, ModelConfig, TextConfig, UNetConfig, VAEConfig, preset, validate

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT_OPENAI = "cond_stage_model.transformer."
TEXT_OPENCLIP = "cond_stage_model.model."
CONDITIONER = "conditioner."
SDXL_CLIP_L = CONDITIONER + "embedders.0.transformer."
SDXL_BIGG = CONDITIONER + "embedders.1.model."
EMA = "model_ema."

# Buffers of the original LatentDiffusion that are derived from the schedule (we recompute them).
SCHEDULE_KEYS = {
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "lvlb_weights", "scale_factor",
    "denoiser.sigmas",  # sgm's DiscreteDenoiser (SDXL)
}


def is_skipped(key: str, use_ema: bool) -> bool:
    """The documented skip list: EMA copies (unless asked for), schedule buffers, CLIP position_ids."""
    if key.startswith(EMA):
        return True
    return key in SCHEDULE_KEYS or key.endswith(".position_ids")


@dataclass
class Detection:
    """What a checkpoint is, with the evidence for each conclusion (shown by `imagic inspect`)."""

    config: ModelConfig
    evidence: List[str] = field(default_factory=list)
    has_ema: bool = False
    has_unet: bool = True
    has_vae: bool = True
    has_text: bool = True
    prediction_known: bool = False  # False until a yaml or the probe has decided epsilon vs v


def _unsupported(sd: StateDict) -> Optional[str]:
    """Name families we recognise but do not support, so the user gets a precise refusal."""
    keys = sd.keys()

    def any_prefix(*ps: str) -> bool:
        return any(k.startswith(ps) for k in keys)

    if any_prefix(CONDITIONER) and not (any_prefix(SDXL_CLIP_L) and any_prefix(SDXL_BIGG)):
        if any_prefix(CONDITIONER + "embedders.0.model."):
            return "the SDXL refiner (one OpenCLIP text tower at conditioner.embedders.0.model.)"
        return f"an SDXL-style file without SDXL base's two text towers ({SDXL_CLIP_L}, {SDXL_BIGG})"
    if any_prefix(UNET + "joint_blocks.", "joint_blocks."):
        return "Stable Diffusion 3 (joint_blocks keys)"
    if any_prefix(UNET + "double_blocks.", "double_blocks."):
        return "Flux (double_blocks keys)"
    if any_prefix("control_model.", "controlnet_cond_embedding."):
        return "a ControlNet"
    if any_prefix("lora_unet_", "lora_te_", "lora_te1_"):
        return "a LoRA file (load it with --lora on top of a full checkpoint)"
    if any_prefix("embedder.", "noise_augmentor."):
        return "Stable unCLIP"
    if any_prefix("low_scale_model."):
        return "the x4 upscaler"
    if any_prefix("depth_model."):
        return "depth-to-image"
    w, out = sd.get(UNET + "input_blocks.0.0.weight"), sd.get(UNET + "out.2.weight")
    latent = int(out.shape[0]) if out is not None and out.ndim == 4 else 4
    if w is not None and w.ndim == 4 and w.shape[1] != latent:  # the extra inputs are another pipeline's conditioning
        names = {9: "inpainting", 8: "instruct-pix2pix", 5: "depth-to-image", 7: "the x4 upscaler"}
        xl = "SDXL " if UNET + "label_emb.0.0.weight" in sd else ""
        return f"{xl}{names.get(w.shape[1], 'a non-standard')} model ({w.shape[1]} UNet input channels)"
    if any_prefix("down_blocks.", "unet.down_blocks.", "text_model.encoder."):
        return "a diffusers-format state dict (use the original single-file layout)"
    if not any_prefix(UNET) and any_prefix("encoder.down.", "decoder.up."):
        return "a standalone VAE file"
    return None


def _indices(sd: StateDict, prefix: str) -> List[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd for m in [pat.match(k)] if m})


def infer_unet(sd: StateDict, openclip: bool) -> Tuple[UNetConfig, List[str]]:
    """UNet sizes from shapes, walking input_blocks the way UNetModel.__init__ built them."""
    w = sd[UNET + "input_blocks.0.0.weight"]
    mc = int(w.shape[0])
    mults: List[int] = []
    attn_res: List[int] = []
    nres = 0
    ds, level_blocks = 1, 0
    level_depth: Dict[int, int] = {}  # transformer depth of each level with attention
    for i in _indices(sd, UNET + "input_blocks.")[1:]:
        p = f"{UNET}input_blocks.{i}."
        if p + "0.op.weight" in sd:  # a Downsample closes a level
            ds *= 2
            nres = max(nres, level_blocks)
            level_blocks = 0
            continue
        out = int(sd[p + "0.out_layers.3.weight"].shape[0])
        if level_blocks == 0:
            mults.append(out // mc)
        level_blocks += 1
        if p + "1.norm.weight" in sd and ds not in attn_res:
            attn_res.append(ds)
            level_depth[len(mults) - 1] = len(_indices(sd, p + "1.transformer_blocks."))
    nres = max(nres, level_blocks)
    first_attn = next((k for k in sd if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
    if first_attn is None:
        raise CheckpointError("UNet without cross-attention layers: not a text-conditioned SD model")
    context_dim = int(sd[first_attn].shape[1])
    block = first_attn.split("transformer_blocks.")[0]
    depth = _depths(sd, level_depth, len(mults))
    linear = sd[block + "proj_in.weight"].ndim == 2
    heads = dict(num_heads=-1, num_head_channels=64) if openclip or linear else dict(num_heads=8)
    adm = sd.get(UNET + "label_emb.0.0.weight")  # SDXL's vector conditioning: Linear(adm_in_channels, 4 * mc)
    vector = {} if adm is None else dict(num_classes="sequential", adm_in_channels=int(adm.shape[1]))
    cfg = UNetConfig(in_channels=int(w.shape[1]), out_channels=int(sd[UNET + "out.2.weight"].shape[0]),
                     model_channels=mc, attention_resolutions=tuple(sorted(attn_res, reverse=True)), num_res_blocks=nres,
                     channel_mult=tuple(mults), transformer_depth=depth, context_dim=context_dim,
                     use_linear_in_transformer=linear, **heads, **vector)  # type: ignore[arg-type]
    ev = [f"UNet: {mc} base channels x {list(mults)}, {nres} res blocks per level, attention at {attn_res}, "
          f"transformer depth {list(depth) if isinstance(depth, tuple) else depth}, "
          f"context_dim {context_dim} (from {first_attn.removeprefix(UNET)} {tuple(sd[first_attn].shape)}), "
          f"proj_in {'Linear' if linear else '1x1 conv'}"]
    if adm is not None:
        ev.append(f"UNet: label_emb takes a vector y of {adm.shape[1]} (SDXL's pooled text + size/crop embedding)")
    return cfg, ev


def _depths(sd: StateDict, level_depth: Dict[int, int], levels: int) -> Union[int, Tuple[int, ...]]:
    """transformer_depth: one int when every level has the same, else one per level (SDXL: 1, 2, 10). Levels
    without attention read 1, as in sd_xl_base.yaml, except the last, whose depth is also the middle block's
    (sgm openaimodel.py: transformer_depth_middle = transformer_depth[-1])."""
    middle = len(_indices(sd, UNET + "middle_block.1.transformer_blocks."))
    depths = [level_depth.get(level, 1) for level in range(levels)]
    if levels - 1 not in level_depth:
        depths[-1] = middle
    elif depths[-1] != middle:
        raise CheckpointError(f"UNet middle block has {middle} transformer blocks but the last level {depths[-1]}: "
                              "not a layout the original UNetModel builds")
    return depths[0] if len(set(depths)) == 1 else tuple(depths)


def infer_vae(sd: StateDict) -> VAEConfig:
    ch = int(sd[VAE + "encoder.conv_in.weight"].shape[0])
    levels = _indices(sd, VAE + "encoder.down.")
    mults = tuple(int(sd[f"{VAE}encoder.down.{i}.block.0.conv2.weight"].shape[0]) // ch for i in levels)
    z = int(sd[VAE + "decoder.conv_in.weight"].shape[1])
    base = VAEConfig()
    attn = tuple(base.resolution // 2 ** i for i in levels if f"{VAE}encoder.down.{i}.attn.0.q.weight" in sd)
    return VAEConfig(embed_dim=int(sd[VAE + "quant_conv.weight"].shape[0]) // 2,
                     double_z=int(sd[VAE + "encoder.conv_out.weight"].shape[0]) == 2 * z, z_channels=z,
                     in_channels=int(sd[VAE + "encoder.conv_in.weight"].shape[1]),
                     out_ch=int(sd[VAE + "decoder.conv_out.weight"].shape[0]), ch=ch, ch_mult=mults,
                     num_res_blocks=len(_indices(sd, VAE + "encoder.down.0.block.")), attn_resolutions=attn)


def _openclip_text(sd: StateDict, p: str) -> TextConfig:
    emb = sd[p + "token_embedding.weight"]
    width = int(emb.shape[1])
    proj = sd.get(p + "text_projection")
    return TextConfig(kind="openclip", vocab_size=int(emb.shape[0]), width=width,
                      layers=len(_indices(sd, p + "transformer.resblocks.")), heads=max(1, width // 64),
                      mlp_width=int(sd[p + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
                      context_length=int(sd[p + "positional_embedding"].shape[0]),
                      projection_dim=int(proj.shape[1]) if proj is not None else width,
                      act="gelu", layer="penultimate")


def _openai_text(sd: StateDict, p: str, has_tm: bool) -> TextConfig:
    p = p + "text_model." if has_tm else p
    emb = sd[p + "embeddings.token_embedding.weight"]
    width = int(emb.shape[1])
    return TextConfig(kind="openai", vocab_size=int(emb.shape[0]), width=width,
                      layers=len(_indices(sd, p + "encoder.layers.")), heads=max(1, width // 64),
                      mlp_width=int(sd[p + "encoder.layers.0.mlp.fc1.weight"].shape[0]),
                      context_length=int(sd[p + "embeddings.position_embedding.weight"].shape[0]),
                      projection_dim=width, has_text_model_prefix=has_tm)


def infer_text(sd: StateDict) -> Tuple[TextConfig, str]:
    """SD 1.x / 2.x: the one text encoder under cond_stage_model."""
    if any(k.startswith(TEXT_OPENCLIP) for k in sd):
        t = _openclip_text(sd, TEXT_OPENCLIP)
        return t, f"text encoder: OpenCLIP names under {TEXT_OPENCLIP} ({t.layers} layers, width {t.width})"
    has_tm = any(k.startswith(TEXT_OPENAI + "text_model.") for k in sd)
    t = _openai_text(sd, TEXT_OPENAI, has_tm)
    return t, (f"text encoder: Hugging Face CLIP names under {TEXT_OPENAI}{'text_model.' if has_tm else ''} "
               f"({t.layers} layers, width {t.width})")


def infer_sdxl_text(sd: StateDict) -> Tuple[TextConfig, TextConfig, str]:
    """SDXL: CLIP-L and OpenCLIP bigG under conditioner.embedders.{0,1}, with sd_xl_base.yaml's layer choices
    (penultimate, no final norm: config_text.SDXL_CLIP_L, BIGG), which the weights cannot show."""
    text = dataclasses.replace(_openai_text(sd, SDXL_CLIP_L, True), layer="penultimate", final_norm=False)
    text2 = dataclasses.replace(_openclip_text(sd, SDXL_BIGG), final_norm=False)
    return text, text2, (f"text encoders: Hugging Face CLIP names under {SDXL_CLIP_L} ({text.layers} layers, "
                         f"width {text.width}) and OpenCLIP names under {SDXL_BIGG} ({text2.layers} layers, width "
                         f"{text2.width}, pooled {text2.projection_dim}); penultimate layers without final norm "
                         "(sd_xl_base.yaml)")


def detect(sd: StateDict) -> Detection:
    """Family and sizes from keys and shapes. Raises CheckpointError for unsupported or unknown files."""
    bad = _unsupported(sd)
    if bad:
        raise CheckpointError(f"unsupported model: {bad}")
    has_unet = any(k.startswith(UNET) for k in sd)
    has_vae = any(k.startswith(VAE) for k in sd)
    has_openclip = any(k.startswith(TEXT_OPENCLIP) for k in sd)
    has_sdxl_text = any(k.startswith(CONDITIONER) for k in sd)  # _unsupported passed only SDXL base's two towers
    has_text = has_openclip or has_sdxl_text or any(k.startswith(TEXT_OPENAI) for k in sd)
    if not (has_unet or has_vae or has_text):
        raise CheckpointError("not a Stable Diffusion checkpoint (no model.diffusion_model., first_stage_model. "
                              "or cond_stage_model. keys)")
    if not has_unet:
        raise CheckpointError("no UNet in this file (no model.diffusion_model.* keys)")
    ev: List[str] = []
    try:
        unet, unet_ev = infer_unet(sd, has_openclip)
        text2 = None
        if has_sdxl_text:
            text, text2, text_ev = infer_sdxl_text(sd)
        else:
            text, text_ev = infer_text(sd) if has_text else (None, "text encoder: absent")
        vae = infer_vae(sd) if has_vae else None
    except KeyError as e:
        raise CheckpointError(f"incomplete checkpoint: expected key {e} is missing") from None
    except (IndexError, ValueError, ZeroDivisionError) as e:  # tensors of the wrong rank, zero-sized, ...
        raise CheckpointError(f"inconsistent checkpoint: its tensor shapes do not describe an SD model ({e})") from None
    ev += unet_ev + [text_ev]
    sdxl = unet.num_classes is not None
    if has_text and has_sdxl_text != sdxl:
        raise CheckpointError("unsupported model: " + ("SDXL text towers with a UNet without label_emb" if has_sdxl_text
                                                       else "a UNet with label_emb (vector-conditioned) beside an "
                                                            "SD 1.x/2.x text encoder"))
    # The text encoder decides the family; without one, label_emb (SDXL) or SD2's linear projections do.
    sd2 = not sdxl and (has_openclip if has_text else unet.use_linear_in_transformer)
    family = "sdxl" if sdxl else "sd2" if sd2 else "sd1"
    base = preset(family)
    ev.append(f"family {family}: " + ("two text towers under conditioner.embedders (SDXL)" if has_sdxl_text else
                                       "no text encoder; UNet has label_emb (SDXL)" if sdxl else
                                       "OpenCLIP text tower (SD 2.x)" if has_openclip else
                                       "CLIP text encoder with Hugging Face names (SD 1.x)" if has_text else
                                       f"no text encoder; UNet proj_in is {'Linear' if sd2 else 'conv'}"))
    if sdxl:
        ev.append("prediction type epsilon: SDXL base's (pass the yaml for a v-prediction fine-tune)")
    cfg = ModelConfig(family=family, prediction_type="epsilon", image_size=base.image_size,  # type: ignore[arg-type]
                      scale_factor=base.scale_factor, unet=unet, vae=vae or base.vae, text=text or base.text,
                      text2=text2 or base.text2)
    try:
        validate(cfg)
    except ConfigError as e:
        raise CheckpointError(f"inconsistent checkpoint: the sizes its shapes give are not a model ({e})") from None
    has_ema = sum(k.startswith(EMA) for k in sd) > 100
    if has_ema:
        ev.append("EMA weights present (model_ema.*)")
    return Detection(config=cfg, evidence=ev, has_ema=has_ema, has_unet=has_unet, has_vae=has_vae,
                     has_text=has_text, prediction_known=not sd2)


def ema_key(unet_key: str) -> str:
    """The original LitEma stores `model.diffusion_model.a.b.c` as `model_ema.diffusion_modelabc` (dots removed)."""
    return EMA + unet_key.removeprefix("model.").replace(".", "")


@torch.no_grad()
def probe_v_prediction(unet: torch.nn.Module, context_dim: int) -> Tuple[bool, float]:
    """Decide epsilon vs v from the UNet's behaviour (the test the AUTOMATIC1111 web UI uses for SD2 files).

    At t=999 the input is almost pure noise. An epsilon model then predicts roughly its input, so
    mean(out - x) stays near 0; a v model predicts v = sqrt(abar) eps - sqrt(1-abar) x0, which for a constant
    positive input drives mean(out - x) strongly negative. Threshold -1, as in A1111's
    `is_using_v_parameterization_for_sd2`.
    """
    p = next(unet.parameters())
    x = torch.full((1, 4, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    cond = torch.full((1, 2, context_dim), 0.5, device=p.device, dtype=p.dtype)
    out = unet(x, torch.tensor([999], device=p.device), cond)
    score = float((out.float() - x.float()).mean())
    return score < -1.0, score


def count_params(sd: StateDict) -> Dict[str, int]:
    """Parameter counts per component, from the file (EMA copies counted separately)."""
    parts = {"unet": UNET, "vae": VAE, "text_encoder": ("cond_stage_model.", CONDITIONER), "ema": EMA}
    counts = {name: 0 for name in parts}
    for k, v in sd.items():
        for name, p in parts.items():
            if k.startswith(p) and not is_skipped(k, use_ema=True) or (name == "ema" and k.startswith(EMA)):
                counts[name] += v.numel()
                break
    return counts
