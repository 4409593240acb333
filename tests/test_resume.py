"""Fault injection: SIGKILL the `vitpipe` driver mid-stage, resume, and compare with a clean run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import boto3
import pytest

from cluster.executor import RayExecutor
from pipeline.config import parse_config
from pipeline.engine import run_pipeline
from pipeline.storage import open_storage
from tests.conftest import (
    S3_SECRET,
    read_events_file,
    run_cli,
    smoke_config,
    start_cli,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.slow


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the driver, then anything it started (Ray's processes share its session)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stage_outputs(store) -> dict[str, bytes]:
    return {o.path: store.read_bytes(o.path) for o in store.list("stages") if not o.path.endswith("manifest.json")}


def _events(store) -> list[dict]:
    from pipeline.events import read_events

    return read_events(store)


def _kill_during_transform_then_resume(config_path: Path, run_uri: str, tmp_path: Path, store,
                                       endpoint: str | None) -> None:
    proc = start_cli("run", str(config_path), "--run-dir", run_uri, log=tmp_path / "killed.log")
    try:
        wait_for(lambda: any(e["event"] == "stage_started" and e["stage"] == "transform" for e in _events(store)),
                 timeout=120, what="stage 'transform' to start")
        wait_for(lambda: not store.exists("stages/transform/manifest.json"), timeout=5)
    finally:
        _kill_group(proc)
    assert store.exists("stages/generate/manifest.json")
    assert not store.exists("stages/transform/manifest.json"), "transform finished before the kill"

    where = ["--endpoint-url", endpoint] if endpoint else []
    status = run_cli("status", run_uri, *where)
    assert status.returncode == 0, status.stderr
    states = {line.split()[0]: line.split()[2] for line in status.stdout.splitlines()[2:]}
    assert states == {"generate": "done", "transform": "interrupted", "combine": "pending"}, status.stdout

    resumed = run_cli("resume", run_uri, "--no-dashboard", *where)
    assert resumed.returncode == 0, resumed.stderr[-3000:]


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_sigkill_driver_mid_stage_then_resume_matches_clean_run(tmp_path, backend, request):
    if backend == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        bucket = request.getfixturevalue("s3_bucket")
        killed_uri, clean_uri = f"s3://{bucket}/runs/killed", f"s3://{bucket}/runs/clean"
    else:
        endpoint = None
        killed_uri, clean_uri = str(tmp_path / "killed"), str(tmp_path / "clean")
    config_path = write_config(tmp_path / "dag.yaml", smoke_config(work_s=6.0, endpoint=endpoint))
    settings = __import__("pipeline.config", fromlist=["StorageSettings"]).StorageSettings(endpoint_url=endpoint)
    killed, clean = open_storage(killed_uri, settings), open_storage(clean_uri, settings)

    _kill_during_transform_then_resume(config_path, killed_uri, tmp_path, killed, endpoint)

    events = _events(killed)
    last_run = events[max(i for i, e in enumerate(events) if e["event"] == "run_started"):]
    assert [e["stage"] for e in last_run if e["event"] == "stage_skipped"] == ["generate"]
    assert [e["stage"] for e in last_run if e["event"] == "stage_finished"] == ["transform", "combine"]
    assert sum(1 for e in events if e["event"] == "stage_started" and e["stage"] == "generate") == 1

    # The reference: the same config run to the end without a kill (in this process's Ray instance,
    # which saves a Ray start; the CLI runs above and below exercise the driver), without the
    # simulated work: ``work_s`` only decides how long the transform takes, not what it writes.
    request.getfixturevalue("ray_instance")
    run_pipeline(parse_config(smoke_config(work_s=0.0, endpoint=endpoint)), clean_uri, RayExecutor())
    killed_out, clean_out = _stage_outputs(killed), _stage_outputs(clean)
    assert set(killed_out) == {"stages/generate/numbers.txt", "stages/transform/numbers.txt",
                               "stages/combine/summary.json"}
    assert killed_out == clean_out

    # Changing stage 2's config re-runs stages 2 and 3 only (the engine's rule: in this process).
    run_pipeline(parse_config(smoke_config(work_s=0.0, factor=4, endpoint=endpoint)), killed_uri, RayExecutor())
    events = _events(killed)
    last_run = events[max(i for i, e in enumerate(events) if e["event"] == "run_started"):]
    assert [e["stage"] for e in last_run if e["event"] == "stage_finished"] == ["transform", "combine"]
    assert [e["stage"] for e in last_run if e["event"] == "stage_skipped"] == ["generate"]
    # The outputs it replaced are kept aside (server-side copies on S3), not deleted.
    assert killed.read_bytes("stages/transform.previous/numbers.txt") == clean_out["stages/transform/numbers.txt"]
    assert json.loads(killed.read_text("stages/transform.previous/SET_ASIDE.json"))["reason"] == \
        "config changed (factor, work_s)"

    if backend == "s3":
        # Credentials never land in the run's records.
        for obj in killed.list():
            assert S3_SECRET.encode() not in killed.read_bytes(obj.path), obj.path
        boto3.client("s3", endpoint_url=endpoint)  # the bucket stays readable by plain boto3


def test_second_driver_on_the_same_run_is_refused(tmp_path, request):
    config_path = write_config(tmp_path / "dag.yaml", smoke_config(work_s=8.0))
    run_dir = tmp_path / "run"
    first = start_cli("run", str(config_path), "--run-dir", str(run_dir), log=tmp_path / "first.log")
    try:
        wait_for(lambda: any(e["event"] == "stage_started" for e in read_events_file(run_dir / "events.jsonl")),
                 timeout=120, what="the first driver to start a stage")
        second = run_cli("run", str(config_path), "--run-dir", str(run_dir), "--no-dashboard")
        assert second.returncode == 3
        lines = second.stderr.strip().splitlines()
        assert lines[-1].startswith("vitpipe: error: ") and f"in use by pid {first.pid}" in lines[-1], second.stderr
    finally:
        _kill_group(first)
    # The dead driver's lock does not outlive it: a new driver (in this process) takes over and finishes.
    request.getfixturevalue("ray_instance")
    assert run_pipeline(parse_config(smoke_config(work_s=0.0)), str(run_dir), RayExecutor()).ok


def test_sigkill_during_ingest_then_resume_writes_only_missing_shards(tmp_path):
    config = {"name": "ing", "ray": {"include_dashboard": False, "num_cpus": 2},
              "stages": {"ingest": {"type": "ingest", "params": {
                  "source": "digits", "image_size": 160, "shard_samples": 25, "workers": 1}}}}
    path = write_config(tmp_path / "ingest.yaml", config)
    run_dir = tmp_path / "run"
    shards_dir = run_dir / "stages/ingest/shards"
    proc = start_cli("run", str(path), "--run-dir", str(run_dir), log=tmp_path / "killed.log")
    try:
        wait_for(lambda: len(list(shards_dir.glob("*.json"))) >= 4 if shards_dir.exists() else False,
                 timeout=180, what="a few committed shards")
    finally:
        _kill_group(proc)
    assert not (run_dir / "stages/ingest/manifest.json").exists(), "ingest finished before the kill"
    committed = {p.name: p.stat().st_mtime_ns for p in shards_dir.glob("*.tar")
                 if (shards_dir / p.name.replace(".tar", ".json")).exists()}
    assert committed

    resumed = run_cli("resume", str(run_dir), "--no-dashboard")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "already written" in resumed.stderr
    after = {name: (shards_dir / name).stat().st_mtime_ns for name in committed}
    assert after == committed, "a shard committed before the kill was rewritten"

    import json as _json

    from stages.data.tarshards import iter_tar_samples

    manifest = _json.loads((run_dir / "stages/ingest/manifest.json").read_text())
    keys = []
    for split in manifest["result"]["splits"].values():
        for shard in split["shards"]:
            with open(run_dir / "stages/ingest" / shard["path"], "rb") as f:
                keys.extend(k for k, _ in iter_tar_samples(f))
    assert len(keys) == len(set(keys)) == 1797
    assert set(keys) == {f"digits-{i:04d}" for i in range(1797)}
    # A half-written shard the kill may have left is never part of the committed outputs.
    assert not [o for o in manifest["outputs"] if ".tmp-" in o["path"]]
    assert len([o for o in manifest["outputs"] if o["path"].endswith(".tar")]) == sum(
        len(s["shards"]) for s in manifest["result"]["splits"].values())
