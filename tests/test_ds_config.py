import pytest

from stages.train.ds_config import build_deepspeed_config, micro_steps


def test_batch_geometry():
    assert micro_steps(4096, 32, 64) == 2
    with pytest.raises(ValueError, match="not divisible by workers x micro-batch \\(3 x 8 = 24\\)"):
        micro_steps(100, 8, 3)
    cfg = build_deepspeed_config(global_batch=64, micro_batch=8, world_size=2, zero_stage=2, precision="bf16")
    assert cfg["train_batch_size"] == 64 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["bf16"]["enabled"] and cfg["zero_optimization"]["stage"] == 2 and cfg["gradient_clipping"] == 1.0


def test_offload_rules():
    cfg = build_deepspeed_config(global_batch=8, micro_batch=4, world_size=2, zero_stage=3, offload_optimizer=True,
                                 offload_params=True)
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    with pytest.raises(ValueError, match="needs ZeRO stage 3"):
        build_deepspeed_config(global_batch=8, micro_batch=4, world_size=2, zero_stage=2, offload_params=True)
    with pytest.raises(ValueError, match="zero_stage must be"):
        build_deepspeed_config(global_batch=8, micro_batch=4, world_size=2, zero_stage=4)
