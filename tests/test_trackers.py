"""Experiment trackers against real local stores: an MLflow sqlite database and W&B offline run files.

Nothing reaches the network: W&B runs offline with its config, cache and data folders under a temporary
folder, MLflow's usage telemetry is off, and the one HTTP tracking URI points at a closed local port.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pipeline.errors import VitpipeError
from pipeline.trackers import (
    MlflowSettings,
    TrackerIds,
    TrackerWriter,
    TrackingSettings,
    WandbSettings,
    finish_tracking,
    start_tracking,
)
from tests.conftest import REPO, free_port

SECRET = "s3cret-tracking-pw-42"


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """W&B offline and out of the user's home, MLflow's usage telemetry off; module-wide
    because both read their environment once per process."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_DIR"):
            mp.delenv(name, raising=False)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("NETRC", str(home / "netrc"))
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(name, str(home / name.lower()))
        yield


@pytest.fixture(autouse=True)
def no_remote_hosts(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A name lookup beyond this machine is a leak (usage analytics, version checks): refused, then failed."""
    remote: list[str] = []
    lookup = socket.getaddrinfo

    def local_only(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in (None, "localhost", "127.0.0.1"):
            remote.append(str(host))
            raise socket.gaierror(f"no network in tests: {host}")
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    yield
    assert remote == []


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store for the module (creating one takes seconds); each test has its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture
def mlflow_settings(mlflow_uri: str, request: pytest.FixtureRequest) -> TrackingSettings:
    return TrackingSettings(mlflow=MlflowSettings(tracking_uri=mlflow_uri, experiment=request.node.name))


def history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# Lines Ray's log monitor streams from its own daemons, e.g. "(raylet) ... is over 95% full": the
# session-wide Ray of conftest writes them into this process's stderr at any moment of any test.
RAY_DAEMON_LINE = re.compile(r"^(\x1b\[\d+m)?\((raylet|gcs_server|autoscaler)[^)]*\)")


def own_console_output(capfd: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """What this test's own code printed: the captured (out, err) without Ray's daemon lines."""
    def without_daemon_lines(text: str) -> str:
        return "".join(line for line in text.splitlines(keepends=True) if not RAY_DAEMON_LINE.match(line))

    captured = capfd.readouterr()
    return without_daemon_lines(captured.out), without_daemon_lines(captured.err)


def test_settings_are_strict_and_off_by_default() -> None:
    assert not TrackingSettings().enabled
    assert start_tracking(TrackingSettings(), "r") is None
    assert TrackingSettings(wandb=WandbSettings()).enabled
    with pytest.raises(ValidationError):  # no place for a W&B key in a config
        TrackingSettings.model_validate({"wandb": {"api_key": "x"}})


def test_trackers_are_imported_only_when_configured() -> None:
    code = "import sys, pipeline.trackers; print(sorted({'mlflow', 'wandb'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_mlflow_params_and_steps_read_back_exactly(mlflow_settings: TrackingSettings,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    from mlflow import MlflowClient

    ids = start_tracking(mlflow_settings, "run-a")
    assert ids is not None and ids.mlflow_run_id is not None
    ids = pickle.loads(pickle.dumps(ids))  # as a Ray worker receives it
    with TrackerWriter(ids) as writer:
        writer.log_params({"model": {"variant": "Ti/16", "depth": 12}, "lr": 0.001,
                           "storage": {"endpoint": f"http://user:{SECRET}@s3.local"}})
        writer.log_metric_rows("pretrain", [(1, {"loss": 2.5, "lr": 0.1}), (2, {"loss": 2.25, "lr": None})])
        writer.log_metrics("finetune", 1, {"loss": 0.75})

    client = MlflowClient(mlflow_settings.mlflow.tracking_uri)
    run = client.get_run(ids.mlflow_run_id)
    assert run.info.run_name == "run-a" and run.info.status == "RUNNING"
    assert run.data.params == {"model.variant": "Ti/16", "model.depth": "12", "lr": "0.001",
                               "storage.endpoint": "http://user:<redacted>@s3.local"}
    assert history(client, ids.mlflow_run_id, "pretrain/loss") == [(1, 2.5), (2, 2.25)]
    assert history(client, ids.mlflow_run_id, "pretrain/lr") == [(1, 0.1)]
    assert history(client, ids.mlflow_run_id, "finetune/loss") == [(1, 0.75)]
    assert own_console_output(capfd) == ("", "")  # no migration lines or banners on the console


def test_mlflow_resumed_run_appends_to_the_same_run(mlflow_settings: TrackingSettings,
                                                    tmp_path: Path) -> None:
    from mlflow import MlflowClient

    ids = start_tracking(mlflow_settings, "run-a")
    assert ids is not None
    with TrackerWriter(ids) as writer:
        writer.log_params({"model": {"depth": 12}})
        writer.log_metric_rows("pretrain", [(1, {"loss": 2.5}), (2, {"loss": 2.25})])
    finish_tracking(ids, ok=False)

    # A resumed vitpipe run: the ids come back from the run folder's JSON.
    stored = TrackerIds.from_json(json.loads(json.dumps(ids.to_json())))
    resumed = start_tracking(mlflow_settings, "run-a", previous=stored)
    assert resumed is not None and resumed.mlflow_run_id == ids.mlflow_run_id
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    with TrackerWriter(resumed) as writer:
        writer.log_params({"model": {"depth": 24}, "seed": 0})  # write-once: depth keeps 12
        writer.log_metric_rows("pretrain", [(3, {"loss": 2.0}), (4, {"loss": 1.75})])
        writer.log_summary({"eval/top1": 0.5})
        writer.log_artifact(report)
    finish_tracking(resumed, ok=True)

    client = MlflowClient(mlflow_settings.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(mlflow_settings.mlflow.experiment)
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [ids.mlflow_run_id]
    run = client.get_run(ids.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"model.depth": "12", "seed": "0"}
    assert history(client, ids.mlflow_run_id, "pretrain/loss") == [(1, 2.5), (2, 2.25), (3, 2.0), (4, 1.75)]
    assert run.data.metrics["eval/top1"] == 0.5
    assert [a.path for a in client.list_artifacts(ids.mlflow_run_id)] == ["report.md"]
    # Artifacts sit next to the database, not in ./mlruns under the current directory.
    database = Path(mlflow_settings.mlflow.tracking_uri.removeprefix("sqlite:///"))
    assert experiment.artifact_location == (database.parent / "artifacts").as_uri()


def test_changed_settings_start_new_runs(mlflow_settings: TrackingSettings) -> None:
    ids = start_tracking(mlflow_settings, "run-a")
    assert ids is not None
    moved = TrackingSettings(mlflow=mlflow_settings.mlflow.model_copy(update={"experiment": "elsewhere"}))
    again = start_tracking(moved, "run-a", previous=ids)
    assert again is not None and again.mlflow_run_id not in (None, ids.mlflow_run_id)


def test_relative_sqlite_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ids = start_tracking(TrackingSettings(mlflow=MlflowSettings()), "run-a")
    assert ids is not None
    assert ids.settings.mlflow.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    monkeypatch.chdir(REPO)  # a worker elsewhere writes to the same database
    with TrackerWriter(ids) as writer:
        writer.log_metrics("pretrain", 1, {"loss": 1.0})


def wandb_records(run_dir: Path) -> list[Any]:
    """The records of an offline run's ``.wandb`` file: W&B's leveldb-style log of protobuf records
    (wandb 0.31 has no Python reader any more). Header ``:W&B``, 0xBEE1, version; 32 KiB blocks of
    chunks with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0)
    records, pos, chunks = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def wandb_items(records: list[Any], kind: str) -> list[dict[str, Any]]:
    """Each history row, config update or summary update as ``{key: value}``."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == kind:
            items = record.history.item if kind == "history" else getattr(record, kind).update
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in items})
    return rows


def test_wandb_offline_params_steps_and_resume(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    settings = TrackingSettings(wandb=WandbSettings(mode="offline", dir=str(tmp_path / "wb")))
    ids = start_tracking(settings, "run-a")
    assert ids is not None and ids.wandb_run_id is not None
    with TrackerWriter(pickle.loads(pickle.dumps(ids))) as writer:
        writer.log_params({"model": {"variant": "Ti/16", "depth": 12}})
        writer.log_metric_rows("pretrain", [(1, {"loss": 2.5, "lr": 0.1}), (2, {"loss": 2.25, "lr": None})])
        writer.log_metrics("finetune", 1, {"loss": 0.75})  # a later stage restarts at step 1

    resumed = start_tracking(settings, "run-a", previous=TrackerIds.from_json(ids.to_json()))
    assert resumed is not None and resumed.wandb_run_id == ids.wandb_run_id
    report = tmp_path / "report.md"
    report.write_text("# report\n")
    with TrackerWriter(resumed) as writer:
        writer.log_params({"model": {"depth": 24}})  # W&B config may change
        writer.log_metric_rows("pretrain", [(3, {"loss": 2.0})])
        writer.log_summary({"eval/top1": 0.5})
        writer.log_artifact(report)
    assert own_console_output(capfd) == ("", "")  # silent: no banners, no sync hints

    run_dirs = sorted((tmp_path / "wb" / "wandb").glob(f"offline-run-*-{ids.wandb_run_id}*"))
    assert len(run_dirs) == 2  # one per writer, same run id
    first, second = (wandb_records(d) for d in run_dirs)
    for records in (first, second):
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert (run.run_id, run.display_name, run.project) == (ids.wandb_run_id, "run-a", "vitpipe")

    def steps(records: list[Any], namespace: str) -> list[tuple[int, float]]:
        return [(row[f"{namespace}/step"], row[f"{namespace}/loss"])
                for row in wandb_items(records, "history") if f"{namespace}/step" in row]

    assert steps(first, "pretrain") == [(1, 2.5), (2, 2.25)]
    assert [row.get("pretrain/lr") for row in wandb_items(first, "history")][:2] == [0.1, None]
    assert steps(first, "finetune") == [(1, 0.75)]
    assert steps(second, "pretrain") == [(3, 2.0)]
    assert {"model.variant": "Ti/16", "model.depth": 12}.items() <= wandb_items(first, "config")[0].items()
    assert wandb_items(second, "config")[0]["model.depth"] == 24
    assert {"eval/top1": 0.5} in wandb_items(second, "summary")
    files = [f.path for r in second if r.WhichOneof("record_type") == "files" for f in r.files.files]
    assert "report.md" in files and (run_dirs[1] / "files" / "report.md").read_text() == "# report\n"


def test_online_wandb_needs_credentials_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = TrackingSettings(wandb=WandbSettings(mode="online"))
    with pytest.raises(VitpipeError, match="no W&B credentials.*WANDB_API_KEY"):  # not a prompt
        start_tracking(settings, "run-a")
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef" * 2 + "01234567")
    ids = start_tracking(settings, "run-a")  # checked offline: nothing is sent
    assert ids is not None and ids.wandb_run_id is not None


@pytest.mark.parametrize("package", ["mlflow", "wandb"])
def test_missing_package_is_one_line(package: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError
    settings = TrackingSettings.model_validate({package: {"tracking_uri": f"sqlite:///{tmp_path}/m.db"}
                                                if package == "mlflow" else {"mode": "offline"}})
    with pytest.raises(VitpipeError) as error:
        start_tracking(settings, "run-a")
    assert str(error.value) == (f"tracking.{package} is configured but {package} is not installed: "
                                f"pip install 'vitpipe[{package}]'")


def test_credentials_in_the_tracking_uri_are_masked(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    uri = f"http://vitpipe:{SECRET}@127.0.0.1:{free_port()}"  # nothing listens there
    settings = TrackingSettings(mlflow=MlflowSettings(tracking_uri=uri))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(VitpipeError) as error:
        start_tracking(settings, "run-a")
    message = str(error.value)
    assert "\n" not in message and SECRET not in message and "vitpipe:<redacted>@127.0.0.1" in message
    assert error.value.__cause__ is None and error.value.__suppress_context__  # no traceback to leak it
    for record in caplog.records:
        assert SECRET not in record.getMessage() and SECRET not in (record.exc_text or "")

    ids = TrackerIds(settings, "run-a", mlflow_run_id="0" * 32)
    stored = json.dumps(ids.to_json())
    assert SECRET not in stored
    with pytest.raises(VitpipeError, match="masked credentials") as error:  # a stored copy cannot connect
        TrackerWriter(TrackerIds.from_json(json.loads(stored)))
    assert SECRET not in str(error.value)


def test_a_failing_tracker_costs_a_warning_not_the_training(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pipeline.storage import LocalStorage
    from stages.train.metrics import MetricsSink, StepRecord, read_history

    # A worker on a machine without the driver's sqlite database: the writer cannot open.
    ids = TrackerIds(TrackingSettings(mlflow=MlflowSettings(tracking_uri=f"sqlite:///{tmp_path}/elsewhere.db")),
                     "run-a", mlflow_run_id="0123")
    out = LocalStorage(tmp_path / "stage")
    sink = MetricsSink("pretrain", 2, 1, out, None, [], False, ids)
    sink.write([StepRecord(step=1, loss=2.0, lr=0.1, grad_norm=1.0, epoch=0)])
    sink.write([StepRecord(step=2, loss=1.5, lr=0.1, grad_norm=1.0, epoch=0)])
    sink.publish()
    sink.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tracker writes stopped for this attempt" in warnings[0], warnings
    assert [r.loss for r in read_history(out)] == [2.0, 1.5]  # the stage's own history is whole
