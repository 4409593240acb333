"""Credentials are masked wherever a run records text: events, manifests, run state and logs."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline.events import EVENTS_FILE, EventLog
from pipeline.logsetup import configure_logging
from pipeline.manifest import MANIFEST_NAME, Manifest, commit_manifest, manifest_digest, read_manifest
from pipeline.redaction import redact, secret_kind
from pipeline.state import STATE_FILE, RunState, save_state
from pipeline.storage import LocalStorage
from tests.conftest import S3_KEY_ID
from tests.test_jobs_unit import SECRET_VALUES

AWS_SECRET = SECRET_VALUES["an AWS secret access key"]


@pytest.mark.parametrize("text, kept", [
    (f"creds {S3_KEY_ID} / {AWS_SECRET} used", "creds <redacted> / <redacted> used"),
    (f"aws_secret_access_key = {AWS_SECRET}", "aws_secret_access_key = <redacted>"),
    (f'{{"SecretAccessKey": "{AWS_SECRET}"}}', '{"SecretAccessKey": "<redacted>"}'),
    ("GET http://svc:pw-123@minio:9000/bucket failed", "GET http://svc:<redacted>@minio:9000/bucket failed"),
    ("Authorization: Bearer abcdefgh12345678", "Authorization: Bearer <redacted>"),
    ("key -----BEGIN PRIVATE KEY-----\nMIIEvQ\n-----END PRIVATE KEY----- end", "key <redacted> end"),
])
def test_secret_spans_are_masked_and_the_rest_kept(text, kept):
    assert redact(text) == kept


@pytest.mark.parametrize("text", [
    "stages/pretrain/checkpoints/step-00000100/mp_rank_00_model_states.pt",
    "sha256 " + "0f" * 32, "commit 0123456789abcdef0123456789abcdef01234567",
    "s3://bucket/Datasets/ImageNet21k/winter21/shards/000123.tar", "http://127.0.0.1:9000/bucket",
])
def test_ordinary_text_is_untouched(text):
    assert redact(text) == text and secret_kind(text) is None


def test_events_manifests_and_state_never_hold_a_credential(tmp_path):
    storage = LocalStorage(tmp_path)
    leaky = f"s3://bucket/x: access denied for {S3_KEY_ID} via https://bob:pw-9876@proxy:3128"
    EventLog(storage, "run").emit("stage_failed", stage="ingest", error=leaky)
    manifest = Manifest(stage="ingest", type="ingest", fingerprint="f", params={"source": leaky})
    commit_manifest(storage, manifest)
    state = RunState(run="run")
    state.stage("ingest").error = leaky
    save_state(storage, state)
    for name in (EVENTS_FILE, MANIFEST_NAME, STATE_FILE):
        text = (tmp_path / name).read_text()
        assert S3_KEY_ID not in text and "pw-9876" not in text and "<redacted>" in text, name
        json.loads(text.splitlines()[0] if name == EVENTS_FILE else text)  # still valid JSON
    # What downstream stages record is the digest of the text on storage.
    assert manifest_digest(read_manifest(storage)) == manifest_digest(manifest)


def test_log_records_and_tracebacks_are_masked(capfd):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []
    try:
        configure_logging(logging.INFO)
        log = logging.getLogger("vitpipe.test")
        log.info("endpoint %s", "https://bob:pw-9876@minio:9000")
        try:
            raise RuntimeError(f"denied for {S3_KEY_ID}")
        except RuntimeError:
            log.exception("upload failed")
    finally:
        root.handlers, root.level = saved
    err = capfd.readouterr().err
    assert "pw-9876" not in err and S3_KEY_ID not in err, err
    assert "https://bob:<redacted>@minio:9000" in err and "RuntimeError: denied for <redacted>" in err


@pytest.mark.timeout(60)
def test_masking_is_linear_in_the_text_a_long_token_does_not_hang_it():
    # A manifest of 100k shards is ~20 MB and a log line may carry a long blob. The URL pattern once
    # scanned to the end of a token from each of its characters: quadratic, 3 s at 40k characters,
    # hours for 2M. Linear, this takes well under a second; the timeout only catches a hang.
    token = "x" * 2_000_000
    assert redact(token) == token
    assert redact(token + " http://u:pw@h") == token + " http://u:<redacted>@h"
