import pytest

from stages.train.schedule import lr_at


def test_warmup_then_linear_decay_to_zero():
    lrs = [lr_at(s, 1e-3, total_steps=100, warmup_steps=10) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(55, 1e-3, 100, 10) == pytest.approx(0.5e-3)
    assert lr_at(100, 1e-3, 100, 10) == 0.0


def test_cosine_decay_and_end_lr():
    assert lr_at(10, 1.0, 110, 10, "cosine") == pytest.approx(1.0)
    assert lr_at(60, 1.0, 110, 10, "cosine") == pytest.approx(0.5)
    assert lr_at(110, 1.0, 110, 10, "cosine", end_lr=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        lr_at(0, 1.0, 10, 0, "step")  # type: ignore[arg-type]
