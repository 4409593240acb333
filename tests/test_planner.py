"""The capacity planner (``stages.planner``) and ``vitpipe plan``: formula values worked by hand,
DeepSpeed's own estimators, activations measured by counting the tensors autograd saves, the CLI."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
import yaml

from pipeline import registry
from stages.model.transfer import transfer_config
from stages.model.vit import ViT, ViTConfig, count_params, decode_variant, flops_per_image
from stages.planner import (
    DEFAULT_DECODE_RATE,
    RESERVED_BYTES,
    activation_breakdown,
    activation_bytes,
    checkpoint_bytes,
    comm_buffer_bytes,
    communication_volume,
    largest_layer_params,
    layer_activation_bytes,
    optimizer_step_bytes,
    plan_pretrain,
    recommend,
    render_pretrain_plan,
    zero_model_state_bytes,
)
from stages.train.ds_config import build_deepspeed_config, comm_buckets
from stages.train.hardware import ACCELERATORS
from stages.train.params import PretrainParams
from tests.conftest import REPO, run_cli

PSI = 86_000_000  # ViT-B/16's ~86M parameters, rounded so every N below divides it
H14 = ["pretrain.model=H/14", "pretrain.image_size=224", "pretrain.width=null", "pretrain.depth=null",
       "pretrain.heads=null", "pretrain.mlp_dim=null"]


def _params(**kw) -> PretrainParams:
    base = {"model": "B/16", "precision": "bf16", "warmup_steps": 0, "workers": 8, "global_batch": 4096,
            "micro_batch": 32}
    return PretrainParams(**{**base, **kw})


# --- ZeRO model states -------------------------------------------------------------------------


def test_zero_states_follow_the_design_formula():
    # DESIGN.md §1 with Ψ = 86M, N = 8, worked by hand:
    #   stage 0: 16Ψ = 1376.0 MB; stage 1: 4Ψ + 12Ψ/8 = 344 + 129 = 473.0 MB;
    #   stage 2: 2Ψ + 14Ψ/8 = 172 + 150.5 = 322.5 MB; stage 3: 16Ψ/8 = 172.0 MB.
    assert [zero_model_state_bytes(PSI, 8, s) for s in range(4)] == \
        [1_376_000_000, 473_000_000, 322_500_000, 172_000_000]
    # One rank partitions nothing: every stage holds the full 16 bytes per parameter.
    assert {zero_model_state_bytes(PSI, 1, s) for s in range(4)} == {16 * PSI}
    # The real B/16 count: 86,567,656 parameters; stage 2 on 64 ranks is 2Ψ + ceil(14Ψ/64).
    b16 = count_params(decode_variant("B/16"))
    assert b16 == 86_567_656
    assert zero_model_state_bytes(b16, 64, 2) == 2 * b16 + math.ceil(14 * b16 / 64) == 192_071_987


def test_zero_states_fp32_and_offload():
    # fp32: 4-byte weights and grads; DeepSpeed's ZeRO-1/2 clone an fp32 master partition anyway.
    assert [zero_model_state_bytes(PSI, 8, s, precision="fp32") for s in range(4)] == \
        [16 * PSI, 8 * PSI + 12 * PSI // 8, 4 * PSI + 16 * PSI // 8, 16 * PSI // 8]
    # Offloading the optimizer leaves only weights and gradients on the GPU.
    assert zero_model_state_bytes(PSI, 8, 2, offload_optimizer=True) == 2 * PSI + 2 * PSI // 8
    assert optimizer_step_bytes(PSI, 8, 2, offload_optimizer=True) == 0
    with pytest.raises(ValueError, match="ZeRO stage"):
        zero_model_state_bytes(PSI, 8, 4)
    with pytest.raises(ValueError, match="precision"):
        zero_model_state_bytes(PSI, 8, 2, precision="fp8")


def test_optimizer_step_copy():
    # The fp32 copy of this rank's gradients at the step: all of them at stage 0, a 1/N shard after.
    assert [optimizer_step_bytes(PSI, 8, s) for s in range(4)] == [4 * PSI] + [4 * PSI // 8] * 3
    assert optimizer_step_bytes(PSI, 8, 2, precision="fp32") == 0


def test_comm_buffers_by_hand():
    # Ψ = 86M: reduce bucket E = 86M / 8 = 10.75M -> 11M elements; ZeRO-3 prefetch P = 5.5M -> 6M.
    assert (comm_buckets(PSI).reduce_bucket, comm_buckets(PSI).prefetch_bucket) == (11_000_000, 6_000_000)
    # ZeRO-0: the whole gradient flattened (2 bytes) and cast to fp32 (4): 86M x 6 = 516 MB; no cast in
    # bf16 communication (172 MB) or fp32 training (4 bytes, 344 MB); at most 5e8 elements at a time.
    assert comm_buffer_bytes(PSI, 0, "bf16") == 516_000_000
    assert comm_buffer_bytes(PSI, 0, "bf16", grad_comm_fp32=False) == 172_000_000
    assert comm_buffer_bytes(PSI, 0, "fp32") == 344_000_000
    assert comm_buffer_bytes(2 * 10**9, 0, "bf16") == 500_000_000 * 6
    # ZeRO-1/2: two bf16 buckets (overlap double-buffering) + the flattened bucket in reduction (3 x 2
    # bytes) + its fp32 cast (4 bytes): 11M x 10 = 110 MB; bf16 traffic 11M x 6; fp32 11M x 12.
    assert comm_buffer_bytes(PSI, 2, "bf16") == comm_buffer_bytes(PSI, 1, "bf16") == 110_000_000
    assert comm_buffer_bytes(PSI, 2, "bf16", grad_comm_fp32=False) == 66_000_000
    assert comm_buffer_bytes(PSI, 2, "fp32") == 132_000_000
    # ZeRO-3: the bucket in the communication dtype and the reduce-scatter's copy (2 x 11M x 4 = 88 MB),
    # the prefetched weights (6M x 2 = 12 MB) and 4 bytes x the largest layer.
    assert comm_buffer_bytes(PSI, 3, "bf16", largest_layer=1000) == 88_000_000 + 12_000_000 + 4000
    assert comm_buffer_bytes(PSI, 3, "fp32", largest_layer=1000) == 88_000_000 + 24_000_000 + 4000
    assert comm_buffer_bytes(PSI, 3, "bf16", grad_comm_fp32=False) == 44_000_000 + 12_000_000


def test_planner_and_deepspeed_config_share_the_bucket():
    # One source: the bucket the planner charges for is the one the DeepSpeed config asks for.
    for n in (5_000_000, PSI, 632_000_000, 3 * 10**9):
        cfg = build_deepspeed_config(global_batch=8, micro_batch=1, world_size=8, zero_stage=2, precision="bf16",
                                     model_params=n)
        assert comm_buffer_bytes(n, 2, "bf16") == 10 * cfg["zero_optimization"]["reduce_bucket_size"]


# --- DeepSpeed's estimators --------------------------------------------------------------------


@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 8), (4, 8), (8, 8)])
def test_deepspeed_zero2_estimate_is_ours_plus_the_fp32_gradient_partition(nodes, gpus):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n = nodes * gpus
    _, ds_gpu = estimate_zero2_model_states_mem_needs(PSI, num_gpus_per_node=gpus, num_nodes=nodes,
                                                      cpu_offload=False)
    ours = zero_model_state_bytes(PSI, n, 2)
    # DeepSpeed: 2Ψ + 18Ψ/N (2 grads16 + 4 grads32 + 4 params32 + 8 Adam); DESIGN: 2Ψ + 14Ψ/N.
    assert ds_gpu == ours + 4 * PSI // n
    # ... which is exactly our optimizer-step peak (the fp32 gradient copy DeepSpeed makes in step).
    assert ds_gpu == ours + optimizer_step_bytes(PSI, n, 2)
    # A parameter count no N divides: DeepSpeed floors 18Ψ/N, we round shards up; a few bytes apart.
    odd = count_params(decode_variant("B/16"))
    _, ds_odd = estimate_zero2_model_states_mem_needs(odd, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=False)
    assert 0 <= zero_model_state_bytes(odd, n, 2) + optimizer_step_bytes(odd, n, 2) - ds_odd < 6
    # additional_buffer_factor scales only DeepSpeed's CPU figure, never the GPU one.
    _, ds_factor = estimate_zero2_model_states_mem_needs(PSI, num_gpus_per_node=gpus, num_nodes=nodes,
                                                         cpu_offload=False, additional_buffer_factor=3.0)
    assert ds_factor == ds_gpu


def test_deepspeed_printed_zero2_table_matches(capsys):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    estimate_zero2_model_states_mem_needs_all_cold(PSI, num_gpus_per_node=8, num_nodes=4)
    row = next(line for line in capsys.readouterr().out.splitlines() if "offload_optimizer=none" in line)
    per_gpu_gib = float(re.findall(r"([\d.]+)GB", row)[1])
    expected = zero_model_state_bytes(PSI, 32, 2) + optimizer_step_bytes(PSI, 32, 2)
    assert per_gpu_gib == pytest.approx(expected / 2**30, abs=0.006)  # printed with 2 decimals


@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 8), (4, 8)])
def test_deepspeed_zero3_estimate(nodes, gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    n = nodes * gpus
    largest = largest_layer_params(decode_variant("B/16", num_classes=1000))
    _, ds_gpu, ds_largest = estimate_zero3_model_states_mem_needs(
        PSI, largest, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=False, cpu_offload_params=False)
    ours = zero_model_state_bytes(PSI, n, 3)
    # DeepSpeed: 4 x largest layer + 18Ψ/N, i.e. a 4-byte gradient shard where DESIGN has 2 bytes
    # (+2Ψ/N), plus the gathered layer, which we count as a ZeRO-3 buffer.
    assert ds_gpu == ours + 2 * PSI // n + 4 * largest
    assert ds_largest == 4 * largest == comm_buffer_bytes(PSI, 3, "bf16", largest) - comm_buffer_bytes(PSI, 3, "bf16")


@pytest.mark.parametrize("overrides", [{}, {"num_classes": 1000}, {"pool": "gap", "representation_size": 64}])
def test_param_and_largest_layer_counts_match_deepspeed_on_a_live_model(overrides):
    from deepspeed.runtime.zero.stage3 import model_to_params

    cfg = ViTConfig(**{"image_size": 32, "patch_size": 4, "width": 96, "depth": 2, "mlp_dim": 384, "heads": 3,
                       "num_classes": 10, **overrides})
    assert model_to_params(ViT(cfg)) == (count_params(cfg), largest_layer_params(cfg))


# --- activations -------------------------------------------------------------------------------


def _measured_saved_bytes(cfg: ViTConfig, batch: int) -> int:
    """Bytes of every distinct storage autograd saves for backward in one training step (fp32, CPU),
    parameters excluded. Views (q, k, v of one qkv output) share a storage and count once."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = ViT(cfg).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    images = torch.randn(batch, cfg.channels, cfg.image_size, cfg.image_size)
    labels = torch.randint(0, cfg.num_classes, (batch,))
    # The formula assumes a fused attention kernel (no T x T matrix saved), as on GPU; pin it here too.
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(images).float(), labels)
    loss.backward()
    return sum(saved.values())


