"""The configs of a diffusers model folder (`unet/config.json`, `vae/config.json`, `text_encoder/config.json`,
`scheduler/scheduler_config.json`, `model_index.json`) as our `ModelConfig`: the inverse of diffusers'
`create_unet_diffusers_config_from_ldm` / `create_vae_diffusers_config_from_ldm`. Options the LDM architecture
cannot express are refused by name. The weights are `diffusers_format.py`'s part."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .checkpoint import CheckpointError, PathLike
from .config import ModelConfig, TextConfig, UNetConfig, VAEConfig

# diffusers UNet / VAE options that the LDM architecture cannot express: (name, the only supported value).
UNET_FIXED = (("class_embed_type", None), ("addition_embed_type", None), ("num_class_embeds", None),
              ("time_cond_proj_dim", None), ("encoder_hid_dim", None), ("only_cross_attention", False),
              ("dual_cross_attention", False), ("time_embedding_type", "positional"), ("flip_sin_to_cos", True),
              ("freq_shift", 0), ("conv_in_kernel", 3), ("conv_out_kernel", 3), ("norm_num_groups", 32),
              ("act_fn", "silu"), ("resnet_time_scale_shift", "default"), ("center_input_sample", False),
              ("mid_block_type", "UNetMidBlock2DCrossAttn"), ("cross_attention_norm", None),
              ("attention_type", "default"), ("downsample_padding", 1), ("mid_block_scale_factor", 1),
              ("resnet_out_scale_factor", 1.0), ("resnet_skip_time_act", False), ("timestep_post_act", None),
              ("time_embedding_act_fn", None), ("time_embedding_dim", None), ("class_embeddings_concat", False),
              ("reverse_transformer_layers_per_block", None))
VAE_FIXED = (("norm_num_groups", 32), ("act_fn", "silu"), ("mid_block_add_attention", True),
             ("use_quant_conv", True), ("use_post_quant_conv", True), ("latents_mean", None), ("latents_std", None),
             ("shift_factor", None))


def read_config(path: Path) -> Dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return doc


def _check_fixed(doc: Dict[str, Any], fixed: Sequence[Tuple[str, Any]], where: str) -> None:
    bad = [f"{k}={doc[k]!r}" for k, v in fixed if k in doc and doc[k] != v]
    if bad:
        raise CheckpointError(f"{where}: not a Stable Diffusion 1.x/2.x architecture ({', '.join(bad)})")


def _per_level(value: Any, levels: int, name: str, where: str) -> List[int]:
    values = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * levels
    if len(values) != levels:
        raise CheckpointError(f"{where}: {name} has {len(values)} entries for {levels} levels")
    return values


def unet_config_from_diffusers(doc: Dict[str, Any], where: str = "unet/config.json") -> UNetConfig:
    """diffusers `UNet2DConditionModel` config -> the `openaimodel.UNetModel` parameters.

    Inverse of diffusers' `create_unet_diffusers_config_from_ldm`: `block_out_channels` = model_channels x
    channel_mult; a `CrossAttn*` block at level l means attention at downsampling factor 2**l; diffusers'
    `attention_head_dim` is, despite its name, the number of heads per level (`num_attention_heads` when set):
    one count for every level is SD1's `num_heads`, a constant width per head is SD2's `num_head_channels`.
    """
    _check_fixed(doc, UNET_FIXED, where)
    channels = [int(c) for c in doc["block_out_channels"]]
    mc, levels = channels[0], len(channels)
    if any(c % mc for c in channels):
        raise CheckpointError(f"{where}: block_out_channels {channels} are not multiples of the first")
    down = list(doc["down_block_types"])
    up = list(doc["up_block_types"])
    attn = [t == "CrossAttnDownBlock2D" for t in down]
    if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down) or \
            [t == "CrossAttnUpBlock2D" for t in up] != attn[::-1]:
        raise CheckpointError(f"{where}: block types {down} / {up} are not those of an SD UNet")
    raw_heads = doc.get("num_attention_heads") or doc["attention_head_dim"]
    heads = _per_level(raw_heads, levels, "attention_head_dim", where)
    used = [(c, h) for c, h, a in zip(channels, heads, attn) if a] + [(channels[-1], heads[-1])]  # + the mid block
    counts = {h for _, h in used}
    widths = {c // h for c, h in used} if all(c % h == 0 for c, h in used) else set()
    # SD2 configs list heads per level (a constant width of 64); SD1 configs give one count (8) for all levels.
    if len(widths) == 1 and (isinstance(raw_heads, (list, tuple)) or len(counts) > 1):
        head_args = dict(num_heads=-1, num_head_channels=widths.pop())
    elif len(counts) == 1:
        head_args = dict(num_heads=counts.pop(), num_head_channels=-1)
    else:
        raise CheckpointError(f"{where}: heads per level {heads} for channels {channels} fit neither a fixed "
                              "head count (SD1) nor a fixed head width (SD2)")
    depth = set(_per_level(doc.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block",
                           where))
    if len(depth) != 1:
        raise CheckpointError(f"{where}: per-level transformer depth {sorted(depth)} (SDXL-style) is not supported")
    return UNetConfig(in_channels=int(doc.get("in_channels", 4)), out_channels=int(doc.get("out_channels", 4)),
                      model_channels=mc, channel_mult=tuple(c // mc for c in channels),
                      attention_resolutions=tuple(sorted((2 ** i for i, a in enumerate(attn) if a), reverse=True)),
                      num_res_blocks=int(doc.get("layers_per_block", 2)), transformer_depth=depth.pop(),
                      context_dim=int(doc["cross_attention_dim"]),
                      use_linear_in_transformer=bool(doc.get("use_linear_projection", False)), **head_args)


def vae_config_from_diffusers(doc: Dict[str, Any], where: str = "vae/config.json") -> VAEConfig:
    """diffusers `AutoencoderKL` config -> the LDM `ddconfig` (inverse of `create_vae_diffusers_config_from_ldm`)."""
    _check_fixed(doc, VAE_FIXED, where)
    channels = [int(c) for c in doc["block_out_channels"]]
    if any(t != "DownEncoderBlock2D" for t in doc.get("down_block_types", [])) or \
            any(t != "UpDecoderBlock2D" for t in doc.get("up_block_types", [])):
        raise CheckpointError(f"{where}: VAE blocks other than DownEncoderBlock2D/UpDecoderBlock2D are not supported")
    z = int(doc.get("latent_channels", 4))
    return VAEConfig(embed_dim=z, z_channels=z, in_channels=int(doc.get("in_channels", 3)),
                     out_ch=int(doc.get("out_channels", 3)), ch=channels[0],
                     ch_mult=tuple(c // channels[0] for c in channels), num_res_blocks=int(doc["layers_per_block"]))


def text_config_from_diffusers(doc: Dict[str, Any], where: str = "text_encoder/config.json") -> TextConfig:
    """transformers `CLIPTextConfig` -> TextConfig. QuickGELU is SD1's OpenAI CLIP; GELU is SD2's OpenCLIP tower,
    which diffusers stores with transformers names and without its last layer (see the module docstring)."""
    act = doc.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"{where}: hidden_act {act!r} is neither SD1's quick_gelu nor SD2's gelu")
    _check_fixed(doc, (("layer_norm_eps", 1e-5),), where)
    width = int(doc.get("hidden_size", 512))
    common = dict(vocab_size=int(doc.get("vocab_size", 49408)), width=width,
                  layers=int(doc.get("num_hidden_layers", 12)), heads=int(doc.get("num_attention_heads", 8)),
                  mlp_width=int(doc.get("intermediate_size", 2048)),
                  context_length=int(doc.get("max_position_embeddings", 77)), layer="last")
    if act == "quick_gelu":
        return TextConfig(kind="openai", act="quick_gelu", projection_dim=width, **common)  # type: ignore[arg-type]
    return TextConfig(kind="openclip", act="gelu", projection_dim=int(doc.get("projection_dim", width)),
                      **common)  # type: ignore[arg-type]


def schedule_from_diffusers(doc: Dict[str, Any], where: str = "scheduler/scheduler_config.json") -> Dict[str, Any]:
    """The training noise schedule and the parameterisation. SD's is "scaled_linear" (linspace of sqrt(beta)), the
    schedule of `imagic.schedule`; a plain "linear" one would be a different model."""
    if doc.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise CheckpointError(f"{where}: beta_schedule {doc['beta_schedule']!r} is not SD's scaled_linear")
    pred = doc.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction"):
        raise CheckpointError(f"{where}: prediction_type {pred!r} is not supported (epsilon or v_prediction)")
    return {"prediction_type": "v" if pred == "v_prediction" else "epsilon",
            "linear_start": float(doc.get("beta_start", 0.00085)), "linear_end": float(doc.get("beta_end", 0.012)),
            "timesteps": int(doc.get("num_train_timesteps", 1000))}


def check_pipeline(folder: Path) -> None:
    """Refuse pipelines with parts we do not have (SDXL's second text encoder, unCLIP, ...) by name."""
    index = folder / "model_index.json"
    if not index.is_file():
        return
    doc = read_config(index)
    extra = sorted(k for k, v in doc.items() if not k.startswith("_") and v not in (None, [None, None]) and k not in
                   ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "safety_checker", "feature_extractor",
                    "image_encoder", "requires_safety_checker"))
    if extra:
        raise CheckpointError(f"{folder}: unsupported pipeline {doc.get('_class_name', '?')} (has {', '.join(extra)}); "
                              "only Stable Diffusion 1.x/2.x folders are supported")


