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


# --- Hybrid R50+ViT (paper §3.1): patches from a ResNet feature map -------------------------------

TINY_HYBRID = {"image_size": 32, "patch_size": 1, "width": 64, "depth": 2, "mlp_dim": 128, "heads": 2,
               "num_classes": 10, "hybrid_layers": (1, 1)}  # ResNet stride 8 -> a 4x4 grid


def test_decode_hybrid_variant():
    cfg = decode_variant("R50+B/16")
    assert cfg.hybrid_layers == (3, 4, 9) and cfg.patch_size == 1  # stage 4 dropped, stage 3 with 9 blocks
    assert (cfg.backbone_stride, cfg.effective_patch_size, cfg.embed_channels) == (16, 16, 1024)
    assert (cfg.grid, cfg.tokens) == (14, 197)
    assert (cfg.width, cfg.depth, cfg.heads) == (768, 12, 12)
    assert decode_variant("R50+B/16", image_size=384).grid == 24  # fine-tuning resolution: 24x24 tokens
    assert decode_variant("R50+L/32").hybrid_layers == (3, 4, 6, 3) and decode_variant("R50+L/32").grid == 7
    plain = decode_variant("B/16")
    assert plain.hybrid_layers is None and (plain.backbone_stride, plain.effective_patch_size) == (1, 16)
    for bad in ("R50+B/14", "R101+B/16", "R50+X/16"):
        with pytest.raises(ValueError, match="unknown"):
            decode_variant(bad)


def test_bad_hybrid_configs_are_rejected():
    with pytest.raises(ValueError, match="not divisible by patch_size 1 x ResNet stride 16"):
        decode_variant("R50+B/16", image_size=200)
    for layers in [(), (0, 1), (1, 1, 1, 1, 1)]:
        with pytest.raises(ValueError, match="hybrid_layers"):
            ViTConfig(**{**TINY_HYBRID, "hybrid_layers": layers})


def test_config_round_trips_through_json_and_yaml():
    import json

    import yaml

    for cfg in (decode_variant("R50+B/16", pool="gap"), decode_variant("B/16"), ViTConfig(**TINY_HYBRID)):
        back = ViTConfig(**json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg and hash(back) == hash(cfg)
        assert ViTConfig(**yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg
    assert isinstance(ViTConfig(**{**TINY_HYBRID, "hybrid_layers": [1, 1]}).hybrid_layers, tuple)
    assert "hybrid_layers" not in decode_variant("B/16").to_dict()  # plain configs serialise as before


@pytest.mark.parametrize("name", ["R50+B/16", "R50+L/32", "R26+S/32", "R50+Ti/16"])
@pytest.mark.parametrize("extra", [{}, {"pool": "gap"}, {"representation_size": 256}, {"num_classes": 0},
                                   {"image_size": 384, "channels": 1}])
def test_closed_form_param_count_is_exact_for_hybrids(name, extra):
    cfg = decode_variant(name, **extra)
    assert count_params(cfg) == n_params(build_meta(cfg))


def test_hybrid_param_count_matches_timm_r50_b16():
    # timm's vit_base_r50_s16_224 (no head) reports 97,890,112 parameters: the same architecture.
    assert count_params(decode_variant("R50+B/16", num_classes=0)) == 97_890_112


def test_hybrid_forward_shapes_new_head_and_resampling():
    cfg = ViTConfig(**TINY_HYBRID)
    model = ViT(cfg)
    x = torch.randn(2, 3, 32, 32)
    assert model.patch_embed(x).shape == (2, 64, 4, 4)  # (B, D, grid, grid)
    assert model(x).shape == (2, 10) and model.representation(x).shape == (2, 64)
    assert model.pos_embed.shape == (1, cfg.tokens, 64) and cfg.tokens == 17
    model.with_new_head(3)
    assert model(x).shape == (2, 3) and model.cfg.hybrid_layers == (1, 1)
    # Fine-tuning at 48 px: the ResNet's stride 8 gives a 6x6 grid.
    model.pos_embed = torch.nn.Parameter(resample_pos_embed(model.pos_embed.data, decode_variant(
        "Ti/8", image_size=48).grid))
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 3)
    with pytest.raises(ValueError, match="resample_pos_embed"):
        model(torch.randn(1, 3, 64, 64))


def test_hybrid_flops_match_a_measured_count():
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ViTConfig(**TINY_HYBRID)
    model = ViT(cfg).eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32))
    measured = counter.get_total_flops()
    assert abs(measured - flops_per_image(cfg)) / measured < 0.02, (measured, flops_per_image(cfg))
    # Full size on the meta device (shapes only, no compute): the ResNet convs are most of R50+B/16's
    # cost and its smallest conv is ~0.2% of the total, so the tolerance is tight.
    for image_size in (224, 384):
        cfg = decode_variant("R50+B/16", image_size=image_size)
        with torch.device("meta"), FlopCounterMode(display=False) as counter:
            ViT(cfg).eval()(torch.empty(1, 3, image_size, image_size))
        measured = counter.get_total_flops()
        assert abs(measured - flops_per_image(cfg)) / measured < 1e-4, (image_size, measured, flops_per_image(cfg))
    assert 40e9 < flops_per_image(decode_variant("R50+B/16")) < 46e9  # ~21.5 GMACs at 224


