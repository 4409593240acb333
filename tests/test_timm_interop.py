"""timm interop: weights exported to timm's VisionTransformer (and imported back) compute the same function.

Every tensor that initialises to a constant (norm scales 1, biases 0, zero head) is randomised
first, so that a mapping that swaps two same-shaped tensors (norm1/norm2, q/k/v order) changes
the outputs; ``test_outputs_detect_a_wrong_mapping`` checks that this is so. timm is a dev
dependency; models are built with pretrained=False, nothing is downloaded.
"""

import pytest
import torch

from stages.model.timm_interop import (
    create_timm_model,
    from_timm_state_dict,
    timm_model_kwargs,
    to_timm_state_dict,
)
from stages.model.vit import ViT, ViTConfig, decode_variant

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

TINY = {"image_size": 32, "patch_size": 4, "width": 64, "depth": 2, "mlp_dim": 128, "heads": 2, "num_classes": 10}
TIMM_TINY = {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0,
             "num_classes": 10}


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fresh random values in every vector and every constant tensor, at scales that keep activations O(1).

    Weight matrices that initialise randomly keep their values (re-drawing 86M of them costs seconds).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2 and p.numel() > 1 and p.std() > 0:
            continue
        noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        if p.ndim == 1 and name.endswith("weight"):  # norm scales: around 1
            p.copy_(1.0 + 0.2 * noise)
        elif p.ndim == 1:
            p.copy_(0.1 * noise)
        else:  # zero-initialised head, class token
            p.copy_(noise / p.shape[-1] ** 0.5)
    return model.eval()


def assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module, image_size: int, batch: int = 2,
                        dtype: torch.dtype = torch.float32, tol: float = 1e-5) -> None:
    x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(1), dtype=dtype)
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    scale = ya.abs().max().item()
    assert scale > 1e-3  # a degenerate (all-zero) output would match anything
    torch.testing.assert_close(yb, ya, rtol=tol, atol=tol * scale)


def test_b16_export_to_timm_and_import_back():
    ours = randomize_(ViT(decode_variant("B/16", num_classes=1000)))
    # weight_init="skip": timm's own init of 86M parameters takes seconds, and every value is overwritten.
    theirs = timm.create_model("vit_base_patch16_224", pretrained=False, weight_init="skip")
    theirs.load_state_dict(to_timm_state_dict(ours), strict=True)
    assert_same_outputs(ours, theirs, 224, batch=1)

    randomize_(theirs, seed=1)  # timm -> ours, with fresh values
    cfg, state = from_timm_state_dict(theirs.state_dict(), heads=12, global_pool="token")
    assert cfg == decode_variant("B/16", num_classes=1000)
    ours.load_state_dict(state, strict=True)
    assert_same_outputs(theirs, ours, 224, batch=1)


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_tiny_vit_both_ways(pool):
    gap = pool == "gap"
    cfg = ViTConfig(**TINY, pool=pool)
    # timm's gap equivalent: no class token, norm before the mean (fc_norm=False).
    theirs = VisionTransformer(**TIMM_TINY, class_token=not gap, global_pool="avg" if gap else "token",
                               fc_norm=False if gap else None)
    ours = randomize_(ViT(cfg))
    theirs.load_state_dict(to_timm_state_dict(ours.state_dict()), strict=True)
    assert_same_outputs(ours, theirs, 32)

    randomize_(theirs, seed=2)
    got, state = from_timm_state_dict(theirs.state_dict(), ViTConfig(**TINY, pool=pool, dropout=0.1))
    assert got.pool == pool and got.dropout == 0.1  # cfg given: its training fields are kept
    back = ViT(got)
    back.load_state_dict(state, strict=True)
    assert_same_outputs(theirs, back, 32)


def test_create_timm_model_matches_the_config():
    for cfg in (ViTConfig(**TINY), ViTConfig(**{**TINY, "num_classes": 0}, pool="gap")):
        theirs = create_timm_model(cfg)
        ours = randomize_(ViT(cfg))
        theirs.load_state_dict(to_timm_state_dict(ours), strict=True)
        assert_same_outputs(ours, theirs, 32)
    assert timm_model_kwargs(ViTConfig(**TINY, pool="gap"))["fc_norm"] is False


def test_tiny_hybrid_both_ways():
    cfg = ViTConfig(**{**TINY, "patch_size": 1, "hybrid_layers": (1, 2)}, pool="gap")
    ours = randomize_(ViT(cfg))
    theirs = create_timm_model(cfg)
    theirs.load_state_dict(to_timm_state_dict(ours), strict=True)
    assert_same_outputs(ours, theirs, 32)
    randomize_(theirs, seed=3)
    got, state = from_timm_state_dict(theirs.state_dict(), heads=2)
    assert got == cfg
    ours.load_state_dict(state, strict=True)
    assert_same_outputs(theirs, ours, 32)


