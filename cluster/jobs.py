"""Submitting pipelines as Ray jobs, and watching them, through Ray's Job Submission SDK.

``vitpipe submit`` packages the current code (``pipeline``, ``stages``, ``cluster`` as
``py_modules``) and the *resolved* config (a working dir holding only ``pipeline.json``), so the
job runs exactly what was validated here. The job's driver is ``vitpipe run`` on the head node.

Secrets never travel with a job: Ray shows a job's entrypoint, metadata and ``runtime_env`` to
anyone who can read its dashboard. Only an allow-list of non-secret environment variables is
forwarded (:func:`cluster.runtime.forwarded_env`), ``--env`` refuses secret-looking names and
values that look like credentials (:mod:`pipeline.redaction`), the job's metadata is checked the
same way, and S3 credentials must come from the cluster's nodes (instance profile, IRSA, or the
environment of ``ray start``).

Ray 2.60 clusters may require token authentication. The token is read from ``RAY_AUTH_TOKEN``,
the file named by ``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token`` and sent as a Bearer header.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cluster.runtime import forwarded_env
from pipeline import __version__
from pipeline.config import RunConfig
from pipeline.errors import VitpipeError
from pipeline.redaction import secret_kind
from pipeline.tables import text_table

__all__ = [
    "auth_token",
    "build_runtime_env",
    "job_client",
    "submit_pipeline",
    "list_pipeline_jobs",
    "format_jobs",
    "job_logs",
    "follow_logs",
    "stop_job",
    "check_job_env",
]

log = logging.getLogger(__name__)

_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE|SESSION|API_KEY", re.I)
_PACKAGES = ("pipeline", "stages", "cluster")
CONFIG_NAME = "pipeline.json"
METADATA_KEY = "vitpipe_run"

_TOKEN_HELP = ("set RAY_AUTH_TOKEN to the cluster's token (or RAY_AUTH_TOKEN_PATH to a file holding it; "
               "default ~/.ray/auth_token); on the head node `cat ~/.ray/auth_token` shows it")


def auth_token() -> str | None:
    """The Ray auth token the client should present, if one is configured."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def job_client(address: str) -> Any:
    """A JobSubmissionClient for ``address``, with one-line errors for the usual failures."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if not log.isEnabledFor(logging.DEBUG):
        # Ray sets up its own loggers on import; its per-package upload chatter is noise here.
        logging.getLogger("ray.dashboard").setLevel(logging.WARNING)
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as err:
        text = str(err)
        if "invalid" in text.lower() or "Forbidden" in text:
            raise VitpipeError(f"{address}: the Ray cluster rejected the auth token; {_TOKEN_HELP}") from None
        raise VitpipeError(f"{address}: the Ray cluster requires token authentication; {_TOKEN_HELP}") from None
    except (ConnectionError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VitpipeError(f"cannot reach the Ray dashboard at {address}: {first}") from None


_NOT_SENT = ("secrets are not sent with jobs (Ray shows a job's environment and metadata to anyone who can "
             "read the dashboard); give the cluster's nodes the credential instead (instance profile, IRSA, "
             "or the environment of `ray start`)")


def check_job_env(name: str, value: str) -> None:
    """Refuse a secret-looking name, or a value shaped like a credential (never echoing it)."""
    if _SECRET_NAME.search(name):
        raise VitpipeError(f"--env {name}: {_NOT_SENT}")
    kind = secret_kind(value)
    if kind:
        raise VitpipeError(f"--env {name}: the value looks like {kind}; {_NOT_SENT}")


def _check_metadata(metadata: dict[str, str]) -> None:
    for key, value in metadata.items():
        kind = secret_kind(value)
        if kind:
            raise VitpipeError(f"job metadata {key}: the value looks like {kind}; {_NOT_SENT}")


def job_env_vars(extra_env: list[str]) -> dict[str, str]:
    """The job's environment: forwarded settings, then ``--env KEY=VALUE`` items, each checked."""
    env_vars = forwarded_env()
    env_vars["PYTHONUNBUFFERED"] = "1"
    for item in extra_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise VitpipeError(f"--env {name or item!r}: expected KEY=VALUE")
        check_job_env(name, value)
        env_vars[name] = value
    return env_vars


def build_runtime_env(staging_dir: str, env_vars: dict[str, str]) -> dict[str, Any]:
    """The job's runtime_env: our packages, the staged config, checked env vars."""
    root = Path(__file__).resolve().parent.parent
    return {
        "working_dir": staging_dir,
        "py_modules": [str(root / pkg) for pkg in _PACKAGES],
        "env_vars": env_vars,
        "excludes": ["__pycache__", "*.pyc"],
    }


def _is_loopback(address: str) -> bool:
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    return host in ("127.0.0.1", "localhost", "::1")


