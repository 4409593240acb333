"""Training metrics: per-step records, read from the device once per sync, and where they go.

:class:`StepMonitor` keeps each step's loss and gradient norm on the device until the loop asks
for them (at log and checkpoint steps): then one all-reduce and one copy to the host resolve the
whole window, so this code waits for the device once per logged step, not once per micro-step
(DeepSpeed's step has waits of its own: README, "The trainer").
Throughput is measured over the window (wall time after that wait, so it includes the device's
work). A non-finite loss or gradient norm stops training naming its first step.

:class:`MetricsSink` (rank 0) writes the records: ``metrics.jsonl`` in the stage folder, TensorBoard
event files, MLflow / W&B when the run configures them (``pipeline.trackers``), a log line with an
ETA at log steps, and a progress bar on a terminal.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.errors import DeterministicError
from pipeline.stage import Progress
from pipeline.storage import Storage
from pipeline.trackers import TrackerIds, TrackerWriter
from stages.train.context import WorkerContext
from stages.train.hardware import model_flops_utilization
from stages.train.timing import eta_seconds, format_duration

__all__ = ["StepRecord", "StepMonitor", "MetricsSink", "METRICS_FILE", "read_history", "history_lines"]

log = logging.getLogger("vitpipe.train")

METRICS_FILE = "metrics.jsonl"
_SCALARS = ("loss", "lr", "grad_norm", "images_per_s", "step_time_s", "data_wait_fraction", "mfu", "max_memory_gb")


@dataclass(frozen=True)
class StepRecord:
    step: int
    loss: float  # mean over ranks and micro-batches
    lr: float
    grad_norm: float | None
    epoch: int
    # Over the window of steps that ends here (set on sync steps only; None elsewhere):
    images_per_s: float | None = None  # all ranks together
    step_time_s: float | None = None
    data_wait_fraction: float | None = None  # of the window's wall time, on rank 0
    mfu: float | None = None  # per device (None without a known peak)
    max_memory_gb: float | None = None  # peak allocated on rank 0's GPU

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_history(storage: Storage) -> list[StepRecord]:
    """A training stage's ``metrics.jsonl`` (empty when it has none)."""
    if not storage.exists(METRICS_FILE):
        return []
    return [StepRecord(**json.loads(line)) for line in storage.read_text(METRICS_FILE).splitlines() if line]


def history_lines(history: list[StepRecord]) -> str:
    return "".join(json.dumps(r.to_json()) + "\n" for r in history)


class StepMonitor:
    def __init__(self, worker: WorkerContext, global_batch: int, train_flops_per_image: float,
                 peak_flops: float | None) -> None:
        self.worker = worker
        self.global_batch = global_batch
        self.flops = train_flops_per_image
        self.peak = peak_flops
        self._pending: list[tuple[int, torch.Tensor, Any, float, int]] = []
        self.restart_window()

    def restart_window(self) -> None:
        """Start timing anew (after a checkpoint save, whose time is not training throughput)."""
        self._window_start = time.perf_counter()

    def add(self, step: int, loss: torch.Tensor, grad_norm: Any, lr: float, epoch: int) -> None:
        """``grad_norm``: DeepSpeed's (a device tensor, a float or None); kept as is, read at ``flush``."""
        self._pending.append((step, loss, grad_norm, lr, epoch))

    def flush(self, data_wait_s: float) -> list[StepRecord]:
        """Resolve the pending steps (a collective: every rank calls it at the same steps)."""
        if not self._pending:
            return []
        device = self.worker.device
        steps = len(self._pending)
        losses = torch.stack([loss for _, loss, _, _, _ in self._pending]).float()
        dist.all_reduce(losses)  # on the training device: NCCL refuses host tensors
        device_norms = [g.float().reshape(()) for _, _, g, _, _ in self._pending if torch.is_tensor(g)]
        # The one host wait of the window: the losses and the norms in one copy, after everything
        # queued on the device so far has run.
        values = torch.cat([losses / self.worker.world_size, torch.stack(device_norms) if device_norms
                            else losses.new_empty(0)]).tolist()
        loss_values, norm_values = values[:steps], iter(values[steps:])
        elapsed = time.perf_counter() - self._window_start
        records = []
        for (step, _, norm, lr, epoch), loss in zip(self._pending, loss_values):
            value = next(norm_values) if torch.is_tensor(norm) else (None if norm is None else float(norm))
            records.append(StepRecord(step=step, loss=loss, lr=lr, grad_norm=value, epoch=epoch))
        images_per_s = steps * self.global_batch / elapsed if elapsed > 0 else None
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        records[-1] = StepRecord(**{
            **asdict(records[-1]), "images_per_s": images_per_s,
            "step_time_s": elapsed / steps, "data_wait_fraction": data_wait_s / elapsed if elapsed else None,
            "mfu": model_flops_utilization(images_per_s, self.worker.world_size, self.flops, self.peak)
            if self.peak and images_per_s else None,
            "max_memory_gb": memory})
        self._pending.clear()
        self.restart_window()
        _check_finite(records)
        return records


