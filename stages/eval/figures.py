"""Report figures, one PNG per function (matplotlib's Agg renderer, no pyplot).

Figures are built with ``matplotlib.figure.Figure`` directly rather than ``pyplot``: no global
backend switch, no figure registry to leak from a long-lived Ray worker, safe in threads. PNGs are
written without the "Software" metadata so that identical inputs give identical bytes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from stages.data.transforms import MEAN, STD

__all__ = ["plot_goodput", "plot_curves", "plot_patch_components", "plot_position_similarity", "plot_attention_distance",
           "plot_attention_rollout", "denormalize_images"]

logger = logging.getLogger(__name__)

_DPI = 100
_PNG_METADATA = {"Software": None}


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI, metadata=_PNG_METADATA)
    logger.debug("wrote %s", path)
    return path


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


def _mosaic(tiles: np.ndarray, cols: int, pad: int = 1, fill: float = np.nan) -> np.ndarray:
    """(n, h, w[, c]) tiles -> one (rows*(h+pad)-pad, cols*(w+pad)-pad[, c]) image; one imshow is far
    cheaper than hundreds of axes (a 14x14 grid of similarity maps has 196 tiles)."""
    n, h, w = tiles.shape[:3]
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, *tiles.shape[3:]), fill, dtype=np.float32)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = tile
    return out


def plot_curves(history: Sequence[dict], path: str | Path) -> Path:
    """Training loss and learning rate against step, two panels. Entries are dicts with step, loss, lr
    (an entry lacking loss or lr, e.g. an eval record, is skipped for that panel)."""
    if not history:
        raise ValueError("history is empty")
    fig = Figure(figsize=(10, 3.5))
    for ax, key, label in zip(fig.subplots(1, 2), ("loss", "lr"), ("training loss", "learning rate")):
        points = [(h["step"], h[key]) for h in history if h.get(key) is not None and "step" in h]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, linewidth=1.0)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_goodput(stages: dict[str, dict[str, float]], path: str | Path) -> Path:
    """One horizontal stacked bar per training stage: seconds per goodput bucket, in the given order."""
    if not stages:
        raise ValueError("no stage to plot")
    names = list(stages)
    buckets = list(next(iter(stages.values())))
    fig = Figure(figsize=(10, 1.6 + 0.5 * len(names)), layout="constrained")
    ax = fig.subplots()
    left = np.zeros(len(names))
    colors = matplotlib.colormaps["tab10"]
    for i, bucket in enumerate(buckets):
        seconds = np.array([stages[n].get(bucket, 0.0) for n in names])
        ax.barh(names, seconds, left=left, color=colors(i % 10), label=bucket.replace("_", " "))
        left += seconds
    ax.set_xlabel("seconds")
    ax.invert_yaxis()  # stages top-down in run order
    fig.legend(loc="outside lower center", ncol=min(5, len(buckets)), fontsize="small", frameon=False)
    return _save(fig, path)


def plot_patch_components(components: torch.Tensor | np.ndarray, path: str | Path, cols: int = 7) -> Path:
    """Principal components of the patch-embedding filters (n, C, P, P) as a tile grid (paper Fig 7 left).

    Each component is min-max scaled to [0, 1] on its own (their signs and scales are arbitrary);
    C=3 is shown as RGB, anything else as the channel mean in grey.
    """
    comps = _numpy(components)
    if comps.ndim != 4:
        raise ValueError(f"expected components of shape (n, C, P, P), got {comps.shape}")
    lo = comps.min(axis=(1, 2, 3), keepdims=True)
    hi = comps.max(axis=(1, 2, 3), keepdims=True)
    comps = (comps - lo) / np.maximum(hi - lo, 1e-12)
    tiles = comps.transpose(0, 2, 3, 1) if comps.shape[1] == 3 else comps.mean(axis=1)  # (n, P, P[, 3])
    image = _mosaic(tiles, min(cols, len(tiles)), fill=1.0)
    fig = Figure(figsize=(6, 6 * image.shape[0] / image.shape[1] + 0.5))
    ax = fig.subplots()
    ax.imshow(image, cmap=None if image.ndim == 3 else "gray", interpolation="nearest")
    ax.set_title("RGB embedding filters (first principal components)")
    ax.axis("off")
    return _save(fig, path)


def plot_position_similarity(sim: torch.Tensor | np.ndarray, path: str | Path) -> Path:
    """Cosine similarity of position embeddings (g, g, g, g) as a g x g grid of g x g tiles (Fig 7 centre)."""
    s = _numpy(sim)
    if s.ndim != 4 or s.shape[0] != s.shape[1] or s.shape[2:] != s.shape[:2]:
        raise ValueError(f"expected similarities of shape (g, g, g, g), got {s.shape}")
    g = s.shape[0]
    image = _mosaic(s.reshape(g * g, g, g), g)  # NaN separators render as background
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    shown = ax.imshow(image, cmap="viridis", vmin=-1.0, vmax=1.0, interpolation="nearest")
    ax.set_title("Position embedding similarity")
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(shown, ax=ax, label="cosine similarity")
    return _save(fig, path)


def plot_attention_distance(dist: torch.Tensor | np.ndarray, patch_size: int, path: str | Path) -> Path:
    """Mean attention distance (depth, heads), one dot per head against network depth (Fig 7 right)."""
    d = _numpy(dist)
    if d.ndim != 2:
        raise ValueError(f"expected distances of shape (depth, heads), got {d.shape}")
    depth, heads = d.shape
    fig = Figure(figsize=(5, 4))
    ax = fig.subplots()
    layers = np.arange(1, depth + 1)
    for h in range(heads):
        ax.scatter(layers, d[:, h], s=12, label=f"head {h + 1}")
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_title(f"/{patch_size} patches")
    ax.set_xlim(0.5, depth + 0.5)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if heads <= 16:
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def denormalize_images(images: torch.Tensor | np.ndarray, mean: Sequence[float] = MEAN,
                       std: Sequence[float] = STD) -> np.ndarray:
    """Model inputs (B, C, H, W), normalised as (x - mean) / std, -> displayable (B, H, W, C) in [0, 1].

    The defaults are the input pipeline's own (``stages.data.transforms.MEAN``/``STD``: [-1, 1] inputs).
    """
    x = _numpy(images)
    if x.ndim != 4 or x.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(f"expected images (B, {len(mean)}, H, W) matching mean/std, got {x.shape}")
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.clip(x * s + m, 0.0, 1.0).transpose(0, 2, 3, 1)


def plot_attention_rollout(images: torch.Tensor | np.ndarray, rollouts: torch.Tensor | np.ndarray, path: str | Path,
                           mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> Path:
    """Input images beside the images masked by their attention rollout (B, g, g), one row each (Fig 6).

    Each rollout is upsampled bilinearly to the image size and scaled to a maximum of 1 before it
    multiplies the image, as in the paper's figure.
    """
    shown = denormalize_images(images, mean, std)  # (B, H, W, C)
    maps = _numpy(rollouts)
    if maps.ndim != 3 or maps.shape[0] != shown.shape[0]:
        raise ValueError(f"expected rollouts (B={shown.shape[0]}, g, g), got {maps.shape}")
    B, H, W = shown.shape[:3]
    up = torch.nn.functional.interpolate(torch.from_numpy(maps)[:, None], size=(H, W), mode="bilinear",
                                         align_corners=False)[:, 0].numpy()  # (B, H, W)
    up = up / np.maximum(up.max(axis=(1, 2), keepdims=True), 1e-12)
    fig = Figure(figsize=(4, 2 * B))
    axes = np.asarray(fig.subplots(B, 2, squeeze=False))
    for b in range(B):
        gray = shown.shape[-1] == 1
        for ax, img, title in ((axes[b, 0], shown[b], "input"), (axes[b, 1], shown[b] * up[b, ..., None], "attention")):
            ax.imshow(img[..., 0] if gray else img, cmap="gray" if gray else None, vmin=0.0, vmax=1.0)
            ax.axis("off")
            if b == 0:
                ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)