def _resolve_run_dir(address: str, config: RunConfig, run_dir: str | None) -> str:
    chosen = run_dir or config.run_dir
    if chosen and ("://" in chosen or os.path.isabs(chosen)):
        return chosen
    if _is_loopback(address):
        # A head on this machine shares our filesystem: make the path absolute so the job
        # (whose cwd is a Ray-managed temp dir) writes where `vitpipe status` will look.
        return os.path.abspath(chosen or config.default_run_dir())
    raise VitpipeError(
        f"--run-dir: a job on a remote cluster needs an absolute run location it can reach "
        f"(s3://bucket/prefix or a shared filesystem path), got {chosen or 'none'}"
    )


def submit_pipeline(address: str, config: RunConfig, run_dir: str | None = None,
                    extra_env: list[str] | None = None, python: str = "python") -> str:
    """Submit ``config`` as a Ray job; returns the job id."""
    run_uri = _resolve_run_dir(address, config, run_dir)
    # Everything the job would publish is checked before the cluster is contacted.
    env_vars = job_env_vars(extra_env or [])
    metadata = {METADATA_KEY: config.name, "vitpipe_run_dir": run_uri, "vitpipe_version": __version__}
    _check_metadata(metadata)
    client = job_client(address)
    with tempfile.TemporaryDirectory(prefix="vitpipe-job-") as staging:
        staged = config.to_dict()
        staged["ray"]["address"] = None  # the job's driver joins the cluster it runs on (RAY_ADDRESS)
        Path(staging, CONFIG_NAME).write_text(json.dumps(staged, indent=2))
        runtime_env = build_runtime_env(staging, env_vars)
        entrypoint = f"{python} -m pipeline.cli run {CONFIG_NAME} --run-dir {shlex.quote(run_uri)}"
        job_id = _submit_with_retry(client, address, entrypoint=entrypoint, runtime_env=runtime_env,
                                    metadata=metadata)
    log.info("submitted %s as job %s (run dir %s)", config.name, job_id, run_uri)
    return job_id


def _submit_with_retry(client: Any, address: str, timeout: float = 120.0, **kwargs: Any) -> str:
    # A head that just started answers 500 "No available agent" until its job agent is up
    # (tens of seconds on a loaded machine); anything else fails at once.
    deadline = time.monotonic() + timeout
    delay = 1.0
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() + delay > deadline:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise VitpipeError(f"{address}: job submission failed: {first}") from None
            log.info("the cluster's job agent is not ready yet; retrying in %.0fs", delay)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _job_record(job: Any) -> dict[str, Any]:
    meta = job.metadata or {}
    return {
        "job_id": job.submission_id or job.job_id,
        "status": str(getattr(job.status, "value", job.status)),
        "run": meta.get(METADATA_KEY, ""),
        "run_dir": meta.get("vitpipe_run_dir", ""),
        "start_time": job.start_time,
        "end_time": job.end_time,
        "message": (job.message or "").strip().splitlines()[0] if job.message else "",
    }


def list_pipeline_jobs(address: str) -> list[dict[str, Any]]:
    """Jobs on the cluster that vitpipe submitted, oldest first."""
    jobs = [j for j in job_client(address).list_jobs() if (j.metadata or {}).get(METADATA_KEY)]
    return [_job_record(j) for j in sorted(jobs, key=lambda j: j.start_time or 0)]


def format_jobs(jobs: list[dict[str, Any]]) -> str:
    if not jobs:
        return "no vitpipe jobs"
    header = ("JOB", "STATUS", "RUN", "STARTED", "RUN DIR")
    rows = []
    for j in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["start_time"] / 1000)) if j["start_time"] else "-"
        rows.append((j["job_id"], j["status"], j["run"], started, j["run_dir"]))
    return text_table(header, rows)


def _wrap_job_error(job_id: str, address: str, err: Exception) -> VitpipeError:
    text = str(err)
    if "404" in text or "does not exist" in text:
        return VitpipeError(f"{address}: no job {job_id!r}")
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return VitpipeError(f"{address}: {first}")


def job_logs(address: str, job_id: str) -> str:
    client = job_client(address)
    try:
        return client.get_job_logs(job_id)
    except RuntimeError as err:
        raise _wrap_job_error(job_id, address, err) from None


def follow_logs(address: str, job_id: str) -> int:
    """Stream a job's logs until it ends; exit code 0 iff it succeeded."""
    client = job_client(address)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
        status = client.get_job_status(job_id)
    except RuntimeError as err:
        raise _wrap_job_error(job_id, address, err) from None
    name = str(getattr(status, "value", status))
    print(f"job {job_id}: {name}", file=sys.stderr)
    return 0 if name == "SUCCEEDED" else 1


def stop_job(address: str, job_id: str) -> bool:
    client = job_client(address)
    try:
        return bool(client.stop_job(job_id))
    except RuntimeError as err:
        raise _wrap_job_error(job_id, address, err) from None