@pytest.mark.parametrize("overrides", [
    {}, {"depth": 3}, {"pool": "gap"}, {"representation_size": 64},
    {"checkpoint_activations": True}, {"checkpoint_activations": True, "pool": "gap", "representation_size": 32},
])
def test_activation_formula_matches_saved_tensors(overrides):
    cfg = ViTConfig(**{"image_size": 32, "patch_size": 4, "width": 96, "depth": 2, "mlp_dim": 384, "heads": 3,
                       "num_classes": 10, **overrides})
    measured = _measured_saved_bytes(cfg, batch=8)
    estimate = activation_breakdown(cfg, 8, "fp32", cfg.checkpoint_activations)["stored"]
    # Left out: the loss's int64 labels and a scalar (~70 bytes of ~1-7 MB).
    assert estimate == pytest.approx(measured, rel=5e-4)


def test_activation_formula_by_hand():
    cfg = decode_variant("B/16")  # T = 197, D = 768, M = 3072, h = 12
    # per token in bf16: (8 x 768 + 2 x 3072) x 2 + 16 (LayerNorm stats) + 4 x 12 (log-sum-exp) = 24,640 bytes
    assert layer_activation_bytes(cfg, 1, "bf16") == 197 * 24_640
    assert layer_activation_bytes(cfg, 32, "fp32") == 32 * 197 * ((8 * 768 + 2 * 3072) * 4 + 16 + 48)
    full = activation_breakdown(cfg, 32, "bf16", checkpointing=False)
    ckpt = activation_breakdown(cfg, 32, "bf16", checkpointing=True)
    outside = full["stored"] - 12 * full["per_layer"]
    # Checkpointing keeps each block's input (B, T, D) and recomputes one block during the backward pass.
    assert ckpt["stored"] == 12 * 32 * 197 * 768 * 2 + outside
    assert ckpt["total"] == ckpt["stored"] + full["per_layer"]
    assert activation_bytes(cfg, 64, "bf16", False) == 2 * activation_bytes(cfg, 32, "bf16", False)  # linear in b


