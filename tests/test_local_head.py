"""`cluster.local_head` signals a recorded pid only if it is still the head it started (issue #14).

No Ray here: an unrelated `python -c "sleep"` process plays the part of whatever got the head's pid
after the head exited. It runs in its own session (as the head does), so a wrongful
``killpg(pid)`` would really kill it and the tests would see it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import cluster.local_head as local_head
from cluster.local_head import LocalHead, _is_our_head, main, start_head, stop_head

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
STALE_NOTE = "is not our Ray head (it was reused or the head is gone); removed the stale record, signalled nothing"


def _start_sleeper() -> subprocess.Popen[bytes]:
    # start_new_session: its pid is its process group id, like the head's, so killpg(pid) hits it alone.
    return subprocess.Popen(SLEEPER, start_new_session=True)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = _start_sleeper()
    try:
        yield proc
    finally:
        _reap(proc)


def _until_started(head: LocalHead, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """The stand-in's "ready": its program started (the real check, a reachable Ray head, comes long
    after that; read before, a child still inside exec shows an empty command line)."""
    import time

    deadline = time.monotonic() + 10
    while psutil.Process(proc.pid).cmdline() != SLEEPER:
        assert time.monotonic() < deadline, "the stand-in never started"
        time.sleep(0.01)


def _write_record(state_dir: Path, pid: int, **identity: Any) -> Path:
    state_file = state_dir / "head.json"
    record = {"pid": pid, "gcs_port": 6379, "dashboard_port": 8265, "token_path": str(state_dir / "tok"), **identity}
    state_file.write_text(json.dumps(record))
    return state_file


def _identity(pid: int) -> dict[str, Any]:
    proc = psutil.Process(pid)
    return {"started": proc.create_time(), "cmdline": proc.cmdline()}


@pytest.mark.parametrize("case", ["wrong_start_time", "other_cmdline", "old_format_record"])
def test_stop_never_signals_a_pid_that_is_not_our_head(case, sleeper, tmp_path, capsys, caplog):
    real = _identity(sleeper.pid)
    identity = {
        "wrong_start_time": {**real, "started": real["started"] - 3600},
        "other_cmdline": {**real, "cmdline": [sys.executable, str(Path(sys.executable).parent / "ray"),
                                              "start", "--head", "--block"]},
        "old_format_record": {},  # written by the previous version: pid and ports only
    }[case]
    state_file = _write_record(tmp_path, sleeper.pid, **identity)

    assert not _is_our_head(LocalHead.from_record(json.loads(state_file.read_text())))
    # status is read-only: it reports the stale record and keeps it.
    assert main(["status", "--state-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("no local head running (") and f"recorded pid {sleeper.pid}" in err
    assert state_file.exists()

    with caplog.at_level(logging.WARNING, logger="cluster.local_head"):
        stopped = stop_head(tmp_path)
    assert sleeper.poll() is None, "stop_head signalled a process that is not the head"
    assert stopped is False
    assert not state_file.exists()
    assert f"recorded pid {sleeper.pid}" in caplog.text and "removed the stale record, signalled nothing" in caplog.text
    if case != "old_format_record":
        assert STALE_NOTE in caplog.text

    assert main(["status", "--state-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == "no local head running"


def test_unreadable_record_is_removed_without_signalling(tmp_path, caplog):
    state_file = tmp_path / "head.json"
    state_file.write_text("{not json")
    assert main(["status", "--state-dir", str(tmp_path)]) == 1
    with caplog.at_level(logging.WARNING, logger="cluster.local_head"):
        assert stop_head(tmp_path) is False
    assert not state_file.exists()
    assert "unreadable" in caplog.text


def test_stop_kills_a_head_whose_identity_matches(sleeper, tmp_path, capsys):
    # Unknown keys (a newer version's record) are ignored, not a crash.
    state_file = _write_record(tmp_path, sleeper.pid, **_identity(sleeper.pid), written_by="a newer version")
    head = LocalHead.from_record(json.loads(state_file.read_text()))
    assert _is_our_head(head)

    assert main(["status", "--state-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == head.address

    assert stop_head(tmp_path) is True
    assert sleeper.wait(timeout=10) == -signal.SIGTERM
    assert not state_file.exists()
    assert not _is_our_head(head)  # gone (a zombie until reaped above) is not ours either


def test_start_replaces_a_stale_record_and_records_what_it_started(sleeper, tmp_path, monkeypatch):
    """start_head must not reuse a live but foreign pid, and must record an identity that checks out.

    Ray is stood in for by another sleeper: Popen ignores the `ray start` command line and
    readiness is not waited for; everything else is start_head's own code.
    """
    _write_record(tmp_path, sleeper.pid, **{**_identity(sleeper.pid), "started": 0.0})
    launched: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def fake_popen(cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        assert cmd[1:4] == ["start", "--head", "--block"] and kwargs["start_new_session"] is True
        launched.append(real_popen(SLEEPER, **kwargs))
        return launched[-1]

    monkeypatch.setattr(local_head.subprocess, "Popen", fake_popen)
    monkeypatch.setattr(local_head, "_wait_ready", _until_started)
    try:
        head = start_head(state_dir=tmp_path, token_path=tmp_path / "tok", env={})
        assert len(launched) == 1 and head.pid == launched[0].pid != sleeper.pid
        recorded = LocalHead.from_record(json.loads((tmp_path / "head.json").read_text()))
        assert recorded == head and recorded.cmdline == SLEEPER and _is_our_head(recorded)
        # A second start reuses the confirmed head instead of launching another.
        assert start_head(state_dir=tmp_path, token_path=tmp_path / "tok", env={}).pid == head.pid
        assert len(launched) == 1

        assert stop_head(tmp_path) is True
        assert launched[0].wait(timeout=10) == -signal.SIGTERM
        assert sleeper.poll() is None
    finally:
        for proc in launched:
            _reap(proc)
