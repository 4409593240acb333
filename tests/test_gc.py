"""``vitpipe gc``: what a run no longer needs is listed, removed only with --yes, and a committed
output is never touched (moto S3: a writer killed mid-multipart-upload; and a local run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import boto3
import pytest

from cluster.executor import RayExecutor
from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.engine import run_pipeline
from pipeline.lock import S3_LOCK_FILE, acquire_run_lock
from pipeline.manifest import read_manifest, verify_outputs
from pipeline.storage import open_storage
from tests.conftest import REPO, cli_env, smoke_config

sys.path.insert(0, str(REPO / "bench"))
from faultproxy import FaultProxy  # noqa: E402

pytestmark = pytest.mark.usefixtures("ray_instance")

# Uploads one object in 5 MiB parts; the proxy holds every part, so the writer dies mid-upload.
_WRITER = """
import sys
from pipeline.storage import S3Storage
S3Storage(sys.argv[1], endpoint_url=sys.argv[2], multipart_threshold_mb=5, multipart_chunk_mb=5).write_bytes(
    "stages/transform/big.bin", b"x" * (12 << 20))
"""


def _kill_a_writer_mid_upload(uri: str, endpoint: str, bucket: str) -> None:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    with FaultProxy(endpoint, hold="partNumber=") as proxy:
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, uri, proxy.url], cwd=REPO, env=cli_env())
        try:
            deadline = time.monotonic() + 60
            while not s3.list_multipart_uploads(Bucket=bucket).get("Uploads"):
                assert writer.poll() is None and time.monotonic() < deadline, "the writer never started its upload"
                time.sleep(0.1)
            while proxy.counts["held"] == 0:  # a part is on its way: the writer is mid-upload
                time.sleep(0.05)
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait()


def _committed_outputs_intact(run) -> None:
    for name in ("generate", "transform", "combine"):
        stage = run.child(f"stages/{name}")
        manifest = read_manifest(stage)
        assert manifest is not None and verify_outputs(stage, manifest, checksums=True) == [], name


def _gc(*args: str, capsys) -> tuple[int, dict]:
    code = main(["gc", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_gc_lists_then_removes_what_a_run_no_longer_needs_on_s3(s3_endpoint, s3_bucket, capsys):
    uri = f"s3://{s3_bucket}/run"
    run_pipeline(parse_config(smoke_config(endpoint=s3_endpoint)), uri, RayExecutor())
    # A re-run with another factor keeps the old transform (and combine) aside.
    run_pipeline(parse_config(smoke_config(endpoint=s3_endpoint, factor=4)), uri, RayExecutor())
    run = open_storage(uri, parse_config(smoke_config(endpoint=s3_endpoint)).storage)
    _kill_a_writer_mid_upload(uri, s3_endpoint, s3_bucket)
    assert not run.exists("stages/transform/big.bin")  # a write killed mid-multipart leaves no object
    for step, committed in ((10, False), (20, True), (30, False)):  # 10: abandoned; 30: may be in progress
        folder = f"stages/transform/checkpoints/step-{step:08d}"
        run.write_text(f"{folder}/state-rank0.json", "{}")
        if committed:
            run.write_text(f"{folder}/COMPLETE.json", "{}")
    run.write_text(S3_LOCK_FILE, json.dumps({"owner": "x", "pid": 1, "host": "gone-host", "heartbeat": 0}))

    code, listed = _gc(uri, "--endpoint-url", s3_endpoint, capsys=capsys)
    kinds = sorted((item["kind"], item["path"]) for item in listed["leftovers"])
    assert code == 0 and not listed["removed"]
    assert kinds == [("abandoned checkpoint", "stages/transform/checkpoints/step-00000010/"),
                     ("set-aside folder", "stages/combine.previous/"),
                     ("set-aside folder", "stages/transform.previous/"),
                     ("stale lock", S3_LOCK_FILE),
                     ("unfinished write", "stages/transform/big.bin")], kinds
    upload = next(item for item in listed["leftovers"] if item["kind"] == "unfinished write")
    assert upload["size"] == 0  # no part got through the proxy
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    assert len(s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])) == 1  # listing removes nothing
    assert run.exists("stages/transform.previous/manifest.json")

    code, removed = _gc(uri, "--endpoint-url", s3_endpoint, "--yes", capsys=capsys)
    assert code == 0 and removed["removed"] and len(removed["leftovers"]) == 5
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert not run.list("stages/transform.previous") and not run.list("stages/combine.previous")
    assert not run.list("stages/transform/checkpoints/step-00000010")
    assert run.exists("stages/transform/checkpoints/step-00000020/COMPLETE.json")
    assert run.exists("stages/transform/checkpoints/step-00000030/state-rank0.json")
    assert not run.exists(S3_LOCK_FILE)
    _committed_outputs_intact(run)
    assert _gc(uri, "--endpoint-url", s3_endpoint, capsys=capsys)[1]["leftovers"] == []


def test_gc_on_disk_removes_temp_files_and_waits_for_a_live_driver(tmp_path, capsys):
    uri = str(tmp_path / "run")
    run_pipeline(parse_config(smoke_config()), uri, RayExecutor())
    run = open_storage(uri)
    torn = tmp_path / "run/stages/transform/.numbers.txt.tmp-0123abcd"  # a writer killed before its rename
    torn.write_bytes(b"12 ")
    with acquire_run_lock(run):
        assert main(["gc", uri]) == 3
        assert "a driver is running this run" in capsys.readouterr().err
    code, listed = _gc(uri, capsys=capsys)
    assert [(i["kind"], i["path"], i["size"]) for i in listed["leftovers"]] == [
        ("unfinished write", "stages/transform/numbers.txt", 3)]
    assert torn.exists()
    _gc(uri, "--yes", capsys=capsys)
    assert not torn.exists() and os.path.exists(tmp_path / "run/stages/transform/numbers.txt")
    _committed_outputs_intact(run)
