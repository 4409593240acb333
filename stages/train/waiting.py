"""A bound on how long a training stage waits for its worker group to run.

Ray Train never gives up on a group it cannot start: a fixed-size group retries its start forever
(``controller_failure_limit=-1``), and an elastic one below its minimum waits without even retrying
(measured in ``../shared/notes/elastic-facts.md``). After a node dies for good, or on a cluster that
shrank, the stage would hang. :class:`WaitDeadline` is a Ray Train controller callback that ends the
run with one line once no group has been running for ``limit_s`` — counted from when the group
last ran (or the run started), so a week-long run survives any number of short restarts.

It is a Ray Train *internal* callback (``ControllerCallback``; ``RunConfig(callbacks=...)`` accepts
them, and Ray 2.60 routes an exception from one through its failure policy: not retryable, so
``fit()`` raises it). ``tests/test_pretrain.py`` covers the behaviour, so a Ray upgrade that changes
it fails there.
"""

from __future__ import annotations

import time
from typing import Any

from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.controller.state import RunningState

from pipeline.errors import VitpipeError
from stages.train.timing import format_duration

__all__ = ["WaitClock", "WaitDeadline", "WorkersUnavailableError"]


class WorkersUnavailableError(VitpipeError):
    """No worker group could run for the stage's ``wait_for_workers_s``."""


class WaitClock:
    """When did the group last run; has the wait since then passed ``limit_s``? (Pure: times are given.)"""

    def __init__(self, limit_s: float, now: float) -> None:
        self.limit_s = limit_s
        self.waiting_since = now

    def observe(self, running: bool, now: float) -> bool:
        """Record what the controller is doing at ``now``; True once the wait is over the limit."""
        if running:
            self.waiting_since = now
            return False
        return now - self.waiting_since > self.limit_s


class WaitDeadline(ControllerCallback):
    """Runs in Ray Train's controller: raises :class:`WorkersUnavailableError` when the group has
    not been running for ``limit_s`` (the controller updates its state on every loop iteration)."""

    def __init__(self, stage: str, limit_s: float, group: str) -> None:
        self.stage = stage
        self.limit_s = limit_s
        self.group = group  # e.g. "2 workers", "1 to 2 workers (elastic)"
        self._clock: WaitClock | None = None

    def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
        now = time.monotonic()
        if self._clock is None:
            self._clock = WaitClock(self.limit_s, now)
        running = isinstance(current_state, RunningState) or current_state.is_terminal()
        if self._clock.observe(running, now):
            raise WorkersUnavailableError(
                f"{self.stage}: no worker group of {self.group} could start for {format_duration(self.limit_s)}: "
                "the cluster lacks the capacity (a node lost?); resume when it is back, or with fewer workers "
                f"(wait_for_workers_s sets this limit)")
