"""The two CLIP text encoders of Stable Diffusion, with the checkpoints' own parameter names.

- SD1 (`OpenAICLIPTextModel`): OpenAI CLIP ViT-L/14's text tower as Hugging Face `CLIPTextModel` stores it
  (`text_model.embeddings.*`, `text_model.encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1,
  mlp.fc2, layer_norm2}`, `text_model.final_layer_norm`); ldm's `FrozenCLIPEmbedder` (layer "last") returns the
  last layer's hidden states after `final_layer_norm`.
- SD2 (`OpenCLIPTextModel`): OpenCLIP ViT-H/14's text tower (`token_embedding`, `positional_embedding`,
  `transformer.resblocks.N.{ln_1, attn.{in_proj_weight, in_proj_bias, out_proj}, ln_2, mlp.{c_fc, c_proj}}`,
  `ln_final`, `text_projection`, `logit_scale`); ldm's `FrozenOpenCLIPEmbedder.encode_with_transformer` (layer
  "penultimate") stops one block before the end, then applies `ln_final`.

- SDXL has one of each (sgm/modules/encoders/modules.py, `conditioner.embedders.{0,1}`, see imagic/sdxl.py):
  CLIP ViT-L/14 with layer "hidden", layer_idx 11 (HF `hidden_states[11]`) and OpenCLIP ViT-bigG/14 with layer
  "penultimate", legacy False, whose `encode` also gives the pooled vector; both leave out the final norm
  (`TextConfig.final_norm` False).

Both are pre-norm transformers with causal self-attention over 77 tokens; they differ in names, fused q/k/v,
activation (QuickGELU vs GELU: `TextConfig.act`) and the default layer. `clip_skip` follows the AUTOMATIC1111
convention for both: 1 = last layer, 2 = penultimate, k = the hidden state k-1 layers from the end; the final
norm is applied in every case unless `final_norm` is off.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from imagic.attention import LayerNorm
from imagic.config import TextConfig

LN_EPS = 1e-5  # both CLIPs use torch's default LayerNorm eps


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's activation (clip/model.py QuickGELU), a sigmoid approximation of GELU it was trained with."""
    return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return F.gelu  # exact (erf) GELU, as OpenCLIP's nn.GELU()
    raise ValueError(f"unknown text encoder activation {name!r} (quick_gelu or gelu)")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head causal self-attention, (B, L, width) each -> (B, L, width); scale head_dim**-0.5.

    `imagic.kernels.attention` has no mask argument, and the text encoders (77 tokens, run once per prompt)
    are not a hot path, so this calls torch's SDPA with `is_causal=True` instead of keeping a mask buffer.
    """
    b, n, w = q.shape
    q, k, v = (t.view(b, n, heads, w // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(b, n, w)


def layers_to_run(cfg: TextConfig, clip_skip: Optional[int]) -> int:
    """How many transformer layers to run: all but `clip_skip - 1`; the default comes from `cfg.layer`."""
    skip = clip_skip if clip_skip is not None else (2 if cfg.layer == "penultimate" else 1)
    if not 1 <= skip <= cfg.layers:
        raise ValueError(f"clip_skip must be between 1 (last layer) and {cfg.layers}, got {skip}")
    return cfg.layers - skip + 1


def eot_features(x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The features at each row's first end-of-text token: it has the largest id (49407), and argmax returns the
    first maximum, so this works with either padding (CLIP's `text.argmax(dim=-1)` pooling)."""
    return x[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)]


# ---------------------------------------------------------------------------------------------------------------
# SD1: OpenAI CLIP with Hugging Face CLIPTextModel names (transformers/models/clip/modeling_clip.py)
# ---------------------------------------------------------------------------------------------------------------

class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class CLIPMLP(nn.Module):
    def __init__(self, width: int, mlp_width: int, act: str):
        super().__init__()
        self.act = activation(act)
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg.width, cfg.heads)
        self.layer_norm1 = LayerNorm(cfg.width, eps=LN_EPS)
        self.mlp = CLIPMLP(cfg.width, cfg.mlp_width, cfg.act)
        self.layer_norm2 = LayerNorm(cfg.width, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.width)
        # Derived, so not saved (older SD1 files carry it; the loader skips it).
        self.register_buffer("position_ids", torch.arange(cfg.context_length).expand(1, -1), persistent=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # CLIP's init, for models trained from scratch
        nn.init.normal_(self.position_embedding.weight, std=0.01)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, :input_ids.shape[1]]
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = LayerNorm(cfg.width, eps=LN_EPS)

    def hidden_state(self, input_ids: torch.Tensor, layers: int) -> torch.Tensor:
        """The output of the first `layers` layers, without the final norm (HF `hidden_states[layers]`)."""
        x = self.embeddings(input_ids).to(self.final_layer_norm.weight.dtype)
        for layer in self.encoder.layers[:layers]:
            x = layer(x)
        return x

    def forward(self, input_ids: torch.Tensor, clip_skip: Optional[int] = None) -> torch.Tensor:
        x = self.hidden_state(input_ids, layers_to_run(self.cfg, clip_skip))
        return self.final_layer_norm(x) if self.cfg.final_norm else x


