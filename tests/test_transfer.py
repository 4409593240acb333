"""From a pretrained handoff to a transfer model: head replaced, position embeddings resampled."""

from __future__ import annotations

import json

import pytest
import torch

from stages.model.handoff import HandoffRef, read_handoff, save_handoff
from stages.model.posemb import resample_pos_embed
from stages.model.transfer import build_transfer_model, transfer_config, transfer_state_dict
from stages.model.vit import ViT, ViTConfig

SOURCE = ViTConfig(image_size=32, patch_size=4, width=32, depth=2, heads=2, mlp_dim=64, num_classes=7,
                   representation_size=16)


@pytest.fixture
def pretrained() -> ViT:
    torch.manual_seed(0)
    return ViT(SOURCE).eval()


def test_head_dropped_and_position_embeddings_resampled(pretrained):
    target = transfer_config(SOURCE, 48, 10)
    state = transfer_state_dict(pretrained.state_dict(), SOURCE, target)
    assert not any(k.startswith(("head.", "pre_logits.")) for k in state)
    assert state["pos_embed"].shape == (1, 1 + 12 * 12, 32)
    torch.testing.assert_close(state["pos_embed"], resample_pos_embed(pretrained.pos_embed.detach(), 12))


def test_transfer_model_keeps_the_backbone_and_starts_from_a_zero_head(pretrained):
    model = build_transfer_model(SOURCE, pretrained.state_dict(), 32, 10).eval()
    assert model.cfg.representation_size is None and model.head.out_features == 10
    assert torch.count_nonzero(model.head.weight) == 0
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.representation(images), pretrained.representation(images))
        assert torch.count_nonzero(model(images)) == 0


def test_resolution_change_runs_at_the_new_grid(pretrained):
    model = build_transfer_model(SOURCE, pretrained.state_dict(), 48, 10)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 10)


def test_weights_of_another_architecture_are_refused(pretrained):
    other = ViTConfig(image_size=32, patch_size=4, width=32, depth=3, heads=2, mlp_dim=64, num_classes=7)
    with pytest.raises(ValueError, match="do not fit"):
        build_transfer_model(other, pretrained.state_dict(), 32, 10)


def test_handoff_round_trip_is_verified_against_the_manifest(pretrained, tmp_path):
    from pipeline.errors import VitpipeError
    from pipeline.storage import LocalStorage, sha256_stream

    store = LocalStorage(tmp_path / "stage")
    save_handoff(store, SOURCE, {k: v.contiguous() for k, v in pretrained.state_dict().items()}, {"step": "7"})
    sha = {}
    for name in ("model.safetensors", "model_config.json"):
        with store.open_read(name) as f:
            sha[name] = sha256_stream(f)[0]
    handoff = read_handoff(HandoffRef(store.uri, sha))
    assert handoff.config == SOURCE
    torch.testing.assert_close(handoff.state["pos_embed"], pretrained.pos_embed.detach())
    # A file that differs from what the producing stage committed is refused, naming it.
    (tmp_path / "stage" / "model_config.json").write_text(json.dumps({**SOURCE.to_dict(), "depth": 3}))
    with pytest.raises(VitpipeError, match=r"model_config.json does not match the sha256 its stage committed"):
        read_handoff(HandoffRef(store.uri, sha))
    with pytest.raises(ValueError, match="records no checksum for model.safetensors"):
        HandoffRef(store.uri, {"model_config.json": sha["model_config.json"]})
