"""The ViT model family: variants, exact parameter counts, FLOPs, position-embedding resampling."""

import pytest
import torch

from stages.model.posemb import resample_pos_embed
from stages.model.vit import ViT, ViTConfig, count_params, decode_variant, flops_per_image


def build_meta(cfg: ViTConfig) -> ViT:
    with torch.device("meta"):
        return ViT(cfg)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["Ti/16", "S/16", "B/16", "B/32", "L/16", "H/14", "g/14", "Ti/4"])
@pytest.mark.parametrize("extra", [{}, {"pool": "gap"}, {"representation_size": 256}, {"num_classes": 0}])
def test_closed_form_param_count_is_exact(name, extra):
    cfg = decode_variant(name, image_size=224 if not name.endswith("/4") else 32, **extra)
    assert count_params(cfg) == n_params(build_meta(cfg))


@pytest.mark.parametrize("name,paper_millions", [("B/16", 86), ("L/16", 307), ("H/14", 632)])
def test_param_counts_match_paper_table_1(name, paper_millions):
    # Table 1 counts the backbone with a 1000-way ImageNet head at 224 px.
    params = count_params(decode_variant(name))
    assert abs(params / 1e6 - paper_millions) / paper_millions < 0.01, params


def test_forward_shapes_representation_and_new_head():
    cfg = decode_variant("Ti/8", image_size=32, num_classes=10, representation_size=64, depth=2)
    model = ViT(cfg)
    x = torch.randn(3, 3, 32, 32)
    assert model(x).shape == (3, 10)
    assert model.representation(x).shape == (3, 192)
    model.with_new_head(5)
    assert model(x).shape == (3, 5) and torch.count_nonzero(model(x)) == 0  # zero-initialised head
    gap = ViT(decode_variant("Ti/8", image_size=32, num_classes=4, pool="gap", depth=1))
    assert gap(x).shape == (3, 4) and gap.pos_embed.shape[1] == 16


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        decode_variant("B/16", image_size=100)
    with pytest.raises(ValueError, match="unknown ViT variant"):
        decode_variant("X/16")
    with pytest.raises(ValueError, match="not divisible by heads"):
        ViTConfig(width=100, heads=3)


def test_flops_match_the_paper_scale():
    # DESIGN.md: a ViT-H/14 forward pass at 224 is about 167 GMACs (~335 GFLOPs).
    gflops = flops_per_image(decode_variant("H/14")) / 1e9
    assert 325 < gflops < 345, gflops
    assert flops_per_image(decode_variant("B/16"), training=True) == 3 * flops_per_image(decode_variant("B/16"))


def test_flops_count_matches_a_measured_count():
    from torch.utils.flop_counter import FlopCounterMode

    cfg = decode_variant("Ti/8", image_size=32, num_classes=10, depth=2)
    model = ViT(cfg).eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32))
    measured = counter.get_total_flops()
    assert abs(measured - flops_per_image(cfg)) / measured < 0.02, (measured, flops_per_image(cfg))


def test_resample_keeps_class_token_and_dtype_and_is_identity_on_same_grid():
    posemb = torch.randn(1, 1 + 16, 8, dtype=torch.bfloat16)
    same = resample_pos_embed(posemb, 4)
    assert torch.equal(same, posemb)
    bigger = resample_pos_embed(posemb, 6)
    assert bigger.shape == (1, 1 + 36, 8) and bigger.dtype == torch.bfloat16
    assert torch.equal(bigger[:, :1], posemb[:, :1])
    constant = torch.ones(1, 1 + 16, 8) * 3.0
    assert torch.allclose(resample_pos_embed(constant, (5, 7)), torch.ones(1, 1 + 35, 8) * 3.0)
    with pytest.raises(ValueError, match="square grid"):
        resample_pos_embed(torch.zeros(1, 1 + 15, 8), 4)


def test_resampled_embeddings_follow_image_location():
    # An embedding equal to the patch's x coordinate stays monotone in x after upsampling.
    g = 4
    xs = torch.arange(g, dtype=torch.float32).repeat(g)  # row-major: x varies fastest
    posemb = torch.cat([torch.zeros(1, 1, 1), xs.view(1, g * g, 1)], dim=1)
    out = resample_pos_embed(posemb, 8)[0, 1:, 0].view(8, 8)
    assert torch.all(out[:, 1:] >= out[:, :-1]) and torch.allclose(out[0], out[7])
    model = ViT(decode_variant("Ti/8", image_size=32, depth=1, num_classes=2))
    model.pos_embed = torch.nn.Parameter(resample_pos_embed(model.pos_embed.data, 6))
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 2)
