"""Experiment trackers (MLflow, Weights & Biases): one tracker run per vitpipe run, written from any process.

The driver calls :func:`start_tracking` at the start of each ``vitpipe run``/``resume``. The
:class:`TrackerIds` it returns is stored in the run folder (:meth:`TrackerIds.to_json`) and handed,
pickled, to Ray workers; any process then opens a :class:`TrackerWriter` from it to log params,
per-step metrics of a stage, final metrics and artifacts. The driver ends with :func:`finish_tracking`.
A resumed vitpipe run continues the same tracker runs, unless the tracking settings changed.

Why it looks like this:

- mlflow and wandb are imported lazily: most runs configure neither, and each takes seconds to import;
- stages restart their step count at 1, so W&B gets one step metric per stage (``pretrain/step``)
  instead of its global ``step=``, which drops any step lower than one already logged;
- MLflow params are write-once: a resumed run logs only the params it does not have yet;
- a tracking URI may carry a password (``http://user:pw@host``): it is masked in every log line,
  error and stored record (:mod:`pipeline.redaction`); W&B credentials come only from the
  environment or netrc and never pass through here.
"""

from __future__ import annotations

import importlib
import logging
import secrets
import shutil
import string
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Literal

from pydantic import Field

from pipeline.errors import VitpipeError
from pipeline.redaction import redact
from pipeline.strict import StrictModel

__all__ = [
    "MlflowSettings",
    "WandbSettings",
    "TrackingSettings",
    "TrackerIds",
    "TrackerWriter",
    "start_tracking",
    "finish_tracking",
]

log = logging.getLogger(__name__)

_SQLITE = "sqlite:///"
_MASK = "<redacted>"
_open_wandb_runs = 0  # W&B runs of open writers in this process


class MlflowSettings(StrictModel):
    """An MLflow tracking store and the experiment that holds vitpipe's runs."""

    # Any URI MLflow accepts (sqlite:///..., http://server:5000). sqlite, because MLflow 3.17's file
    # store (file:, ./mlruns) refuses to write unless MLFLOW_ALLOW_FILE_STORE=true. A relative sqlite
    # path is made absolute against the driver's directory, where workers find the same file.
    tracking_uri: str = Field(default="sqlite:///mlruns/mlflow.db", min_length=1)
    experiment: str = Field(default="vitpipe", min_length=1)


class WandbSettings(StrictModel):
    """A Weights & Biases project. No key field: credentials come from the environment or netrc only."""

    project: str = Field(default="vitpipe", min_length=1)
    entity: str | None = None
    mode: Literal["online", "offline"] = "online"
    dir: str | None = None  # W&B's local files; default WANDB_DIR or the current directory


class TrackingSettings(StrictModel):
    """The ``tracking:`` section of a run config; each tracker is off unless configured."""

    mlflow: MlflowSettings | None = None
    wandb: WandbSettings | None = None

    @property
    def enabled(self) -> bool:
        return self.mlflow is not None or self.wandb is not None


