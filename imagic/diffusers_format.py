"""Reading a diffusers model folder (what `StableDiffusionPipeline.save_pretrained` writes) offline.

    model_index.json                                   which class each part is
    unet/config.json + diffusion_pytorch_model.safetensors   (or .bin, .fp16.*, or sharded with an .index.json)
    vae/config.json + diffusion_pytorch_model.safetensors
    text_encoder/config.json + model.safetensors     (transformers CLIPTextModel; or pytorch_model.bin)
    tokenizer/special_tokens_map.json, tokenizer_config.json  (only the padding token and length are read)
    scheduler/scheduler_config.json                   (beta schedule and prediction_type)

The configs become a `ModelConfig` and the weights are renamed to our module names (the original LDM names), then
built exactly as a single file is (`loader._build`: meta device, strict key/shape check, assign).

Why the renaming is structural and not done by diffusers: diffusers is a test-only dependency here (design.md),
and a user with a downloaded folder need not have it. The renaming is the inverse of diffusers' own single-file
converter (`diffusers/loaders/single_file_utils.py: convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
convert_open_clip_checkpoint`), written the way that converter is: the block loop of `openaimodel.UNetModel`
(as `lora.transformer_paths` does) gives the module *paths* of each block on both sides; below a block the names
are identical except for a few fixed leaf renames (ResBlock `in_layers.0` = `norm1`, ...). It maps paths, never
single tensors, and tests/test_diffusers_format.py checks it against diffusers' converter on the full-size SD 1.x and
2.x key sets and numerically on tiny models.

Three value changes are needed, each where diffusers' converter made one: the VAE's mid-attention q/k/v/proj_out are
1x1 convolutions in LDM and Linear layers in diffusers (reshaped back); OpenCLIP's fused `in_proj_weight` is three
`q_proj/k_proj/v_proj` layers in transformers (concatenated back); and SD 2.x's text tower is stored without its last
layer (diffusers keeps 23 of 24 layers, because SD 2.x conditions on the penultimate one), so we build a 23-layer
OpenCLIP tower whose *last* layer is used (`layer="last"`): the same computation as SD 2.x's penultimate layer.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import detect as D
from .checkpoint import CheckpointError, PathLike, StateDict, read_state_dict
from .config import ModelConfig, TextConfig, UNetConfig, VAEConfig, describe
from .loader import StableDiffusion, _build

log = logging.getLogger(__name__)

# Weight file names diffusers / transformers write, in the order we prefer them (safetensors first; the fp16
# "variant" files only when there is nothing else).
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                "pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
                "diffusion_pytorch_model.fp16.bin", "pytorch_model.fp16.bin")
SHARD_INDEXES = tuple(name + ".index.json" for name in WEIGHT_FILES)

# ResBlock leaves: LDM (openaimodel.ResBlock) -> diffusers ResnetBlock2D, as in diffusers'
# `update_unet_resnet_ldm_to_diffusers`; the VAE's ResnetBlock differs only in the shortcut's name.
UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}

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


def is_diffusers_folder(path: PathLike) -> bool:
    """A directory with `model_index.json` or `unet/config.json` (a pipeline saved by diffusers)."""
    p = Path(path)
    return p.is_dir() and ((p / "model_index.json").is_file() or (p / "unet" / "config.json").is_file())


# --- configs -------------------------------------------------------------------------------------------------

def _read_config(path: Path) -> Dict[str, Any]:
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


def _check_pipeline(folder: Path) -> None:
    """Refuse pipelines with parts we do not have (SDXL's second text encoder, unCLIP, ...) by name."""
    index = folder / "model_index.json"
    if not index.is_file():
        return
    doc = _read_config(index)
    extra = sorted(k for k, v in doc.items() if not k.startswith("_") and v not in (None, [None, None]) and k not in
                   ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "safety_checker", "feature_extractor",
                    "image_encoder", "requires_safety_checker"))
    if extra:
        raise CheckpointError(f"{folder}: unsupported pipeline {doc.get('_class_name', '?')} (has {', '.join(extra)}); "
                              "only Stable Diffusion 1.x/2.x folders are supported")


# --- weights ---------------------------------------------------------------------------------------------------

