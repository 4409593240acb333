"""Inspecting a trained ViT (paper Figures 6 and 7), as pure functions of a model and images.

- ``patch_embedding_components``: principal components of the patch-embedding filters (Fig 7 left).
- ``position_embedding_similarity``: cosine similarity between patch position embeddings (Fig 7 centre).
- ``mean_attention_distance``: attention-weighted query-key pixel distance per head and layer (Fig 7 right).
- ``attention_rollout``: Abnar & Zuidema (2020) rollout of attention to the input patches (Fig 6).

``Attention`` uses fused SDPA and never materialises its weights, so ``attention_maps`` re-derives
them: a forward hook on each block's ``norm1`` receives the normalised tokens that feed the
attention, re-applies ``attn.qkv`` and computes softmax(q kᵀ / sqrt(hs)) in float32. The model is
not modified; hooks are removed and the train/eval mode restored on exit. Everything runs in eval
mode (no dropout, no activation checkpointing, whose recomputation would fire hooks twice) and
without autograd.

Token layout: ``T = prefix + grid²`` with one prefix (class) token for ``pool="cls"`` and none for
``pool="gap"``; patches are in row-major order (the patch-embedding conv's ``flatten(2)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from stages.model.vit import ViT

__all__ = ["attention_maps", "patch_embedding_components", "position_embedding_similarity",
           "mean_attention_distance", "attention_rollout", "patch_distances", "attention_distance",
           "rollout_from_attention"]


def _num_prefix_tokens(model: ViT) -> int:
    return 1 if model.cfg.pool == "cls" else 0


def _grid_of(num_tokens: int, num_prefix: int) -> int:
    grid = math.isqrt(num_tokens - num_prefix)
    if grid * grid != num_tokens - num_prefix:
        raise ValueError(f"{num_tokens - num_prefix} patch tokens do not form a square grid")
    return grid


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _block_attention(block: nn.Module, normed: torch.Tensor) -> torch.Tensor:
    """Softmax attention probabilities (B, nh, T, T) of ``block`` for its normalised input (B, T, D)."""
    B, T, D = normed.shape
    heads = block.attn.heads
    # Same layout as Attention.forward: the qkv features are (3, heads, head_size), q first.
    qkv = block.attn.qkv(normed).view(B, T, 3, heads, D // heads).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
    q, k = qkv[0].float(), qkv[1].float()  # float32 even under bf16 autocast: probabilities are summed later
    scores = (q @ k.transpose(-2, -1)) * (D // heads) ** -0.5  # (B, nh, T, T), SDPA's default scale
    return scores.softmax(dim=-1)


def _for_each_layer(model: ViT, images: torch.Tensor, on_layer: Callable[[int, torch.Tensor], None]) -> None:
    """Run the encoder once, calling ``on_layer(i, probs (B, nh, T, T))`` for each block in order.

    Consumers reduce each layer's probabilities on the spot, so the maps of a 32-layer model are never
    held all at once unless ``attention_maps`` is asked for them.
    """
    handles = []
    for i, block in enumerate(model.blocks):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor, i: int = i, block: nn.Module = block) -> None:
            on_layer(i, _block_attention(block, output))
        handles.append(block.norm1.register_forward_hook(hook))
    try:
        with _inference(model):
            model.tokens(images)
    finally:
        for handle in handles:
            handle.remove()


def attention_maps(model: ViT, images: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the attention probabilities (B, heads, T, T) in float32; each row sums to 1."""
    maps: list[torch.Tensor] = []
    _for_each_layer(model, images, lambda _i, probs: maps.append(probs))
    return maps


def patch_embedding_components(model: ViT, n: int = 28) -> torch.Tensor:
    """The top-``n`` principal components of the patch-embedding filters, as images (n, C, P, P).

    Each of the D filters (C, P, P) is one sample; the mean filter is subtracted (ordinary PCA) and the
    right singular vectors give orthonormal components, most variance first. Signs are fixed so each
    component's largest-magnitude entry is positive, making plots deterministic.
    """
    if not isinstance(model.patch_embed, nn.Conv2d):
        # A hybrid's patch embedding projects ResNet features, not pixels: its filters are not images.
        raise ValueError(f"patch-embedding components need a plain conv patch embedding (raw pixels), "
                         f"got {type(model.patch_embed).__name__}")
    weight = model.patch_embed.weight.detach()  # (D, C, P, P)
    D, C, P, Q = weight.shape
    filters = weight.reshape(D, C * P * Q).double()  # (D, C*P*P)
    available = min(D - 1, C * P * Q)  # centering removes one degree of freedom across the D filters
    if not 1 <= n <= available:
        raise ValueError(f"n must be in [1, {available}] for {D} filters of size {C}x{P}x{Q}, got {n}")
    _, _, vh = torch.linalg.svd(filters - filters.mean(dim=0, keepdim=True), full_matrices=False)
    comps = vh[:n]  # (n, C*P*P), orthonormal rows
    peak = comps.gather(1, comps.abs().argmax(dim=1, keepdim=True))
    comps = comps * torch.sign(peak)
    return comps.reshape(n, C, P, Q).float()


