"""A small vision transformer in plain torch, for the transformer tests.

Self-contained (imports only torch): ``write_vit_model_dir`` copies this file verbatim into
a model directory as ``model.py``, as a user's own ViT class would be served.
"""

from __future__ import annotations

import math

import torch
from torch import nn

VIT_CAM_LAYER = "blocks.1"
"""The last block but one, whose token output N x (1 + h*w) x D the CAM methods reshape to a
grid. Not the last block: the head reads only the class token after it, so the last
block's patch tokens get zero gradient (and every gradient CAM a zero map)."""


class PatchEmbed(nn.Module):
    """Non-overlapping patches, linearly embedded: N x C x H x W -> N x (H/p * W/p) x D."""

    def __init__(self, channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; the probabilities are the output of the ``softmax``
    module (N x heads x T x T), where attention rollout reads them."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(dim // heads)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.softmax = nn.Softmax(dim=-1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = self.softmax((q @ k.transpose(-2, -1)) * self.scale)
        return self.proj((attn @ v).transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding, class token, learned position embedding, ``depth`` blocks, final
    norm and a linear head on the class token.

    Input N x channels x size x size (normalized); output logits N x num_classes. The
    blocks' outputs are N x (1 + (size/patch)^2) x dim, the class token first.
    """

    def __init__(
        self,
        num_classes: int = 3,
        channels: int = 3,
        size: int = 16,
        patch: int = 4,
        dim: int = 16,
        depth: int = 3,
        heads: int = 2,
    ) -> None:
        super().__init__()
        tokens = (size // patch) ** 2
        self.patch_embed = PatchEmbed(channels, dim, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.2)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.2)
        self.blocks = nn.Sequential(*[Block(dim, heads, 2 * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        tokens = self.norm(self.blocks(tokens))
        return self.head(tokens[:, 0])
