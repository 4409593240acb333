"""The split trainer in-process (no Ray): a one-rank gloo group, real DeepSpeed, real tar shards.

What NCCL would refuse (host tensors in collectives), where the host waits for the device, exact
resume with dropout, the first non-finite step, MFU and the batch geometry.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import shutil
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from pipeline.errors import VitpipeError
from pipeline.storage import LocalStorage, sha256_stream
from stages.data.loader import ShardInfo
from stages.data.tarshards import ShardTarWriter
from stages.model.handoff import HANDOFF_FILES, HandoffRef
from stages.model.vit import decode_variant
from stages.train.context import current_worker
from stages.train.geometry import BatchGeometry, accumulation_steps, valid_world_sizes
from stages.train.hardware import ACCELERATORS, model_flops_utilization
from stages.train.job import (
    CheckpointPolicy,
    DataSpec,
    DistributedSpec,
    EvalSpec,
    FinetuneTask,
    OptimizerSpec,
    OutputSpec,
    ScheduleSpec,
    TelemetrySpec,
    TrainJob,
)
from stages.train.loop import train
from stages.train.metrics import read_history
from tests.conftest import free_port, ledger_by_step, read_ledgers
from tests.device_guard import HostTensorInCollective, device_guard

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def process_group() -> Iterator[None]:
    """A one-rank gloo group in this process, with the variables Ray Train or torchrun would set."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[str, list[ShardInfo], list[ShardInfo]]:
    """Four train shards and one test shard of 16 px digits (PNG), written as an ingest would."""
    from sklearn.datasets import load_digits

    data = load_digits()
    store = LocalStorage(tmp_path_factory.mktemp("digits"))

    def shard(path: str, indices: range) -> ShardInfo:
        with store.open_write(path) as f, ShardTarWriter(f) as tar:
            for i in indices:
                im = Image.fromarray((data.images[i] * 16).clip(0, 255).astype(np.uint8)).resize((16, 16))
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="PNG")
                tar.write(f"d{i:04d}", {"png": buf.getvalue(), "cls": str(data.target[i]).encode()})
        return ShardInfo(path, len(indices))

    train_shards = [shard(f"shards/train-{s:06d}.tar", range(s * 100, s * 100 + 100)) for s in range(4)]
    return store.uri, train_shards, [shard("shards/test-000000.tar", range(1000, 1050))]


def tiny_job(digits, out: Path, **changes) -> TrainJob:
    uri, shards, _ = digits
    model = decode_variant("Ti/4", image_size=16, num_classes=10, width=32, depth=2, heads=2, mlp_dim=64,
                           dropout=0.1, drop_path=0.1)  # dropout on: its RNG must resume exactly too
    job = TrainJob(label="pretrain", seed=3, model=model, optimizer=OptimizerSpec("adamw", 3e-3, weight_decay=0.05),
                   schedule=ScheduleSpec(8, 2, "linear"), batch=BatchGeometry(16, 8),
                   data=DataSpec(uri, tuple(shards), (0.6, 1.0), False, 0),
                   distributed=DistributedSpec(2, "fp32"), checkpoints=CheckpointPolicy(4, 2),
                   output=OutputSpec(str(out / "stage"), staging=str(out / "staging")),
                   telemetry=TelemetrySpec(log_every=2, tensorboard=False, ledger=True))
    return dataclasses.replace(job, **changes)


def handoff_ref(stage: Path) -> HandoffRef:
    sha = {}
    for name in HANDOFF_FILES:
        with open(stage / name, "rb") as f:
            sha[name] = sha256_stream(f)[0]
    return HandoffRef(str(stage), sha)


# --- pure pieces -------------------------------------------------------------------------------------


def test_mfu_is_one_devices_share_of_the_throughput_over_its_peak():
    # 128 H100s at 4096 images/s in all: each computes 32 images/s x 1.5 TFLOP = 48 TFLOP/s of 989.
    assert model_flops_utilization(4096, 128, 1.5e12, ACCELERATORS["h100"].peak_flops) == pytest.approx(48 / 989)
    # One device: the whole rate. (Dividing the global rate by one peak would report 128x this.)
    assert model_flops_utilization(32, 1, 1.5e12, 989e12) == pytest.approx(48 / 989)
    with pytest.raises(ValueError):
        model_flops_utilization(1.0, 0, 1.0, 1.0)