def test_resnet_flops_count_every_conv_and_same_padding_shapes():
    from torch.utils.flop_counter import FlopCounterMode

    from stages.model.resnet import ResNet, resnet_flops

    net = ResNet((1, 2)).eval()
    for size in (32, 33):  # 33: SAME padding rounds every strided output up
        with FlopCounterMode(display=False) as counter:
            out = net(torch.randn(1, 3, size, size))
        assert out.shape == (1, 512, -(-size // 8), -(-size // 8))
        assert counter.get_total_flops() == resnet_flops((1, 2), size)


def test_same_padding_and_weight_standardisation():
    from stages.model.resnet import StdConv2d, same_padding

    assert same_padding(224, 7, 2) == (2, 3)  # TF SAME: the odd pixel goes after
    assert same_padding(112, 3, 2) == (0, 1) and same_padding(113, 3, 2) == (1, 1)
    assert same_padding(56, 1, 2) == (0, 0) and same_padding(14, 3, 1) == (1, 1)
    conv = StdConv2d(8, 16, 3, stride=2)
    w = conv.standardized_weight()
    torch.testing.assert_close(w.mean(dim=(1, 2, 3)), torch.zeros(16), atol=1e-6, rtol=0)
    torch.testing.assert_close(w.var(dim=(1, 2, 3), correction=0), torch.ones(16), atol=1e-4, rtol=0)
    x = torch.randn(2, 8, 9, 9)
    y = conv(x)
    assert y.shape == (2, 16, 5, 5)
    with torch.no_grad():
        conv.weight.mul_(7.0).add_(0.5)  # a filter's scale and offset do not change a standardised conv
    torch.testing.assert_close(conv(x), y, atol=1e-4, rtol=1e-4)


def test_hybrid_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = ViT(ViTConfig(**TINY_HYBRID))
    ckpt = ViT(ViTConfig(**TINY_HYBRID, checkpoint_activations=True))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for model in (plain, ckpt):
        model.train()
        model.representation(x).pow(2).sum().backward()  # (the head is zero-initialised)
    stem = "patch_embed.backbone.stem_conv.weight"
    grads = {name: dict(m.named_parameters())[stem].grad for name, m in (("plain", plain), ("ckpt", ckpt))}
    assert grads["plain"].abs().sum() > 0
    torch.testing.assert_close(grads["ckpt"], grads["plain"])


def test_weight_decay_skips_biases_norms_position_embeddings_and_the_class_token():
    from stages.train.engine import param_groups

    model = ViT(decode_variant("Ti/4", image_size=16, num_classes=10, width=32, depth=1, heads=2, mlp_dim=64))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.1)
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "pos_embed", "norm.weight", "head.bias"} <= skipped
    assert {names[id(p)] for p in decay["params"]} == {"patch_embed.weight", "blocks.0.attn.qkv.weight",
                                                        "blocks.0.attn.proj.weight", "blocks.0.fc1.weight",
                                                        "blocks.0.fc2.weight", "head.weight"}
