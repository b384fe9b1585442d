"""Model configurations: dataclasses whose field names are the original LDM yaml parameter names.

The original Stable Diffusion inference yamls (e.g. `v1-inference.yaml`, `v2-inference-v.yaml`) describe a
`LatentDiffusion` whose `unet_config`, `first_stage_config` and `cond_stage_config` give every size. We keep the
same names so a yaml maps onto these dataclasses one to one (`ModelConfig.from_ldm_yaml`), and presets for the
public checkpoints (`preset("sd1")`, `preset("sd2")`, `preset("sd2-v")`, `preset("sdxl")`). SDXL's yaml
(`sd_xl_base.yaml`, a DiffusionEngine) is translated to this layout by config_sdxl.py.
"""
from __future__ import annotations

import dataclasses
import os
import reprlib
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Tuple, Union

import yaml

from . import config_sdxl
from .config_check import ConfigError, build, validate
# TextConfig and the token ids live in config_text and are imported from here too (tokenizer, clip, tests).
from .config_text import BIGG, EOT_TOKEN, SDXL_CLIP_L, SOT_TOKEN, VIT_H, TextConfig, cond_for, text_from_cond

Family = Literal["sd1", "sd2", "sd2-v", "sdxl", "custom"]
PredictionType = Literal["epsilon", "v"]


class ResolutionError(ValueError):
    """An image size the model cannot take (not a multiple of its downsampling)."""