# --- the plan ----------------------------------------------------------------------------------


def test_plan_numbers():
    p = _params()
    plan = plan_pretrain(p, nodes=1, gpus_per_node=8, gpu="h100", mfu=0.5, decode_rate=100.0, num_classes=1000)
    cfg = decode_variant("B/16", num_classes=1000)
    psi = count_params(cfg)
    assert plan["params"] == psi and plan["flops_per_image"] == flops_per_image(cfg)
    assert [r["model_state_bytes"] for r in plan["zero_stages"]] == [zero_model_state_bytes(psi, 8, s) for s in range(4)]
    images_per_s = 8 * ACCELERATORS["h100"].peak_flops * 0.5 / (3 * flops_per_image(cfg))
    assert plan["throughput"]["images_per_s"] == pytest.approx(images_per_s)
    assert plan["throughput"]["step_time_s"] == pytest.approx(4096 / images_per_s)
    assert plan["data_plane"]["decode_cores"] == math.ceil(images_per_s / 100.0)
    assert plan["checkpoint"] == {"deepspeed_bytes": 14 * psi, "handoff_bytes": 4 * psi, "kept": 2,
                                  "storage_bytes": 2 * 14 * psi + 4 * psi}
    # The buffers are DeepSpeed's for this config: fp32 gradient traffic unless switched off.
    largest = largest_layer_params(cfg)
    assert [r["buffer_bytes"] for r in plan["zero_stages"]] == \
        [comm_buffer_bytes(psi, s, "bf16", largest) for s in range(4)]
    off = plan_pretrain(_params(grad_comm_fp32=False), nodes=1, gpus_per_node=8, gpu="h100", num_classes=1000)
    assert not off["grad_comm_fp32"] and [r["buffer_bytes"] for r in off["zero_stages"]] == \
        [comm_buffer_bytes(psi, s, "bf16", largest, grad_comm_fp32=False) for s in range(4)]
    # fp32 training communicates in fp32 whatever the switch says.
    assert plan_pretrain(_params(precision="fp32", grad_comm_fp32=False), nodes=1, gpus_per_node=8)["grad_comm_fp32"]
    row = plan["zero_stages"][2]
    acts = activation_bytes(cfg, 32, "bf16", False)
    assert row["peak_bytes"] == RESERVED_BYTES + row["model_state_bytes"] + row["buffer_bytes"] + acts
    assert plan["fits"] and not plan["warnings"]
    assert not any(n.startswith("the config has workers=") for n in plan["notes"])  # workers = N = 8


