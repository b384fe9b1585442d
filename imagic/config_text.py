"""Text encoder configs: `TextConfig`, the public towers' sizes, and the text models of the original yamls.

An ldm yaml (SD 1.x/2.x) names one text model in `cond_stage_config`; SDXL's sgm yaml names two among the
`GeneralConditioner`'s `emb_models` (config_sdxl.py finds them). Each entry is `{"target", "params"}` with the
original class name as target; `text_from_cond` reads one and `cond_for` writes one. config.py re-exports
`TextConfig` and the token ids.
"""
from __future__ import annotations

import dataclasses
import reprlib
from dataclasses import dataclass
from typing import Any, Dict, Literal

from .config_check import ConfigError, build

# The SD tokenizers: OpenAI CLIP (SD1) pads with the end-of-text token, OpenCLIP (SD2) pads with 0.
SOT_TOKEN = 49406
EOT_TOKEN = 49407


@dataclass
class TextConfig:
    """A CLIP text transformer. `kind` picks the checkpoint naming and details:

    - "openai": SD1's `FrozenCLIPEmbedder` (Hugging Face CLIPTextModel names, QuickGELU, last layer, pad 49407);
    - "openclip": SD2's `FrozenOpenCLIPEmbedder` (OpenCLIP names, GELU, penultimate layer then ln_final, pad 0).

    SDXL has one of each (`SDXL_CLIP_L`, `BIGG`), both penultimate and without the final norm.
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
    final_norm: bool = True  # the final LayerNorm on the chosen layer's output (SDXL's towers leave it out)

    @property
    def pad_token(self) -> int:
        return EOT_TOKEN if self.kind == "openai" else 0


# OpenCLIP ViT-H/14 (SD 2.x) and ViT-bigG/14 (SDXL's second tower): open_clip's model_configs/*.json text_cfg,
# mlp_ratio 4. SDXL's CLIP ViT-L/14 is TextConfig's default sizes with sd_xl_base.yaml's layer "hidden",
# layer_idx 11: hidden_states[11], no final LayerNorm (sgm/modules/encoders/modules.py FrozenCLIPEmbedder); its
# bigG tower has layer "penultimate", legacy False: no ln_final on the context (FrozenOpenCLIPEmbedder2).
VIT_H = dict(kind="openclip", width=1024, layers=24, heads=16, mlp_width=4096, projection_dim=1024, act="gelu",
             layer="penultimate")
BIGG = dict(VIT_H, width=1280, layers=32, heads=20, mlp_width=5120, projection_dim=1280, final_norm=False)
SDXL_CLIP_L = dict(kind="openai", layer="penultimate", final_norm=False)
_ARCHS = {"ViT-H-14": VIT_H, "ViT-bigG-14": BIGG}
LDM, SGM = "ldm.modules.encoders.modules.", "sgm.modules.encoders.modules."


def text_from_cond(cond: Dict[str, Any]) -> TextConfig:
    """One text model's yaml entry -> TextConfig. A malformed entry fails with KeyError, TypeError, ..."""
    target = str(cond.get("target", ""))
    p = cond.get("params") or {}
    if target.endswith("FrozenCLIPEmbedder"):
        t = TextConfig(kind="openai")
        if p.get("layer") == "hidden":  # sgm: hidden_states[layer_idx] of 0..layers, no final LayerNorm
            index = p["layer_idx"] + (t.layers + 1 if p["layer_idx"] < 0 else 0)  # a Python index into the list
            if index not in (t.layers - 1, t.layers):
                raise ConfigError(f"CLIP layer_idx {reprlib.repr(p['layer_idx'])} is not supported (11 or 12)")
            t.layer, t.final_norm = "penultimate" if index == t.layers - 1 else "last", False
        else:
            t.layer = "penultimate" if p.get("layer") == "penultimate" else "last"
    elif target.endswith(("FrozenOpenCLIPEmbedder", "FrozenOpenCLIPEmbedder2")):
        arch = p.get("arch", "ViT-H-14")  # both embedders' default
        if not isinstance(arch, str) or arch not in _ARCHS:
            raise ConfigError(f"OpenCLIP arch {reprlib.repr(arch)} is not supported ({', '.join(_ARCHS)})")
        t = TextConfig(**_ARCHS[arch])  # type: ignore[arg-type]
        t.layer = "last" if p.get("layer") == "last" else "penultimate"
        # FrozenOpenCLIPEmbedder2 applies ln_final to the context only when `legacy` (its default).
        t.final_norm = not target.endswith("2") or bool(p.get("legacy", True))
    elif target.endswith("ImagicTextEncoder"):  # our own small models (weights/shapes) spell every size out
        t = build(TextConfig, dict(p))
    else:
        raise ConfigError(f"text encoder {reprlib.repr(target) if target else '(none)'} is not supported "
                          "(FrozenCLIPEmbedder for SD1, FrozenOpenCLIPEmbedder for SD2)")
    return t


def cond_for(text: TextConfig, sgm: bool = False) -> Dict[str, Any]:
    """The yaml entry for a text model: the original class for the public towers (ldm's for SD 1.x/2.x,
    sgm's for SDXL's two), ours with every size spelled out otherwise."""
    sd1 = TextConfig(kind="openai", layer=text.layer, has_text_model_prefix=text.has_text_model_prefix)
    if not sgm and text == sd1:
        return {"target": LDM + "FrozenCLIPEmbedder", "params": {"layer": text.layer}}
    if not sgm and text.kind == "openclip" and (text.width, text.layers, text.final_norm) == (1024, 24, True):
        return {"target": LDM + "FrozenOpenCLIPEmbedder",
                "params": {"arch": "ViT-H-14", "layer": text.layer, "freeze": True}}
    if sgm and text == TextConfig(**SDXL_CLIP_L):  # type: ignore[arg-type]
        return {"target": SGM + "FrozenCLIPEmbedder", "params": {"layer": "hidden", "layer_idx": 11}}
    if sgm and text == TextConfig(**BIGG):  # type: ignore[arg-type]
        return {"target": SGM + "FrozenOpenCLIPEmbedder2",
                "params": {"arch": "ViT-bigG-14", "version": "laion2b_s39b_b160k", "freeze": True,
                           "layer": "penultimate", "always_return_pooled": True, "legacy": False}}
    return {"target": "imagic.clip.ImagicTextEncoder", "params": dataclasses.asdict(text)}