@dataclass(frozen=True)
class TrackerIds:
    """Which tracker runs a vitpipe run writes to; small and picklable, it travels to Ray workers."""

    settings: TrackingSettings
    run_name: str
    mlflow_run_id: str | None = None
    wandb_run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict for the run folder, with credentials in the tracking URI masked.

        Read back with :meth:`from_json`, it serves as ``previous`` for :func:`start_tracking`, which
        reconnects with the current config; a writer refuses its masked URI.
        """
        return {"settings": _masked(self.settings).model_dump(mode="json"), "run_name": self.run_name,
                "mlflow_run_id": self.mlflow_run_id, "wandb_run_id": self.wandb_run_id}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrackerIds:
        return cls(settings=TrackingSettings.model_validate(data["settings"]), run_name=data["run_name"],
                   mlflow_run_id=data.get("mlflow_run_id"), wandb_run_id=data.get("wandb_run_id"))


def start_tracking(settings: TrackingSettings, run_name: str,
                   previous: TrackerIds | None = None) -> TrackerIds | None:
    """The tracker runs for this attempt of a vitpipe run (driver only), or None if none is configured.

    ``previous`` (from an earlier attempt of the same vitpipe run) is continued per tracker whose
    settings did not change: the MLflow run is set back to RUNNING, the W&B run id is reused.
    """
    if not settings.enabled:
        return None
    settings = _absolute_paths(settings)
    mlflow_run_id = wandb_run_id = None
    if settings.mlflow is not None:
        previous_id = _previous_id(previous, settings, "mlflow")
        mlflow_run_id = _start_mlflow_run(settings.mlflow, run_name, previous_id)
    if settings.wandb is not None:
        _require("wandb")  # fail in the driver now, not in a worker hours later
        if settings.wandb.mode == "online":
            _check_wandb_credentials()
        wandb_run_id = _previous_id(previous, settings, "wandb") or _new_wandb_id()
        log.info("W&B run %s in project %s (%s)", wandb_run_id, settings.wandb.project, settings.wandb.mode)
    return TrackerIds(settings, run_name, mlflow_run_id, wandb_run_id)


def finish_tracking(ids: TrackerIds | None, ok: bool) -> None:
    """Mark the MLflow run FINISHED or FAILED at the end of an attempt (driver only).

    W&B needs nothing: every writer finished the run when it closed, failed if it closed on an error.
    """
    if ids is None or ids.settings.mlflow is None or ids.mlflow_run_id is None:
        return
    uri = ids.settings.mlflow.tracking_uri
    client = _mlflow_client(uri, create=False)
    with _mlflow_errors(uri):
        client.set_terminated(ids.mlflow_run_id, "FINISHED" if ok else "FAILED")


class TrackerWriter:
    """Logs to the tracker runs of a :class:`TrackerIds`, from the driver or any Ray worker.

    Open one per stage attempt, not per step: W&B's ``init`` takes ~0.2-1 s (offline). A W&B run
    should have one open writer at a time; each offline writer leaves its own
    ``offline-run-*-<id>`` folder, all synced into one run with ``wandb sync --id <id> <folders>``.
    """

    def __init__(self, ids: TrackerIds) -> None:
        self.ids = ids
        self._mlflow: Any = None
        self._wandb_run: Any = None
        self._namespaces: set[str] = set()  # W&B step metrics defined by this writer
        mlflow_settings, wandb_settings = ids.settings.mlflow, ids.settings.wandb
        if mlflow_settings is not None and ids.mlflow_run_id is not None:
            self._mlflow = _mlflow_client(mlflow_settings.tracking_uri, create=False)
        if wandb_settings is not None and ids.wandb_run_id is not None:
            global _open_wandb_runs
            self._wandb_run = _wandb_init(wandb_settings, ids.wandb_run_id, ids.run_name)
            _open_wandb_runs += 1

    def __enter__(self) -> TrackerWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(ok=exc_type is None)

    def close(self, ok: bool = True) -> None:
        """Finish this writer's W&B run and wait until its data is written (offline) or uploaded (online).

        The MLflow run stays RUNNING: the vitpipe run goes on; :func:`finish_tracking` ends it.
        """
        run, self._wandb_run = self._wandb_run, None
        if run is None:
            return
        global _open_wandb_runs
        _open_wandb_runs -= 1
        run.finish(exit_code=0 if ok else 1)
        if _open_wandb_runs == 0:
            # finish() returns before W&B's service process has flushed the run's files (measured with
            # wandb 0.31), and its atexit flush does not run when Ray ends a worker; teardown waits for
            # it. The next writer in this process starts a new service (~0.5 s).
            _require("wandb").teardown()

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (nested) params as flat ``a.b.c`` keys; string values are credential-masked."""
        flat = _flatten(params)
        if self._mlflow is not None:
            from mlflow.entities import Param
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

            with self._mlflow_guard():
                logged = self._mlflow.get_run(self.ids.mlflow_run_id).data.params
                text = {key: str(value)[:MAX_PARAM_VAL_LENGTH] for key, value in flat.items()}
                changed = sorted(key for key, value in text.items() if key in logged and logged[key] != value)
                if changed:  # write-once in MLflow: a resumed run keeps the first values
                    log.warning("MLflow keeps the first value of changed params: %s", ", ".join(changed))
                new = [Param(key, value) for key, value in text.items() if key not in logged]
                if new:
                    self._mlflow.log_batch(self.ids.mlflow_run_id, params=new)
        if self._wandb_run is not None:
            self._wandb_run.config.update(flat, allow_val_change=True)

    def log_metrics(self, namespace: str, step: int, values: Mapping[str, float | None]) -> None:
        """Log one step of a stage's metrics as ``<namespace>/<key>``; None values are skipped."""
        self.log_metric_rows(namespace, [(step, values)])

    def log_metric_rows(self, namespace: str, rows: Iterable[tuple[int, Mapping[str, float | None]]]) -> None:
        """Log a window of steps of one stage: one MLflow batch, one W&B row per step."""
        keyed = [(step, {f"{namespace}/{key}": float(value) for key, value in values.items()
                         if value is not None}) for step, values in rows]
        keyed = [(step, values) for step, values in keyed if values]  # a step with nothing to log
        if not keyed:
            return
        self._log_mlflow_metrics(keyed)
        if self._wandb_run is not None:
            step_key = f"{namespace}/step"
            if namespace not in self._namespaces:
                self._wandb_run.define_metric(f"{namespace}/*", step_metric=step_key)
                self._namespaces.add(namespace)
            for step, values in keyed:
                self._wandb_run.log({step_key: step, **values})  # no step=: stages restart at 1

    def log_summary(self, values: Mapping[str, float]) -> None:
        """Log final metrics: MLflow metrics at step 0 (the latest call wins), the W&B run summary."""
        final = {key: float(value) for key, value in values.items()}
        self._log_mlflow_metrics([(0, final)])
        if self._wandb_run is not None:
            self._wandb_run.summary.update(final)

    def log_artifact(self, path: str | Path) -> None:
        """Attach a file (e.g. the report) to the runs, as it is now.

        W&B gets a copy in the run's files folder (``run.save``, policy "now"): it works offline and
        travels with the run folder to ``wandb sync``, while an offline Artifact is staged in W&B's
        cache outside the run folder and a symlink would follow later edits of the file.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no file to log as an artifact: {path}")
        if self._mlflow is not None:
            with self._mlflow_guard():
                self._mlflow.log_artifact(self.ids.mlflow_run_id, str(path))
        if self._wandb_run is not None:
            files = Path(self._wandb_run.dir)
            shutil.copy2(path, files / path.name)
            self._wandb_run.save(str(files / path.name), base_path=str(files), policy="now", glob=False)

    def _log_mlflow_metrics(self, rows: list[tuple[int, dict[str, float]]]) -> None:
        if self._mlflow is None:
            return
        from mlflow.entities import Metric

        now = _now_ms()
        with self._mlflow_guard():  # log_batch splits into MLflow's 1000-metric requests itself
            self._mlflow.log_batch(self.ids.mlflow_run_id, metrics=[
                Metric(key, value, now, step) for step, values in rows for key, value in values.items()])

    def _mlflow_guard(self) -> Any:
        assert self.ids.settings.mlflow is not None
        return _mlflow_errors(self.ids.settings.mlflow.tracking_uri)


def _require(name: Literal["mlflow", "wandb"]) -> ModuleType:
    """The tracker's package, or one line saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise VitpipeError(f"tracking.{name} is configured but {name} is not installed: "
                           f"pip install 'vitpipe[{name}]'") from None


