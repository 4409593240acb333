"""A single-machine Ray head for ``make submit`` and the job tests.

``python -m cluster.local_head start`` starts ``ray start --head --block`` in its own process
group, bound to 127.0.0.1 with token authentication on, waits until its dashboard accepts jobs,
records it in ``.ray-local/head.json`` and prints the dashboard URL. It is idempotent: a head
recorded there and still running is reused. ``stop`` kills that process group only — unlike
``ray stop``, it never touches other Ray instances on the machine. ``status`` prints the URL of
the recorded head if it is running (exit 0), else exits 1.

A pid alone does not identify the head: once it exits, the kernel may hand its pid to any other
process. The record therefore also holds the process's start time and command line, and ``start``
reuses, ``stop`` signals and ``status`` reports a recorded head only when a live process has that
pid, that start time (within 1 s) and that command line. A record that fails the check (or one
written before these fields existed) is stale: ``stop`` removes it and signals nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import psutil

__all__ = ["LocalHead", "start_head", "stop_head", "main"]

STATE_DIR = Path(".ray-local")
# psutil derives create_time from boot time plus clock ticks, so two readings of the same process
# may differ by a tick or by boot-time rounding; a reused pid belongs to a process started later.
_START_TIME_TOLERANCE_S = 1.0

log = logging.getLogger(__name__)


@dataclass
class LocalHead:
    pid: int
    gcs_port: int
    dashboard_port: int
    token_path: str
    # Identity of the process behind ``pid``, as psutil reports it (see _is_our_head). The defaults
    # stand for "unknown": a record written before these fields existed can never be confirmed.
    started: float | None = None
    cmdline: list[str] = field(default_factory=list)

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> LocalHead:
        """Build from a ``head.json`` dict, ignoring keys this version does not know."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    # A zombie counts as gone: it has exited and only waits for its parent to reap it. When the
    # head is our own child (start_head and stop_head in one process, as in the tests), waiting for
    # the zombie to vanish would always sit out _kill_group's full grace period.
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _read_record(state_file: Path) -> LocalHead | None:
    """The head recorded in ``state_file``; None if the record is unreadable (treated as stale)."""
    try:
        data = json.loads(state_file.read_text())
        return LocalHead.from_record(data)
    except (OSError, ValueError, TypeError, AttributeError):
        # Corrupt JSON, a non-object, or missing required keys: nothing in it can be trusted.
        return None


