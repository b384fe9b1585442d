"""Model configurations: dataclasses whose field names are the original LDM yaml parameter names.

The original Stable Diffusion inference yamls (e.g. `v1-inference.yaml`, `v2-inference-v.yaml`) describe a
`LatentDiffusion` whose `unet_config`, `first_stage_config` and `cond_stage_config` give every size. We keep the
same names so a yaml maps onto these dataclasses one to one (`ModelConfig.from_ldm_yaml`), and presets for the
public checkpoints (`preset("sd1")`, `preset("sd2")`, `preset("sd2-v")`).
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

from .config_check import ConfigError, validate

Family = Literal["sd1", "sd2", "sd2-v", "custom"]
PredictionType = Literal["epsilon", "v"]

# The SD tokenizers: OpenAI CLIP (SD1) pads with the end-of-text token, OpenCLIP (SD2) pads with 0.
SOT_TOKEN = 49406
EOT_TOKEN = 49407


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
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    use_checkpoint: bool = False  # gradient checkpointing of ResBlocks and transformer blocks

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
class TextConfig:
    """A CLIP text transformer. `kind` picks the checkpoint naming and details:

    - "openai": SD1's `FrozenCLIPEmbedder` (Hugging Face CLIPTextModel names, QuickGELU, last layer, pad 49407);
    - "openclip": SD2's `FrozenOpenCLIPEmbedder` (OpenCLIP names, GELU, penultimate layer then ln_final, pad 0).
    """

    kind: Literal["openai", "openclip"] = "openai"
    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    context_length: int = 77
    projection_dim: int = 768  # OpenCLIP's text_projection output size (stored in SD2 files, unused by SD)
    act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    layer: Literal["last", "penultimate"] = "last"
    has_text_model_prefix: bool = True  # newer SD1 files store `transformer.text_model.*`, older `transformer.*`

    @property
    def pad_token(self) -> int:
        return EOT_TOKEN if self.kind == "openai" else 0


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

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae.downsample_factor

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        parts = {"unet": UNetConfig, "vae": VAEConfig, "text": TextConfig}
        for name, klass in parts.items():
            if name in d:
                d[name] = _build(klass, d[name])
        return _build(cls, d)

    @classmethod
    def from_ldm_yaml(cls, source: Union[str, Path, Dict[str, Any]]) -> "ModelConfig":
        """Read an original LDM inference yaml (a path or an already-parsed dict)."""
        return from_ldm_yaml(source)


def _tuple_fields(klass: type) -> set:
    return {f.name for f in dataclasses.fields(klass) if "Tuple" in str(f.type)}


def _build(klass: type, values: Dict[str, Any]) -> Any:
    """Construct a dataclass from a dict, turning lists into tuples; unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(klass)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {klass.__name__} fields: {', '.join(unknown)}")
    tuples = _tuple_fields(klass)
    return klass(**{k: tuple(v) if k in tuples and v is not None else v for k, v in values.items()})


def preset(name: str) -> ModelConfig:
    """The configurations of the public checkpoints: "sd1" (v1.x), "sd2" (2.x base 512), "sd2-v" (2.x 768-v)."""
    if name == "sd1":
        return ModelConfig()
    if name in ("sd2", "sd2-v"):
        v = name == "sd2-v"
        return ModelConfig(
            family=name,  # type: ignore[arg-type]
            prediction_type="v" if v else "epsilon",
            image_size=768 if v else 512,
            unet=UNetConfig(num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True),
            text=TextConfig(kind="openclip", width=1024, layers=24, heads=16, mlp_width=4096,
                            projection_dim=1024, act="gelu", layer="penultimate"),
        )
    raise ValueError(f"unknown preset {name!r}; choose sd1, sd2 or sd2-v")


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
        cfg = _from_ldm_doc(doc)
    except ConfigError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, IndexError, OverflowError) as e:
        what = f"missing {e}" if isinstance(e, KeyError) else " ".join(str(e).split())
        raise ConfigError(f"not an LDM inference config: {what}") from None
    return validate(cfg)


