"""S3 errors a user can fix are one line naming the URI and what to do (moto's server, a proxy
answering as S3 does when it denies access or refuses expired credentials, and a closed port)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.errors import StorageError
from pipeline.storage import S3Storage
from tests.conftest import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from faultproxy import FaultProxy  # noqa: E402

MISSING_BUCKET = "vitpipe-no-such-bucket"


def _one_line(err: pytest.ExceptionInfo[StorageError], uri: str, *needles: str) -> str:
    message = str(err.value)
    assert "\n" not in message and message.startswith(uri), message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize("operation", ["exists", "upload_file", "write_text", "read_text", "list"])
def test_a_missing_bucket_is_named_never_read_as_a_missing_object(s3_endpoint, tmp_path, operation):
    storage = S3Storage(f"s3://{MISSING_BUCKET}/run", endpoint_url=s3_endpoint)
    local = tmp_path / "f.bin"
    local.write_bytes(b"x" * 100)
    calls = {"exists": lambda: storage.exists("state.json"), "upload_file": lambda: storage.upload_file(local, "f.bin"),
             "write_text": lambda: storage.write_text("f.txt", "x"), "read_text": lambda: storage.read_text("f.txt"),
             "list": lambda: storage.list("stages")}
    with pytest.raises(StorageError) as err:
        calls[operation]()
    _one_line(err, "s3://", f"bucket {MISSING_BUCKET!r} does not exist; create it or correct the run location")


def test_status_of_a_run_in_a_missing_bucket_is_one_line(s3_endpoint, capsys):
    code = main(["status", f"s3://{MISSING_BUCKET}/run", "--endpoint-url", s3_endpoint])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert err.startswith(f"vitpipe: error: s3://{MISSING_BUCKET}/run/") and "does not exist" in err, err


@pytest.mark.parametrize("status, code, advice", [
    (403, "AccessDenied", "access denied (AccessDenied); the credentials lack permission here: check the IAM"),
    (403, "InvalidAccessKeyId", "S3 rejected the AWS credentials (InvalidAccessKeyId); check AWS_ACCESS_KEY_ID"),
    (400, "ExpiredToken", "the AWS credentials have expired (ExpiredToken); refresh them"),
])
def test_denied_rejected_and_expired_credentials_say_what_to_do(s3_endpoint, s3_bucket, tmp_path, status, code, advice):
    local = tmp_path / "f.bin"
    local.write_bytes(b"x" * 100)
    head_advice = {403: "access denied (403)", 400: "400 Bad Request, no detail on a HEAD); expired credentials"}
    with FaultProxy(s3_endpoint, reject=(status, code)) as proxy:
        storage = S3Storage(f"s3://{s3_bucket}/run", endpoint_url=proxy.url)
        for call in (lambda: storage.write_text("a.txt", "x"), lambda: storage.upload_file(local, "f.bin"),
                     lambda: storage.read_text("a.txt"), lambda: storage.list("stages")):
            with pytest.raises(StorageError) as err:
                call()
            _one_line(err, f"s3://{s3_bucket}/run", advice)
        with pytest.raises(StorageError) as err:  # a HEAD's error has no body, so no code
            storage.exists("a.txt")
        _one_line(err, f"s3://{s3_bucket}/run/a.txt", head_advice[status])


def test_a_wrong_endpoint_is_one_line_within_seconds():
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    storage = S3Storage("s3://some-bucket/run", endpoint_url=endpoint)
    for call in (lambda: storage.exists("a"), lambda: storage.write_text("a", "x"), lambda: storage.read_text("a")):
        started = time.monotonic()
        with pytest.raises(StorageError) as err:
            call()
        _one_line(err, "s3://some-bucket/run/a", f"cannot reach {endpoint}", "AWS_ENDPOINT_URL")
        assert time.monotonic() - started < 20