def test_checkpoint_sizes():
    assert checkpoint_bytes(PSI, "bf16", 3) == {"deepspeed": 12 * PSI, "handoff": 4 * PSI}
    assert checkpoint_bytes(PSI, "fp32", 0)["deepspeed"] == 12 * PSI  # torch Adam: weights + m + v
    assert checkpoint_bytes(PSI, "fp32", 2)["deepspeed"] == 16 * PSI  # + DeepSpeed's fp32 partition


def test_h14_at_micro_batch_256_does_not_fit_zero0_on_one_a100():
    p = _params(model="H/14", micro_batch=256, global_batch=256, workers=1, zero_stage=0)
    plan = plan_pretrain(p, gpu="a100")
    assert not plan["fits"]
    warning = plan["warnings"][0]
    assert warning.startswith("does not fit: ZeRO-0 at micro_batch 256")
    assert "checkpoint_activations=true with ZeRO-0" in warning
    limit = plan["zero_stages"][0]["max_micro_batch"]
    assert 0 < limit < 256 and "micro_batch 128 at ZeRO-0" in warning  # largest divisor of 256 under the limit
    # The suggested micro-batch really fits; one more image than the limit does not.
    assert plan_pretrain(_params(model="H/14", micro_batch=128, global_batch=256, workers=1, zero_stage=0),
                         gpu="a100")["fits"]
    over = plan_pretrain(_params(model="H/14", micro_batch=limit + 1, global_batch=limit + 1, workers=1,
                                 zero_stage=0), gpu="a100")
    assert not over["fits"]
    assert plan_pretrain(_params(model="H/14", micro_batch=256, global_batch=256, workers=1, zero_stage=0,
                                 checkpoint_activations=True), gpu="a100")["fits"]
    # The same on an H200 (141 GB) fits.
    assert plan_pretrain(p, gpu="h200")["fits"]