class OpenAICLIPTextModel(nn.Module):
    """SD1's text encoder; its state dict is that of Hugging Face `CLIPTextModel` (keys under `text_model.`)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = CLIPTextTransformer(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.final_layer_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.text_model.final_layer_norm.weight.device

    def forward(self, input_ids: torch.Tensor, clip_skip: Optional[int] = None) -> torch.Tensor:
        """(B, 77) ids -> (B, 77, width) conditioning for the UNet's cross-attention."""
        return self.text_model(input_ids, clip_skip)

    def pooled(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, width) end-of-text features of the last layer (HF's pooler_output). SD1 files hold no
        text_projection, so these are not in CLIP's joint image-text space."""
        last = self.text_model.hidden_state(input_ids, self.cfg.layers)
        return eot_features(self.text_model.final_layer_norm(last), input_ids)


# ---------------------------------------------------------------------------------------------------------------
# SD2: OpenCLIP names (open_clip/transformer.py TextTransformer, open_clip/model.py CLIP)
# ---------------------------------------------------------------------------------------------------------------

class FusedAttention(nn.Module):
    """nn.MultiheadAttention's parameters (`in_proj_weight` = [W_q; W_k; W_v], `in_proj_bias`, `out_proj`)
    with our own forward."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(causal_attention(q, k, v, self.heads))


class OpenCLIPMLP(nn.Module):
    def __init__(self, width: int, mlp_width: int, act: str):
        super().__init__()
        self.act = activation(act)  # at index 1 of OpenCLIP's Sequential (c_fc, gelu, c_proj): no parameters
        self.c_fc = nn.Linear(width, mlp_width)
        self.c_proj = nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.width, eps=LN_EPS)
        self.attn = FusedAttention(cfg.width, cfg.heads)
        self.ln_2 = LayerNorm(cfg.width, eps=LN_EPS)
        self.mlp = OpenCLIPMLP(cfg.width, cfg.mlp_width, cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


class OpenCLIPTextModel(nn.Module):
    """SD2's text encoder; its state dict is the text part of an OpenCLIP `CLIP` (SD2 files store it under
    `cond_stage_model.model.`). `text_projection` and `logit_scale` are stored there too; SD does not use them."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg)
        self.ln_final = LayerNorm(cfg.width, eps=LN_EPS)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # OpenCLIP's init (TextTransformer.init_parameters), for models trained from scratch.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.ln_final.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.ln_final.weight.device

    def forward(self, input_ids: torch.Tensor, clip_skip: Optional[int] = None) -> torch.Tensor:
        """(B, 77) ids -> (B, 77, width) conditioning for the UNet's cross-attention."""
        x = self._embed(input_ids)
        for block in self.transformer.resblocks[:layers_to_run(self.cfg, clip_skip)]:
            x = block(x)
        return self.ln_final(x) if self.cfg.final_norm else x

    def encode(self, input_ids: torch.Tensor, clip_skip: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(forward(input_ids, clip_skip), pooled(input_ids)) in one pass: the layers after the chosen one go on
        from its output (SDXL's FrozenOpenCLIPEmbedder2 with always_return_pooled)."""
        x = self._embed(input_ids)
        n = layers_to_run(self.cfg, clip_skip)
        for block in self.transformer.resblocks[:n]:
            x = block(x)
        context = self.ln_final(x) if self.cfg.final_norm else x
        for block in self.transformer.resblocks[n:]:
            x = block(x)
        return context, eot_features(self.ln_final(x), input_ids) @ self.text_projection.to(x.dtype)

    def pooled(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, projection_dim) CLIP text features: end-of-text token of the last layer after ln_final,
        `@ text_projection` (OpenCLIP's encode_text before normalisation; SDXL's pooled vector)."""
        return self.encode(input_ids)[1]

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(input_ids) + self.positional_embedding[:input_ids.shape[1]]
        return x.to(self.dtype)


def build_text_encoder(cfg: TextConfig) -> nn.Module:
    """The text encoder `cfg.kind` names: "openai" (SD1) or "openclip" (SD2)."""
    if cfg.kind == "openai":
        return OpenAICLIPTextModel(cfg)
    if cfg.kind == "openclip":
        return OpenCLIPTextModel(cfg)
    raise ValueError(f"unknown text encoder kind {cfg.kind!r} (openai or openclip)")