def _check_finite(records: list[StepRecord]) -> None:
    # Without fp16 loss scaling an inf/nan gradient is divergence, not a scale to back off from;
    # DeepSpeed would silently skip every such step, so stop instead (every rank sees the same values).
    for r in records:
        if not math.isfinite(r.loss):
            raise DeterministicError(f"non-finite loss ({r.loss}) at step {r.step}")
        if r.grad_norm is not None and not math.isfinite(r.grad_norm):
            raise DeterministicError(f"non-finite gradient norm ({r.grad_norm}) at step {r.step} (loss {r.loss:.4g})")


class MetricsSink:
    """Rank 0's outputs for the records: history, TensorBoard, log lines, a progress bar."""

    def __init__(self, label: str, total_steps: int, log_every: int, out: Storage, tensorboard_dir: Path | None,
                 history: list[StepRecord], show_progress: bool, trackers: TrackerIds | None = None) -> None:
        self.label = label
        self.total = total_steps
        self.log_every = log_every
        self.out = out
        self.history = history
        self.tb_dir = tensorboard_dir
        start = history[-1].step if history else 0
        self._attempt_start, self._attempt_first = time.perf_counter(), start
        self._writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops events a crashed attempt logged after its checkpoint.
            self._writer = SummaryWriter(log_dir=str(tensorboard_dir), purge_step=start + 1 if start else None)
        self._tracker = self._guard(lambda: TrackerWriter(trackers)) if trackers is not None else None
        self._progress = Progress(total_steps, label, True, log) if show_progress else None
        if self._progress is not None:
            self._progress.update(start)

    def _guard(self, call: Callable[[], Any]) -> Any:
        """A tracker call; a tracker that fails is dropped for the rest of the attempt with a warning
        (a tracking server's outage must not stop training: metrics.jsonl and TensorBoard keep all)."""
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - any tracker failure, MLflow's or W&B's
            log.warning("%s: tracker writes stopped for this attempt: %s", self.label,
                        " ".join(str(err).split())[:300])
            self._tracker = None
            return None

    def write(self, records: list[StepRecord]) -> None:
        self.history.extend(records)
        tracker = self._tracker
        if tracker is not None and records:
            self._guard(lambda: tracker.log_metric_rows(self.label, [
                (r.step, {key: getattr(r, key) for key in _SCALARS}) for r in records]))
        for r in records:
            if self._writer is not None:
                for key in _SCALARS:
                    value = getattr(r, key)
                    if value is not None:
                        self._writer.add_scalar(f"{self.label}/{key}", value, r.step)
            if self._progress is not None:
                self._progress.update(1)
            if r.step % self.log_every == 0 or r.step == self.total:
                eta = eta_seconds(r.step - self._attempt_first, self.total - self._attempt_first,
                                  time.perf_counter() - self._attempt_start)
                speed = f" {r.images_per_s:.1f} img/s," if r.images_per_s is not None else ""
                log.info("%s step %d/%d loss %.4f lr %.2e%s ETA %s", self.label, r.step, self.total, r.loss, r.lr,
                         speed, format_duration(eta))

    def publish(self) -> None:
        """Write ``metrics.jsonl`` and the TensorBoard files into the stage folder (at checkpoints, at the end)."""
        self.out.write_text(METRICS_FILE, history_lines(self.history))
        if self._writer is not None and self.tb_dir is not None:
            self._writer.flush()
            for path in sorted(self.tb_dir.rglob("*")):
                if path.is_file():
                    self.out.upload_file(path, f"tensorboard/{path.relative_to(self.tb_dir).as_posix()}")

    def close(self) -> None:
        tracker = self._tracker
        if tracker is not None:
            self._guard(tracker.close)
        if self._progress is not None:
            self._progress.close()
        if self._writer is not None:
            self._writer.close()