def test_r50_b16_hybrid_matches_timm_registered_model():
    # timm's own R50+ViT-B/16 definition (64 px keeps the CPU forward cheap: a 4x4 grid). In float64:
    # 28 randomised ResNet blocks + 12 ViT blocks amplify float32 rounding to ~1e-5 of the output
    # scale, too close to what a subtle mismatch (an epsilon, a padding) would give; float64 agrees to ~1e-13.
    theirs = timm.create_model("vit_base_r50_s16_224", pretrained=False, img_size=64, weight_init="skip")
    theirs = randomize_(theirs).double()
    cfg, state = from_timm_state_dict(theirs.state_dict(), heads=12)
    assert cfg == decode_variant("R50+B/16", image_size=64, num_classes=0)
    with torch.device("meta"):  # no init of 98M parameters that the import replaces anyway
        ours = ViT(cfg)
    ours.load_state_dict(state, strict=True, assign=True)
    assert_same_outputs(theirs, ours, 64, batch=1, dtype=torch.float64, tol=1e-10)
    # Export is the exact inverse of the import just checked: same names, same tensors.
    exported = to_timm_state_dict(ours)
    original = theirs.state_dict()
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)


def test_outputs_detect_a_wrong_mapping():
    # The comparisons above would catch a mapping that swaps same-shaped tensors.
    ours = randomize_(ViT(ViTConfig(**TINY)))
    theirs = VisionTransformer(**TIMM_TINY)
    swaps = [("blocks.0.norm1.weight", "blocks.0.norm2.weight"), ("blocks.1.attn.proj.bias", "blocks.1.mlp.fc2.bias")]
    for a, b in swaps:
        state = to_timm_state_dict(ours)
        state[a], state[b] = state[b], state[a]
        theirs.load_state_dict(state, strict=True)
        with pytest.raises(AssertionError):
            assert_same_outputs(ours, theirs, 32)
    state = to_timm_state_dict(ours)  # q and k halves of qkv exchanged
    for key in ("blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias"):
        q, k, v = state[key].chunk(3)
        state[key] = torch.cat([k, q, v])
    theirs.load_state_dict(state, strict=True)
    with pytest.raises(AssertionError):
        assert_same_outputs(ours, theirs, 32)


def test_missing_unknown_and_misshapen_keys_are_named():
    state = VisionTransformer(**TIMM_TINY).state_dict()
    missing = {k: v for k, v in state.items() if k != "blocks.1.norm2.weight"}
    with pytest.raises(ValueError, match=r"missing: blocks\.1\.norm2\.weight"):
        from_timm_state_dict(missing, heads=2)
    with pytest.raises(ValueError, match=r"blocks\.0\.ls1\.gamma"):
        from_timm_state_dict({**state, "blocks.0.ls1.gamma": torch.ones(64)}, heads=2)
    with pytest.raises(ValueError, match=r"shape mismatch: blocks\.1\.attn\.qkv\.weight"):
        from_timm_state_dict({**state, "blocks.1.attn.qkv.weight": torch.zeros(96, 64)}, heads=2)
    with pytest.raises(ValueError, match="heads"):
        from_timm_state_dict(state)
    with pytest.raises(ValueError, match=r"width: weights 64, cfg 128"):
        from_timm_state_dict(state, ViTConfig(**{**TINY, "width": 128}))
    with pytest.raises(ValueError, match="no timm name for vitpipe parameter.*extra.weight"):
        to_timm_state_dict({**ViT(ViTConfig(**TINY)).state_dict(), "extra.weight": torch.zeros(1)})


def test_unsupported_pooling_and_pre_logits_are_refused_clearly():
    fc_norm = VisionTransformer(**TIMM_TINY, class_token=False, global_pool="avg")  # timm's default: fc_norm
    with pytest.raises(ValueError, match="fc_norm"):
        from_timm_state_dict(fc_norm.state_dict(), heads=2)
    with pytest.raises(ValueError, match="global_pool='avg'"):
        from_timm_state_dict(VisionTransformer(**TIMM_TINY).state_dict(), heads=2, global_pool="avg")
    with pytest.raises(ValueError, match="pre-logits"):
        to_timm_state_dict(ViT(ViTConfig(**TINY, representation_size=32)))


def test_legacy_timm_pre_logits_are_imported():
    # timm < 0.6 stored the paper's tanh pre-logits layer as pre_logits.fc.
    ours = randomize_(ViT(ViTConfig(**TINY, representation_size=32)))
    state = ours.state_dict()
    pre = {f"pre_logits.fc.{w}": state.pop(f"pre_logits.0.{w}") for w in ("weight", "bias")}
    legacy = {**to_timm_state_dict(state), **pre}
    cfg, imported = from_timm_state_dict(legacy, heads=2)
    assert cfg.representation_size == 32
    back = ViT(cfg)
    back.load_state_dict(imported, strict=True)
    assert_same_outputs(ours, back, 32)
