"""Stage manifests: the commit record of a stage's outputs.

A stage's outputs become visible only when ``manifest.json`` is written, after every object it
names. The manifest records each output (path, size, sha256), the stage's config and
fingerprint, the manifests of its inputs, package versions and timings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from importlib import metadata
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from pipeline.redaction import redact
from pipeline.storage import Storage

__all__ = [
    "MANIFEST_NAME",
    "OutputEntry",
    "InputRecord",
    "Manifest",
    "read_manifest",
    "commit_manifest",
    "manifest_digest",
    "package_versions",
    "verify_outputs",
]

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class OutputEntry(BaseModel):
    path: str
    size: int
    sha256: str


class InputRecord(BaseModel):
    stage: str
    fingerprint: str
    manifest_sha256: str


class Manifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: int = FORMAT_VERSION
    stage: str
    type: str
    fingerprint: str
    params: dict[str, Any]
    inputs: dict[str, InputRecord] = Field(default_factory=dict)
    outputs: list[OutputEntry] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    # The stage's typed result record (its type is the stage's business: see stages/records.py);
    # what downstream stages read. ``metrics`` is for people (status, logs).
    result: dict[str, Any] | None = None
    versions: dict[str, str] = Field(default_factory=dict)
    timings: dict[str, Any] = Field(default_factory=dict)
    # sha256 of the text this manifest was read from (read_manifest): hashing what is on storage
    # needs no re-serialisation, and stays right for manifests an older vitpipe formatted otherwise.
    _stored_digest: str | None = PrivateAttr(default=None)

    def to_json(self) -> str:
        # Masked here, not at write time, so the digest downstream stages record is that of the
        # text on storage. Compact: an ingest of 300k shards has a manifest entry per shard.
        return redact(json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))) + "\n"

    def output(self, path: str) -> OutputEntry | None:
        return next((o for o in self.outputs if o.path == path), None)

    def __eq__(self, other: object) -> bool:
        # By content: where a manifest was read from (its stored digest) is not part of its value
        # (pydantic would compare private attributes too).
        return isinstance(other, Manifest) and self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]  # mutable, like every non-frozen pydantic model


def manifest_digest(manifest: Manifest) -> str:
    """sha256 of the manifest's text on storage: what downstream stages record as their input."""
    if manifest._stored_digest is not None:
        return manifest._stored_digest
    return hashlib.sha256(manifest.to_json().encode("utf-8")).hexdigest()


def read_manifest(stage_storage: Storage) -> Manifest | None:
    """The stage's committed manifest, or None when it has none (or an unreadable one)."""
    if not stage_storage.exists(MANIFEST_NAME):
        return None
    data = stage_storage.read_bytes(MANIFEST_NAME)
    try:
        manifest = Manifest.model_validate_json(data)
    except (ValidationError, ValueError) as err:
        log.warning("%s: ignoring an unreadable manifest (%s)", stage_storage.uri_of(MANIFEST_NAME),
                    str(err).splitlines()[0])
        return None
    manifest._stored_digest = hashlib.sha256(data).hexdigest()
    return manifest


def commit_manifest(stage_storage: Storage, manifest: Manifest) -> None:
    """Write the manifest last, atomically: this is the stage's commit point."""
    stage_storage.write_text(MANIFEST_NAME, manifest.to_json())


def verify_outputs(stage_storage: Storage, manifest: Manifest, checksums: bool = False) -> list[str]:
    """Problems with the outputs a manifest names: missing, wrong size or (optionally) wrong sha256."""
    present = {o.path: o.size for o in stage_storage.list()}
    problems = []
    for entry in manifest.outputs:
        size = present.get(entry.path)
        if size is None:
            problems.append(f"{entry.path}: missing")
        elif size != entry.size:
            problems.append(f"{entry.path}: size {size} != {entry.size} recorded")
        elif checksums and stage_storage.sha256(entry.path) != entry.sha256:
            problems.append(f"{entry.path}: sha256 differs from the manifest")
    return problems


def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on, read without importing them."""
    versions = {"python": platform.python_version()}
    for dist in ("vitpipe", "torch", "deepspeed", "ray", "webdataset", "boto3"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions
