"""Pure parts of job submission: what a job carries, and what it must never carry."""

import os

import pytest

from cluster import jobs
from pipeline.config import parse_config
from pipeline.errors import VitpipeError
from tests.conftest import S3_SECRET, smoke_config


def test_runtime_env_carries_code_and_allowlisted_env_only(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)  # conftest sets it for in-process DeepSpeed; allow-listed
    env = jobs.build_runtime_env(str(tmp_path), jobs.job_env_vars(["NCCL_DEBUG=INFO"]))
    assert env["working_dir"] == str(tmp_path)
    assert [os.path.basename(p) for p in env["py_modules"]] == ["pipeline", "stages", "cluster"]
    assert env["env_vars"] == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "us-east-1",
                               "PYTHONUNBUFFERED": "1",
                               "NCCL_DEBUG": "INFO"}
    assert S3_SECRET not in repr(env)


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "WANDB_API_KEY",
                                  "HF_TOKEN", "DB_PASSWORD"])
def test_secret_looking_env_names_are_refused(name):
    with pytest.raises(VitpipeError, match="secrets are not sent with jobs"):
        jobs.check_job_env(name, "x")


# One of each credential shape (AWS's documented example keys, made-up tokens), under innocent names.
SECRET_VALUES = {
    "an AWS access key id": "AKIAIOSFODNN7EXAMPLE",
    "an AWS access key id (temporary)": "ASIAIOSFODNN7EXAMPLE",
    "an AWS secret access key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "a URL with a password": "https://builder:hunter2-pw@minio.internal:9000",
    "a bearer token": "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ2aXRwaXBlIn0.c2lnbmF0dXJl",
    "a PEM block": "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----",
}


@pytest.mark.parametrize("kind", sorted(SECRET_VALUES))
def test_credential_values_are_refused_under_innocent_names_without_echoing_them(kind):
    value = SECRET_VALUES[kind]
    with pytest.raises(VitpipeError) as caught:
        jobs.job_env_vars([f"BUILD_INFO={value}", "NCCL_DEBUG=INFO"])
    message = str(caught.value)
    assert message.startswith("--env BUILD_INFO: the value looks like ") and "\n" not in message
    assert kind.split(" (")[0] in message
    assert not any(value[i:i + 10] in message for i in range(len(value) - 9))  # no piece of it is echoed


@pytest.mark.parametrize("value", ["http://minio.internal:9000", "us-east-1", "cpu", "INFO",
                                   "0123456789abcdef0123456789abcdef01234567",  # a git sha is 40 characters too
                                   "s3://bucket/datasets/imagenet21k/shards", "--flag=value"])
def test_ordinary_values_pass(value):
    assert jobs.job_env_vars([f"SETTING={value}"])["SETTING"] == value


def test_forwarded_settings_and_job_metadata_are_checked_too(monkeypatch, tmp_path):
    from cluster.runtime import forwarded_env

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://svc:s3cr3t-pass@minio:9000")
    with pytest.raises(VitpipeError, match="^AWS_ENDPOINT_URL: the value looks like a URL with a password") as caught:
        forwarded_env()
    assert "s3cr3t-pass" not in str(caught.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    config = parse_config(smoke_config())
    # Refused before any cluster is contacted (nothing listens on port 9).
    with pytest.raises(VitpipeError, match="^job metadata vitpipe_run_dir: the value looks like an AWS access key id"):
        jobs.submit_pipeline("http://127.0.0.1:9", config, run_dir="s3://bucket/AKIAIOSFODNN7EXAMPLE/run")


def test_token_lookup_order(monkeypatch, tmp_path):
    token_file = tmp_path / "tok"
    token_file.write_text("from-file\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert jobs.auth_token() == "from-file"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.auth_token() == "from-env"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert jobs.auth_token() is None


def test_run_dir_resolution():
    config = parse_config(smoke_config())
    assert jobs._resolve_run_dir("http://127.0.0.1:8265", config, None) == os.path.abspath("runs/dag")
    assert jobs._resolve_run_dir("http://head:8265", config, "s3://b/r") == "s3://b/r"
    with pytest.raises(VitpipeError, match="needs an absolute run location"):
        jobs._resolve_run_dir("http://head:8265", config, None)


def test_format_jobs():
    assert jobs.format_jobs([]) == "no vitpipe jobs"
    text = jobs.format_jobs([{"job_id": "raysubmit_1", "status": "RUNNING", "run": "tiny", "start_time": 0,
                              "end_time": None, "run_dir": "s3://b/r", "message": ""}])
    assert text.splitlines()[0].split() == ["JOB", "STATUS", "RUN", "STARTED", "RUN", "DIR"]
    assert "raysubmit_1" in text and "RUNNING" in text