@contextmanager
def _mlflow_errors(uri: str) -> Iterator[None]:
    """MLflow failures as one masked line: MLflow's messages quote the request URL, password included."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        raise VitpipeError(f"MLflow tracking at {redact(uri)} failed: {redact(e.message)}") from None


def _mlflow_client(uri: str, *, create: bool) -> Any:
    """A client of the store at ``uri``; ``create`` makes a missing local sqlite database."""
    mlflow = _require("mlflow")
    # MLflow logs every schema migration of a new database at INFO through its own console handler.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if _MASK in uri:
        raise VitpipeError(f"the MLflow tracking URI {uri} has masked credentials: open writers from the "
                           f"TrackerIds that start_tracking returned, not one read back from JSON")
    db = _sqlite_path(uri)
    if db is not None:
        if create:
            db.parent.mkdir(parents=True, exist_ok=True)
        elif not db.is_file():  # MLflow would quietly create an empty database here
            raise VitpipeError(f"MLflow database {db} is not on this machine: a sqlite store serves only the "
                               f"driver's machine; use an MLflow server (http://...) for multi-node runs")
    with _mlflow_errors(uri):
        return mlflow.MlflowClient(tracking_uri=uri)


def _start_mlflow_run(settings: MlflowSettings, run_name: str, previous_id: str | None) -> str:
    """Continue ``previous_id`` if it is still there, else create a run (and the experiment)."""
    uri = settings.tracking_uri
    client = _mlflow_client(uri, create=True)
    with _mlflow_errors(uri):
        if previous_id is not None:
            if _mlflow_run_active(client, previous_id):
                client.update_run(previous_id, status="RUNNING")
                log.info("MLflow run %s continues at %s", previous_id, redact(uri))
                return previous_id
            log.warning("MLflow run %s is gone from %s: starting a new run", previous_id, redact(uri))
        experiment = client.get_experiment_by_name(settings.experiment)
        if experiment is None:
            db = _sqlite_path(uri)  # else the default is ./mlruns under whatever directory is current
            artifacts = None if db is None else (db.parent / "artifacts").as_uri()
            experiment_id = client.create_experiment(settings.experiment, artifact_location=artifacts)
        elif experiment.lifecycle_stage == "deleted":
            raise VitpipeError(f"MLflow experiment {settings.experiment!r} at {redact(uri)} is deleted: "
                               f"restore it or set tracking.mlflow.experiment to another name")
        else:
            experiment_id = experiment.experiment_id
        run_id: str = client.create_run(experiment_id, run_name=run_name).info.run_id
    log.info("MLflow run %s in experiment %r at %s", run_id, settings.experiment, redact(uri))
    return run_id


def _mlflow_run_active(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def _wandb_init(settings: WandbSettings, run_id: str, run_name: str) -> Any:
    wandb = _require("wandb")
    if settings.dir is not None:
        Path(settings.dir).mkdir(parents=True, exist_ok=True)
    if settings.mode == "offline":
        # W&B's own usage analytics follow the process-wide mode, not the run's: without this an
        # offline run still posts them to the W&B server (seen with wandb 0.31).
        wandb.setup(settings=wandb.Settings(mode="offline"))
    quiet = wandb.Settings(
        silent=True, console="off",  # no banners; stdout/stderr and the pipeline's logs are left alone
        # Several processes open the same run: system metrics, host metadata, git and code capture from
        # each would be noise, and each starts work that delays init.
        x_disable_stats=True, x_disable_meta=True, disable_git=True, save_code=False,
        disable_job_creation=True,
    )
    return wandb.init(project=settings.project, entity=settings.entity, mode=settings.mode, dir=settings.dir,
                      id=run_id, name=run_name, resume="allow", reinit="create_new", settings=quiet)


def _check_wandb_credentials() -> None:
    """Online W&B with no credentials prompts on a terminal (and fails on a worker): fail now, in one line."""
    try:  # wandb 0.31 has no public "are credentials configured?" check that neither prints nor prompts
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth
    except ImportError:
        return
    host = wandb_setup.singleton().settings.base_url  # env and settings files; starts no service
    if wbauth.authenticate_session(host=host, source="vitpipe", prompt=False, update_session=False) is None:
        raise VitpipeError("tracking.wandb.mode is online but no W&B credentials are configured: set "
                           "WANDB_API_KEY or run `wandb login` (or set tracking.wandb.mode: offline)")


def _new_wandb_id() -> str:
    # W&B's own id shape (8 base-36 characters); wandb.util.generate_id is gone in wandb 0.31.
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _previous_id(previous: TrackerIds | None, settings: TrackingSettings,
                 tracker: Literal["mlflow", "wandb"]) -> str | None:
    """The previous attempt's run id of ``tracker``, if its settings are unchanged (credentials aside)."""
    if previous is None:
        return None
    run_id = previous.mlflow_run_id if tracker == "mlflow" else previous.wandb_run_id
    old, new = getattr(_masked(previous.settings), tracker), getattr(_masked(settings), tracker)
    if run_id is not None and old != new:
        log.info("tracking.%s changed since the last attempt: starting a new %s run", tracker, tracker)
        return None
    return run_id


