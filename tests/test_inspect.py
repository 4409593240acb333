"""Model inspection (paper Figs 6 and 7) on a tiny ViT: re-derived attention probabilities reproduce the
fused attention's output, rollout and attention distance on constructed attention, PCA of the patch
embedding, position-embedding similarity."""

import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from stages.eval.inspect import (
    attention_distance,
    attention_maps,
    attention_rollout,
    mean_attention_distance,
    patch_distances,
    patch_embedding_components,
    position_embedding_similarity,
    rollout_from_attention,
)
from stages.model.vit import ViT, ViTConfig

TINY = {"image_size": 32, "patch_size": 4, "width": 64, "depth": 2, "heads": 2, "mlp_dim": 128, "num_classes": 10}


def tiny_vit(pool: str = "cls", seed: int = 0, sharpen: float = 3.0) -> ViT:
    torch.manual_seed(seed)
    model = ViT(ViTConfig(**TINY, pool=pool))
    with torch.no_grad():
        for block in model.blocks:
            # Sharper than the init's near-uniform attention, with biases, so the checks are not trivial.
            block.attn.qkv.weight.mul_(sharpen)
            block.attn.qkv.bias.normal_(std=0.5)
    return model


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def uniform_attention(model: ViT) -> ViT:
    """Zero the query projection: every score is 0, so every query attends uniformly."""
    with torch.no_grad():
        for block in model.blocks:
            D = block.attn.qkv.in_features
            block.attn.qkv.weight[:D].zero_()
            block.attn.qkv.bias[:D].zero_()
    return model


