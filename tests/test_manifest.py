import json

import pytest

from pipeline import manifest as manifest_module
from pipeline.manifest import (
    Manifest,
    OutputEntry,
    commit_manifest,
    manifest_digest,
    read_manifest,
    read_manifest_head,
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


class _CountingStorage(LocalStorage):
    """Counts the bytes read through ``read_range`` (how the head is read) and whole reads."""

    def __init__(self, root):
        super().__init__(root)
        self.ranged, self.whole = 0, 0

    def read_range(self, rel, start, length):
        data = super().read_range(rel, start, length)
        self.ranged += len(data)
        return data

    def read_bytes(self, rel):
        self.whole += 1
        return super().read_bytes(rel)


def _large_manifest(outputs: int) -> Manifest:
    return Manifest(stage="ingest", type="ingest", fingerprint="f" * 32, params={"path": "s3://b/c", "workers": 64},
                    outputs=[OutputEntry(path=f"shards/train-{i:06d}.tar", size=400_000_000 + i, sha256=f"{i:064x}")
                             for i in range(outputs)],
                    result={"splits": {"train": {"shards": [{"path": f"shards/train-{i:06d}.tar", "samples": 3000}
                                                            for i in range(outputs)]}}},
                    metrics={"headline": ["12 shards"]}, timings={"duration_s": 1234.5})


def test_a_manifest_head_is_read_without_its_outputs(tmp_path):
    """``vitpipe status`` reads a manifest's head: the fields before its outputs and result,
    which the text puts last, with the outputs' count and bytes — ~1 KB of a 300k-shard ingest's
    ~50 MB."""
    store = _CountingStorage(tmp_path)
    manifest = _large_manifest(20_000)
    commit_manifest(store, manifest)
    size = (tmp_path / "manifest.json").stat().st_size
    head = read_manifest_head(store)
    assert head == manifest.head() and (head.totals.count, head.totals.bytes) == (20_000, sum(
        o.size for o in manifest.outputs))
    assert head.metrics == {"headline": ["12 shards"]} and head.fingerprint == "f" * 32
    assert store.ranged == 1 << 16 and size > 40 * store.ranged and store.whole == 0  # one 64 KB read
    assert read_manifest(store) == manifest  # the whole manifest reads as before


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8, 13, 64, 211])
def test_a_manifest_head_read_in_pieces_of_any_size_is_the_same(tmp_path, chunk):
    """A value cut at the end of what was read is read on (a number cut short would still parse)."""
    store = _CountingStorage(tmp_path)
    # Numbers at the top level (fields another version adds) can be cut and still parse: "12" of
    # "1234567", "12." of "12.5", "3e" of "3e-05".
    manifest = Manifest(**_large_manifest(3).model_dump(), attempts=1234567, elapsed=12.5, rate=3e-05)
    commit_manifest(store, manifest)
    assert '"attempts":1234567,' in (tmp_path / "manifest.json").read_text()
    assert read_manifest_head(store, chunk=chunk) == manifest.head() and store.whole == 0  # not read whole


def test_a_manifest_in_the_older_order_gives_its_head_from_a_whole_read(tmp_path, monkeypatch):
    """Before heads, keys were sorted (outputs before params): such a manifest is read whole."""
    store = _CountingStorage(tmp_path)
    manifest = _large_manifest(50)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest.model_dump(mode="json"), sort_keys=True) + "\n")
    assert read_manifest_head(store) == manifest.head() and store.whole == 1
    (tmp_path / "manifest.json").write_text('{"fingerprint": "f", "format": 1, "stage"')
    assert read_manifest_head(store) is None  # unreadable: as absent
    commit_manifest(store, manifest)  # a head the reader cannot follow: read whole, as a run reads it
    monkeypatch.setattr(manifest_module, "_leading_fields", lambda read, chunk: (_ for _ in ()).throw(ValueError("?")))
    assert read_manifest_head(store) == manifest.head()
    (tmp_path / "manifest.json").unlink()
    assert read_manifest_head(store) is None