def position_embedding_similarity(model: ViT) -> torch.Tensor:
    """Cosine similarity of every patch's position embedding with every other: (g, g, g, g).

    ``sim[i, j]`` is the (g, g) map of patch (row i, col j) against all patches, the paper's Fig 7
    tile for that patch; the class token's embedding has no position and is excluded.
    """
    pos = model.pos_embed.detach()[0].float()  # (T, D)
    prefix = _num_prefix_tokens(model)
    grid = _grid_of(pos.shape[0], prefix)
    unit = nn.functional.normalize(pos[prefix:], dim=-1)  # (N, D)
    return (unit @ unit.T).reshape(grid, grid, grid, grid)


def patch_distances(grid: int, patch_px: float, device: torch.device | str | None = None) -> torch.Tensor:
    """(N, N) Euclidean pixel distances between patch centres of a row-major grid x grid layout."""
    centres = (torch.arange(grid, dtype=torch.float32, device=device) + 0.5) * patch_px
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    points = torch.stack([ys.flatten(), xs.flatten()], dim=-1)  # (N, 2)
    return torch.cdist(points, points)


def attention_distance(probs: torch.Tensor, patch_px: float, num_prefix_tokens: int) -> torch.Tensor:
    """Mean attention distance per head (heads,) for one layer's probabilities (B, heads, T, T).

    Only patch queries and patch keys take part: prefix tokens have no location. The weights over
    patch keys are renormalised to sum to 1 per query, so attention parked on the class token does not
    count as distance 0 — the result is the expected pixel distance of a patch-to-patch attention hop.
    """
    grid = _grid_of(probs.shape[-1], num_prefix_tokens)
    patches = probs[:, :, num_prefix_tokens:, num_prefix_tokens:].float()  # (B, nh, N, N)
    patches = patches / patches.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    dist = patch_distances(grid, patch_px, device=probs.device)  # (N, N)
    per_query = (patches * dist).sum(dim=-1)  # (B, nh, N)
    return per_query.mean(dim=(0, 2))


def mean_attention_distance(model: ViT, images: torch.Tensor) -> torch.Tensor:
    """(depth, heads): attention-weighted query-key distance in input pixels, averaged over the batch.

    The paper's Fig 7 right ("attention distance"), analogous to receptive-field size in CNNs.
    Pixels are those of ``images``: the patch spacing is image width / grid.
    """
    prefix = _num_prefix_tokens(model)
    rows: list[torch.Tensor] = []

    def on_layer(_i: int, probs: torch.Tensor) -> None:
        patch_px = images.shape[-1] / _grid_of(probs.shape[-1], prefix)
        rows.append(attention_distance(probs, patch_px, prefix))

    _for_each_layer(model, images, on_layer)
    return torch.stack(rows)


def _rollout_step(rollout: torch.Tensor | None, probs: torch.Tensor) -> torch.Tensor:
    """Fold one more layer into the rollout: (B, T, T)."""
    attn = probs.mean(dim=1)  # (B, T, T), heads averaged
    # The residual connection carries each token's own state forward: add identity, renormalise rows.
    attn = attn + torch.eye(attn.shape[-1], device=attn.device, dtype=attn.dtype)
    attn = attn / attn.sum(dim=-1, keepdim=True)
    return attn if rollout is None else attn @ rollout  # later layers multiply from the left


def _rollout_readout(rollout: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """(B, T, T) joint attention -> (B, g, g) over patches, summing to 1 per image."""
    grid = _grid_of(rollout.shape[-1], num_prefix_tokens)
    if num_prefix_tokens:
        flow = rollout[:, 0, num_prefix_tokens:]  # (B, N): the class token is the representation
    else:
        # GAP: the representation is the mean of all final tokens, so its flow to the input is the
        # mean of the rollout's rows — the exact analogue of reading the class token's row.
        flow = rollout.mean(dim=1)  # (B, N)
    flow = flow / flow.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return flow.reshape(-1, grid, grid)


def rollout_from_attention(maps: Sequence[torch.Tensor], num_prefix_tokens: int) -> torch.Tensor:
    """Attention rollout (B, g, g) from per-layer probabilities (B, heads, T, T), first layer first."""
    if not maps:
        raise ValueError("need the attention maps of at least one layer")
    rollout = None
    for probs in maps:
        rollout = _rollout_step(rollout, probs.float())
    return _rollout_readout(rollout, num_prefix_tokens)


def attention_rollout(model: ViT, images: torch.Tensor) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) of the representation onto the input patches: (B, g, g).

    Per layer: average the heads, add the identity for the residual path, renormalise the rows; the
    layers' matrices are multiplied in order. For ``pool="cls"`` the result is the class token's row
    restricted to patches; for ``pool="gap"`` the mean of all rows (see ``_rollout_readout``). Each
    map is renormalised to sum to 1 over the patches.
    """
    state: dict[str, torch.Tensor] = {}

    def on_layer(_i: int, probs: torch.Tensor) -> None:
        state["rollout"] = _rollout_step(state.get("rollout"), probs)

    _for_each_layer(model, images, on_layer)
    if "rollout" not in state:
        raise ValueError("the model has no attention blocks")
    return _rollout_readout(state["rollout"], _num_prefix_tokens(model))