def test_batch_geometry_is_resolved_from_the_world_size():
    geometry = BatchGeometry(4096, 16).resolve(128)
    assert (geometry.accumulation, geometry.per_rank) == (2, 32)
    assert BatchGeometry(4096, 16).resolve(64).accumulation == 4  # the same global batch on half the workers
    with pytest.raises(ValueError) as refused:
        accumulation_steps(4096, 16, 3)
    assert str(refused.value) == ("global_batch 4096 is not divisible by workers x micro_batch (3 x 16 = 48); numbers "
                                  "of workers that can split it: 1, 2, 4, 8, 16, 32, 64, 128, 256")
    assert valid_world_sizes(30, 8) == [] and valid_world_sizes(48, 4) == [1, 2, 3, 4, 6, 12]
    with pytest.raises(ValueError, match=r"can split it: 1, 2, 3, 4, 5, 6, 8, 9, 10, 12, 15, 16, \.\.\. 720$"):
        accumulation_steps(720, 1, 7)


# --- the NCCL device rule --------------------------------------------------------------------------


def test_the_guard_refuses_what_nccl_refuses(process_group):
    with device_guard(CPU) as checked:
        dist.all_reduce(torch.zeros(2, device=CPU))  # made on the device: fine
        dist.all_reduce(torch.tensor([1.0, 2.0]).to(CPU))  # moved explicitly: fine
        dist.all_reduce(torch.randn(3, device=CPU).sum(0, keepdim=True) * 2)  # computed on the device: fine
        for host in (torch.tensor([0.5]), torch.zeros(3) + 1, torch.stack([torch.tensor(1.0), torch.tensor(2.0)])):
            with pytest.raises(HostTensorInCollective, match="No backend type associated with device type cpu"):
                dist.all_reduce(host)
    assert checked == ["all_reduce"] * 3


def test_training_and_evaluation_pass_the_nccl_device_guard(process_group, digits, tmp_path):
    """Every tensor the trainer (and DeepSpeed under it) hands to a collective would be on the GPU.

    The pre-trainer worker all-reduced ``torch.tensor([loss_sum / accum])`` every step: a host tensor,
    which NCCL refuses at step 1 and this guard refuses too.
    """
    with device_guard(CPU) as checked:
        train(tiny_job(digits, tmp_path / "pre"), current_worker(CPU))
    assert set(checked) == {"all_reduce", "broadcast"}
    _, _, test_shards = digits
    finetune = tiny_job(digits, tmp_path / "ft", label="finetune", optimizer=OptimizerSpec("sgd", 0.01),
                        schedule=ScheduleSpec(4, 1, "cosine"),
                        task=FinetuneTask(handoff_ref(tmp_path / "pre/stage"), EvalSpec("test", tuple(test_shards))))
    with device_guard(CPU) as checked:
        train(finetune, current_worker(CPU))
    assert set(checked) == {"all_reduce", "broadcast"}
    evaluation = json.loads((tmp_path / "ft/stage/eval.json").read_text())
    assert (evaluation["total"], evaluation["skipped"]) == (50, 0)


# --- the host waits for the device once per logged step ------------------------------------------

_WAITS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
          torch.Tensor.__int__, torch.Tensor.cpu, torch.Tensor.numpy}
TRAINER = str(Path(__file__).resolve().parent.parent / "stages")


class _HostWaits(TorchFunctionMode):
    """Counts calls that make the host wait for a GPU, made directly by vitpipe code, by function.

    (DeepSpeed's ZeRO-1/2 step reads its own overflow flags each step; that is DeepSpeed's.)"""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _WAITS:
            caller = traceback.extract_stack(limit=2)[0]
            if caller.filename.startswith(TRAINER):
                self.calls[f"{Path(caller.filename).name}:{caller.name}"] += 1
        return func(*args, **(kwargs or {}))


def test_the_host_waits_for_the_device_only_when_metrics_are_read(process_group, digits, tmp_path):
    waits = _HostWaits()
    # 8 steps of 2 micro-batches; metrics read every 4th step (also the checkpoint steps).
    with waits:
        train(tiny_job(digits, tmp_path, telemetry=TelemetrySpec(log_every=4, tensorboard=False)),
              current_worker(CPU))
    in_the_loop = {k: n for k, n in waits.calls.items() if k.startswith(("step.py:", "loop.py:", "metrics.py:"))}
    # One read per read-out (losses and gradient norms in one copy), nothing in the step or the loop
    # body; the checkpointer and the final export read the device at checkpoints and at the end.
    assert in_the_loop == {"metrics.py:flush": 2}, dict(waits.calls)