@pytest.mark.parametrize("pool,tokens", [("cls", 65), ("gap", 64)])
def test_attention_maps_shapes_and_rows_sum_to_one(pool, tokens):
    model = tiny_vit(pool).train()
    maps = attention_maps(model, images())
    assert len(maps) == 2
    for probs in maps:
        assert probs.shape == (2, 2, tokens, tokens) and probs.dtype == torch.float32
        assert (probs >= 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, tokens))
    # The model is left as found: training mode, no hooks.
    assert model.training
    assert all(not block.norm1._forward_hooks for block in model.blocks)


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_attention_probabilities_reproduce_the_blocks_output(pool):
    model = tiny_vit(pool)
    captured = []
    handles = [b.attn.register_forward_hook(lambda m, i, o: captured.append((i[0], o))) for b in model.blocks]
    maps = attention_maps(model, images())
    for h in handles:
        h.remove()
    assert len(captured) == len(maps) == 2
    for block, probs, (x, out) in zip(model.blocks, maps, captured):
        assert probs.max() > 0.2  # far from uniform (1/65): the check below is not vacuous
        B, T, D = x.shape
        v = block.attn.qkv(x).view(B, T, 3, 2, D // 2)[:, :, 2].transpose(1, 2)  # (B, nh, T, hs)
        with torch.no_grad():
            rebuilt = block.attn.proj((probs @ v).transpose(1, 2).reshape(B, T, D))
        torch.testing.assert_close(rebuilt, out, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_rollout_of_uniform_attention_is_uniform(pool):
    rollout = attention_rollout(uniform_attention(tiny_vit(pool)), images())
    assert rollout.shape == (2, 8, 8)
    torch.testing.assert_close(rollout, torch.full((2, 8, 8), 1 / 64))


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_rollout_matches_a_direct_computation(pool):
    model = tiny_vit(pool)
    x = images()
    maps = attention_maps(model, x)
    prefix = 1 if pool == "cls" else 0
    expected = []
    for b in range(2):
        joint = np.eye(maps[0].shape[-1])
        for probs in maps:
            a = probs[b].mean(0).double().numpy()
            a = 0.5 * a + 0.5 * np.eye(a.shape[0])  # rows of a sum to 1: same as add identity, renormalise
            joint = a @ joint
        flow = joint[0, prefix:] if pool == "cls" else joint.mean(0)
        expected.append((flow / flow.sum()).reshape(8, 8))
    got = attention_rollout(model, x)
    np.testing.assert_allclose(got.double().numpy(), np.stack(expected), atol=1e-6)
    torch.testing.assert_close(rollout_from_attention(maps, prefix), got)
    assert got.std() > 1e-3  # a non-uniform model gives a non-uniform map


def test_patch_distances():
    d = patch_distances(3, 4.0)
    assert d.shape == (9, 9)
    assert d[0, 1] == 4.0 and d[0, 3] == 4.0 and d[4, 4] == 0.0
    torch.testing.assert_close(d[0, 8], torch.tensor(math.hypot(8.0, 8.0)))


def test_attention_distance_of_constructed_attention():
    grid, T = 4, 17  # one class token + 16 patches
    probs = torch.zeros(1, 2, T, T)
    for r, c in itertools.product(range(grid), range(grid)):
        q = 1 + r * grid + c
        # head 0: half on the class token, half on the horizontal neighbour (one patch away)
        probs[0, 0, q, 0] = 0.5
        probs[0, 0, q, 1 + r * grid + (c + 1 if c + 1 < grid else c - 1)] = 0.5
        # head 1: a quarter on itself, three quarters on the vertically mirrored patch
        probs[0, 1, q, q] = 0.25
        probs[0, 1, q, 1 + (grid - 1 - r) * grid + c] += 0.75
    probs[0, :, 0, 0] = 1.0  # the class token's own row is ignored
    dist = attention_distance(probs, patch_px=16.0, num_prefix_tokens=1)
    mirror = np.mean([0.75 * abs((grid - 1 - r) - r) * 16.0 for r in range(grid)])
    torch.testing.assert_close(dist, torch.tensor([16.0, mirror], dtype=torch.float32))


def test_mean_attention_distance_of_uniform_attention():
    dist = mean_attention_distance(uniform_attention(tiny_vit()), images())
    assert dist.shape == (2, 2)
    centres = [((r + 0.5) * 4, (c + 0.5) * 4) for r in range(8) for c in range(8)]
    expected = np.mean([math.dist(p, q) for p in centres for q in centres])
    torch.testing.assert_close(dist, torch.full((2, 2), expected, dtype=torch.float32))
    # A real model's heads differ from uniform.
    assert not torch.allclose(mean_attention_distance(tiny_vit(), images()), dist, atol=0.1)


def test_patch_embedding_components_are_orthonormal_principal_axes():
    model = tiny_vit()
    comps = patch_embedding_components(model, n=28)
    assert comps.shape == (28, 3, 4, 4)
    flat = comps.reshape(28, -1).double()
    torch.testing.assert_close(flat @ flat.T, torch.eye(28, dtype=torch.float64), atol=1e-5, rtol=0)
    ref = PCA(n_components=5).fit(model.patch_embed.weight.detach().reshape(64, -1).double().numpy())
    overlap = np.abs(np.sum(ref.components_ * flat[:5].numpy(), axis=1))
    np.testing.assert_allclose(overlap, np.ones(5), atol=1e-5)
    with pytest.raises(ValueError, match="n must be"):
        patch_embedding_components(model, n=49)
    model.patch_embed = torch.nn.Sequential(model.patch_embed)  # stands in for a hybrid's ResNet embedding
    with pytest.raises(ValueError, match="plain conv"):
        patch_embedding_components(model)


def test_position_embedding_similarity():
    model = tiny_vit()
    sim = position_embedding_similarity(model)
    assert sim.shape == (8, 8, 8, 8)
    flat = sim.reshape(64, 64)
    torch.testing.assert_close(flat.diagonal(), torch.ones(64))
    torch.testing.assert_close(flat, flat.T)
    # Constructed: patch i's embedding is a multiple of basis vector i -> similarity is the identity; the
    # class token's embedding (equal to patch 0's direction) must not shift anything.
    with torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, 1:, :] = torch.diag(torch.arange(1.0, 65.0))
        model.pos_embed[0, 0, 0] = 1.0
    torch.testing.assert_close(position_embedding_similarity(model).reshape(64, 64), torch.eye(64))
    assert position_embedding_similarity(tiny_vit("gap")).shape == (8, 8, 8, 8)
