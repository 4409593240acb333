"""Per-stage run state, as the driver last recorded it (``state.json`` under the run root).

Completion is decided by manifests, not by this file; the state adds what a manifest cannot say:
which stage is running or failed, with which error, and the fingerprint an unfinished stage was
started with (so a resume can tell an interrupted attempt from a changed config).
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from pipeline.redaction import redact
from pipeline.storage import Storage

__all__ = ["STATE_FILE", "StageStatus", "StageState", "RunState", "load_state", "save_state"]

STATE_FILE = "state.json"

StageStatus = Literal["pending", "running", "done", "skipped", "failed", "interrupted", "blocked"]


class StageState(BaseModel):
    status: StageStatus = "pending"
    fingerprint: str | None = None
    started: str | None = None
    finished: str | None = None
    duration_s: float | None = None
    error: str | None = None
    attempts: int = 0
    # Set while the stage's previous outputs are being moved aside (see the engine's _set_aside):
    # a driver that dies in the middle leaves it for the next one to finish the move.
    setting_aside: str | None = None


class RunState(BaseModel):
    run: str
    stages: dict[str, StageState] = Field(default_factory=dict)

    def stage(self, name: str) -> StageState:
        return self.stages.setdefault(name, StageState())


def load_state(storage: Storage, run_name: str) -> RunState:
    if not storage.exists(STATE_FILE):
        return RunState(run=run_name)
    try:
        return RunState.model_validate(json.loads(storage.read_text(STATE_FILE)))
    except (ValidationError, ValueError):
        return RunState(run=run_name)


def save_state(storage: Storage, state: RunState) -> None:
    # Errors quote URIs and messages from libraries: mask any credential they carry.
    storage.write_text(STATE_FILE, redact(json.dumps(state.model_dump(mode="json"), indent=2, sort_keys=True)) + "\n")