def test_throughput_and_mfu_are_per_device_over_the_window(process_group, monkeypatch):
    from stages.train import metrics
    from stages.train.context import WorkerContext
    from stages.train.metrics import StepMonitor

    clock = iter([100.0, 104.0])  # the window opens at 100 s and is read at 104 s
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock, 104.0))
    # As rank 0 of 128 (the collective runs on this one-rank group: the sums are the local values).
    monitor = StepMonitor(WorkerContext(0, 128, CPU, "n0"), global_batch=4096, train_flops_per_image=1.5e12,
                          peak_flops=989e12)
    for step in (1, 2):
        monitor.add(step, torch.tensor(2.0 * 128), torch.tensor(0.5), 1e-3, 0)
    records = monitor.flush(data_wait_s=1.0)
    assert [(r.step, r.loss, r.grad_norm, r.images_per_s) for r in records] == [(1, 2.0, 0.5, None),
                                                                                 (2, 2.0, 0.5, 2048.0)]
    last = records[-1]
    assert (last.step_time_s, last.data_wait_fraction) == (2.0, 0.25)
    # 2 steps x 4096 images in 4 s = 2048 images/s in all, 16 per device x 1.5 TFLOP / 989 TFLOP/s.
    assert last.mfu == pytest.approx(16 * 1.5e12 / 989e12)


# --- resume ----------------------------------------------------------------------------------------