def _is_our_head(head: LocalHead) -> bool:
    """True only if ``head.pid`` is still the process this module started.

    ``_alive(pid)`` is not enough: after the head exits its pid can be reused by an unrelated
    process, and signalling that process group would kill someone else's work. The start time
    cannot be forged by a later process, and the command line guards against a coarse clock.
    """
    if not isinstance(head.started, (int, float)) or not head.cmdline:
        return False  # an old-format record: cannot confirm, so never trust it
    try:
        proc = psutil.Process(head.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        started = proc.create_time()
        cmdline = proc.cmdline()
    except (psutil.Error, ValueError, TypeError):
        # Gone, owned by another user (we started the head as ourselves), or a pid that is not
        # one (a hand-edited record): not ours.
        return False
    return abs(started - head.started) <= _START_TIME_TOLERANCE_S and cmdline == head.cmdline


def _stale_message(state_file: Path, head: LocalHead | None) -> str:
    if head is None:
        return f"{state_file} is unreadable; it does not identify a Ray head"
    if head.started is None or not head.cmdline:
        return (f"recorded pid {head.pid} cannot be confirmed as our Ray head (the record predates "
                f"start-time checks; if that head still runs, stop it by hand)")
    return f"recorded pid {head.pid} is not our Ray head (it was reused or the head is gone)"


def _ensure_token(path: Path) -> None:
    if path.exists() and path.read_text().strip():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def _wait_ready(head: LocalHead, proc: subprocess.Popen[bytes], timeout: float) -> None:
    import urllib.request

    token = Path(head.token_path).read_text().strip()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with code {proc.returncode}")
        request = urllib.request.Request(f"{head.address}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the Ray head did not become ready within {timeout:.0f}s")


def start_head(
    num_cpus: int = 2,
    state_dir: Path = STATE_DIR,
    token_path: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> LocalHead:
    """Start (or reuse) a local head; returns it once its dashboard accepts jobs."""
    state_file = state_dir / "head.json"
    if state_file.exists():
        recorded = _read_record(state_file)
        if recorded is not None and _is_our_head(recorded):
            return recorded
        # Not signalled: the pid may be someone else's now. The new record below replaces it.
        log.warning("%s; starting a new head", _stale_message(state_file, recorded))
    token = Path(token_path or os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    _ensure_token(token)
    head = LocalHead(pid=0, gcs_port=_free_port(), dashboard_port=_free_port(), token_path=str(token))
    child_env = dict(env if env is not None else os.environ)
    child_env.pop("RAY_ADDRESS", None)
    child_env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    child_env.pop("RAY_AUTH_TOKEN", None)
    # Jobs run `python -m pipeline.cli`: put this interpreter's environment first on PATH.
    child_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{child_env.get('PATH', '')}"
    ray_bin = Path(sys.executable).parent / "ray"
    state_dir.mkdir(parents=True, exist_ok=True)
    head_log = open(state_dir / "head.log", "wb")  # noqa: SIM115 - handed to the child
    cmd = [
        str(ray_bin) if ray_bin.exists() else "ray", "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={head.gcs_port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={head.dashboard_port}",
        f"--num-cpus={num_cpus}", "--disable-usage-stats",
        # Every fixed default port gets a free one: another Ray instance on this machine (an
        # embedded `vitpipe run`, a test) may hold the defaults, and a head whose job agent
        # cannot bind 52365 accepts no jobs at all.
        *(f"--{flag}={_free_port()}" for flag in (
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
            "metrics-export-port", "ray-client-server-port", "node-manager-port", "object-manager-port")),
    ]
    proc = subprocess.Popen(cmd, stdout=head_log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True)
    head.pid = proc.pid
    try:
        _wait_ready(head, proc, timeout)
        # The identity _is_our_head checks later. Read back from the kernel rather than copied
        # from ``cmd``: the ``ray`` console script runs under its shebang interpreter, so the
        # process's command line is [python, .../ray, "start", ...]. Reading it once the head is
        # ready is as safe as right after Popen (our unreaped child's pid cannot be reused) and
        # lets a head that died at once fail with _wait_ready's "exited with code" error.
        child = psutil.Process(proc.pid)
        head.started = child.create_time()
        head.cmdline = child.cmdline()
    except Exception:
        _kill_group(proc.pid)
        raise
    state_file.write_text(json.dumps(asdict(head)))
    return head


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(50):
        if not _alive(pid):
            break
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_head(state_dir: Path = STATE_DIR) -> bool:
    """Stop the head recorded in ``state_dir``; True if a head of ours was running and stopped.

    A record that ``_is_our_head`` cannot confirm is removed without signalling anything.
    """
    state_file = state_dir / "head.json"
    if not state_file.exists():
        return False
    head = _read_record(state_file)
    if head is None or not _is_our_head(head):
        state_file.unlink(missing_ok=True)
        log.warning("%s; removed the stale record, signalled nothing", _stale_message(state_file, head))
        return False
    _kill_group(head.pid)
    state_file.unlink(missing_ok=True)
    return True


def _head_status(state_dir: Path = STATE_DIR) -> tuple[LocalHead | None, str | None]:
    """(the recorded head if it is ours and running, else None; why a record is stale, or None).

    Read-only: a stale record is reported, not removed (``stop`` removes it).
    """
    state_file = state_dir / "head.json"
    if not state_file.exists():
        return None, None
    head = _read_record(state_file)
    if head is not None and _is_our_head(head):
        return head, None
    return None, _stale_message(state_file, head)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local_head",
                                     description="Start, stop or check a single-machine Ray head (127.0.0.1, token auth).")
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--state-dir", type=Path, default=STATE_DIR)
    args = parser.parse_args(argv)
    if args.action == "start":
        head = start_head(num_cpus=args.num_cpus, state_dir=args.state_dir)
        print(f"Ray head at {head.address} (token in {head.token_path}; stop with "
              f"`python -m cluster.local_head stop`)", file=sys.stderr)
        print(head.address)
    elif args.action == "status":
        head, stale = _head_status(args.state_dir)
        if head is None:
            suffix = f" ({stale}; `python -m cluster.local_head stop` removes the record)" if stale else ""
            print(f"no local head running{suffix}", file=sys.stderr)
            return 1
        print(head.address)
    else:
        print("stopped" if stop_head(args.state_dir) else "no local head running", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
