"""Shared fixtures: a real Ray instance, a real S3 endpoint (moto's server on 127.0.0.1), helpers
for writing configs and running the ``vitpipe`` CLI in a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
VITPIPE = [sys.executable, "-m", "pipeline.cli"]

# Fake credentials for the moto server; tests assert they never leak into outputs.
S3_KEY_ID = "AKIAVITPIPETESTKEY01"
S3_SECRET = "vitpipe-test-secret-do-not-leak-0123456789"

# Set before any Ray instance or subprocess starts, so every worker inherits them, as Ray workers
# on a real cluster inherit the node's credentials.
os.environ.update(AWS_ACCESS_KEY_ID=S3_KEY_ID, AWS_SECRET_ACCESS_KEY=S3_SECRET, AWS_DEFAULT_REGION="us-east-1")
os.environ.pop("AWS_PROFILE", None)
# DeepSpeed picks its accelerator when first imported; this machine's torch is a CUDA build with no GPU.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_instance() -> Iterator[None]:
    """One embedded Ray instance for the in-process engine tests (2 CPUs, no dashboard)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace="vitpipe-tests",
             logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real HTTP S3 endpoint: moto's threaded server on 127.0.0.1, a free port."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh bucket on the moto server; returns its name."""
    import boto3

    name = f"vitpipe-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def smoke_config(name: str = "dag", work_s: float = 0.0, factor: int = 3, endpoint: str | None = None) -> dict[str, Any]:
    """The three-stage test DAG: generate -> transform -> combine."""
    config: dict[str, Any] = {
        "name": name,
        "seed": 7,
        "ray": {"include_dashboard": False, "num_cpus": 2},
        "stages": {
            "generate": {"type": "smoke.generate", "params": {"records": 5000}},
            "transform": {"type": "smoke.transform", "inputs": {"source": "generate"},
                          "params": {"factor": factor, "work_s": work_s, "steps": 20}},
            "combine": {"type": "smoke.combine", "inputs": ["transform"]},
        },
    }
    if endpoint:
        config["storage"] = {"endpoint_url": endpoint}
    return config


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VITPIPE, *args], capture_output=True, text=True, timeout=timeout,
                          env=env or cli_env(), cwd=cwd or REPO)


def start_cli(*args: str, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start the CLI in its own process group, so a test can SIGKILL the driver and its Ray."""
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen([*VITPIPE, *args], stdout=out, stderr=subprocess.STDOUT, env=env or cli_env(),
                            cwd=REPO, start_new_session=True)


def read_events_file(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return events


def wait_for(predicate: Any, timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --- sample ledgers: per rank, [step, keys consumed in it] entries (stages.train.checkpointer) --------


def read_ledgers(stage_dir: Path) -> list[list[Any]]:
    """Every rank's ledger file of a training stage, by rank."""
    files = sorted((stage_dir / "ledger").glob("rank*.json"), key=lambda p: int(p.stem[4:]))
    return [json.loads(path.read_text()) for path in files]


def ledger_keys(ledger: list[Any]) -> list[str]:
    """One rank's consumed sample keys, in order."""
    return [key for _, keys in ledger for key in keys]


def ledger_by_step(ledgers: list[list[Any]]) -> dict[int, list[str]]:
    """What the whole group consumed at each global step, whichever ranks it ran on (sorted keys)."""
    steps: dict[int, list[str]] = {}
    for ledger in ledgers:
        for step, keys in ledger:
            steps.setdefault(step, []).extend(keys)
    return {step: sorted(keys) for step, keys in sorted(steps.items())}
