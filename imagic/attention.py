"""The UNet's transformer: a port of ldm/modules/attention.py (Stability-AI/stablediffusion) with the same names.

Attribute names and `nn.Sequential` indices are the checkpoint keys (`attn1.to_q`, `attn2.to_out.0`,
`ff.net.0.proj`, `ff.net.2`, `norm1..3`, `proj_in`, `transformer_blocks.N`, `proj_out`), so a checkpoint loads
with `load_state_dict(strict=True)`. The maths goes through `imagic.kernels` (attention, layer_norm, group_norm,
geglu), which dispatch to Triton on CUDA and to the torch references elsewhere.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from imagic import kernels


def maybe_checkpoint(fn: Callable[..., torch.Tensor], enabled: bool, *args: Optional[torch.Tensor]) -> torch.Tensor:
    """Run `fn(*args)`, recomputing its activations in the backward pass when `enabled` (saves memory).

    The original uses its own `ldm.modules.diffusionmodules.util.checkpoint`; torch's non-reentrant version
    computes the same gradients and also gives them to inputs that do not require grad themselves.
    """
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters, as the original initialises residual output projections (new blocks start
    as identities). Checkpoint weights overwrite this; it matters only when training from scratch."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same `weight`/`bias` keys) computed by `kernels.group_norm`: statistics in fp32, result cast
    back to the input dtype (ldm's GroupNorm32). `silu=True` fuses the SiLU that follows every UNet norm."""

    def forward(self, x: torch.Tensor, silu: bool = False) -> torch.Tensor:
        return kernels.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu=silu)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same keys) over the last dimension, computed by `kernels.layer_norm` (fp32 statistics)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)


class CrossAttention(nn.Module):
    """Multi-head attention of `x` over `context` (self-attention when context is None).

    The original scales by dim_head**-0.5 and, with ATTN_PRECISION=fp32 (its default), computes q k^T in fp32;
    `kernels.attention` accumulates in fp32 as well.
    """

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(0.0))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, heads*d) -> (B, heads, L, d)."""
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = (self._split_heads(t) for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = kernels.attention(q, k, v)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): one Linear to 2*dim_out, then a * gelu(gate), exact erf GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.geglu(self.proj(x))


class FeedForward(nn.Module):
    """The transformer MLP: `net = (GEGLU | Linear+GELU, Dropout, Linear)`; SD always uses the GEGLU variant."""

    def __init__(self, dim: int, mult: int = 4, glu: bool = True):
        super().__init__()
        inner_dim = dim * mult
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(0.0), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the text, feed-forward, each with a residual.

    The LayerNorms keep torch's default eps 1e-5, as in the original (`nn.LayerNorm(dim)`) and diffusers.
    """

    def __init__(self, dim: int, n_heads: int, d_head: int, context_dim: Optional[int] = None,
                 checkpoint: bool = False):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head)
        self.ff = FeedForward(dim, glu=True)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head)
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.norm3 = LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        return maybe_checkpoint(self._forward, self.checkpoint, x, context)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: norm, project in, `depth` blocks, project out, residual.

    SD1 projects with 1x1 convolutions before flattening; SD2 (`use_linear=True`) flattens first and uses Linear.
    The norm is GroupNorm(32, eps=1e-6) (ldm's `Normalize`), not the ResBlocks' eps 1e-5.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1,
                 context_dim: Optional[int] = None, use_linear: bool = False, use_checkpoint: bool = False):
        super().__init__()
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        self.norm = GroupNorm(32, in_channels, eps=1e-6)
        if use_linear:
            self.proj_in: nn.Module = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner_dim, n_heads, d_head, context_dim=context_dim, checkpoint=use_checkpoint)
             for _ in range(depth)])
        # The original writes nn.Linear(in_channels, inner_dim) here, a slip that is harmless because SD2 has
        # in_channels == inner_dim; the shape that means what it does is (inner_dim -> in_channels).
        if use_linear:
            self.proj_out: nn.Module = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2).contiguous()  # (B, C, H, W) -> (B, H*W, C)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