def test_model_states_too_big_suggest_a_higher_zero_stage():
    # ~4B parameters: 16Ψ of ZeRO-0 alone exceeds 80 GB; ZeRO-1 on 64 GPUs fits.
    p = _params(model="g/14", depth=160, micro_batch=8, global_batch=512, workers=64, zero_stage=0,
                checkpoint_activations=True)
    plan = plan_pretrain(p, nodes=8, gpus_per_node=8, gpu="h100")
    assert plan["params"] > 4e9 and not plan["fits"]
    assert plan["zero_stages"][0]["max_micro_batch_checkpointed"] == 0
    remedy = plan["warnings"][0].split("would fit: ")[1]
    assert remedy.startswith("ZeRO-1 (") and "micro_batch" not in remedy
    # On one GPU nothing fits at all.
    alone = plan_pretrain(_params(model="g/14", depth=200, micro_batch=8, global_batch=8, workers=1, zero_stage=0),
                          gpu="h100")
    assert "nothing fits" in alone["warnings"][0]


# --- communication and the recommendation ------------------------------------------------------


def test_communication_volume_by_hand():
    # Per optimizer step, in units of Ψ: all-reduce 2; ZeRO-1 reduce + all-gather 2; ZeRO-2 reduce-scatters
    # at each of A micro-steps + one all-gather, A + 1; ZeRO-3 two all-gathers + a reduce-scatter per micro-step.
    assert [communication_volume(s) for s in range(4)] == [2, 2, 2, 3]
    assert [communication_volume(s, accumulation=4) for s in range(4)] == [2, 2, 5, 12]
    with pytest.raises(ValueError, match="accumulation must be >= 1"):
        communication_volume(2, accumulation=0)


def _rows(fits, fits_ckpt, peaks=(40, 30, 25, 20)):
    """Per-stage rows as plan_pretrain makes them; peaks in GB, checkpointed ones 10 GB lower."""
    return [{"stage": s, "fits": f, "fits_checkpointed": c, "peak_bytes": p * 10**9,
             "peak_bytes_checkpointed": (p - 10) * 10**9} for s, f, c, p in zip(range(4), fits, fits_ckpt, peaks)]


def test_recommend_by_hand():
    yes, no = (True,) * 4, (False,) * 4
    # Everything fits, one micro-step: ZeRO-0/1/2 all move 2Ψ; ZeRO-0 only after the backward pass, and
    # ZeRO-1 peaks higher (30 > 25 GB): ZeRO-2, no recomputation.
    best = recommend(_rows(yes, yes))
    assert (best["zero_stage"], best["checkpoint_activations"], best["communication_volume"]) == (2, False, 2)
    assert best["peak_bytes"] == 25 * 10**9
    assert "ZeRO-0 moves as much but only after the backward pass" in best["reason"]
    assert "ZeRO-1 moves as much with a higher peak" in best["reason"]
    # Four micro-steps: ZeRO-2 now moves 5Ψ and ZeRO-3 12Ψ; ZeRO-1 keeps 2Ψ.
    assert recommend(_rows(yes, yes), accumulation=4)["zero_stage"] == 1
    # Without checkpointing only ZeRO-3 fits (3Ψ); with it ZeRO-1 and 2 (2Ψ): less communication first.
    best = recommend(_rows((False, False, False, True), yes))
    assert (best["zero_stage"], best["checkpoint_activations"]) == (2, True)
    # Equal communication: no recomputation wins over a lower peak (ZeRO-1 plain vs ZeRO-2 checkpointed).
    best = recommend(_rows((False, True, False, False), (False, False, True, False)))
    assert (best["zero_stage"], best["checkpoint_activations"]) == (1, False)
    # Only ZeRO-0 fits: it is recommended, said to communicate after the backward pass ...
    best = recommend(_rows((True, False, False, False), no))
    assert best["zero_stage"] == 0 and "after the backward pass" in best["reason"]
    # ... unless the optimizer is offloaded, which ZeRO-0 cannot do; nothing fitting gives None.
    assert recommend(_rows((True, False, False, False), no), offload_optimizer=True) is None
    assert recommend(_rows(no, no)) is None


