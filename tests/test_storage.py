"""Storage against a local directory and a real HTTP S3 endpoint (moto's server)."""

import hashlib
import os
import subprocess
import sys

import boto3
import pytest

from pipeline.errors import StorageError
from pipeline.storage import LocalStorage, S3Storage, open_storage
from tests.conftest import REPO, S3_SECRET, free_port


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStorage(tmp_path / "root")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return S3Storage(f"s3://{bucket}/runs/x", endpoint_url=endpoint, multipart_threshold_mb=5, multipart_chunk_mb=5)


def test_roundtrip_list_and_delete(store):
    written = store.write_bytes("a/b.bin", b"hello")
    assert written.size == 5 and written.sha256 == hashlib.sha256(b"hello").hexdigest()
    store.write_text("a/c.txt", "x")
    store.write_text("ab/d.txt", "yy")
    assert store.exists("a/b.bin") and not store.exists("a/zzz")
    assert store.size("a/b.bin") == 5 and store.size("nope") is None
    assert store.read_bytes("a/b.bin") == b"hello"
    assert [store.read_range("a/b.bin", *r) for r in ((1, 3), (3, 10), (0, 0))] == [b"ell", b"lo", b""]
    assert [o.path for o in store.list()] == ["a/b.bin", "a/c.txt", "ab/d.txt"]
    assert [o.path for o in store.list("a")] == ["a/b.bin", "a/c.txt"]  # "a" never matches "ab"
    child = store.child("a")
    assert [(o.path, o.size) for o in child.list()] == [("b.bin", 5), ("c.txt", 1)]
    assert child.read_text("c.txt") == "x"
    assert store.delete_prefix("a") == 2
    assert [o.path for o in store.list()] == ["ab/d.txt"]
    store.delete("ab/d.txt")
    store.delete("ab/d.txt")  # deleting a missing object is fine
    assert store.list() == []


def test_copy_prefix_copies_every_object_and_replaces_what_is_there(store):
    store.write_bytes("stages/a/x.bin", b"one")
    store.write_bytes("stages/a/ck/step-1/rank0.pt", b"two" * 1000)
    store.write_bytes("stages/ab/y.bin", b"not under a/")
    store.write_bytes("stages/a.previous/x.bin", b"old")
    assert store.copy_prefix("stages/a", "stages/a.previous") == 2
    assert {o.path: store.read_bytes(o.path) for o in store.list("stages/a.previous")} == {
        "stages/a.previous/x.bin": b"one", "stages/a.previous/ck/step-1/rank0.pt": b"two" * 1000}
    store.delete_prefix("stages/a")  # the copy does not depend on the original (hard links on a disk)
    assert store.read_bytes("stages/a.previous/x.bin") == b"one"
    assert store.copy_prefix("stages/nothing", "stages/elsewhere") == 0


def test_failed_write_leaves_nothing_visible(store):
    store.write_text("keep.txt", "old")
    with pytest.raises(RuntimeError), store.open_write("keep.txt") as f:
        f.write(b"new but never committed")
        raise RuntimeError("crash mid-write")
    with pytest.raises(RuntimeError), store.open_write("other.txt") as f:
        f.write(b"partial")
        raise RuntimeError("crash mid-write")
    assert store.read_text("keep.txt") == "old"
    assert [o.path for o in store.list()] == ["keep.txt"]


def test_put_if_absent(store):
    assert store.put_if_absent("lock", b"one") is True
    assert store.put_if_absent("lock", b"two") is False
    assert store.read_bytes("lock") == b"one"


def test_large_objects_stream_both_ways(store, tmp_path):
    data = os.urandom(1 << 20) * 12  # 12 MiB: three multipart parts on S3 at a 5 MiB threshold
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    written = store.upload_file(src, "big.bin")
    assert written.size == len(data) and written.sha256 == hashlib.sha256(data).hexdigest()
    with store.open_read("big.bin") as f:
        head = f.read(1000)  # a streaming read returns a prefix without fetching the rest first
        rest = f.read()
    assert head + rest == data
    store.download_file("big.bin", tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == data
    if isinstance(store, S3Storage):
        etag = store.client.head_object(Bucket=store.bucket, Key=store._key("big.bin"))["ETag"]
        assert etag.strip('"').endswith("-3"), f"expected a 3-part multipart upload, got ETag {etag}"


def test_missing_objects_are_one_line_errors(store):
    with pytest.raises(StorageError, match="no such"):
        store.read_bytes("does/not/exist")


def test_paths_cannot_escape_the_root(tmp_path):
    with pytest.raises(ValueError):
        LocalStorage(tmp_path).write_text("../escape.txt", "x")


def test_s3_error_messages(s3_endpoint, monkeypatch, tmp_path):
    missing = S3Storage("s3://no-such-bucket-here/x", endpoint_url=s3_endpoint)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' does not exist"):
        missing.write_text("a", "b")
    dead = S3Storage("s3://bucket/x", endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match="cannot reach http://127.0.0.1"):
        dead.read_bytes("a")
    with pytest.raises(StorageError, match="at least 3 characters"):
        S3Storage("s3://ab/x")
    with pytest.raises(StorageError, match="unsupported storage scheme"):
        open_storage("gs://bucket/x")


def test_missing_credentials_are_a_clear_error(s3_endpoint, s3_bucket, tmp_path):
    # A fresh process with no credentials anywhere (no env, no config files).
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true", PYTHONPATH=str(REPO))
    code = ("from pipeline.storage import S3Storage; "
            f"S3Storage('s3://{s3_bucket}/x', endpoint_url='{s3_endpoint}').read_bytes('a')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode != 0
    assert "no AWS credentials found" in result.stderr


def test_boto_config_uses_standard_retries_and_never_exposes_secrets(s3_endpoint, s3_bucket):
    store = S3Storage(f"s3://{s3_bucket}/r", endpoint_url=s3_endpoint)
    assert store.client.meta.config.retries["mode"] == "standard"
    assert S3_SECRET not in repr(store) and S3_SECRET not in str(store.__getstate__())
    # The same bucket is readable with plain boto3 (nothing proprietary in the layout).
    store.write_text("plain.txt", "interop")
    body = boto3.client("s3", endpoint_url=s3_endpoint).get_object(Bucket=s3_bucket, Key="r/plain.txt")["Body"]
    assert body.read() == b"interop"


def test_storages_unpickled_in_one_process_share_its_s3_client(monkeypatch):
    """A Ray task gets its storage unpickled, without a client; making one costs ~0.1 s, so a
    process keeps one per configuration (and environment boto3 reads) for all of them."""
    import pickle

    first = pickle.loads(pickle.dumps(S3Storage("s3://bkt/one", endpoint_url="http://127.0.0.1:9")))
    second = pickle.loads(pickle.dumps(S3Storage("s3://bkt/two", endpoint_url="http://127.0.0.1:9")))
    assert first.client is second.client
    assert S3Storage("s3://bkt/one", endpoint_url="http://127.0.0.1:8").client is not first.client
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "another-key")
    assert S3Storage("s3://bkt/one", endpoint_url="http://127.0.0.1:9").client is not first.client