@dataclass
class UNetConfig:
    """`openaimodel.UNetModel` parameters (the yaml's `unet_config.params`)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: Tuple[int, ...] = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: Tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int = 8  # -1 when num_head_channels fixes the head size instead (SD2)
    num_head_channels: int = -1
    transformer_depth: Union[int, Tuple[int, ...]] = 1  # one depth for all levels, or one per level (SDXL)
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    use_checkpoint: bool = False  # gradient checkpointing of ResBlocks and transformer blocks
    num_classes: Optional[Literal["sequential"]] = None  # "sequential": a vector `y` enters via label_emb (SDXL)
    adm_in_channels: Optional[int] = None  # the width of `y` (SDXL: 2816)

    def depth_at(self, level: int) -> int:
        """Transformer depth at a level of channel_mult; -1 (the last level's) is the middle block's (sgm
        openaimodel.py UNetModel: `transformer_depth_middle = transformer_depth[-1]`)."""
        depth = self.transformer_depth
        if isinstance(depth, int):
            return depth
        if len(depth) != len(self.channel_mult):
            raise ValueError(f"transformer_depth {list(depth)} needs one depth per level of channel_mult "
                             f"{list(self.channel_mult)}")
        return depth[level]

    def heads_for(self, channels: int) -> Tuple[int, int]:
        """(heads, head_dim) of an attention layer with `channels` channels, as UNetModel.__init__ decides."""
        if self.num_head_channels == -1:
            heads = self.num_heads
            dim_head = channels // heads
        else:
            heads = channels // self.num_head_channels
            dim_head = self.num_head_channels
        # The original `legacy` flag changes nothing here: with a spatial transformer it recomputes the same value.
        return heads, dim_head


@dataclass
class VAEConfig:
    """`AutoencoderKL` parameters: `embed_dim` plus the yaml's `ddconfig`."""

    embed_dim: int = 4
    double_z: bool = True
    z_channels: int = 4
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: Tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: Tuple[int, ...] = ()
    dropout: float = 0.0

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class ModelConfig:
    """A whole latent diffusion model: its parts, noise schedule and how its UNet output is parameterised."""

    family: Family = "sd1"
    prediction_type: PredictionType = "epsilon"
    scale_factor: float = 0.18215
    image_size: int = 512  # native resolution in pixels
    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    text2: Optional[TextConfig] = None  # SDXL's second tower (OpenCLIP bigG: context and pooled vector)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae.downsample_factor

    @property
    def size_embed_dim(self) -> int:
        """SDXL: the width each of the six size/crop numbers is embedded to in `y` (pooled vector first)."""
        assert self.text2 is not None and self.unet.adm_in_channels is not None, "not an SDXL config"
        return (self.unet.adm_in_channels - self.text2.projection_dim) // (2 * len(config_sdxl.SIZE_KEYS))

    @property
    def resolution_multiple(self) -> int:
        """Image sizes must be multiples of this: the VAE's factor times the UNet's downsampling."""
        return self.vae.downsample_factor * 2 ** (len(self.unet.channel_mult) - 1)

    def at_resolution(self, pixels: int) -> "ModelConfig":
        """The same model run at `pixels` x `pixels` (ResolutionError unless a positive multiple of
        `resolution_multiple`)."""
        m = self.resolution_multiple
        if pixels < m or pixels % m:
            raise ResolutionError(f"the resolution must be a positive multiple of {m} for this model, got {pixels}")
        return dataclasses.replace(self, image_size=pixels)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        parts = {"unet": UNetConfig, "vae": VAEConfig, "text": TextConfig, "text2": TextConfig}
        for name, klass in parts.items():
            if d.get(name) is not None:
                d[name] = build(klass, d[name])
        return build(cls, d)

    @classmethod
    def from_ldm_yaml(cls, source: Union[str, Path, Dict[str, Any]]) -> "ModelConfig":
        """Read an original LDM inference yaml (a path or an already-parsed dict)."""
        return from_ldm_yaml(source)


def preset(name: str) -> ModelConfig:
    """The configurations of the public checkpoints: "sd1" (v1.x), "sd2" (2.x base 512), "sd2-v" (2.x 768-v),
    "sdxl" (SDXL base 1.0: sd_xl_base.yaml's sizes)."""
    if name == "sd1":
        return ModelConfig()
    if name in ("sd2", "sd2-v"):
        v = name == "sd2-v"
        return ModelConfig(
            family=name,  # type: ignore[arg-type]
            prediction_type="v" if v else "epsilon",
            image_size=768 if v else 512,
            unet=UNetConfig(num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
            text=TextConfig(**VIT_H),  # type: ignore[arg-type]
        )
    if name == "sdxl":
        return ModelConfig(
            family="sdxl", scale_factor=0.13025, image_size=config_sdxl.SDXL_IMAGE_SIZE,
            unet=UNetConfig(attention_resolutions=(4, 2), channel_mult=(1, 2, 4), num_heads=-1, num_head_channels=64,
                            transformer_depth=(1, 2, 10), context_dim=2048, use_linear_in_transformer=True,
                            num_classes="sequential", adm_in_channels=2816),
            text=TextConfig(**SDXL_CLIP_L), text2=TextConfig(**BIGG),  # type: ignore[arg-type]
        )
    raise ValueError(f"unknown preset {name!r}; choose sd1, sd2, sd2-v or sdxl")


def _read_yaml(source: Union[str, Path]) -> Any:
    """yaml.safe_load of a file (never a constructor that runs code), refusing what is not a regular file."""
    try:
        if not stat.S_ISREG(os.stat(source).st_mode):  # a FIFO would block the read forever
            raise ConfigError(f"cannot read config {source}: not a regular file")
        return yaml.safe_load(Path(source).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config {source}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {source} is not valid YAML: {str(e).splitlines()[0]}") from None
    except RecursionError:  # PyYAML composes nested collections recursively: '[[[[...' exhausts the stack
        raise ConfigError(f"config {source} is nested too deeply") from None


def from_ldm_yaml(source: Union[str, Path, Dict[str, Any]]) -> ModelConfig:
    """Map an original LDM inference yaml onto a ModelConfig; sizes and `parameterization` are honoured.

    Anything that is not such a config (wrong structure, wrong types, sizes that are not positive integers)
    raises ConfigError, whose message is one line.
    """
    doc = source if isinstance(source, dict) else _read_yaml(source)
    try:
        cfg = validate(_from_ldm_doc(doc))
        cfg.unet.depth_at(0)  # ValueError unless a per-level transformer_depth has one depth per level
    except ConfigError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, IndexError, OverflowError) as e:
        what = f"missing {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
        raise ConfigError(f"not an LDM inference config: {what}") from None
    return cfg


def _from_ldm_doc(doc: Any) -> ModelConfig:
    """The mapping itself; a malformed document fails here with KeyError, TypeError, ... (see from_ldm_yaml)."""
    if config_sdxl.is_sgm(doc):
        doc = config_sdxl.to_ldm_layout(doc)
    params = doc["model"]["params"]
    unet_p = dict(params["unet_config"]["params"])
    first = params["first_stage_config"]["params"]
    cond = params["cond_stage_config"]
    if unet_p.get("use_spatial_transformer", True) is False:
        raise ConfigError("UNets without a spatial transformer (use_spatial_transformer: False) are not supported")
    sdxl_cond = str(cond.get("target", "")).endswith("GeneralConditioner")
    if unet_p.get("num_classes") != ("sequential" if sdxl_cond else None):
        raise ConfigError(f"num_classes {reprlib.repr(unet_p.get('num_classes'))} is not supported (SDXL's "
                          "sequential with its conditioner, none otherwise)")
    if unet_p.get("num_classes") is None:
        unet_p.pop("adm_in_channels", None)  # the original UNetModel ignores it then
    elif unet_p.get("adm_in_channels") is None:
        raise ConfigError("num_classes: sequential needs adm_in_channels (the width of the vector y)")

    unet = build(UNetConfig, {k: v for k, v in unet_p.items() if k in _UNET_YAML_KEYS})
    if unet_p.get("num_head_channels", -1) != -1 and "num_heads" not in unet_p:
        unet.num_heads = -1  # SD2 yamls give only num_head_channels
    if isinstance(unet_p.get("context_dim"), (list, tuple)):
        unet.context_dim = int(unet_p["context_dim"][0])
    dd = dict(first.get("ddconfig", {}))
    vae = build(VAEConfig, {"embed_dim": first.get("embed_dim", 4),
                             **{k: v for k, v in dd.items() if k in _VAE_YAML_KEYS}})
    text, text2 = _text_towers(cond, unet)
    parameterization = params.get("parameterization", "eps")
    prediction: PredictionType = "v" if parameterization == "v" else "epsilon"
    if parameterization not in ("eps", "v"):
        raise ConfigError(f"parameterization {reprlib.repr(parameterization)} is not supported (eps or v)")
    image_size = int(params.get("image_size", 64)) * vae.downsample_factor
    family: Family = "custom"
    if text2 is not None:
        family = "sdxl"
    elif text.kind == "openai":
        family = "sd1"
    elif text.kind == "openclip":
        family = "sd2-v" if prediction == "v" else "sd2"
    return ModelConfig(
        family=family, prediction_type=prediction, scale_factor=float(params.get("scale_factor", 0.18215)),
        image_size=image_size, timesteps=int(params.get("timesteps", 1000)),
        linear_start=float(params.get("linear_start", 0.00085)), linear_end=float(params.get("linear_end", 0.012)),
        unet=unet, vae=vae, text=text, text2=text2,
    )


_UNET_YAML_KEYS = {f.name for f in dataclasses.fields(UNetConfig)}
_VAE_YAML_KEYS = {f.name for f in dataclasses.fields(VAEConfig)} - {"embed_dim"}


def _text_towers(cond: Dict[str, Any], unet: UNetConfig) -> Tuple[TextConfig, Optional[TextConfig]]:
    """cond_stage_config -> (text, text2): SD 1.x/2.x have one tower; SDXL's conditioner two, whose contexts
    are concatenated (sgm GeneralConditioner) and whose second one's pooled vector starts `y`."""
    if not str(cond.get("target", "")).endswith("GeneralConditioner"):
        text = text_from_cond(cond)
        widths: Tuple[int, ...] = (text.width,)
        text2 = None
    else:
        first, second, size_dim = config_sdxl.text_towers(cond)
        text, text2 = text_from_cond(first), text_from_cond(second)
        widths = (text.width, text2.width)
        if text2.kind != "openclip":  # its pooled vector is OpenCLIP's projected end-of-text features
            raise ConfigError("the second text tower of an SDXL conditioner must be an OpenCLIP one")
        y = text2.projection_dim + 2 * len(config_sdxl.SIZE_KEYS) * size_dim
        if unet.adm_in_channels != y:
            raise ConfigError(f"adm_in_channels {reprlib.repr(unet.adm_in_channels)} is not the pooled "
                              f"{text2.projection_dim} + 6 size embeddings of {size_dim} = {y}")
    if sum(widths) != unet.context_dim:
        raise ConfigError(f"text width {' + '.join(map(str, widths))} does not match the UNet's context_dim "
                          f"{reprlib.repr(unet.context_dim)}")
    return text, text2


def to_ldm_yaml(cfg: ModelConfig) -> Dict[str, Any]:
    """The inverse of from_ldm_yaml, for configs we write next to checkpoints we produce."""
    # Like the original yamls, leave out the head setting that is not used (-1): diffusers reads num_heads: -1
    # as attention_head_dim -1. SD 1.x/2.x yamls have no num_classes / adm_in_channels (None).
    unet = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg.unet).items()
            if not (k in ("num_heads", "num_head_channels") and v == -1) and v is not None}
    unet["image_size"] = cfg.latent_size
    vae = dataclasses.asdict(cfg.vae)
    dd = {k: list(v) if isinstance(v, tuple) else v for k, v in vae.items() if k != "embed_dim"}
    doc = {"model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "parameterization": "v" if cfg.prediction_type == "v" else "eps",
            "linear_start": cfg.linear_start, "linear_end": cfg.linear_end, "timesteps": cfg.timesteps,
            "image_size": cfg.latent_size, "channels": cfg.unet.in_channels, "scale_factor": cfg.scale_factor,
            "cond_stage_key": "txt", "first_stage_key": "jpg", "conditioning_key": "crossattn",
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                                   "params": {"embed_dim": cfg.vae.embed_dim, "ddconfig": dd,
                                              "lossconfig": {"target": "torch.nn.Identity"}}},
            "cond_stage_config": cond_for(cfg.text),
        },
    }}
    if cfg.text2 is None:
        return doc
    towers = (cond_for(cfg.text, sgm=True), cond_for(cfg.text2, sgm=True))
    return config_sdxl.to_sgm_layout(doc, towers, cfg.size_embed_dim)


def describe(cfg: Optional[ModelConfig]) -> str:
    """One line for logs and `imagic inspect`."""
    if cfg is None:
        return "(no config)"
    texts = " + ".join(f"{t.kind} {t.width}w/{t.layers}L" for t in (cfg.text, cfg.text2) if t is not None)
    return (f"{cfg.family} ({cfg.prediction_type}-prediction, {cfg.image_size}px, "
            f"unet {cfg.unet.model_channels}ch x {list(cfg.unet.channel_mult)}, text {texts})")