def _absolute_paths(settings: TrackingSettings) -> TrackingSettings:
    """Relative local paths made absolute against the driver's directory: Ray workers run elsewhere."""
    update: dict[str, Any] = {}
    if settings.mlflow is not None:
        db = _sqlite_path(settings.mlflow.tracking_uri)
        if db is not None and not db.is_absolute():
            query = settings.mlflow.tracking_uri.partition("?")[1:]
            uri = _SQLITE + str(db.resolve()) + "".join(query)
            update["mlflow"] = settings.mlflow.model_copy(update={"tracking_uri": uri})
    if settings.wandb is not None and settings.wandb.dir is not None:
        update["wandb"] = settings.wandb.model_copy(update={"dir": str(Path(settings.wandb.dir).absolute())})
    return settings.model_copy(update=update)


def _masked(settings: TrackingSettings) -> TrackingSettings:
    if settings.mlflow is None:
        return settings
    uri = redact(settings.mlflow.tracking_uri)
    return settings.model_copy(update={"mlflow": settings.mlflow.model_copy(update={"tracking_uri": uri})})


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite URI (relative: ``sqlite:///a.db``, absolute: ``sqlite:////a.db``)."""
    if not uri.startswith(_SQLITE):
        return None
    path = uri[len(_SQLITE):].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; strings are masked: trackers are read by many people."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = redact(value) if isinstance(value, str) else value
    return flat


def _now_ms() -> int:
    return int(time.time() * 1000)
