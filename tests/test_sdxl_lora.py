"""kohya SDXL LoRA files, written by the editor and read back, through diffusers' own loader (which needs `peft`, a test extra).

sd-scripts names an SDXL LoRA by the original sgm module path (`lora_unet_input_blocks_4_1_transformer_blocks_0_
attn1_to_q`), not by the diffusers path it uses for SD 1.x/2.x; diffusers' `StableDiffusionXLPipeline.load_lora_weights`
maps those names with `_maybe_map_sgm_blocks_to_diffusers` + `_convert_non_diffusers_lora_to_diffusers`. The UNet is
SDXL-structured at small widths (no attention at the first level, transformer depth 1, 2, 3 per level), its diffusers
twin converted by diffusers' single-file converter (tests/test_sdxl.py).
"""
from __future__ import annotations

import copy
from typing import Tuple

import pytest
import torch

from imagic import lora as L
from imagic import lora_format as LF
from imagic.config import preset
from imagic.fileio import load_safetensors, save_safetensors
from imagic.sdxl import size_embedding
from imagic.unet import UNetModel
from tests.helpers import randomize_, rel_err

peft = pytest.importorskip("peft", reason="diffusers' LoRA loaders need peft (a test extra)")
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline  # noqa: E402
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya  # noqa: E402
from peft import get_peft_model_state_dict  # noqa: E402

from tests.test_lora_interop import randomize_lora_  # noqa: E402
from tests.test_sdxl import diffusers_twin, small_sdxl, time_ids  # noqa: E402

TOL = 1e-4
CFG = small_sdxl((16, 32), 16, 8)


def pipeline(unet: UNetModel) -> StableDiffusionXLPipeline:
    """An SDXL pipeline around the diffusers twin of `unet`: load_lora_weights needs only the UNet (and no text
    encoders when the file has no lora_te* tensors)."""
    return StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=diffusers_twin(unet, CFG),
                                     scheduler=EulerDiscreteScheduler())


def inputs() -> Tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(2)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 981]),
            torch.randn(2, 7, CFG.unet.context_dim, generator=g), torch.randn(2, 16, generator=g))


@torch.no_grad()
def our_out(unet: UNetModel) -> torch.Tensor:
    x, t, ctx, pooled = inputs()
    return unet(x, t, ctx, torch.cat([pooled, size_embedding(time_ids(2), CFG.size_embed_dim)], dim=1))


@torch.no_grad()
def diffusers_out(pipe: StableDiffusionXLPipeline) -> torch.Tensor:
    x, t, ctx, pooled = inputs()
    return pipe.unet(x, t, encoder_hidden_states=ctx,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids(2)}).sample


def with_lora(alpha: float) -> Tuple[UNetModel, UNetModel]:
    """(a random SDXL-structured UNet, the same with a random rank-4 LoRA on kohya's default targets)."""
    base = randomize_(UNetModel(CFG.unet)).eval()
    lora = copy.deepcopy(base)
    L.inject_lora(lora, rank=4, alpha=alpha)
    randomize_lora_(lora)
    return base, lora


def test_sdxl_kohya_names_are_the_sgm_paths():
    _, ours = with_lora(alpha=2)
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in LF.to_kohya(ours)}
    assert names == {"lora_unet_" + p.replace(".", "_") for p, _ in L.lora_modules(ours)}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_input_blocks_7_1_transformer_blocks_2_ff_net_0_proj" in names  # depth 3 at the last level
    assert "lora_unet_middle_block_1_transformer_blocks_2_attn2_to_out_0" in names  # the middle takes the last's
    assert "lora_unet_output_blocks_5_1_proj_out" in names
    assert not any(n.startswith(("lora_unet_input_blocks_1_", "lora_unet_input_blocks_2_")) for n in names)
    with pytest.raises(ValueError, match="not inside a SpatialTransformer"):
        LF.kohya_name("input_blocks.1.0.in_layers.2", CFG.unet)


def test_sd1_kohya_names_stay_the_diffusers_paths():
    for family in ("sd1", "sd2"):
        cfg = preset(family).unet
        assert (LF.kohya_name("input_blocks.1.1.transformer_blocks.0.attn1.to_q", cfg)
                == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")
        assert LF.kohya_name("output_blocks.11.1.proj_out", cfg) == "lora_unet_up_blocks_3_attentions_2_proj_out"
    # SDXL at full size: input block 4 is level 1's first (no attention at level 0).
    assert (LF.kohya_name("input_blocks.4.1.transformer_blocks.9.attn1.to_q", preset("sdxl").unet)
            == "lora_unet_input_blocks_4_1_transformer_blocks_9_attn1_to_q")


def test_our_sdxl_kohya_file_loads_into_diffusers(tmp_path):
    base, ours = with_lora(alpha=2)  # scale 0.5: a wrong alpha convention shows
    pipe = pipeline(base)
    save_safetensors(tmp_path / "xl.safetensors", LF.to_kohya(ours), {"ss_network_module": "networks.lora"})
    L.merge_lora(ours)
    expected = our_out(ours)
    assert rel_err(expected, our_out(base)) > 0.05  # the LoRA matters
    pipe.load_lora_weights(str(tmp_path), weight_name="xl.safetensors")
    # Every LoRA landed: diffusers' PEFT layers, one per module of ours.
    assert sum(hasattr(m, "lora_A") for m in pipe.unet.modules()) == len(list(L.lora_modules(ours)))
    assert rel_err(diffusers_out(pipe), expected) <= TOL


def test_from_kohya_gives_back_our_lora(tmp_path):
    _, ours = with_lora(alpha=2)
    save_safetensors(tmp_path / "xl.safetensors", LF.to_kohya(ours))
    kohya, _ = load_safetensors(tmp_path / "xl.safetensors")
    fresh = UNetModel(CFG.unet)
    assert len(LF.from_kohya(fresh, kohya)) == len(kohya) // 3
    got, want = LF.lora_state_dict(fresh), LF.lora_state_dict(ours)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_diffusers_named_sdxl_file_loads_into_ours():
    """diffusers' own kohya writer names SDXL modules by the diffusers path; from_kohya takes those too."""
    base, ours = with_lora(alpha=4)  # convert_state_dict_to_kohya writes alpha = rank: only alpha = rank is faithful
    pipe = pipeline(base)
    pipe.load_lora_weights(LF.to_kohya(ours), adapter_name="xl")
    peft_sd = get_peft_model_state_dict(pipe.unet, adapter_name="xl")
    theirs = convert_state_dict_to_kohya({"unet." + k: v for k, v in peft_sd.items()})
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_") for k in theirs)
    fresh = UNetModel(CFG.unet)
    LF.from_kohya(fresh, theirs)
    got, want = LF.lora_state_dict(fresh), LF.lora_state_dict(ours)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
