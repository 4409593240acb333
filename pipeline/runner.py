"""Runs one stage where it is scheduled (a Ray task) and commits its manifest.

:class:`StageTask` is a plain, picklable description of one stage execution; :func:`execute_stage`
is the function an executor runs. It never raises for a stage's own failure: it returns a
:class:`StageResult` with a one-line error and writes the full traceback to
``stages/NAME/error.txt``, so the driver can show a clean status table instead of a traceback wall.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pipeline import registry
from pipeline.config import StorageSettings
from pipeline.errors import VitpipeError
from pipeline.logsetup import configure_logging
from pipeline.manifest import InputRecord, Manifest, commit_manifest, package_versions
from pipeline.stage import StageContext, StageInput
from pipeline.storage import Storage, open_storage
from pipeline.trackers import TrackerIds

__all__ = ["StageTask", "StageResult", "execute_stage", "stage_folder", "ERROR_FILE"]

log = logging.getLogger(__name__)

ERROR_FILE = "error.txt"


def stage_folder(name: str) -> str:
    """Where a stage's outputs live, relative to the run root."""
    return f"stages/{name}"


@dataclass
class StageTask:
    run_uri: str
    storage_settings: dict[str, Any]
    name: str
    type_name: str
    params: dict[str, Any]
    fingerprint: str
    seed: int
    # role -> (upstream stage, its manifest as data, the digest of its text on storage)
    inputs: dict[str, tuple[str, dict[str, Any], str]]
    plugins: list[str] = field(default_factory=list)
    attempt: int = 1
    resumed: bool = False
    show_progress: bool = False
    trackers: TrackerIds | None = None  # the run's MLflow / W&B runs (``pipeline.trackers``)


@dataclass
class StageResult:
    name: str
    ok: bool
    manifest: dict[str, Any] | None = None
    error: str | None = None
    duration_s: float = 0.0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _one_line(err: BaseException) -> str:
    # A Ray task the stage started failed: its text carries the remote traceback; say what the
    # task raised instead (Ray keeps it as ``cause``).
    while type(err).__name__.startswith("RayTaskError") and isinstance(getattr(err, "cause", None), BaseException):
        err = err.cause  # type: ignore[attr-defined]
    if isinstance(err, VitpipeError):
        text = str(err)
    else:
        text = f"{type(err).__name__}: {err}"
    return " ".join(text.split()) or type(err).__name__


def _remove_working_dirs(out: Storage, folders: tuple[str, ...]) -> None:
    """After the commit: a failure here costs storage, not the stage (logged, not raised)."""
    for folder in folders:
        try:
            removed = out.delete_prefix(f"{folder}/")
        except Exception as err:  # noqa: BLE001 - the stage is committed; what is left is only space
            log.warning("%s: could not remove the stage's working files (%s); they are safe to delete",
                        out.uri_of(folder), _one_line(err))
        else:
            if removed:
                log.debug("%s: %d working files removed after the commit", out.uri_of(folder), removed)


def execute_stage(task: StageTask) -> StageResult:
    """Run the stage described by ``task`` and commit its manifest; never raises for stage errors."""
    configure_logging()
    started_wall = _now()
    started = time.perf_counter()
    settings = StorageSettings(**task.storage_settings)
    run_storage = open_storage(task.run_uri, settings)
    out = run_storage.child(stage_folder(task.name))
    try:
        registry.load_plugins(task.plugins)
        stage_cls = registry.find_stage(task.type_name)
        if stage_cls is None:
            raise VitpipeError(f"stage type {task.type_name!r} is not registered on {socket.gethostname()}")
        params = stage_cls.Params.model_validate(task.params)
        inputs = {
            role: StageInput(
                stage=upstream,
                manifest=Manifest.model_validate(manifest),
                storage=run_storage.child(stage_folder(upstream)),
            )
            for role, (upstream, manifest, _) in task.inputs.items()
        }
        ctx = StageContext(
            name=task.name,
            type_name=task.type_name,
            params=params,
            fingerprint=task.fingerprint,
            seed=task.seed,
            out=out,
            run_storage=run_storage,
            run_storage_settings=settings,
            inputs=inputs,
            attempt=task.attempt,
            resumed=task.resumed,
            show_progress=task.show_progress,
            trackers=task.trackers,
            logger=logging.getLogger(f"vitpipe.stage.{task.name}"),
        )
        stage_cls().run(ctx)
        duration = time.perf_counter() - started
        manifest = Manifest(
            stage=task.name,
            type=task.type_name,
            fingerprint=task.fingerprint,
            params=params.model_dump(mode="json"),
            inputs={
                role: InputRecord(stage=inp.stage, fingerprint=inp.manifest.fingerprint,
                                  manifest_sha256=task.inputs[role][2])
                for role, inp in inputs.items()
            },
            outputs=ctx.outputs,
            metrics=ctx.metrics,
            result=None if ctx.result is None else ctx.result.model_dump(mode="json"),
            versions=package_versions(),
            timings={"started": started_wall, "finished": _now(), "duration_s": round(duration, 3),
                     "host": socket.gethostname(), "pid": os.getpid(), "attempt": task.attempt},
        )
        out.delete(ERROR_FILE)
        commit_manifest(out, manifest)
        _remove_working_dirs(out, stage_cls.working_dirs)
        return StageResult(task.name, ok=True, manifest=manifest.model_dump(mode="json"), duration_s=duration)
    except Exception as err:  # noqa: BLE001 - reported as the stage's failure, traceback kept on disk
        line = _one_line(err)
        try:
            out.write_text(ERROR_FILE, traceback.format_exc())
        except Exception:  # noqa: BLE001 - the storage itself may be what failed
            log.debug("could not write %s for %s", ERROR_FILE, task.name, exc_info=True)
        return StageResult(task.name, ok=False, error=line, duration_s=time.perf_counter() - started)
