"""Stage manifests: the commit record of a stage's outputs.

A stage's outputs become visible only when ``manifest.json`` is written, after every object it
names. The manifest records each output (path, size, sha256), the stage's config and
fingerprint, the manifests of its inputs, package versions and timings.

Its text puts the head first — every field but the outputs and the result, with the outputs'
count and bytes — so that what needs only the head (``vitpipe status``, the report's headlines)
reads only that much: an ingest of 300k shards has a 50 MB manifest, nearly all outputs and
result (:func:`read_manifest_head`).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import platform
from collections.abc import Callable
from importlib import metadata
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from pipeline.redaction import redact
from pipeline.storage import Storage

__all__ = [
    "MANIFEST_NAME",
    "OutputEntry",
    "OutputTotals",
    "InputRecord",
    "ManifestHead",
    "Manifest",
    "read_manifest",
    "read_manifest_head",
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


class OutputTotals(BaseModel):
    count: int
    bytes: int


class ManifestHead(BaseModel):
    """A manifest without its outputs and result: what deciding whether a stage is done (its
    fingerprint, params, inputs) and showing it (timings, metrics, totals) needs."""

    model_config = ConfigDict(extra="allow")

    format: int = FORMAT_VERSION
    stage: str
    type: str
    fingerprint: str
    params: dict[str, Any]
    inputs: dict[str, InputRecord] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)  # for people (status, logs)
    versions: dict[str, str] = Field(default_factory=dict)
    timings: dict[str, Any] = Field(default_factory=dict)
    totals: OutputTotals | None = None  # the outputs' count and bytes


# Written last, after the head: the fields whose size grows with the stage's outputs.
_TAIL_FIELDS = ("outputs", "result")


class Manifest(ManifestHead):
    outputs: list[OutputEntry] = Field(default_factory=list)
    # The stage's typed result record (its type is the stage's business: see stages/records.py);
    # what downstream stages read.
    result: dict[str, Any] | None = None
    # As read from a manifest's text (None for one built in memory): excluded from dumps, so not part
    # of the manifest's value; to_json writes output_totals(), which is what to use.
    totals: OutputTotals | None = Field(default=None, exclude=True)
    # sha256 of the text this manifest was read from (read_manifest): hashing what is on storage
    # needs no re-serialisation, and stays right for manifests an older vitpipe formatted otherwise.
    _stored_digest: str | None = PrivateAttr(default=None)

    def head(self) -> ManifestHead:
        return ManifestHead.model_validate(
            {**{k: v for k, v in self.model_dump().items() if k not in _TAIL_FIELDS}, "totals": self.output_totals()})

    def output_totals(self) -> OutputTotals:
        return OutputTotals(count=len(self.outputs), bytes=sum(o.size for o in self.outputs))

    def to_json(self) -> str:
        # Masked here, not at write time, so the digest downstream stages record is that of the
        # text on storage. Compact (an ingest of 300k shards has a manifest entry per shard), keys
        # sorted within each field, the head first and its totals just before the outputs.
        fields = self.model_dump(mode="json")
        head = {k: v for k, v in sorted(fields.items()) if k not in _TAIL_FIELDS}
        head["totals"] = self.output_totals().model_dump()
        members = [*head.items(), *((k, fields[k]) for k in _TAIL_FIELDS)]
        return redact("{" + ",".join(f"{json.dumps(k)}:{_compact(v)}" for k, v in members) + "}") + "\n"

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


def read_manifest_head(stage_storage: Storage, chunk: int = 1 << 16) -> ManifestHead | None:
    """The committed manifest's head, read from the start of its text up to the outputs; the
    head of the whole manifest (:func:`read_manifest`, so None when that is unreadable) for one an
    older vitpipe wrote in another order, or whose head does not parse. At 300k shards: ~1 KB
    read, not 50 MB. (A manifest is written atomically: a head cannot be whole and its tail cut,
    short of the storage damaging it afterwards, which a run's output check finds.)"""
    if not stage_storage.exists(MANIFEST_NAME):
        return None
    try:
        fields = _leading_fields(lambda start, length: stage_storage.read_range(MANIFEST_NAME, start, length), chunk)
        if "totals" in fields:  # else an older order (keys sorted: outputs before params)
            return ManifestHead.model_validate(fields)
    except (ValidationError, ValueError):
        pass  # read whole: a manifest the head reader cannot follow is judged as a run judges it
    manifest = read_manifest(stage_storage)
    return manifest.head() if manifest is not None else None


def _leading_fields(read: Callable[[int, int], bytes], chunk: int) -> dict[str, Any]:
    """The top-level members of a JSON object, in order up to the first tail field (or the end):
    ``read(start, length)`` gives the text's bytes, asked for ``chunk`` at first, and more (twice
    as many each time) only when a member is cut at the end of what was read."""
    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    text, pos, fields, ended, offset = "", 0, {}, False, 0

    def skip(at: int) -> int:
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        return at

    while True:
        try:
            at = skip(pos)
            if pos and text[at:at + 1] == "}":
                return fields
            opener = "," if pos else "{"
            if text[at:at + 1] != opener:
                raise ValueError(f"expected {opener!r} at {at}")
            key, at = decoder.raw_decode(text, skip(at + 1))
            at = skip(at)
            if text[at:at + 1] != ":":
                raise ValueError(f"expected ':' at {at}")
            if key in _TAIL_FIELDS:
                return fields
            value, end = decoder.raw_decode(text, skip(at + 1))
            if text[skip(end):skip(end) + 1] not in (",", "}"):  # a number cut short ("12." or "12") still parses
                raise ValueError(f"no ',' or '}}' after the value at {end}")
            fields[key], pos = value, end
        except (ValueError, IndexError):
            if ended:
                raise ValueError("not a JSON object") from None
            data = read(offset, chunk)
            offset, ended = offset + len(data), len(data) < chunk
            text += utf8.decode(data, final=ended)
            chunk *= 2  # a long member: fewer re-parses


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


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))
