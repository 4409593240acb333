"""The pretrain stage for real: DeepSpeed ZeRO-2 on 2 Ray Train CPU workers (gloo), tiny ViT."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest
from safetensors.torch import load_file

from cluster.executor import RayExecutor
from pipeline.config import parse_config
from pipeline.engine import run_pipeline
from pipeline.errors import ConfigError, StageFailedError
from stages.train.goodput import BUCKETS
from tests.conftest import ledger_by_step, ledger_keys, read_ledgers, run_cli, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_instance")]

INGEST = {"type": "ingest", "params": {"source": "digits", "image_size": 16, "shard_samples": 100}}
TINY = {"model": "Ti/4", "width": 64, "depth": 2, "heads": 2, "mlp_dim": 128, "image_size": 16,
        "global_batch": 32, "micro_batch": 8, "lr": 0.003, "warmup_steps": 3, "workers": 2, "zero_stage": 2,
        "weight_decay": 0.0, "crop_scale_min": 0.6, "log_every": 1}


def config(**params) -> dict:
    return {"name": "pt", "seed": 5, "ray": {"include_dashboard": False},
            "stages": {"ingest": INGEST, "pretrain": {"type": "pretrain", "inputs": {"data": "ingest"},
                                                      "params": {**TINY, **params}}}}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    """A run directory whose ingest stage is done (copied by each test, so ingest runs once)."""
    base = tmp_path_factory.mktemp("ingested") / "run"
    raw = config()
    raw["stages"].pop("pretrain")
    run_pipeline(parse_config(raw), str(base), RayExecutor())
    return base


def fresh_run(ingested: Path, tmp_path: Path, name: str) -> str:
    target = tmp_path / name
    shutil.copytree(ingested, target)
    return str(target)


def weights(run: str) -> dict:
    return load_file(str(Path(run) / "stages/pretrain/model.safetensors"))


def ledgers(run: str) -> list[list[Any]]:
    return read_ledgers(Path(run) / "stages/pretrain")


def _check_outputs(run: str, steps: int, batch_per_rank: int) -> None:
    """What a pretrain stage hands off and records (learning itself: test_multinode, the default pipeline)."""
    out = Path(run) / "stages/pretrain"
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, steps + 1))
    assert {"lr", "grad_norm", "images_per_s", "step_time_s", "data_wait_fraction", "mfu"} <= set(history[0])
    cfg = json.loads((out / "model_config.json").read_text())
    assert cfg["width"] == 64 and cfg["num_classes"] == 10
    assert weights(run)["pos_embed"].shape == (1, 17, 64)
    # The two ranks saw disjoint samples in each step.
    assert [[step for step, _ in ledger] for ledger in ledgers(run)] == [list(range(1, steps + 1))] * 2
    rank0, rank1 = (ledger_keys(ledger) for ledger in ledgers(run))
    assert len(rank0) == len(rank1) == steps * batch_per_rank
    assert not set(rank0) & set(rank1)
    manifest = json.loads((out / "manifest.json").read_text())
    paths = {o["path"] for o in manifest["outputs"]}
    assert {p.split("/")[0] for p in paths} == {"model.safetensors", "model_config.json", "metrics.jsonl",
                                                "workers.json", "attempts.jsonl", "tensorboard", "goodput"}
    assert manifest["result"]["final_loss"] == history[-1]["loss"] and manifest["result"]["steps"] == steps
    assert [w["rank"] for w in json.loads((out / "workers.json").read_text())] == [0, 1]
    # Where the stage's wall time went: named buckets hold at least 95% of it.
    goodput = manifest["result"]["goodput"]
    assert set(goodput["buckets"]) == set(BUCKETS) and goodput["attempts"] == 1
    assert sum(goodput["buckets"].values()) == pytest.approx(goodput["wall_s"])
    assert goodput["buckets"]["other"] <= 0.05 * goodput["wall_s"], goodput
    assert goodput["buckets"]["compute"] > 0 and goodput["buckets"]["lost_to_restarts"] == 0
    assert goodput["fraction"] == pytest.approx(goodput["buckets"]["compute"] / goodput["wall_s"])
    # TensorBoard holds the same curve as the JSONL log.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = events.Scalars("pretrain/loss")
    assert [e.step for e in losses] == list(range(1, steps + 1))
    assert abs(losses[-1].value - history[-1]["loss"]) < 1e-5


def _committed_steps(run: str) -> list[int]:
    return sorted(int(p.parent.name[5:]) for p in (Path(run) / "stages/pretrain/checkpoints").glob("step-*/COMPLETE.json"))


def _kill_one_worker_after(run: str, step: int, done: threading.Event, killed: list[tuple[int, int]]) -> None:
    """SIGKILL rank 1 of *this run* (its pid from the run's workers.json, checked to be a Ray Train
    worker) once the step-``step`` checkpoint is committed; records (pid, newest committed step)."""
    marker = Path(run) / f"stages/pretrain/checkpoints/step-{step:08d}/COMPLETE.json"
    wait_for(lambda: marker.exists() or done.is_set(), timeout=600, interval=0.1, what="a checkpoint")
    placement = json.loads((Path(run) / "stages/pretrain/workers.json").read_text())
    victim = psutil.Process(next(w["pid"] for w in placement if w["rank"] == 1))
    assert any("RayTrainWorker" in part for part in victim.cmdline()), victim.cmdline()
    if 12 not in _committed_steps(run):
        victim.kill()  # SIGKILL
        victim.wait(timeout=30)
        # Rank 0 cannot commit another checkpoint without rank 1: the newest now is the resume point.
        killed.append((victim.pid, _committed_steps(run)[-1]))


def test_sigkill_a_worker_resumes_exactly(ingested, tmp_path):
    params = dict(steps=12, checkpoint_every=4, ledger=True, max_failures=2, streams=2, dropout=0.1, drop_path=0.1)
    clean = fresh_run(ingested, tmp_path, "clean")
    summary = run_pipeline(parse_config(config(**params)), clean, RayExecutor())
    assert summary.ran == ["pretrain"] and summary.skipped == ["ingest"]
    _check_outputs(clean, 12, 16)
    status = run_cli("status", clean, "--detail")
    table = status.stdout.split("where the training stages' wall time went:")[1].splitlines()
    assert table[1].split()[:2] == ["STAGE", "WALL"] and table[2].split()[0] == "pretrain", status.stdout

    faulty = fresh_run(ingested, tmp_path, "faulty")
    done, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_one_worker_after, args=(faulty, 4, done, killed), daemon=True)
    killer.start()
    try:
        run_pipeline(parse_config(config(**params)), faulty, RayExecutor())
    finally:
        done.set()
        killer.join(timeout=10)
    assert killed, "no training worker was killed mid-run"
    out = Path(faulty) / "stages/pretrain"
    # The group restarted once, from the newest checkpoint at the kill, on the same two workers.
    attempts = [json.loads(line) for line in (out / "attempts.jsonl").read_text().splitlines()]
    assert [(a["world_size"], a["resumed_from"]) for a in attempts] == [(2, 0), (2, killed[0][1])], (attempts, killed)
    goodput = json.loads((out / "manifest.json").read_text())["result"]["goodput"]
    assert goodput["attempts"] == 2 and goodput["buckets"]["lost_to_restarts"] > 0, goodput
    assert goodput["buckets"]["other"] <= 0.05 * goodput["wall_s"], goodput
    a, b = weights(clean), weights(faulty)
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), f"{name} differs after the restart"
    assert ledgers(clean) == ledgers(faulty)  # every sample consumed exactly as often, in the same order
    steps = sorted(p.name for p in (Path(faulty) / "stages/pretrain/checkpoints").iterdir() if p.name.startswith("step"))
    assert steps == ["step-00000008", "step-00000012"]  # keep_checkpoints=2

    # What a driver killed during the step-12 checkpoint write leaves: the stage recorded as
    # running, no manifest or handoff, step 12's files without COMPLETE.json (one half-written).
    # The resume, on one worker now (``workers`` is an execution param here: ``streams`` is set),
    # must ignore step 12, continue from step 8 resharded, consume every step's samples and draw the
    # same dropout and stochastic-depth masks.
    state = json.loads((Path(faulty) / "state.json").read_text())
    state["stages"]["pretrain"].update(status="running", finished=None)
    (Path(faulty) / "state.json").write_text(json.dumps(state))
    (out / "manifest.json").unlink()
    (out / "checkpoints/step-00000012/COMPLETE.json").unlink()
    half = max((p for p in (out / "checkpoints/step-00000012").rglob("*.pt")), key=lambda p: p.stat().st_size)
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])
    (out / "model.safetensors").unlink()
    summary = run_pipeline(parse_config(config(**params, workers=1)), faulty, RayExecutor())
    assert summary.ran == ["pretrain"], summary
    assert not (Path(faulty) / "stages/pretrain.partial").exists()  # continued in place, nothing set aside
    attempts = [json.loads(line) for line in (out / "attempts.jsonl").read_text().splitlines()]
    assert [(t["world_size"], t["resumed_from"]) for t in attempts][2:] == [(1, 8)], attempts  # not started over
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, 13))
    c = weights(faulty)
    # Measured once: 1.0e-5 off the clean run (the same masks; reduction order: 4 micro-batches on one
    # worker, 2 on each of two). Without dropout: 4.8e-5 here, 1.7e-4 between whole runs on one and on
    # two workers, and 4.1e-3 with the Adam moments zeroed after the reshard.
    worst = max((a[name] - c[name]).abs().max().item() for name in a)
    assert worst < 5e-5, worst
    assert ledger_by_step(ledgers(clean)) == ledger_by_step(ledgers(faulty))


def test_bad_training_configs_are_rejected_at_load():
    with pytest.raises(ConfigError, match=r"global_batch 30 is not divisible by workers x micro_batch \(2 x 8 = 16\)"):
        parse_config(config(global_batch=30), source="x.yaml")
    with pytest.raises(ConfigError, match="image_size 18 is not divisible by patch_size 4"):
        parse_config(config(image_size=18), source="x.yaml")
    with pytest.raises(ConfigError, match="unknown ViT variant"):
        parse_config(config(model="Z/16"), source="x.yaml")
    # The sample order's streams default to one per loader process; they must suit the geometry.
    with pytest.raises(ConfigError, match=r"streams 6 \(workers x loader_workers; set streams\) must be a multiple "
                                          r"of workers \(2\) and divide global_batch \(32\)"):
        parse_config(config(loader_workers=3), source="x.yaml")
    with pytest.raises(ConfigError, match=r"streams 3 must be a multiple of workers \(2\)"):
        parse_config(config(streams=3), source="x.yaml")


def test_elastic_workers_are_checked_at_load_and_map_to_ray_train():

    from stages.train.launch import scaling_config
    from stages.train.params import FinetuneParams, PretrainParams, worker_demand

    def pretrain(**params):
        parse_config(config(**params), source="x.yaml")  # as a run loads it: errors are ConfigErrors
        return PretrainParams.model_validate({**TINY, **params})

    p = pretrain(workers=[1, 2], resize_check_s=5)
    assert (p.world_sizes, p.order_streams, p.workers_label) == ([1, 2], 2, "1-2 (elastic)")
    # Only sizes that split the batch (32 in micro-batches of 8): 3 is skipped; the sample order's
    # streams default to their lcm x loader workers.
    q = pretrain(workers=[2, 4], loader_workers=2)
    assert (q.world_sizes, q.order_streams) == ([2, 4], 8)
    elastic = scaling_config(p)
    assert (elastic.min_workers, elastic.max_workers, elastic.elastic_resize_monitor_interval_s) == (1, 2, 5)
    assert scaling_config(pretrain(workers=2)).num_workers == 2
    # Preflight asks for the minimum: the group starts at whatever else the cluster has.
    assert len(worker_demand(p).bundles) == 1
    with pytest.raises(ConfigError, match=r"workers \[1, 3\]: MIN and MAX must each split global_batch 32 into "
                                          r"micro-batches of 8; the sizes in that range that do: \[1, 2\]"):
        pretrain(workers=[1, 3])
    with pytest.raises(ConfigError, match=r"workers must be a number >= 1 or \[MIN, MAX\]"):
        pretrain(workers=[2, 1])
    with pytest.raises(ConfigError, match=r"streams 6 must be a multiple of every size the group may take \(\[2, 4\]\)"):
        pretrain(workers=[2, 4], streams=6, global_batch=64)
    # Every resize reshards the newest checkpoint: ZeRO 0-3, Adam's state and SGD's alike.
    assert pretrain(workers=[1, 2], zero_stage=3).elastic
    assert FinetuneParams(workers=[1, 2], global_batch=32, micro_batch=16, warmup_steps=0, steps=4).elastic
    assert PretrainParams.optimizer == "adamw" and FinetuneParams.optimizer == "sgd"


def test_elastic_groups_take_only_sizes_that_split_the_batch(monkeypatch):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from stages.train.elastic import ElasticTorchTrainer, UsableSizesPolicy, usable_size
    from stages.train.params import PretrainParams

    # The paper's batch on 64-128 GPUs: 4096 in micro-batches of 32 splits over 64 or 128 ranks only.
    p = PretrainParams(workers=[64, 128], global_batch=4096, micro_batch=32, streams=1024, warmup_steps=0, steps=1)
    assert p.world_sizes == [64, 128]
    assert [usable_size(n, [64, 128]) for n in (63, 64, 100, 127, 128, 200)] == [0, 64, 64, 64, 128, 128]
    # Ray Train's own count from the nodes' reserved GPUs (8 per node), rounded down: a node lost at
    # 16 nodes leaves 120 GPUs and a group of 64; fewer than 64 is "below the minimum" (Ray waits).
    policy = UsableSizesPolicy(ScalingConfig(num_workers=(64, 128), use_gpu=True), p.world_sizes)
    assert [policy._count_possible_workers({f"node{i}": {"GPU": 8.0, "CPU": 96.0} for i in range(nodes)})
            for nodes in (16, 15, 8, 7)] == [128, 64, 64, 0]
    # The trainer hands that policy to Ray Train's controller (a Ray upgrade that renames the hook fails here).
    handed = {}
    monkeypatch.setattr(TorchTrainer, "_initialize_and_run_controller", lambda self, **kw: handed.update(kw))
    trainer = ElasticTorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=(1, 2)), sizes=[1, 2])
    trainer._initialize_and_run_controller(scaling_policy=None, failure_policy=None)
    assert isinstance(handed["scaling_policy"], UsableSizesPolicy) and handed["scaling_policy"].sizes == [1, 2]


def test_the_wait_clock_counts_from_when_the_group_last_ran():
    from stages.train.waiting import WaitClock

    clock = WaitClock(limit_s=10, now=0)
    assert not clock.observe(running=False, now=10)  # starting: 10 s is not over the limit
    assert not clock.observe(running=True, now=11)  # ran: the wait starts again
    assert [clock.observe(running=False, now=t) for t in (15, 21, 21.5)] == [False, False, True]


def test_a_group_that_can_never_start_fails_the_stage_in_one_line_instead_of_waiting_forever(ingested, tmp_path):
    run = fresh_run(ingested, tmp_path, "starved")
    raw = config(workers=3, global_batch=48, micro_batch=8, steps=4, wait_for_workers_s=4, worker_start_timeout_s=2)
    raw["ray"]["autoscaling"] = True  # an autoscaling cluster is not preflighted: Ray Train is asked as is
    with pytest.raises(StageFailedError):
        run_pipeline(parse_config(raw), run, RayExecutor())  # 3 one-CPU workers on this 2-CPU Ray: never
    error = json.loads((Path(run) / "state.json").read_text())["stages"]["pretrain"]["error"]
    assert error == ("pretrain: no worker group of 3 workers could start for 4s: the cluster lacks the capacity (a "
                     "node lost?); resume when it is back, or with fewer workers (wait_for_workers_s sets this "
                     "limit)"), error
    assert not (Path(run) / "stages/pretrain/attempts.jsonl").exists()  # no group ever ran


def test_a_non_finite_loss_stops_the_stage_naming_the_step(ingested, tmp_path):
    run = fresh_run(ingested, tmp_path, "nan")
    # lr 3e37: Adam moves every weight by ~3e37 in the first step, so the second forward overflows
    # (much more and torch's Adam itself cannot represent its step size).
    # With retries allowed: a diverged update would diverge again, so it is not retried.
    with pytest.raises(StageFailedError) as failed:
        run_pipeline(parse_config(config(steps=6, lr=3e37, warmup_steps=0, max_failures=2)), run, RayExecutor())
    error = json.loads((Path(run) / "state.json").read_text())["stages"]["pretrain"]["error"]
    assert error == "training stopped: non-finite loss (nan) at step 2 (not retried: it would happen again)", error
    assert "non-finite loss (nan) at step 2" in str(failed.value)
    assert not (Path(run) / "stages/pretrain/manifest.json").exists()
    starts = (Path(run) / "stages/pretrain/attempts.jsonl").read_text().splitlines()
    assert len(starts) == 1, starts  # one start of the worker group: no retry used


def test_class_sorted_folders_give_mixed_micro_batches_in_the_pretrain_stage(tmp_path):
    """An ImageFolder listed by key gives shards of one class each; the stage's micro-batches (from
    its sample ledger) must still hold about as many classes as a random draw."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i in range(1000):
        folder = tmp_path / "digits" / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((digits.images[i] * 16).clip(0, 255).astype(np.uint8)).resize((16, 16))
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        (folder / f"{i:04d}.png").write_bytes(buf.getvalue())
    raw = {"name": "mix", "seed": 1, "ray": {"include_dashboard": False}, "stages": {
        # shuffle: false keeps the listing's (class) order in the shards, as other tools' shards may be.
        "ingest": {"type": "ingest", "params": {"source": "imagefolder", "path": str(tmp_path / "digits"),
                                                "shard_samples": 20, "shuffle": False}},
        "pretrain": {"type": "pretrain", "inputs": {"data": "ingest"}, "params": {
            **TINY, "steps": 10, "global_batch": 32, "micro_batch": 16, "streams": 16, "open_shards": 4,
            "shuffle_buffer": 64, "ledger": True, "tensorboard": False, "log_every": 5, "checkpoint_every": 10}}}}
    run = tmp_path / "run"
    run_pipeline(parse_config(raw), str(run), RayExecutor())
    manifest = json.loads((run / "stages/ingest/manifest.json").read_text())
    label_of, classes_per_shard = {}, []
    for shard in manifest["result"]["splits"]["train"]["shards"]:
        with tarfile.open(run / "stages/ingest" / shard["path"]) as tar:
            labels = {m.name[:-4]: int(tar.extractfile(m).read()) for m in tar if m.name.endswith(".cls")}
        label_of.update(labels)
        classes_per_shard.append(len(set(labels.values())))
    # What the loader is up against: shards of one class (two where a class ends mid-shard).
    assert len(classes_per_shard) == 50 and max(classes_per_shard) == 2 and classes_per_shard.count(1) >= 40
    distinct = []
    for ledger in ledgers(str(run)):
        for _, keys in ledger:  # a rank's micro-batch of 16 at each step
            distinct.append(len({label_of[k] for k in keys}))
    random_draw = 10 * (1 - 0.9 ** 16)  # 8.15 distinct classes in 16 random draws from 10
    assert len(distinct) == 20 and np.mean(distinct) >= 0.9 * random_draw, distinct
