"""Where a training stage's wall time goes: named buckets, and the goodput fraction (compute / wall).

Rank 0 of each attempt (each start of the worker group) times its phases with a
:class:`PhaseClock` and writes a snapshot (:class:`AttemptTiming`) when its loop starts, after every
checkpoint and at its end, so a snapshot always marks work that survives. The stage, once Ray
Train returns, turns the snapshots and its own two timestamps into buckets with
:func:`account`, a pure function returning the stage's :class:`~stages.records.GoodputRecord`: time an attempt spent after its last snapshot, until the next
attempt started, is work lost to the restart (the steps since the last checkpoint, the failure
detection and the new group's start-up).

Snapshots cross processes and nodes, so they carry wall-clock times (``time.time()``): nodes are
assumed NTP-synchronised; skew shows up in ``other`` (clamped at zero, never negative).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field

from pipeline.storage import Storage
from pipeline.tables import text_table
from stages.records import GoodputRecord
from stages.train.timing import format_duration

__all__ = ["BUCKETS", "PhaseClock", "AttemptTiming", "account", "write_snapshot", "read_snapshots",
           "GOODPUT_DIR", "goodput_table"]

# In report order. "startup": Ray Train's worker group, process group, DeepSpeed and data loader
# set-up; "shutdown": the end of training until the stage has its outputs (worker teardown).
BUCKETS = ("startup", "checkpoint_restore", "data_wait", "compute", "checkpoint_save", "evaluation",
           "lost_to_restarts", "shutdown", "other")
GOODPUT_DIR = "goodput"


class PhaseClock:
    """Seconds per bucket within one process, measured with ``perf_counter`` (cheap: no device waits)."""

    def __init__(self, started_at: float | None = None) -> None:
        self.started_at = time.time() if started_at is None else started_at  # wall clock, for other processes
        self.origin = time.perf_counter()  # the same moment on this process's clock: the first mark
        self.buckets: dict[str, float] = dict.fromkeys(BUCKETS[:-3], 0.0)  # lost/shutdown/other: the stage's
        self._loop_mark: tuple[float, float] | None = None

    def add(self, bucket: str, seconds: float) -> None:
        self.buckets[bucket] += seconds

    def charge(self, bucket: str, since: float) -> float:
        """Add the time since ``since`` (a ``perf_counter`` value) to ``bucket``; returns now, the next mark."""
        now = time.perf_counter()
        self.add(bucket, now - since)
        return now

    @contextlib.contextmanager
    def phase(self, bucket: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(bucket, time.perf_counter() - start)

    def start_loop(self) -> None:
        """From now on, loop time not spent waiting for data or saving checkpoints is compute."""
        self._loop_mark = (time.perf_counter(), self.buckets["data_wait"] + self.buckets["checkpoint_save"])

    def settle_loop(self) -> None:
        """Add the loop's compute since the last mark to its bucket (before a snapshot, at the end)."""
        assert self._loop_mark is not None, "start_loop first"
        since, other_before = self._loop_mark
        other = self.buckets["data_wait"] + self.buckets["checkpoint_save"] - other_before
        self.buckets["compute"] += max(0.0, time.perf_counter() - since - other)
        self.start_loop()

    def snapshot(self, attempt: int, step: int, final: bool = False) -> AttemptTiming:
        return AttemptTiming(attempt=attempt, started=self.started_at, recorded=time.time(), step=step,
                             final=final, buckets=dict(self.buckets))


@dataclass(frozen=True)
class AttemptTiming:
    """One attempt's buckets up to ``recorded`` (wall clock); ``final``: the attempt ended training."""

    attempt: int
    started: float
    recorded: float
    step: int
    final: bool = False
    buckets: dict[str, float] = field(default_factory=dict)


def write_snapshot(out: Storage, timing: AttemptTiming) -> None:
    out.write_text(f"{GOODPUT_DIR}/attempt-{timing.attempt:04d}.json", json.dumps(asdict(timing)))


def read_snapshots(out: Storage) -> list[AttemptTiming]:
    return [AttemptTiming(**json.loads(out.read_text(obj.path))) for obj in out.list(f"{GOODPUT_DIR}/")
            if obj.path.endswith(".json")]


def account(started: float, ended: float, snapshots: list[AttemptTiming], first_attempt: int = 0) -> GoodputRecord:
    """The stage's wall time [``started``, ``ended``] in buckets, from its attempts' snapshots.

    Attempts numbered below ``first_attempt`` belong to an earlier run of the stage (a resumed
    driver) and are ignored; of each attempt only its newest snapshot counts.
    """
    newest: dict[int, AttemptTiming] = {}
    for s in snapshots:
        if s.attempt >= first_attempt and (s.attempt not in newest or s.recorded > newest[s.attempt].recorded):
            newest[s.attempt] = s
    attempts = [newest[a] for a in sorted(newest)]
    buckets = dict.fromkeys(BUCKETS, 0.0)
    for s in attempts:
        for name, seconds in s.buckets.items():
            buckets[name] += seconds
    if attempts:
        buckets["startup"] += max(0.0, attempts[0].started - started)  # Ray Train's controller and worker group
        for before, after in zip(attempts, attempts[1:]):
            # Everything after the last snapshot of a failed attempt was redone or waited for.
            buckets["lost_to_restarts"] += max(0.0, after.started - before.recorded)
        last = attempts[-1]
        if last.final:
            buckets["shutdown"] += max(0.0, ended - last.recorded)
        else:  # the group ended without a final snapshot: its last stretch is unaccounted for
            buckets["lost_to_restarts"] += max(0.0, ended - last.recorded)
    wall = max(0.0, ended - started)
    buckets["other"] = max(0.0, wall - sum(v for k, v in buckets.items() if k != "other"))
    # Goodput: the share of the wall time spent computing training steps.
    return GoodputRecord(wall_s=wall, buckets=buckets, attempts=len(attempts),
                         fraction=buckets["compute"] / wall if wall > 0 else 0.0)


def goodput_table(stages: Mapping[str, GoodputRecord]) -> str:
    """``vitpipe status --detail``: a row per training stage, seconds and share of wall per bucket."""
    header = ("STAGE", "WALL", "GOODPUT", *(b.upper().replace("_", " ") for b in BUCKETS))
    rows = [(name, format_duration(g.wall_s), f"{g.fraction:.1%}",
             *(f"{g.buckets.get(b, 0.0):.1f}s ({g.buckets.get(b, 0.0) / g.wall_s:.0%})" if g.wall_s else "-"
               for b in BUCKETS)) for name, g in stages.items()]
    return text_table(header, rows)
