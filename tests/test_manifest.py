from pipeline.manifest import (
    Manifest,
    OutputEntry,
    commit_manifest,
    manifest_digest,
    read_manifest,
    verify_outputs,
)
from pipeline.storage import LocalStorage


def _manifest(store):
    entries = []
    for path, data in (("a.bin", b"abc"), ("sub/b.txt", b"hello")):
        w = store.write_bytes(path, data)
        entries.append(OutputEntry(path=path, size=w.size, sha256=w.sha256))
    return Manifest(stage="s", type="t", fingerprint="f", params={}, outputs=entries)


def test_commit_and_read_roundtrip(tmp_path):
    store = LocalStorage(tmp_path)
    m = _manifest(store)
    assert read_manifest(store) is None
    commit_manifest(store, m)
    again = read_manifest(store)
    assert again == m and manifest_digest(again) == manifest_digest(m)


def test_verify_finds_missing_resized_and_corrupted_outputs(tmp_path):
    store = LocalStorage(tmp_path)
    m = _manifest(store)
    assert verify_outputs(store, m, checksums=True) == []
    (tmp_path / "a.bin").write_bytes(b"xyz")  # same size, different content
    assert verify_outputs(store, m) == []
    assert verify_outputs(store, m, checksums=True) == ["a.bin: sha256 differs from the manifest"]
    (tmp_path / "sub/b.txt").write_bytes(b"hi")
    assert "sub/b.txt: size 2 != 5 recorded" in verify_outputs(store, m)
    (tmp_path / "a.bin").unlink()
    assert "a.bin: missing" in verify_outputs(store, m)


def test_unreadable_manifest_counts_as_absent(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    assert read_manifest(LocalStorage(tmp_path)) is None