def test_plan_recommends_zero2_without_checkpointing_for_h14_on_128_h100():
    p = _params(model="H/14", micro_batch=32, workers=128, zero_stage=3, checkpoint_activations=True)
    plan = plan_pretrain(p, nodes=16, gpus_per_node=8, gpu="h100")
    rec = plan["recommended"]
    assert (rec["zero_stage"], rec["checkpoint_activations"], plan["accumulation"]) == (2, False, 1)
    assert rec["peak_bytes"] == plan["zero_stages"][2]["peak_bytes"]
    assert [r["communication_volume"] for r in plan["zero_stages"]] == [2, 2, 2, 3]
    assert any("this config has zero_stage 3, checkpoint_activations true; the plan recommends zero_stage 2, "
               "checkpoint_activations false" in n for n in plan["notes"])
    text = render_pretrain_plan(plan)
    assert "recommended: ZeRO-2, activation checkpointing off: the least communication that fits" in text
    # Configured as recommended: no such note.
    same = plan_pretrain(p.model_copy(update={"zero_stage": 2, "checkpoint_activations": False}), nodes=16,
                         gpus_per_node=8, gpu="h100")
    assert not any("the plan recommends" in n for n in same["notes"])


def test_plan_recommendation_follows_accumulation_and_memory():
    # B/16 on 8 GPUs at micro-batch 32: 16 micro-steps per step, so ZeRO-2 would reduce-scatter 16 times.
    plan = plan_pretrain(_params(), nodes=1, gpus_per_node=8, gpu="h100")
    assert plan["accumulation"] == 16 and plan["recommended"]["zero_stage"] == 1
    # H/14 at micro-batch 224 on 8 H100s: without checkpointing only ZeRO-3 fits (3Ψ); ZeRO-2 with
    # checkpointing moves 2Ψ, so it is recommended, recomputation and all.
    plan = plan_pretrain(_params(model="H/14", micro_batch=224, global_batch=8 * 224), nodes=1, gpus_per_node=8,
                         gpu="h100")
    assert [r["fits"] for r in plan["zero_stages"]] == [False, False, False, True]
    assert (plan["recommended"]["zero_stage"], plan["recommended"]["checkpoint_activations"]) == (2, True)
    # Nothing fits: said so, with no stage.
    alone = plan_pretrain(_params(model="g/14", depth=200, micro_batch=8, global_batch=8, workers=1, zero_stage=0),
                          gpu="h100")
    assert alone["recommended"]["zero_stage"] is None and "nothing fits" in alone["recommended"]["reason"]
    assert "recommended: none (nothing fits" in render_pretrain_plan(alone)


def test_plan_notes_workers_and_batch_divisibility():
    plan = plan_pretrain(_params(workers=8, global_batch=4096, micro_batch=32), nodes=4, gpus_per_node=8)
    assert any("workers=8" in n and "N = 4 x 8 = 32" in n for n in plan["notes"])
    assert not any("divisible" in w for w in plan["warnings"])  # 4096 = 32 x 32 x 4
    plan = plan_pretrain(_params(workers=8, global_batch=4096, micro_batch=256), nodes=4, gpus_per_node=8)
    assert any("not divisible by N x micro_batch = 32 x 256 = 8192" in w for w in plan["warnings"])


