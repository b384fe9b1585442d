"""SDXL's conditioning: its two text towers and the size/crop vector, as sgm's `GeneralConditioner` computes them
(Stability-AI/generative-models, sgm/modules/encoders/modules.py, with configs/inference/sd_xl_base.yaml).

- `context` (B, 77, 768 + 1280) is the two towers' token features concatenated along the channels, in embedder
  order (GeneralConditioner.forward: "crossattn" outputs are concatenated on dim 2): CLIP ViT-L/14's
  `hidden_states[11]` and OpenCLIP ViT-bigG/14's penultimate block output, neither with its final norm.
- `y` (B, 1280 + 6 * 256) is bigG's pooled vector followed by the Fourier features of original size (h, w), crop
  top-left (top, left) and target size (h, w) ("vector" outputs are concatenated on dim 1); it enters the UNet
  through `label_emb` (imagic.unet).

`Conditioner`'s state dict is the checkpoint's under `conditioner.`: `embedders.0.transformer.*` (Hugging Face
CLIPTextModel names) and `embedders.1.model.*` (OpenCLIP names). Embedders 2-4, the three
`ConcatTimestepEmbedderND`, have no parameters; `size_embedding` is their computation.

Imagic's "text embedding" on SDXL is the pair (context, pooled): stage 1 optimises both and stage 3 interpolates
both with the same alpha. The editor, the optimisation loops and the samplers handle one tensor per embedding, so
the pair travels packed (`pack`): one more row after the 77 tokens holds the pooled vector in its first entries
and zeros after them. The zeros never reach the UNet (`unpack` drops them), so their gradient is exactly zero and
Adam leaves them at zero; interpolating packed tensors interpolates both parts. `VectorUNet` unpacks at the UNet
call and appends the run's fixed size/crop features to make `y`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from imagic.clip import OpenAICLIPTextModel, OpenCLIPTextModel
from imagic.config import ModelConfig, TextConfig
from imagic.unet import timestep_embedding


def pack(context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(B, L, D) context and (B, P) pooled, P <= D -> (B, L + 1, D): the pooled vector as a last row, zero-padded."""
    b, _, d = context.shape
    if pooled.shape[-1] > d:
        raise ValueError(f"a pooled vector of {pooled.shape[-1]} does not fit a context row of {d}")
    row = torch.zeros(b, 1, d, dtype=context.dtype, device=context.device)
    row[:, 0, :pooled.shape[-1]] = pooled.to(context.dtype)
    return torch.cat([context, row], dim=1)


def unpack(packed: torch.Tensor, pooled_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """`pack`'s inverse: (context (B, L, D), pooled (B, pooled_dim))."""
    return packed[:, :-1], packed[:, -1, :pooled_dim]


def size_features(original_size: Tuple[int, int], crop_top_left: Tuple[int, int], target_size: Tuple[int, int],
                  dim: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """(1, 6 * dim): the Fourier features of (h, w), (top, left), (h, w), the part of `y` after the pooled vector
    (sgm's embedders 2-4 in the yaml's order: original_size_as_tuple, crop_coords_top_left, target_size_as_tuple)."""
    numbers = torch.tensor([[*original_size, *crop_top_left, *target_size]], dtype=torch.float32, device=device)
    return size_embedding(numbers, dim)


class VectorUNet:
    """Calls an SDXL UNet with a packed embedding, `(x, t, packed) -> unet(x, t, context, y)`, where
    y = [pooled, size features]: the editor's and the loops' one-tensor interface on a vector-conditioned UNet."""

    def __init__(self, unet: nn.Module, pooled_dim: int, sizes: torch.Tensor):
        self.unet, self.pooled_dim, self.sizes = unet, pooled_dim, sizes

    def __call__(self, x: torch.Tensor, t: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        context, pooled = unpack(packed, self.pooled_dim)
        sizes = self.sizes.to(device=pooled.device, dtype=pooled.dtype).expand(pooled.shape[0], -1)
        return self.unet(x, t, context, torch.cat([pooled, sizes], dim=1))


def size_embedding(numbers: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, n) numbers -> (B, n * dim): each one through the timestep sinusoid (cos half first), concatenated in
    order (ConcatTimestepEmbedderND: `rearrange(x, "b d -> (b d)")`, Timestep(outdim), back to `b (d d2)`)."""
    b, n = numbers.shape
    return timestep_embedding(numbers.reshape(b * n), dim).reshape(b, n * dim)


class FrozenCLIPEmbedder(nn.Module):
    """`conditioner.embedders.0`: CLIP ViT-L/14 as Hugging Face CLIPTextModel under `transformer`."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.transformer = OpenAICLIPTextModel(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids)


class FrozenOpenCLIPEmbedder2(nn.Module):
    """`conditioner.embedders.1`: OpenCLIP ViT-bigG/14's text tower under `model`; returns (context, pooled)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.model = OpenCLIPTextModel(cfg)

    def forward(self, input_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode(input_ids)


class Conditioner(nn.Module):
    """SDXL's text conditioning: (ids for CLIP-L, ids for bigG) -> (context, pooled); `vector` makes `y`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.text2 is None:
            raise ValueError(f"{cfg.family} has one text tower; the SDXL conditioner needs two (text, text2)")
        self.size_embed_dim = cfg.size_embed_dim
        self.embedders = nn.ModuleList([FrozenCLIPEmbedder(cfg.text), FrozenOpenCLIPEmbedder2(cfg.text2)])

    def forward(self, input_ids: torch.Tensor, input_ids2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """input_ids: (B, 77) from the CLIP tokenizer (pad 49407), input_ids2: (B, 77) from OpenCLIP's (pad 0).
        Returns context (B, 77, width + width2) and pooled (B, projection_dim2)."""
        context2, pooled = self.embedders[1](input_ids2)
        return torch.cat([self.embedders[0](input_ids), context2], dim=-1), pooled

    def vector(self, pooled: torch.Tensor, original_size: Tuple[int, int], crop_top_left: Tuple[int, int],
               target_size: Tuple[int, int]) -> torch.Tensor:
        """`y` (B, adm_in_channels): pooled, then the embedded (h, w), (top, left) and (h, w) of every row."""
        sizes = size_features(original_size, crop_top_left, target_size, self.size_embed_dim, pooled.device)
        return torch.cat([pooled, sizes.to(pooled.dtype).expand(pooled.shape[0], -1)], dim=1)
