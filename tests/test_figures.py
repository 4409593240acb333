"""Report figures: each function writes one valid, non-empty PNG; display un-normalisation inverts the
input pipeline's normalisation; identical inputs give identical bytes."""

import numpy as np
import pytest
import torch
from PIL import Image

from stages.data.transforms import to_model_input
from stages.eval.figures import (
    denormalize_images,
    plot_attention_distance,
    plot_attention_rollout,
    plot_curves,
    plot_patch_components,
    plot_position_similarity,
)


def check_png(path) -> tuple[int, int]:
    assert path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
        return im.size


def test_plot_curves(tmp_path):
    history = [{"step": s, "loss": 2.3 * 0.99**s, "lr": min(1.0, s / 10) * 1e-3} for s in range(50)]
    history.append({"step": 50, "eval_accuracy": 0.5})  # no loss/lr: skipped, not an error
    out = plot_curves(history, tmp_path / "sub" / "curves.png")
    assert out == tmp_path / "sub" / "curves.png"
    width, height = check_png(out)
    assert width > height  # two panels side by side
    with pytest.raises(ValueError, match="empty"):
        plot_curves([], tmp_path / "x.png")


def test_plot_patch_components(tmp_path):
    comps = torch.randn(28, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    check_png(plot_patch_components(comps, tmp_path / "pca.png"))
    check_png(plot_patch_components(comps[:, :1], tmp_path / "pca_gray.png"))  # non-RGB: grey
    with pytest.raises(ValueError):
        plot_patch_components(comps[0], tmp_path / "bad.png")


def test_plot_position_similarity_is_deterministic(tmp_path):
    pos = torch.nn.functional.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    sim = (pos @ pos.T).reshape(8, 8, 8, 8)
    a = plot_position_similarity(sim, tmp_path / "a.png")
    b = plot_position_similarity(sim, tmp_path / "b.png")
    check_png(a)
    assert a.read_bytes() == b.read_bytes()
    with pytest.raises(ValueError):
        plot_position_similarity(sim.reshape(64, 64), tmp_path / "bad.png")


def test_plot_attention_distance(tmp_path):
    dist = np.linspace(5, 100, 24).reshape(12, 2)
    check_png(plot_attention_distance(dist, 16, tmp_path / "dist.png"))


def test_denormalize_inverts_the_input_pipeline():
    raw = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    shown = denormalize_images(to_model_input(raw))  # defaults: the pipeline's MEAN/STD
    np.testing.assert_allclose(shown, raw.numpy() / 255.0, atol=1e-6)
    other = denormalize_images(torch.zeros(1, 3, 2, 2), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    np.testing.assert_allclose(other[0, 0, 0], [0.485, 0.456, 0.406], atol=1e-7)


def test_plot_attention_rollout(tmp_path):
    gen = torch.Generator().manual_seed(0)
    imgs = torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1
    rollouts = torch.softmax(torch.randn(3, 64, generator=gen), dim=-1).reshape(3, 8, 8)
    width, height = check_png(plot_attention_rollout(imgs, rollouts, tmp_path / "rollout.png"))
    assert height > width  # one row per image (3), two columns
    with pytest.raises(ValueError, match="rollouts"):
        plot_attention_rollout(imgs, rollouts[:1], tmp_path / "bad.png")