@pytest.mark.parametrize("kwargs,message", [
    ({"nodes": 0}, "nodes"), ({"gpus_per_node": -1}, "gpus_per_node"), ({"mfu": 0}, "mfu"),
    ({"mfu": 1.5}, "mfu"), ({"decode_rate": 0}, "decode_rate"), ({"gpu": "v100"}, "unknown GPU 'v100'"),
])
def test_plan_rejects_bad_cluster(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_pretrain(_params(), **kwargs)


@pytest.mark.parametrize("gpu", sorted(ACCELERATORS))
def test_plan_uses_the_one_accelerator_table(gpu):
    # Memory and the MFU denominator come from stages.train.hardware, which the trainer uses too.
    c = plan_pretrain(_params(), gpu=gpu, nodes=1, gpus_per_node=8)["cluster"]
    assert (c["gpu_memory_bytes"], c["peak_flops"]) == (ACCELERATORS[gpu].memory_bytes, ACCELERATORS[gpu].peak_flops)
    assert {a: ACCELERATORS[a].memory_bytes for a in ("h100", "a100", "h200")} == \
        {"h100": 80e9, "a100": 80e9, "h200": 141e9}


def test_pretrain_has_a_registered_planner():
    registry.load_plugins()
    assert "pretrain" in registry.planner_types()
    assert registry.find_planner("ingest") is None


# --- the command line --------------------------------------------------------------------------


def test_cli_plan_json_on_tiny():
    result = run_cli("plan", "configs/tiny.yaml", "--json", "--nodes", "2", "--gpus-per-node", "4")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    plan = out["stages"]["pretrain"]
    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())["stages"]["pretrain"]["params"]
    params = PretrainParams(**raw)
    cfg = params.vit_config(10)  # digits: 10 classes
    assert plan["params"] == count_params(cfg) and plan["flops_per_image"] == flops_per_image(cfg)
    assert plan["num_classes"] == 10 and plan["cluster"]["world_size"] == 8
    assert [r["model_state_bytes"] for r in plan["zero_stages"]] == \
        [zero_model_state_bytes(count_params(cfg), 8, s, precision="fp32") for s in range(4)]
    assert plan["data_plane"]["decode_rate"] == DEFAULT_DECODE_RATE
    assert plan["fits"] and "ingest" in out["not_planned"]
    assert any("workers=2" in n for n in plan["notes"])
    # The fine-tune stage is planned with the pretrained backbone at its own resolution and head.
    ft = out["stages"]["finetune"]
    target = transfer_config(cfg, 48, 10)
    assert ft["model_from"] == "pretrain" and ft["params"] == count_params(target)
    assert ft["flops_per_image"] == flops_per_image(target) and ft["tokens"] == 145
    assert any("SGD" in n for n in ft["notes"])


def test_cli_plan_text_warns_when_it_does_not_fit():
    result = run_cli("plan", "configs/tiny.yaml", *H14, "pretrain.precision=bf16", "pretrain.micro_batch=256",
                     "pretrain.global_batch=256", "pretrain.workers=1", "pretrain.zero_stage=0", "--gpu", "a100")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.split()[:1] == ["parameters"] and "630.8M" in line for line in lines)
    warnings = [line for line in lines if line.strip().startswith("warning: does not fit: ZeRO-0")]
    assert len(warnings) == 1 and "checkpoint_activations=true" in warnings[0]
    assert re.search(r"^\s+0 \*\s", result.stdout, re.M)  # the configured ZeRO stage is marked
    # The override breaks the fine-tune (48 px is not a multiple of 14): said, without hiding the rest.
    assert "finetune: cannot plan: stages.finetune: image_size 48 is not divisible by patch_size 14" in result.stdout


@pytest.mark.parametrize("args,error", [
    (["--nodes", "0"], "vitpipe: error: --nodes must be at least 1, got 0"),
    (["--mfu", "1.5"], "vitpipe: error: --mfu must be in (0, 1], got 1.5"),
    (["--gpu", "v100"], "vitpipe: error: stages.pretrain: unknown GPU 'v100' (known: a100, h100, h200)"),
    (["pretrain.model=X/16"], None),
])
def test_cli_plan_bad_arguments_are_one_line(args, error):
    result = run_cli("plan", "configs/tiny.yaml", *args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("vitpipe: error: ")
    if error:
        assert result.stderr.strip() == error


def test_cli_plan_help():
    from pipeline.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    text = sub.choices["plan"].format_help()
    assert text.startswith("usage: vitpipe plan")
    for flag in ("--nodes", "--gpus-per-node", "--gpu", "--mfu", "--decode-rate", "--num-classes", "--json"):
        assert flag in text
    assert "vitpipe plan configs/tiny.yaml" in build_parser().format_help()  # in the top-level examples
