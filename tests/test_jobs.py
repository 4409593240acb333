"""Job submission against a real local head (`ray start --head` on 127.0.0.1, token auth on)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.local_head import start_head, stop_head
from tests.conftest import S3_SECRET, cli_env, run_cli, smoke_config, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    state = tmp_path_factory.mktemp("head")
    token = state / "auth_token"
    started = start_head(num_cpus=2, state_dir=state, token_path=token, env=cli_env())
    yield started
    stop_head(state)


def _env(head, **extra: str) -> dict[str, str]:
    env = cli_env(RAY_AUTH_TOKEN_PATH=head.token_path)
    env.pop("RAY_AUTH_TOKEN", None)
    env.update(extra)
    return env


def test_submit_runs_the_dag_and_logs_jobs_status_show_it(head, tmp_path):
    config = write_config(tmp_path / "dag.yaml", smoke_config(name="jobdag"))
    run_dir = tmp_path / "run"
    env = _env(head)
    assert env["AWS_SECRET_ACCESS_KEY"] == S3_SECRET  # present in the submitting shell...
    submitted = run_cli("submit", str(config), "--address", head.address, "--run-dir", str(run_dir), env=env)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert job_id

    followed = run_cli("logs", job_id, "--address", head.address, "--follow", env=env, timeout=300)
    assert followed.returncode == 0, followed.stdout[-3000:] + followed.stderr[-2000:]
    assert "run jobdag finished: 3 ran" in followed.stdout
    assert f"job {job_id}: SUCCEEDED" in followed.stderr

    logs = run_cli("logs", job_id, "--address", head.address, env=env)
    assert logs.returncode == 0 and "stage combine: done" in logs.stdout

    listed = run_cli("jobs", "--address", head.address, "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    record = next(j for j in json.loads(listed.stdout) if j["job_id"] == job_id)
    assert record["status"] == "SUCCEEDED" and record["run"] == "jobdag" and record["run_dir"] == str(run_dir)
    table = run_cli("jobs", "--address", head.address, env=env)
    assert job_id in table.stdout and "SUCCEEDED" in table.stdout

    status = run_cli("status", str(run_dir), env=env)
    assert status.returncode == 0, status.stderr
    assert [line.split()[2] for line in status.stdout.splitlines()[2:]] == ["done", "done", "done"]

    # ...but never reaches the job's entrypoint, metadata, runtime_env or logs.
    from ray.job_submission import JobSubmissionClient

    token = Path(head.token_path).read_text().strip()
    info = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {token}"}).get_job_info(job_id)
    exposed = json.dumps(info.dict(), default=str)
    for text in (exposed, followed.stdout, followed.stderr, logs.stdout, listed.stdout, status.stdout):
        assert S3_SECRET not in text and "AWS_SECRET_ACCESS_KEY" not in text
    assert "pipeline.cli run pipeline.json" in info.entrypoint


def test_missing_or_wrong_token_is_a_one_line_error(head, tmp_path):
    wrong = _env(head, RAY_AUTH_TOKEN="not-the-token")
    result = run_cli("jobs", "--address", head.address, env=wrong)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "rejected the auth token" in result.stderr and "RAY_AUTH_TOKEN" in result.stderr

    missing = _env(head, HOME=str(tmp_path), RAY_AUTH_TOKEN_PATH=str(tmp_path / "nope"))
    result = run_cli("jobs", "--address", head.address, env=missing)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "requires token authentication" in result.stderr and "RAY_AUTH_TOKEN" in result.stderr


def test_secrets_cannot_be_forwarded_and_bad_addresses_are_clear(head, tmp_path):
    config = write_config(tmp_path / "dag.yaml", smoke_config())
    refused = run_cli("submit", str(config), "--address", head.address, "--env", "AWS_SECRET_ACCESS_KEY=x",
                      env=_env(head))
    assert refused.returncode == 2 and "secrets are not sent with jobs" in refused.stderr
    remote = run_cli("submit", str(config), "--address", "http://10.255.255.1:8265", env=_env(head))
    assert remote.returncode == 2 and "needs an absolute run location" in remote.stderr
    from tests.conftest import free_port

    dead = run_cli("jobs", "--address", f"http://127.0.0.1:{free_port()}", env=_env(head))
    assert dead.returncode == 2 and "cannot reach the Ray dashboard" in dead.stderr
    assert len(dead.stderr.strip().splitlines()) == 1
    unknown = run_cli("logs", "raysubmit_doesnotexist", "--address", head.address, env=_env(head))
    assert unknown.returncode == 2 and "no job 'raysubmit_doesnotexist'" in unknown.stderr