def diffusers_model_config(folder: PathLike, evidence: Optional[List[str]] = None) -> ModelConfig:
    """The ModelConfig of a diffusers folder, from its unet/, vae/, text_encoder/ and scheduler/ configs."""
    folder = Path(folder)
    evidence = evidence if evidence is not None else []
    check_pipeline(folder)
    for part in ("unet", "vae", "text_encoder"):
        if not (folder / part / "config.json").is_file():
            raise CheckpointError(f"{folder}: no {part}/config.json (Imagic needs the UNet, the VAE and the text "
                                  "encoder)")
    unet_doc = read_config(folder / "unet" / "config.json")
    vae_doc = read_config(folder / "vae" / "config.json")
    try:
        unet = unet_config_from_diffusers(unet_doc)
        vae = vae_config_from_diffusers(vae_doc)
        text = text_config_from_diffusers(read_config(folder / "text_encoder" / "config.json"))
    except KeyError as e:
        raise CheckpointError(f"{folder}: a config lacks the entry {e}") from None
    sched_path = folder / "scheduler" / "scheduler_config.json"
    schedule = schedule_from_diffusers(read_config(sched_path)) if sched_path.is_file() else {}
    if text.kind == "openai":
        family = "sd1"
    else:
        family = "sd2-v" if schedule.get("prediction_type") == "v" else "sd2"
    image_size = int(unet_doc.get("sample_size", 64)) * vae.downsample_factor
    cfg = ModelConfig(family=family, scale_factor=float(vae_doc.get("scaling_factor", 0.18215)),  # type: ignore
                      image_size=image_size, unet=unet, vae=vae, text=text, **schedule)
    tower = "OpenAI CLIP (quick_gelu)" if text.kind == "openai" else "OpenCLIP tower stored as CLIPTextModel"
    evidence.append(f"diffusers folder: text encoder {tower} with {text.layers} layers" +
                    (f"; prediction type {cfg.prediction_type} from scheduler_config.json" if schedule else ""))
    return cfg