def _from_ldm_doc(doc: Any) -> ModelConfig:
    """The mapping itself; a malformed document fails here with KeyError, TypeError, ... (see from_ldm_yaml)."""
    params = doc["model"]["params"]
    unet_p = dict(params["unet_config"]["params"])
    first = params["first_stage_config"]["params"]
    cond = params["cond_stage_config"]
    if unet_p.get("use_spatial_transformer", True) is False:
        raise ConfigError("UNets without a spatial transformer (use_spatial_transformer: False) are not supported")
    if unet_p.get("num_classes") is not None or unet_p.get("adm_in_channels") is not None:
        raise ConfigError("class-conditioned / SDXL-style UNets (num_classes, adm_in_channels) are not supported")

    unet = _build(UNetConfig, {k: v for k, v in unet_p.items() if k in _UNET_YAML_KEYS})
    if unet_p.get("num_head_channels", -1) != -1 and "num_heads" not in unet_p:
        unet.num_heads = -1  # SD2 yamls give only num_head_channels
    if isinstance(unet_p.get("context_dim"), (list, tuple)):
        unet.context_dim = int(unet_p["context_dim"][0])
    if isinstance(unet_p.get("transformer_depth"), (list, tuple)):
        raise ConfigError("per-level transformer_depth (SDXL) is not supported")
    dd = dict(first.get("ddconfig", {}))
    vae = _build(VAEConfig, {"embed_dim": first.get("embed_dim", 4),
                             **{k: v for k, v in dd.items() if k in _VAE_YAML_KEYS}})
    text = _text_from_cond(cond, unet.context_dim)
    parameterization = params.get("parameterization", "eps")
    prediction: PredictionType = "v" if parameterization == "v" else "epsilon"
    if parameterization not in ("eps", "v"):
        raise ConfigError(f"parameterization {reprlib.repr(parameterization)} is not supported (eps or v)")
    image_size = int(params.get("image_size", 64)) * vae.downsample_factor
    family: Family = "custom"
    if text.kind == "openai":
        family = "sd1"
    elif text.kind == "openclip":
        family = "sd2-v" if prediction == "v" else "sd2"
    return ModelConfig(
        family=family, prediction_type=prediction, scale_factor=float(params.get("scale_factor", 0.18215)),
        image_size=image_size, timesteps=int(params.get("timesteps", 1000)),
        linear_start=float(params.get("linear_start", 0.00085)), linear_end=float(params.get("linear_end", 0.012)),
        unet=unet, vae=vae, text=text,
    )


_UNET_YAML_KEYS = {f.name for f in dataclasses.fields(UNetConfig)}
_VAE_YAML_KEYS = {f.name for f in dataclasses.fields(VAEConfig)} - {"embed_dim"}


def _text_from_cond(cond: Dict[str, Any], context_dim: int) -> TextConfig:
    """cond_stage_config -> TextConfig. Target class names are those of the original repos."""
    target = str(cond.get("target", ""))
    p = cond.get("params") or {}
    if target.endswith("FrozenCLIPEmbedder"):
        t = TextConfig(kind="openai")
        t.layer = "penultimate" if p.get("layer") == "penultimate" else "last"
    elif target.endswith("FrozenOpenCLIPEmbedder"):
        t = preset("sd2").text
        t.layer = "last" if p.get("layer") == "last" else "penultimate"
    elif target.endswith("ImagicTextEncoder"):  # our own small models (weights/shapes) spell every size out
        t = _build(TextConfig, dict(p))
    else:
        raise ConfigError(f"text encoder {reprlib.repr(target) if target else '(none)'} is not supported "
                          "(FrozenCLIPEmbedder for SD1, FrozenOpenCLIPEmbedder for SD2)")
    if t.width != context_dim:
        raise ConfigError(f"text width {reprlib.repr(t.width)} does not match the UNet's context_dim "
                          f"{reprlib.repr(context_dim)}")
    return t


def to_ldm_yaml(cfg: ModelConfig) -> Dict[str, Any]:
    """The inverse of from_ldm_yaml, for configs we write next to checkpoints we produce."""
    # Like the original yamls, leave out the head setting that is not used (-1): diffusers reads num_heads: -1
    # as attention_head_dim -1.
    unet = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg.unet).items()
            if not (k in ("num_heads", "num_head_channels") and v == -1)}
    unet["image_size"] = cfg.latent_size
    vae = dataclasses.asdict(cfg.vae)
    dd = {k: list(v) if isinstance(v, tuple) else v for k, v in vae.items() if k != "embed_dim"}
    if cfg.text.kind == "openai" and cfg.text == TextConfig(kind="openai", layer=cfg.text.layer,
                                                             has_text_model_prefix=cfg.text.has_text_model_prefix):
        cond = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder", "params": {"layer": cfg.text.layer}}
    elif cfg.text.kind == "openclip" and cfg.text.width == 1024 and cfg.text.layers == 24:
        cond = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"arch": "ViT-H-14", "layer": cfg.text.layer, "freeze": True}}
    else:
        cond = {"target": "imagic.clip.ImagicTextEncoder", "params": dataclasses.asdict(cfg.text)}
    return {"model": {
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
            "cond_stage_config": cond,
        },
    }}


def describe(cfg: Optional[ModelConfig]) -> str:
    """One line for logs and `imagic inspect`."""
    if cfg is None:
        return "(no config)"
    return (f"{cfg.family} ({cfg.prediction_type}-prediction, {cfg.image_size}px, "
            f"unet {cfg.unet.model_channels}ch x {list(cfg.unet.channel_mult)}, text {cfg.text.kind} "
            f"{cfg.text.width}w/{cfg.text.layers}L)")
