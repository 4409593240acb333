"""Resampling learned position embeddings to a new patch grid (fine-tuning at higher resolution).

The paper: "we perform 2D interpolation of the pre-trained position embeddings, according to their
location in the original image". Prefix tokens (the class token) have no location and are kept
as they are; the interpolation runs in float32 whatever the embeddings' dtype, which is restored.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["resample_pos_embed"]


def resample_pos_embed(posemb: torch.Tensor, new_grid: int | tuple[int, int], num_prefix_tokens: int = 1,
                       mode: str = "bilinear") -> torch.Tensor:
    """(1, prefix + g*g, D) -> (1, prefix + H*W, D) for ``new_grid`` = H x W (or an int for square)."""
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"expected position embeddings of shape (1, T, D), got {tuple(posemb.shape)}")
    new_h, new_w = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ValueError(f"{grid.shape[1]} patch position embeddings do not form a square grid")
    if (old, old) == (new_h, new_w):
        return posemb.clone()
    dim = grid.shape[-1]
    x = grid.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)  # (1, D, g, g)
    x = F.interpolate(x, size=(new_h, new_w), mode=mode, align_corners=False)
    x = x.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(posemb.dtype)
    return torch.cat([prefix, x], dim=1)