def test_resume_from_a_checkpoint_is_exact_with_dropout(process_group, digits, tmp_path):
    clean = tiny_job(digits, tmp_path / "clean")
    train(clean, current_worker(CPU))
    interrupted = tiny_job(digits, tmp_path / "resumed")
    train(interrupted, current_worker(CPU))
    # Two runs of the same job on one machine: bit-identical weights and metrics (dropout included).
    first, second = (load_file(str(tmp_path / f"{run}/stage/model.safetensors")) for run in ("clean", "resumed"))
    assert all(torch.equal(first[k], second[k]) for k in first), "two runs of the same job differ"
    curves = [[(r.step, r.loss, r.lr, r.grad_norm) for r in read_history(LocalStorage(tmp_path / f"{run}/stage"))]
              for run in ("clean", "resumed")]
    assert curves[0] == curves[1]
    # What a kill after the step-4 checkpoint leaves: no step-8 checkpoint and no handoff.
    stage = tmp_path / "resumed/stage"
    for path in (stage / "checkpoints/step-00000008").rglob("*"):
        if path.is_file():
            path.unlink()
    (stage / "model.safetensors").unlink()
    train(interrupted, current_worker(CPU))

    a, b = load_file(str(tmp_path / "clean/stage/model.safetensors")), load_file(str(stage / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run's weights differ"
    assert json.loads((tmp_path / "clean/stage/ledger/rank0.json").read_text()) == \
        json.loads((stage / "ledger/rank0.json").read_text())
    history = read_history(LocalStorage(stage))
    assert [r.step for r in history] == list(range(1, 9))
    assert [r.loss for r in history] == [r.loss for r in read_history(LocalStorage(tmp_path / "clean/stage"))]


def test_a_non_finite_loss_is_reported_at_its_first_step_between_read_outs(process_group, digits, tmp_path):
    # lr 3e37: the first update overflows the weights, so step 2's loss is nan; metrics are read at 4.
    job = tiny_job(digits, tmp_path, optimizer=OptimizerSpec("adamw", 3e37), schedule=ScheduleSpec(8, 0, "linear"),
                   telemetry=TelemetrySpec(log_every=4, tensorboard=False))
    with pytest.raises(VitpipeError, match=r"^non-finite loss \(nan\) at step 2$"):
        train(job, current_worker(CPU))
    assert not (tmp_path / "stage/checkpoints/step-00000004").exists()  # a diverged state is never saved


def test_weights_an_update_made_non_finite_are_never_checkpointed(process_group, digits, tmp_path, monkeypatch):
    import stages.train.loop as loop

    real_step, calls = loop.train_step, []

    def diverging_step(engine, next_batch, accumulation):
        loss = real_step(engine, next_batch, accumulation)
        calls.append(1)
        if len(calls) == 4:  # the update of step 4 overflows one weight; its loss was still finite
            engine.module.pos_embed.data[0, 0, 0] = float("inf")
        return loss

    monkeypatch.setattr(loop, "train_step", diverging_step)
    with pytest.raises(VitpipeError, match=r"^non-finite weights after step 4: the update diverged; not checkpointed$"):
        train(tiny_job(digits, tmp_path), current_worker(CPU))
    assert not (tmp_path / "stage/checkpoints/step-00000004/COMPLETE.json").exists()


def test_an_unreadable_sample_adds_nothing_and_every_sample_weighs_the_same():
    from stages.data.loader import UNREADABLE
    from stages.train.step import Batch, forward_backward

    class Engine(torch.nn.Module):  # the step's view of DeepSpeed: call, backward
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.linear(x)

        def backward(self, loss):
            loss.backward()

    torch.manual_seed(0)
    engine, images = Engine(), torch.randn(4, 4)
    labels = torch.tensor([0, 2, UNREADABLE, 1])
    loss = forward_backward(engine, Batch(images, labels))
    readable = torch.nn.functional.cross_entropy(engine(images[[0, 1, 3]]), labels[[0, 1, 3]], reduction="sum")
    # The three readable samples' losses, over the micro-batch's full size of four.
    assert loss.item() == pytest.approx(readable.item() / 4)
    full = torch.tensor([0, 2, 1, 1])
    assert forward_backward(engine, Batch(images, full)).item() == pytest.approx(
        torch.nn.functional.cross_entropy(engine(images), full).item())  # nothing damaged: the mean


def _step_dir(job: TrainJob, step: int) -> Path:
    return Path(job.output.uri) / f"checkpoints/step-{step:08d}"


def _resumed_from(job: TrainJob) -> list[int]:
    lines = (Path(job.output.uri) / "attempts.jsonl").read_text().splitlines()
    return [json.loads(line)["resumed_from"] for line in lines]


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(process_group, digits, tmp_path, caplog):
    clean = tiny_job(digits, tmp_path / "clean")
    train(clean, current_worker(CPU))
    job = tiny_job(digits, tmp_path / "damaged")
    train(job, current_worker(CPU))  # checkpoints at steps 4 and 8
    optim = next(_step_dir(job, 8).glob("*optim_states.pt"))
    data = bytearray(optim.read_bytes())
    data[-100] ^= 0xFF  # same size, other bytes: only the sha256 can tell
    optim.write_bytes(bytes(data))
    (Path(job.output.uri) / "model.safetensors").unlink()
    with caplog.at_level("WARNING", logger="vitpipe.train"):
        train(job, current_worker(CPU))
    assert _resumed_from(job) == [0, 4]  # step 8 skipped, step 4 used; the run then trained to 8 again
    assert f"{optim.name}: file is corrupt (size or sha256 differs from COMPLETE.json); falling back" in caplog.text
    a = load_file(str(tmp_path / "clean/stage/model.safetensors"))
    b = load_file(str(Path(job.output.uri) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed exactly from step 4


class _RunsCode:
    """Unpickling this calls open(path, "w"): what a crafted checkpoint file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_file_is_never_unpickled_beyond_tensors_and_plain_data(process_group, digits, tmp_path):
    from stages.train.checkpoint import COMPLETE

    job = tiny_job(digits, tmp_path, schedule=ScheduleSpec(4, 2, "linear"))
    train(job, current_worker(CPU))
    marker = tmp_path / "code-ran"
    states = next(_step_dir(job, 4).glob("*model_states.pt"))
    torch.save({"module": _RunsCode(marker)}, states)
    # Whoever can write the folder can write its commit record too: the hashes match.
    record = json.loads((_step_dir(job, 4) / COMPLETE).read_text())
    with open(states, "rb") as f:
        digest, size = sha256_stream(f)
    record["files"][states.name] = {"sha256": digest, "size": size}
    (_step_dir(job, 4) / COMPLETE).write_text(json.dumps(record))
    (Path(job.output.uri) / "model.safetensors").unlink()
    with pytest.raises(VitpipeError, match=r"^checkpoint step 4: a file holds objects other than tensors and plain "
                                           r"data; refusing to unpickle it"):
        train(job, current_worker(CPU))
    assert not marker.exists()


def _train_rank(rank: int, world: int, port: int, job: TrainJob, node_per_rank: bool, checked_in: Path) -> None:
    """One spawned rank of a ``world``-rank gloo group training ``job`` (``node_per_rank``: each
    rank poses as a node of its own) under the NCCL device guard; records the collectives it checked
    in ``checked_in/rankR.json``."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        with device_guard(CPU) as checked:  # installed before DeepSpeed builds its communication backend
            train(job, current_worker(CPU, node=f"node{rank}" if node_per_rank else None))
        checked_in.mkdir(exist_ok=True)
        (checked_in / f"rank{rank}.json").write_text(json.dumps(sorted(set(checked))))
    finally:
        dist.destroy_process_group()


def _checked_collectives(checked_in: Path, world: int) -> set[str]:
    """The collectives the ranks of a run checked (the same on every rank)."""
    checked = [set(json.loads((checked_in / f"rank{r}.json").read_text())) for r in range(world)]
    assert all(c == checked[0] for c in checked), checked
    return checked[0]


def _train_on(job: TrainJob, world: int, node_per_rank: bool = False) -> set[str]:
    """Train ``job`` on ``world`` spawned ranks; returns the collectives they checked."""
    import torch.multiprocessing as mp

    checked_in = Path(job.output.staging).with_name(f"checked-{uuid.uuid4().hex[:8]}")
    mp.spawn(_train_rank, args=(world, free_port(), job, node_per_rank, checked_in), nprocs=world, join=True)
    return _checked_collectives(checked_in, world)


# Every case reads one shard of 100 samples, so that the resumed run crosses an epoch boundary (6
# steps of 16 per epoch); ZeRO 1, 2 and 3 each once with two loader processes per rank (the 2 -> 1
# cases). The 1 -> 2 cases resume on S3: each rank a node of its own (ZeRO-2), or both on one node
# (ZeRO-3). ZeRO-0 keeps whole, world-size-free state: it resumes without the universal form. SGD
# (fine-tuning) state rides DeepSpeed's conversion under Adam's names: ZeRO-2 and ZeRO-3 load it
# by different code in DeepSpeed; the ZeRO-3 case trains in bf16 (fp32 master weights, bf16 copies).
@pytest.mark.parametrize("zero, first, then, loader_workers, stage_on, optimizer, precision", [
    (2, 1, 2, 0, "s3, a node per rank", "adamw", "fp32"), (3, 1, 2, 0, "s3, one node", "adamw", "fp32"),
    (1, 2, 1, 2, "disk", "adamw", "fp32"), (0, 2, 1, 0, "disk", "adamw", "fp32"), (2, 2, 1, 2, "disk", "sgd", "fp32"),
    (3, 2, 1, 2, "disk", "sgd", "bf16")])
def test_a_checkpoint_resumes_on_another_number_of_workers(digits, tmp_path, s3_endpoint, s3_bucket, zero, first, then,
                                                           loader_workers, stage_on, optimizer, precision):
    """Model, optimizer state (Adam's moments and step; SGD's momentum), LR schedule, the global
    data cursor and the random masks carry over: the run ends where an uninterrupted one at the
    first size ends, within reduction-order noise. On S3 (moto, through a proxy listing every
    object read): the conversion's download and upload, each rank reading only the universal files
    of the parameters it loads, and each node reading them once."""
    from bench.faultproxy import FaultProxy
    from pipeline.config import StorageSettings
    from pipeline.storage import S3Storage

    data = dataclasses.replace(tiny_job(digits, tmp_path).data, loader_workers=loader_workers, shards=(digits[1][0],))
    changes = {"distributed": DistributedSpec(zero, precision), "data": data}  # dropout and stochastic depth on
    if optimizer == "sgd":  # the fine-tuning recipe
        changes["optimizer"] = OptimizerSpec("sgd", 3e-2)
    clean = tiny_job(digits, tmp_path / "clean", **changes)
    checked = {first: _train_on(clean, first)}
    # What a kill after the step-4 checkpoint of the same run leaves (runs of a job on one machine are
    # bit-identical: test_resume_from_a_checkpoint_is_exact_with_dropout), without training it again.
    left = [p for p in Path(clean.output.uri).rglob("*") if p.is_file() and not p.name.startswith("ledger") and
            "step-00000008" not in p.parts and p.name != "model.safetensors"]
    resized = tmp_path / "resized"  # the resumed stage's folder (read back from S3 afterwards)
    staging = str(tmp_path / "staging")
    if stage_on.startswith("s3"):
        bucket = S3Storage(f"s3://{s3_bucket}/stage", endpoint_url=s3_endpoint)
        for path in left:
            bucket.upload_file(path, path.relative_to(clean.output.uri).as_posix())
        with FaultProxy(s3_endpoint) as proxy:
            checked[then] = _train_on(dataclasses.replace(
                clean, output=OutputSpec(bucket.uri, StorageSettings(endpoint_url=proxy.url), staging)), then,
                stage_on == "s3, a node per rank")
        for obj in bucket.list(""):
            bucket.download_file(obj.path, resized / obj.path)
    else:
        for path in left:
            (resized / path.relative_to(clean.output.uri)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, resized / path.relative_to(clean.output.uri))
        checked[then] = _train_on(dataclasses.replace(clean, output=OutputSpec(str(resized), staging=staging)), then)
    # Every run passed the NCCL device guard; the two-rank one with DeepSpeed's partitioning
    # collectives, reshard included (a 1-rank group partitions nothing).
    partitioning = {0: set(), 1: {"all_gather_into_tensor"}, 2: {"all_gather_into_tensor"},
                    3: {"all_gather_into_tensor", "reduce_scatter_tensor"}}
    assert checked[2] == {"all_reduce", "broadcast"} | partitioning[zero], checked
    attempts = [json.loads(line) for line in (resized / "attempts.jsonl").read_text().splitlines()]
    assert [(a["world_size"], a["resumed_from"]) for a in attempts] == [(first, 0), (then, 4)]
    universal = {p.relative_to(resized / "checkpoints/step-00000004/universal").as_posix()
                 for p in (resized / "checkpoints/step-00000004/universal").rglob("*") if p.is_file()}
    assert bool(universal) == (zero > 0)
    reads = collections.Counter(p.split("/checkpoints/step-00000004/universal/", 1)[1]
                                for p in (proxy.object_paths if stage_on.startswith("s3") else []) if "/universal/" in p)
    if stage_on == "s3, one node":  # one download of every file, shared by the node's ranks
        assert reads == dict.fromkeys(universal, 1)
    if stage_on == "s3, a node per rank":
        per_parameter = {rel for rel in universal if rel.startswith("zero/") and rel.count("/") == 2}
        # Every rank reads the form's other files. Of the parameters, under ZeRO 1-2 a rank holds a
        # contiguous slice of each group's flat master, so it reads the parameters in its slice: of
        # the two groups', at most one parameter straddles each of the M - 1 boundaries.
        assert {rel: reads[rel] for rel in universal - per_parameter} == {rel: then for rel in universal - per_parameter}
        assert all(1 <= reads[rel] <= then for rel in per_parameter), reads
        shared = {rel.split("/")[1] for rel in per_parameter if reads[rel] > 1}
        assert len(shared) <= 2 * (then - 1), shared
    a = load_file(str(tmp_path / "clean/stage/model.safetensors"))
    b = load_file(str(resized / "model.safetensors"))
    # Measured on this model, dropout and stochastic depth on: 0 (ZeRO 0, 3) and 1.5e-8 (ZeRO 1, 2) after
    # a reshard, with Adam and with SGD, fp32 and bf16 (the exported weights are the fp32 master). Every micro-batch slot holds the same samples and masks at both
    # sizes, and a sum of two gradients is the same in either order. Masks not seeded per slot:
    # 6.3-6.6e-3; the Adam moments zeroed after the load: 5.8e-3; ZeRO-3's shared step counter: 2.0e-4;
    # the SGD momentum left under Adam's name (so zero): 1.3e-2.
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-6, worst
    history = [json.loads(line) for line in (resized / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, 9))
    # Every global step consumed the same samples as the uninterrupted run, whichever ranks ran it.
    ledger = ledger_by_step(read_ledgers(resized))
    assert list(ledger) == list(range(1, 9)) and ledger == ledger_by_step(read_ledgers(tmp_path / "clean/stage"))
    # 8 steps of 16 from an epoch of 6 (96 of the 100 samples fill whole steps): two epochs.
    assert len({key for keys in ledger.values() for key in keys}) == 96


def test_loads_past_the_checkpoint_engine_are_weights_only_too(tmp_path):
    """DeepSpeed's universal loader and converter call torch's loader themselves, asking it to unpickle
    anything; inside ``weights_only_loads`` that request is overruled."""
    import pickle

    from stages.train.engine import weights_only_loads

    marker, crafted = tmp_path / "code-ran", tmp_path / "fp32.pt"
    torch.save({"param": _RunsCode(marker)}, crafted)
    plain = tmp_path / "ok.pt"
    torch.save({"param": torch.ones(3)}, plain)
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    deepspeeds = TorchCheckpointEngine()  # its load() asks torch for weights_only=False, as the universal loader does
    with weights_only_loads():
        with pytest.raises(pickle.UnpicklingError):
            deepspeeds.load(str(crafted))
        assert torch.equal(deepspeeds.load(str(plain))["param"], torch.ones(3))
    assert not marker.exists()
