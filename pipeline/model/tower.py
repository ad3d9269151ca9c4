"""The image tower's exits: which open_clip towers can exit early, and the head an early exit leaves through.

Shared by the adaptive-depth encoder (``pipeline.model.encoder``), which runs images through the heads, and the
GFLOP counter (``pipeline.model.flops``), which counts what a head costs; below both, so neither reaches into
the other.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def has_early_exit_heads(visual: nn.Module) -> bool:
    """Return True when ``visual`` pools so that an ExitHead can pool early (class token or average, no attn_pool)."""
    return getattr(visual, "attn_pool", None) is None and visual.pool_type in ("tok", "avg")


def check_visual(visual: nn.Module, exits: list[int]) -> None:
    """Raise a clear error when ``visual`` is not an open_clip ViT tower we can exit early from at ``exits``.

    The last of ``exits`` is the full depth; the earlier ones need class-token or average pooling.
    """
    # Lazy: open_clip takes ~2 s to import and only this check needs its classes; flops (and through it the
    # scorer and the jobs that only score) import this module without ever building a CLIP.
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise TypeError(f"adaptive depth needs an open_clip VisionTransformer image tower (ViT-*), got "
                        f"{type(visual).__name__}; timm and ResNet towers are not supported")
    early = exits[:-1]
    if early and getattr(visual, "attn_pool", None) is not None:
        raise NotImplementedError(
            f"this tower pools with an attentional pooler (CoCa-style attn_pool); early exits {early} would need "
            f"their own trained poolers, which ICAR does not build. Use full depth only (exits={exits[-1:]}) or a "
            f"CLIP ViT with class-token or average pooling")
    if early and visual.pool_type not in ("tok", "avg"):
        raise NotImplementedError(f"pool_type {visual.pool_type!r} gives token maps, not embeddings; early exits "
                                  f"need 'tok' (class token) or 'avg' pooling")


class ExitHead(nn.Module):
    """LayerNorm + projection for one early exit, pooling the way the tower pools at full depth.

    Split in two so trainers can cache what does not learn: ``pool_features`` (no parameters) and
    ``from_features`` (the LayerNorm affine and projection). ``forward(tokens) = from_features(pool_features(tokens))``.
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.pool_type = visual.pool_type
        self.final_ln_after_pool = bool(getattr(visual, "final_ln_after_pool", False))
        self.ln = copy.deepcopy(visual.ln_post)  # keeps open_clip's LayerNorm/LayerNormFp32 class and eps
        for p in self.ln.parameters():  # the tower may be frozen; its copy is what trains
            p.requires_grad_(True)
        proj = getattr(visual, "proj", None)
        self.proj = nn.Parameter(proj.detach().clone()) if proj is not None else None

    def pool_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return the parameter-free pooled features (N, width) of block outputs ``tokens`` (N, L, width)."""
        if self.pool_type == "tok":
            return tokens[:, 0]  # the class token (LayerNorm is per token, so pooling first changes nothing)
        if self.final_ln_after_pool:
            return tokens[:, 1:].mean(dim=1)
        # avg of LayerNorm(token): normalise each patch token (without the affine, which is the learnable part)
        # then average; the affine commutes with the mean and is applied in from_features.
        normed = F.layer_norm(tokens[:, 1:].float(), self.ln.normalized_shape, None, None, self.ln.eps)
        return normed.mean(dim=1).to(tokens.dtype)

    def from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Return the (unnormalised) embeddings (N, D), in the head's dtype, for pooled ``features`` (N, width)."""
        features = features.to(self.ln.weight.dtype)  # a bf16 tower feeds heads kept in float32 (ExitHeads.load)
        if self.pool_type == "avg" and not self.final_ln_after_pool:
            x = features * self.ln.weight + self.ln.bias
        else:
            x = self.ln(features)
        return x @ self.proj if self.proj is not None else x

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return the (unnormalised) embeddings (N, D) of block outputs ``tokens`` (N, L, width)."""
        return self.from_features(self.pool_features(tokens))
