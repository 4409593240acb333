"""The run lock: one driver per run; a dead driver's lock never blocks the next one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.errors import RunLockedError
from pipeline.lock import S3_LOCK_FILE, RunLock, acquire_run_lock, is_run_locked
from pipeline.storage import LocalStorage, S3Storage
from tests.conftest import REPO, wait_for

HOLD = """
import sys, time
sys.path.insert(0, {repo!r})
from pipeline.lock import acquire_run_lock
from pipeline.storage import open_storage
from pipeline.config import StorageSettings
lock = acquire_run_lock(open_storage({uri!r}, StorageSettings(endpoint_url={endpoint!r})))
print("held", flush=True)
time.sleep(600)
"""


def _hold_in_subprocess(uri: str, endpoint: str | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(repo=str(REPO), uri=uri, endpoint=endpoint)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture(params=["local", "s3"])
def run_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run"), None
    endpoint = request.getfixturevalue("s3_endpoint")
    return f"s3://{request.getfixturevalue('s3_bucket')}/runs/r", endpoint


def _storage(uri: str, endpoint: str | None):
    return S3Storage(uri, endpoint_url=endpoint) if uri.startswith("s3://") else LocalStorage(uri)


def test_live_holder_is_named_and_a_killed_holder_is_taken_over(run_uri):
    uri, endpoint = run_uri
    store = _storage(uri, endpoint)
    holder = _hold_in_subprocess(uri, endpoint)
    try:
        assert is_run_locked(store)
        with pytest.raises(RunLockedError, match=f"in use by pid {holder.pid} on "):
            acquire_run_lock(store)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # SIGKILL: no cleanup ran, yet the lock is free at once (flock / dead pid on this host).
    assert not is_run_locked(store)
    lock = acquire_run_lock(store)
    try:
        with pytest.raises(RunLockedError):
            RunLock(store).acquire()  # a second holder in the same process is refused too
    finally:
        lock.release()
    assert not is_run_locked(store)


def test_remote_lock_from_another_host_expires_by_heartbeat(s3_endpoint, s3_bucket):
    store = S3Storage(f"s3://{s3_bucket}/runs/r", endpoint_url=s3_endpoint)
    other = {"owner": "x", "pid": 1, "host": "some-other-node", "started": "earlier", "heartbeat": time.time()}
    store.write_text(S3_LOCK_FILE, json.dumps(other))
    with pytest.raises(RunLockedError, match="in use by pid 1 on some-other-node"):
        RunLock(store, stale_after=60).acquire()
    other["heartbeat"] = time.time() - 120
    store.write_text(S3_LOCK_FILE, json.dumps(other))
    lock = RunLock(store, stale_after=60).acquire()
    try:
        assert json.loads(store.read_text(S3_LOCK_FILE))["owner"] == lock.owner
    finally:
        lock.release()
    assert not store.exists(S3_LOCK_FILE)


def test_heartbeat_keeps_a_remote_lock_fresh(s3_endpoint, s3_bucket):
    store = S3Storage(f"s3://{s3_bucket}/runs/hb", endpoint_url=s3_endpoint)
    lock = RunLock(store, stale_after=60, heartbeat_every=0.2).acquire()
    try:
        first = json.loads(store.read_text(S3_LOCK_FILE))["heartbeat"]
        wait_for(lambda: json.loads(store.read_text(S3_LOCK_FILE))["heartbeat"] > first, timeout=10,
                 what="a heartbeat")
    finally:
        lock.release()


def test_local_lock_file_records_the_holder(tmp_path):
    store = LocalStorage(tmp_path / "run")
    with acquire_run_lock(store):
        info = json.loads((tmp_path / "run/.lock").read_text())
        assert info["pid"] == os.getpid()


class _Partitioned(S3Storage):
    """An S3 storage whose writes fail once ``cut`` is set (a driver cut off from S3)."""

    cut = False

    def write_text(self, rel: str, text: str):
        if self.cut:
            raise ConnectionError("network unreachable")
        return super().write_text(rel, text)

    def put_if_match(self, rel: str, data: bytes, tag: str) -> bool:
        if self.cut:
            raise ConnectionError("network unreachable")
        return super().put_if_match(rel, data, tag)


def test_a_lock_taken_over_or_not_renewed_is_lost_and_check_raises(s3_endpoint, s3_bucket):
    from pipeline.errors import RunLockLostError

    store = S3Storage(f"s3://{s3_bucket}/taken", endpoint_url=s3_endpoint)
    lock = RunLock(store, stale_after=60, heartbeat_every=0.1).acquire()
    try:
        lock.check()  # held: no error
        store.write_text(S3_LOCK_FILE, json.dumps({"owner": "successor", "pid": 1, "host": "elsewhere",
                                                   "heartbeat": time.time()}))
        wait_for(lambda: lock._lost is not None, timeout=10)
        with pytest.raises(RunLockLostError, match="run lock was taken over by pid 1 on elsewhere"):
            lock.check()
    finally:
        lock.release()
    assert json.loads(store.read_text(S3_LOCK_FILE))["owner"] == "successor"  # the successor's lock stays

    cut = _Partitioned(f"s3://{s3_bucket}/cut", endpoint_url=s3_endpoint)
    lock = RunLock(cut, stale_after=1.0, heartbeat_every=0.2).acquire()
    try:
        cut.cut = True
        started = time.monotonic()
        wait_for(lambda: lock._lost is not None, timeout=10)
        assert 0.7 <= time.monotonic() - started < 3  # given up before the lock could look stale (1 s)
        with pytest.raises(RunLockLostError, match=r"could not be renewed for \d+s \(ConnectionError\)"):
            lock.check()
    finally:
        lock.release()


def test_a_takeover_between_a_heartbeats_read_and_write_is_never_overwritten(s3_endpoint, s3_bucket, monkeypatch):
    from pipeline.errors import RunLockLostError

    store = S3Storage(f"s3://{s3_bucket}/race", endpoint_url=s3_endpoint)
    successor = {"owner": "successor", "pid": 1, "host": "elsewhere", "heartbeat": time.time()}
    read = store.read_tagged

    def read_then_taken_over(rel: str):  # the successor writes right after the heartbeat has read
        found = read(rel)
        store.write_text(S3_LOCK_FILE, json.dumps(successor))
        return found

    monkeypatch.setattr(store, "read_tagged", read_then_taken_over)
    lock = RunLock(store, stale_after=60, heartbeat_every=0.1).acquire()
    try:
        wait_for(lambda: lock._lost, timeout=10, what="the lock to be lost")
        with pytest.raises(RunLockLostError, match="taken over by pid 1 on elsewhere"):
            lock.check()
        assert json.loads(store.read_text(S3_LOCK_FILE))["owner"] == "successor"  # its lock stands
    finally:
        lock.release()


def test_a_driver_that_loses_the_run_stops_writing_and_its_successor_resumes(ray_instance, s3_endpoint, s3_bucket):
    from cluster.executor import RayExecutor
    from pipeline.config import parse_config
    from pipeline.engine import run_pipeline
    from pipeline.errors import RunLockLostError
    from tests.conftest import smoke_config

    uri = f"s3://{s3_bucket}/lost"
    store = S3Storage(uri, endpoint_url=s3_endpoint)
    config = parse_config(smoke_config(endpoint=s3_endpoint, work_s=3.0))
    lock = RunLock(store, stale_after=60, heartbeat_every=0.2).acquire()

    def transform_runs() -> bool:
        if not store.exists("state.json"):
            return False
        return json.loads(store.read_text("state.json"))["stages"].get("transform", {}).get("status") == "running"

    def take_over_once_transform_runs() -> None:
        # Not while a stage is ending: see RayExecutor.cancel (Ray aborts a driver that force-cancels
        # a task completing at that moment; this test's driver is pytest itself).
        wait_for(transform_runs, timeout=60)
        store.write_text(S3_LOCK_FILE, json.dumps({"owner": "successor", "pid": 1, "host": "elsewhere",
                                                   "heartbeat": time.time()}))

    import threading

    thief = threading.Thread(target=take_over_once_transform_runs)
    thief.start()
    with pytest.raises(RunLockLostError, match="taken over by pid 1 on elsewhere since .*; this driver stopped"):
        run_pipeline(config, uri, RayExecutor(), lock=lock)
    thief.join()
    state, events = store.read_text("state.json"), store.read_text("events.jsonl")
    time.sleep(4)  # the 3 s stage, had it not been stopped, would have finished and committed by now
    assert store.read_text("state.json") == state and store.read_text("events.jsonl") == events
    assert not any(o.path.endswith("manifest.json") for o in store.list("stages/transform"))
    assert '"running"' in state  # what it recorded before the loss is left as it was

    store.delete(S3_LOCK_FILE)  # the other driver is done (or found dead): a successor resumes cleanly
    summary = run_pipeline(parse_config(smoke_config(endpoint=s3_endpoint)), uri, RayExecutor())
    assert summary.ok and "transform" in summary.ran
