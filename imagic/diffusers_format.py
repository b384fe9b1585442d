"""Reading a diffusers model folder (what `StableDiffusionPipeline.save_pretrained` writes) offline.

    model_index.json                                   which class each part is
    unet/config.json + diffusion_pytorch_model.safetensors   (or .bin, .fp16.*, or sharded with an .index.json)
    vae/config.json + diffusion_pytorch_model.safetensors
    text_encoder/config.json + model.safetensors     (transformers CLIPTextModel; or pytorch_model.bin)
    tokenizer/special_tokens_map.json, tokenizer_config.json  (only the padding token and length are read)
    scheduler/scheduler_config.json                   (beta schedule and prediction_type)

The configs become a `ModelConfig` and the weights are renamed to our module names (the original LDM names), then
built exactly as a single file is (`assemble.build`: meta device, strict key/shape check, assign).

Why the renaming is structural and not done by diffusers: diffusers is a test-only dependency here (design.md),
and a user with a downloaded folder need not have it. The renaming is the inverse of diffusers' own single-file
converter (`diffusers/loaders/single_file_utils.py: convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
convert_open_clip_checkpoint`), written the way that converter is: the block loop of `openaimodel.UNetModel`
(as `lora_format.transformer_paths` does) gives the module *paths* of each block on both sides; below a block the names
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

import logging
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from . import detect as D
from .assemble import StableDiffusion, build
from .checkpoint import CheckpointError, PathLike, StateDict, read_state_dict
from .config import TextConfig, UNetConfig, VAEConfig, describe
from .diffusers_config import diffusers_model_config, read_config

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

def is_diffusers_folder(path: PathLike) -> bool:
    """A directory with `model_index.json` or `unet/config.json` (a pipeline saved by diffusers)."""
    p = Path(path)
    return p.is_dir() and ((p / "model_index.json").is_file() or (p / "unet" / "config.json").is_file())


# --- weights ---------------------------------------------------------------------------------------------------

def read_weights(subfolder: Path) -> StateDict:
    """The weights of one part: a single file or the shards an `.index.json` lists, read safely
    (`checkpoint.read_state_dict`: safetensors, or a pickle through torch.load(weights_only=True))."""
    for name in SHARD_INDEXES:
        index = subfolder / name
        if index.is_file():
            shards = sorted(set(read_config(index).get("weight_map", {}).values()))
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
            doc = read_config(path)
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
    unet = build(factories["unet"], states["unet"], "UNet", dtype, device)
    vae = build(factories["vae"], states["vae"], "VAE", vae_dtype, device)
    text = build(factories["text_encoder"], states["text_encoder"], "text encoder", dtype, device)
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
