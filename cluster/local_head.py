"""A single-machine Ray head for ``make submit`` and the job tests.

``python -m cluster.local_head start`` starts ``ray start --head --block`` in its own process
group, bound to 127.0.0.1 with token authentication on, waits until its dashboard accepts jobs,
records it in ``.ray-local/head.json`` and prints the dashboard URL. It is idempotent: a head
recorded there and still alive is reused. ``stop`` kills that process group only — unlike
``ray stop``, it never touches other Ray instances on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["LocalHead", "start_head", "stop_head", "main"]

STATE_DIR = Path(".ray-local")


@dataclass
class LocalHead:
    pid: int
    gcs_port: int
    dashboard_port: int
    token_path: str

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
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        head = LocalHead(**json.loads(state_file.read_text()))
        if _alive(head.pid):
            return head
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
    log = open(state_dir / "head.log", "wb")  # noqa: SIM115 - handed to the child
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
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True)
    head.pid = proc.pid
    try:
        _wait_ready(head, proc, timeout)
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
    """Stop the head recorded in ``state_dir``; True if one was running."""
    state_file = state_dir / "head.json"
    if not state_file.exists():
        return False
    head = LocalHead(**json.loads(state_file.read_text()))
    was_alive = _alive(head.pid)
    _kill_group(head.pid)
    state_file.unlink()
    return was_alive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local_head",
                                     description="Start or stop a single-machine Ray head (127.0.0.1, token auth).")
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--state-dir", type=Path, default=STATE_DIR)
    args = parser.parse_args(argv)
    if args.action == "start":
        head = start_head(num_cpus=args.num_cpus, state_dir=args.state_dir)
        print(f"Ray head at {head.address} (token in {head.token_path}; stop with "
              f"`python -m cluster.local_head stop`)", file=sys.stderr)
        print(head.address)
    else:
        print("stopped" if stop_head(args.state_dir) else "no local head running", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
