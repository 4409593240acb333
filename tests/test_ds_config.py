"""The DeepSpeed config builder: batch geometry, offload rules, communication sizes worked by hand,
and DeepSpeed's own parser reading back what we meant (overlap, buckets, fp32 gradient traffic)."""

import pytest

from stages.train.ds_config import (
    MAX_BUCKET_ELEMENTS,
    MIN_BUCKET_ELEMENTS,
    CommBuckets,
    build_deepspeed_config,
    comm_buckets,
)

B16 = 86_567_656  # ViT-B/16 with a 1000-class head (count_params)


def _cfg(**kw):
    base = {"global_batch": 64, "micro_batch": 8, "world_size": 2, "zero_stage": 2, "model_params": B16}
    return build_deepspeed_config(**{**base, **kw})


def test_batch_geometry():
    cfg = _cfg(precision="bf16")
    assert cfg["train_batch_size"] == 64 and cfg["train_micro_batch_size_per_gpu"] == 8
    assert cfg["gradient_accumulation_steps"] == 4  # 64 = 8 x 2 x 4
    assert cfg["bf16"]["enabled"] and cfg["zero_optimization"]["stage"] == 2 and cfg["gradient_clipping"] == 1.0
    # The one geometry rule (stages.train.geometry.accumulation_steps) and its one-line error.
    with pytest.raises(ValueError, match=r"not divisible by workers x micro_batch \(3 x 8 = 24\)"):
        _cfg(global_batch=100, world_size=3)


def test_keys_the_trainer_relies_on():
    cfg = _cfg()
    assert cfg["zero_allow_untested_optimizer"] is True and cfg["zero_force_ds_cpu_optimizer"] is False
    assert cfg["steps_per_print"] >= 10**9 and cfg["wall_clock_breakdown"] is False
    assert cfg["fp16"] == {"enabled": False} and cfg["bf16"] == {"enabled": False}


def test_offload_rules():
    cfg = _cfg(global_batch=8, micro_batch=4, zero_stage=3, offload_optimizer=True, offload_params=True)
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in _cfg(zero_stage=3)["zero_optimization"]
    with pytest.raises(ValueError, match="needs ZeRO stage 3"):
        _cfg(zero_stage=2, offload_params=True)
    with pytest.raises(ValueError, match="optimizer offload needs ZeRO stage 1, 2 or 3"):
        _cfg(zero_stage=0, offload_optimizer=True)
    with pytest.raises(ValueError, match="zero_stage must be"):
        _cfg(zero_stage=4)
    with pytest.raises(ValueError, match="precision must be"):
        _cfg(precision="fp16")


# --- communication sizes -----------------------------------------------------------------------


def test_comm_buckets_by_hand():
    # B/16: 86,567,656 / 8 = 10,820,957 -> rounded up to whole millions: 11M; prefetch 5.5M -> 6M;
    # persistence: 1% of a bucket per tensor, 1% of the model in total.
    assert comm_buckets(B16) == CommBuckets(reduce_bucket=11_000_000, allgather_bucket=11_000_000,
                                            prefetch_bucket=6_000_000, param_persistence_threshold=110_000,
                                            model_persistence_threshold=865_676)
    # H/14 with the 21k-class head (660,385,363): / 8 = 82.5M -> 83M; prefetch 41.5M -> 42M.
    h14 = comm_buckets(660_385_363)
    assert (h14.reduce_bucket, h14.prefetch_bucket, h14.param_persistence_threshold) == \
        (83_000_000, 42_000_000, 830_000)
    # Clamped: a 40M model gets the 10M minimum (4 buckets, not 8 latency-bound ones) ...
    assert comm_buckets(40_000_000).reduce_bucket == MIN_BUCKET_ELEMENTS == 10_000_000
    # ... a 2B model the 100M maximum ...
    assert comm_buckets(2_000_000_000).reduce_bucket == MAX_BUCKET_ELEMENTS == 100_000_000
    assert comm_buckets(2_000_000_000).prefetch_bucket == 50_000_000
    # ... and a model below the minimum one bucket of (about) its own size.
    assert comm_buckets(5_000_000).reduce_bucket == 5_000_000
    assert comm_buckets(7_000).reduce_bucket == 1_000_000
    # Every bucket is even: DeepSpeed asserts allgather_bucket_size % 2 == 0 (ZeRO-1/2).
    assert all(comm_buckets(n).allgather_bucket % 2 == 0 for n in (1, 7_000, 12_345_679, B16, 10**10))
    with pytest.raises(ValueError, match="model_params must be >= 1"):
        comm_buckets(0)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_overlap_and_buckets_from_the_model(stage):
    z = _cfg(zero_stage=stage, precision="bf16")["zero_optimization"]
    b = comm_buckets(B16)
    assert z["overlap_comm"] is True and z["contiguous_gradients"] is True
    assert z["reduce_bucket_size"] == b.reduce_bucket < B16  # several buckets: something to overlap
    if stage < 3:
        assert z["allgather_bucket_size"] == b.allgather_bucket
        assert not any(k.startswith("stage3_") for k in z)
    else:
        assert z["stage3_prefetch_bucket_size"] == b.prefetch_bucket
        assert z["stage3_param_persistence_threshold"] == b.param_persistence_threshold
        assert z["stage3_model_persistence_threshold"] == b.model_persistence_threshold
    # A bigger model, bigger buckets: the sizes follow model_params.
    assert _cfg(zero_stage=stage, model_params=8 * B16)["zero_optimization"]["reduce_bucket_size"] == 87_000_000


def test_zero0_has_no_zero_settings():
    assert _cfg(zero_stage=0)["zero_optimization"] == {"stage": 0}


@pytest.mark.parametrize("precision,grad_comm_fp32,expected", [
    ("bf16", True, "fp32"), ("bf16", False, "bf16"), ("fp32", True, "fp32"), ("fp32", False, "fp32"),
])
def test_gradient_communication_dtype(precision, grad_comm_fp32, expected):
    cfg = _cfg(precision=precision, grad_comm_fp32=grad_comm_fp32)
    assert cfg["communication_data_type"] == expected
    assert "data_types" not in cfg  # grad_accum_dtype would swap ZeRO-1 for BF16_Optimizer (module docstring)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_reads_the_config_as_meant(stage):
    """DeepSpeed's own parser (no process group: world size 1) sees overlap, the buckets and fp32
    gradient communication; a misspelt key would fall back to a default and fail here."""
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = _cfg(zero_stage=stage, precision="bf16", world_size=1, global_batch=32)
    ds = DeepSpeedConfig(cfg)
    z, b = ds.zero_config, comm_buckets(B16)
    assert ds.communication_data_type == torch.float32 and ds.bfloat16_config.enabled
    assert ds.bfloat16_config.check_grad_overflow is False  # no per-step host wait for an overflow flag
    assert ds.gradient_accumulation_steps == 4 and ds.train_batch_size == 32
    assert ds.zero_optimization_stage == stage
    if stage == 0:
        return
    assert z.overlap_comm is True and z.reduce_bucket_size == b.reduce_bucket
    if stage < 3:
        assert z.allgather_bucket_size == b.allgather_bucket
    else:
        assert (z.prefetch_bucket_size, z.param_persistence_threshold, z.model_persistence_threshold) == \
            (b.prefetch_bucket, b.param_persistence_threshold, b.model_persistence_threshold)
    off = DeepSpeedConfig(_cfg(zero_stage=stage, precision="bf16", world_size=1, global_batch=32,
                               grad_comm_fp32=False))
    assert off.communication_data_type == torch.bfloat16