def read_weights(subfolder: Path) -> StateDict:
    """The weights of one part: a single file or the shards an `.index.json` lists, read safely
    (`checkpoint.read_state_dict`: safetensors, or a pickle through torch.load(weights_only=True))."""
    for name in SHARD_INDEXES:
        index = subfolder / name
        if index.is_file():
            shards = sorted(set(_read_config(index).get("weight_map", {}).values()))
            sd: StateDict = {}
            for shard in shards:
                sd.update(read_state_dict(subfolder / shard))
            return sd
    for name in WEIGHT_FILES:
        if (subfolder / name).is_file():
            return read_state_dict(subfolder / name)
    raise CheckpointError(f"{subfolder}: no weights ({', '.join(WEIGHT_FILES[:4])}, ...)")


def unet_paths(cfg: UNetConfig) -> Dict[str, str]:
    """Our (LDM) module path -> diffusers module path, for every block of the UNet.

    The loop is `openaimodel.UNetModel.__init__`'s: input block n = 1 + level * (num_res_blocks + 1) + i holds
    down_blocks.level's i-th resnet (and attention), the block after a level's resnets its downsampler; output
    block n = up * (num_res_blocks + 1) + i holds up_blocks.up's, `up` counting levels from the bottom, with the
    level's upsampler after its last resnet (and attention). Same index arithmetic as diffusers' converter.
    """
    paths = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
             "middle_block.1": "mid_block.attentions.0",
             **_leaves("middle_block.0", "mid_block.resnets.0", UNET_RESNET),
             **_leaves("middle_block.2", "mid_block.resnets.1", UNET_RESNET)}
    levels, per_level, ds = len(cfg.channel_mult), cfg.num_res_blocks + 1, 1
    for level in range(levels):
        for i in range(cfg.num_res_blocks):
            n = 1 + level * per_level + i
            paths.update(_leaves(f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{i}", UNET_RESNET))
            if ds in cfg.attention_resolutions:
                paths[f"input_blocks.{n}.1"] = f"down_blocks.{level}.attentions.{i}"
        if level != levels - 1:
            paths[f"input_blocks.{(level + 1) * per_level}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            ds *= 2
    for up in range(levels):
        attention = ds in cfg.attention_resolutions
        for i in range(per_level):
            n = up * per_level + i
            paths.update(_leaves(f"output_blocks.{n}.0", f"up_blocks.{up}.resnets.{i}", UNET_RESNET))
            if attention:
                paths[f"output_blocks.{n}.1"] = f"up_blocks.{up}.attentions.{i}"
        if up != levels - 1:
            last = up * per_level + per_level - 1
            paths[f"output_blocks.{last}.{2 if attention else 1}.conv"] = f"up_blocks.{up}.upsamplers.0.conv"
        ds //= 2
    return paths


def vae_paths(cfg: VAEConfig) -> Dict[str, str]:
    """Our (LDM `Encoder`/`Decoder`) module path -> diffusers `AutoencoderKL` path. The decoder's `up` list is
    stored in resolution order (up.0 is the last level to run), diffusers' `up_blocks` in execution order."""
    levels = len(cfg.ch_mult)
    paths: Dict[str, str] = {}
    for side in ("encoder", "decoder"):
        paths[f"{side}.norm_out"] = f"{side}.conv_norm_out"
        paths.update(_leaves(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", VAE_RESNET))
        paths.update(_leaves(f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", VAE_RESNET))
        paths.update(_leaves(f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", VAE_ATTENTION))
    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            paths.update(_leaves(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", VAE_RESNET))
        for j in range(cfg.num_res_blocks + 1):
            paths.update(_leaves(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{levels - 1 - i}.resnets.{j}",
                                 VAE_RESNET))
        if i != levels - 1:
            paths[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        if i != 0:
            paths[f"decoder.up.{i}.upsample.conv"] = f"decoder.up_blocks.{levels - 1 - i}.upsamplers.0.conv"
    return paths


def openclip_paths(layers: int) -> Dict[str, str]:
    """Our OpenCLIP tower's module paths -> transformers CLIPTextModel's (diffusers' `convert_open_clip_checkpoint`
    mapping, inverted). The fused attention input projection is handled by `_fused_qkv`."""
    paths = {"token_embedding": "embeddings.token_embedding", "ln_final": "final_layer_norm"}
    for i in range(layers):
        paths.update(_leaves(f"transformer.resblocks.{i}", f"encoder.layers.{i}",
                             {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                              "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}))
    return paths


def _leaves(ours: str, theirs: str, leaves: Dict[str, str]) -> Dict[str, str]:
    """A block's own path plus its renamed children (the block path maps the children that keep their names)."""
    return {ours: theirs, **{f"{ours}.{a}": f"{theirs}.{b}" for a, b in leaves.items()}}


def diffusers_key(key: str, paths: Dict[str, str]) -> str:
    """Rename a key by the longest module path of `paths` it lies under (unchanged when none)."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in paths:
            return ".".join([paths[prefix]] + parts[n:])
    return key


def _expected(factory) -> Dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in factory().state_dict().items()}


def _rename(theirs: StateDict, expected: Dict[str, torch.Size], paths: Dict[str, str], where: str,
            special: Optional[StateDict] = None) -> StateDict:
    """Pick each of our tensors from the diffusers state dict; every diffusers tensor must be used.

    A Linear weight stored for a 1x1 conv (the VAE's mid-attention) is reshaped; `special` holds our tensors that
    are not a plain rename (already taken out of `theirs`). Missing or unused keys raise an error listing them.
    """
    out: StateDict = dict(special or {})
    used, missing = set(), []
    for key, shape in expected.items():
        if key in out:
            continue
        name = diffusers_key(key, paths)
        if name not in theirs:
            missing.append(f"{name} (for {key})")
            continue
        t = theirs[name]
        out[key] = t.reshape(shape) if t.shape != shape and t.numel() == shape.numel() else t
        used.add(name)
    unused = sorted(k for k in theirs if k not in used and not k.endswith("position_ids"))
    problems = [f"{len(v)} {label}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}"
                for label, v in (("missing", missing), ("unexpected", unused)) if v]
    if problems:
        raise CheckpointError(f"{where} does not match its config: " + "; ".join(problems))
    return out


def _take(theirs: StateDict, name: str, where: str) -> torch.Tensor:
    if name not in theirs:
        raise CheckpointError(f"{where} does not match its config: missing {name}")
    return theirs.pop(name)


def _text_state(theirs: StateDict, cfg: TextConfig, expected: Dict[str, torch.Size], where: str) -> StateDict:
    """transformers 5 saves CLIPTextModel without its `text_model.` level, older versions (and the SD folders on
    the hub) with it: accept both. SD1 then has our names; SD2 is renamed to OpenCLIP's."""
    flat = {k.removeprefix("text_model."): v for k, v in theirs.items()}
    if cfg.kind == "openai":
        return _rename({"text_model." + k: v for k, v in flat.items()}, expected, {}, where)
    # OpenCLIP's `attn.in_proj_weight/bias` = cat(q, k, v), torch.nn.MultiheadAttention's layout, which diffusers'
    # converter splits in this order.
    special = {f"transformer.resblocks.{i}.attn.in_proj_{kind}":
               torch.cat([_take(flat, f"encoder.layers.{i}.self_attn.{p}_proj.{kind}", where) for p in "qkv"])
               for i in range(cfg.layers) for kind in ("weight", "bias")}
    special["positional_embedding"] = _take(flat, "embeddings.position_embedding.weight", where)
    # Not stored: diffusers drops OpenCLIP's text_projection and logit_scale (SD conditions on the token states, not
    # the pooled projection). NaN, so that using them (OpenCLIPTextModel.pooled) is loud rather than silently wrong.
    special["text_projection"] = torch.full(tuple(expected["text_projection"]), float("nan"))
    special["logit_scale"] = torch.tensor(float("nan"))
    return _rename(flat, expected, openclip_paths(cfg.layers), where, special)


# --- tokenizer and the whole folder ----------------------------------------------------------------------------

def _tokenizer(folder: Path, cfg: TextConfig, evidence: List[str]):
    """Our BPE tokenizer with the folder's padding token and length (SD1 pads with <|endoftext|> = 49407, SD2's
    tokenizer with "!" = 0). The vocabulary is CLIP's in both, which ours is; without a tokenizer/ folder the
    text encoder's kind decides, as for single files."""
    from .tokenizer import Tokenizer

    pad, length = None, cfg.context_length
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / "tokenizer" / name
        if path.is_file():
            doc = _read_config(path)
            length = min(length, int(doc.get("model_max_length", length)))
            token = doc.get("pad_token")
            if pad is None and token is not None:
                pad = token.get("content") if isinstance(token, dict) else str(token)
    tok = Tokenizer(cfg.pad_token, length)
    if pad is None:
        evidence.append(f"tokenizer: no tokenizer/ settings, padding with {cfg.pad_token} (the {cfg.kind} default)")
        return tok
    if pad not in tok.encoder:
        raise CheckpointError(f"{folder / 'tokenizer'}: padding token {pad!r} is not in the CLIP vocabulary")
    tok.pad_token = tok.encoder[pad]
    evidence.append(f"tokenizer: CLIP BPE, pads with {pad!r} = {tok.pad_token}, {length} tokens")
    return tok


def diffusers_model_config(folder: PathLike, evidence: Optional[List[str]] = None) -> ModelConfig:
    """The ModelConfig of a diffusers folder, from its unet/, vae/, text_encoder/ and scheduler/ configs."""
    folder = Path(folder)
    evidence = evidence if evidence is not None else []
    _check_pipeline(folder)
    for part in ("unet", "vae", "text_encoder"):
        if not (folder / part / "config.json").is_file():
            raise CheckpointError(f"{folder}: no {part}/config.json (Imagic needs the UNet, the VAE and the text "
                                  "encoder)")
    unet_doc = _read_config(folder / "unet" / "config.json")
    vae_doc = _read_config(folder / "vae" / "config.json")
    try:
        unet = unet_config_from_diffusers(unet_doc)
        vae = vae_config_from_diffusers(vae_doc)
        text = text_config_from_diffusers(_read_config(folder / "text_encoder" / "config.json"))
    except KeyError as e:
        raise CheckpointError(f"{folder}: a config lacks the entry {e}") from None
    sched_path = folder / "scheduler" / "scheduler_config.json"
    schedule = schedule_from_diffusers(_read_config(sched_path)) if sched_path.is_file() else {}
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


def load_diffusers_folder(path: PathLike, dtype: torch.dtype = torch.float32,
                          device: Union[str, torch.device] = "cpu",
                          vae_dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """Load a diffusers Stable Diffusion 1.x/2.x folder into our modules (what `load_checkpoint` does for a folder).

    dtype is for the UNet and text encoder, vae_dtype for the VAE (fp32 by default), as in `load_checkpoint`.
    """
    from .clip import build_text_encoder
    from .unet import UNetModel
    from .vae import AutoencoderKL

    folder = Path(path)
    device = torch.device(device)
    if not is_diffusers_folder(folder):
        raise CheckpointError(f"{folder}: not a diffusers model folder (no model_index.json or unet/config.json)")
    evidence: List[str] = []
    cfg = diffusers_model_config(folder, evidence)
    factories = {"unet": lambda: UNetModel(cfg.unet), "vae": lambda: AutoencoderKL(cfg.vae),
                 "text_encoder": lambda: build_text_encoder(cfg.text)}
    states = {}
    for part, paths in (("unet", unet_paths(cfg.unet)), ("vae", vae_paths(cfg.vae))):
        states[part] = _rename(read_weights(folder / part), _expected(factories[part]), paths, f"{folder / part}")
    states["text_encoder"] = _text_state(read_weights(folder / "text_encoder"), cfg.text,
                                         _expected(factories["text_encoder"]), f"{folder / 'text_encoder'}")
    unet = _build(factories["unet"], states["unet"], "UNet", dtype, device)
    vae = _build(factories["vae"], states["vae"], "VAE", vae_dtype, device)
    text = _build(factories["text_encoder"], states["text_encoder"], "text encoder", dtype, device)
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        is_v, score = D.probe_v_prediction(unet, cfg.unet.context_dim)
        cfg.prediction_type = "v" if is_v else "epsilon"
        if is_v and cfg.family == "sd2":
            cfg.family = "sd2-v"
        evidence.append(f"no scheduler/scheduler_config.json: prediction type {cfg.prediction_type} from the probe "
                        f"(mean(unet(0.5, t=999) - x) = {score:.3f})")
    tokenizer = _tokenizer(folder, cfg.text, evidence)
    log.info("loaded diffusers folder %s: %s", folder, describe(cfg))
    return StableDiffusion(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, config=cfg,
                           evidence=evidence, path=folder)
