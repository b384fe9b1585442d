"""SDXL's yaml layout, read and written by translating it to and from the LDM layout that config.py reads.

SDXL's yaml (Stability-AI/generative-models, configs/inference/sd_xl_base.yaml) describes an
`sgm.models.diffusion.DiffusionEngine`, not an ldm `LatentDiffusion`; the sizes are the same kind, under other
keys:

    sgm (DiffusionEngine)                                       LDM (LatentDiffusion)
    network_config                                              unet_config
    conditioner_config (GeneralConditioner: a list of models)   cond_stage_config
    denoiser_config.params.num_idx                              timesteps
    denoiser_config...scaling_config EpsScaling / VScaling      parameterization eps / v
    denoiser_config...discretization_config linear_start/end    linear_start, linear_end
    first_stage_config, scale_factor                            the same

Everything here is dict to dict, so config.py (which owns the dataclasses) uses this module without an import
cycle. The conditioner must have SDXL base's structure: two text towers (the second also returns its pooled
vector) and three `ConcatTimestepEmbedderND` for original size, crop and target size, in that order.
"""
from __future__ import annotations

import reprlib
from typing import Any, Dict, List, Tuple

from .config_check import ConfigError

# The three size conditionings, each two numbers embedded by the timestep sinusoid (ConcatTimestepEmbedderND).
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
SDXL_IMAGE_SIZE = 1024  # sgm yamls name no resolution; SDXL base is trained for 1024x1024

SCALING = "sgm.modules.diffusionmodules.denoiser_scaling."


def is_sgm(doc: Any) -> bool:
    """Whether a parsed yaml is a DiffusionEngine (it has `model.params.network_config`)."""
    params = doc.get("model", {}).get("params") if isinstance(doc, dict) else None
    return isinstance(params, dict) and "network_config" in params


def to_ldm_layout(doc: Dict[str, Any]) -> Dict[str, Any]:
    """A DiffusionEngine yaml as the LatentDiffusion yaml with the same sizes. A malformed document fails
    with KeyError, TypeError, ... (config.from_ldm_yaml turns those into one-line ConfigErrors)."""
    p = doc["model"]["params"]
    denoiser = p.get("denoiser_config", {}).get("params", {})
    scaling = str(denoiser.get("scaling_config", {}).get("target", "EpsScaling"))
    if scaling.endswith("EpsScaling"):
        parameterization = "eps"
    elif scaling.endswith("VScaling"):
        parameterization = "v"
    else:
        raise ConfigError(f"denoiser scaling {reprlib.repr(scaling)} is not supported (EpsScaling or VScaling: "
                          "EDM-style models are not SD's discrete-time DDPM)")
    discretization = denoiser.get("discretization_config", {})
    if not str(discretization.get("target", "LegacyDDPMDiscretization")).endswith("LegacyDDPMDiscretization"):
        raise ConfigError(f"discretization {reprlib.repr(discretization['target'])} is not supported "
                          "(LegacyDDPMDiscretization, SD's scaled-linear schedule)")
    schedule = discretization.get("params") or {}
    downsample = 2 ** (len(p["first_stage_config"]["params"]["ddconfig"]["ch_mult"]) - 1)
    return {"model": {"params": {
        "parameterization": parameterization,
        "timesteps": denoiser.get("num_idx", 1000),
        # sgm/modules/diffusionmodules/discretizer.py LegacyDDPMDiscretization's defaults
        "linear_start": schedule.get("linear_start", 0.00085), "linear_end": schedule.get("linear_end", 0.012),
        "scale_factor": p.get("scale_factor", 1.0),  # DiffusionEngine's default
        "image_size": SDXL_IMAGE_SIZE // downsample,
        "unet_config": p["network_config"],
        "first_stage_config": p["first_stage_config"],
        "cond_stage_config": {"target": "sgm.modules.GeneralConditioner",
                              "params": p["conditioner_config"]["params"]},
    }}}


def text_towers(cond: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any], int]:
    """A GeneralConditioner's two text towers (each {"target", "params"}, as an LDM cond_stage_config) and the
    width of its size embedding; refuses conditioners without SDXL base's structure."""
    models: List[Dict[str, Any]] = list(cond["params"]["emb_models"])
    texts = [m for m in models if not str(m.get("target", "")).endswith("ConcatTimestepEmbedderND")]
    sizes = [m for m in models if m not in texts]
    keys = tuple(m.get("input_key") for m in sizes)
    if len(texts) != 2 or models[:2] != texts or keys != SIZE_KEYS:
        refiner = len(texts) == 1 and "aesthetic_score" in keys
        raise ConfigError(("the SDXL refiner (one text tower, aesthetic score)" if refiner else
                           f"a conditioner of {len(texts)} text models and size keys {list(keys)}") +
                          " is not supported (SDXL base: two text towers, then " + ", ".join(SIZE_KEYS) + ")")
    second = texts[1].get("params") or {}
    if str(texts[1]["target"]).endswith("FrozenOpenCLIPEmbedder2") and not second.get("always_return_pooled"):
        raise ConfigError("the second text tower must return its pooled vector (always_return_pooled: True)")
    dims = {int((m.get("params") or {})["outdim"]) for m in sizes}
    if len(dims) != 1:
        raise ConfigError(f"the size embeddings have different widths {sorted(dims)}")
    return texts[0], texts[1], dims.pop()


def to_sgm_layout(ldm: Dict[str, Any], towers: Tuple[Dict[str, Any], Dict[str, Any]], size_dim: int
                  ) -> Dict[str, Any]:
    """The inverse of to_ldm_layout, for the yaml of an SDXL-structured model we write: `ldm` is its LDM
    layout, `towers` the two text models' {"target", "params"}."""
    p = ldm["model"]["params"]
    scaling = SCALING + ("EpsScaling" if p["parameterization"] == "eps" else "VScaling")
    # sgm's UNetModel takes no image_size (ldm's does)
    unet = {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": {k: v for k, v in p["unet_config"]["params"].items() if k != "image_size"}}
    emb_models = [dict(towers[0], is_trainable=False, input_key="txt"),
                  dict(towers[1], is_trainable=False, input_key="txt")]
    emb_models += [{"is_trainable": False, "input_key": key, "params": {"outdim": size_dim},
                    "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND"} for key in SIZE_KEYS]
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": p["scale_factor"], "disable_first_stage_autocast": True,
        "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
            "num_idx": p["timesteps"], "scaling_config": {"target": scaling},
            "discretization_config": {
                "target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization",
                "params": {"linear_start": p["linear_start"], "linear_end": p["linear_end"]}}}},
        "network_config": unet,
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": emb_models}},
        "first_stage_config": dict(p["first_stage_config"], target="sgm.models.autoencoder.AutoencoderKL"),
    }}}

