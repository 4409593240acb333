"""``vitpipe status``: what each stage of a run is doing or did, from the run directory alone."""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import asdict, dataclass

from pipeline import dag
from pipeline.engine import (
    PARTIAL_SUFFIX,
    PREVIOUS_SUFFIX,
    SET_ASIDE_FILE,
    matching_manifests,
    read_run_config,
)
from pipeline.fingerprint import accepted_fingerprints
from pipeline.lock import is_run_locked
from pipeline.manifest import read_manifest, read_manifest_head
from pipeline.runner import stage_folder
from pipeline.state import load_state
from pipeline.storage import Storage
from pipeline.tables import text_table

__all__ = ["StatusRow", "collect_status", "collect_headlines", "stage_results", "format_table", "format_bytes"]


@dataclass
class StatusRow:
    stage: str
    type: str
    state: str
    duration_s: float | None
    outputs: int
    output_bytes: int
    error: str
    previous: str = ""  # where the folders set aside by re-runs are kept, and why they were moved

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def collect_status(storage: Storage) -> tuple[str, list[StatusRow]]:
    """The run's name and one row per stage, in topological order."""
    config = read_run_config(storage)
    state = load_state(storage, config.name)
    live = is_run_locked(storage)
    graph = {name: list(spec.inputs.values()) for name, spec in config.stages.items()}
    # Heads only (a 300k-shard ingest's manifest is ~50 MB, its head ~1 KB): status needs no output list.
    manifests = {name: read_manifest_head(storage.child(stage_folder(name))) for name in config.stages}
    matched = matching_manifests(config, accepted_fingerprints(config), manifests)
    rows = []
    for name in dag.topological_order(graph):
        spec = config.stages[name]
        st = state.stages.get(name)
        manifest = manifests[name]
        recorded = st.status if st else "pending"
        if name in matched:
            status = "done"
        elif recorded in ("running", "pending") and not live and st is not None and st.started:
            status = "interrupted"
        elif recorded == "done":
            status = "stale"  # done once, but the config or an input has changed since
        else:
            status = recorded
        duration = st.duration_s if st and st.duration_s is not None else None
        if duration is None and manifest is not None:
            duration = manifest.timings.get("duration_s")
        totals = manifest.totals if manifest is not None and status == "done" else None
        rows.append(StatusRow(
            stage=name,
            type=spec.type,
            state=status,
            duration_s=duration,
            outputs=totals.count if totals else 0,
            output_bytes=totals.bytes if totals else 0,
            error=(st.error or "") if st and status in ("failed", "interrupted", "blocked") else "",
            previous=_set_aside_note(storage, name),
        ))
    return config.name, rows


def _set_aside_note(storage: Storage, name: str) -> str:
    """'URI (why, when)' for each folder re-runs of this stage set aside, '; '-separated."""
    notes = []
    for suffix in (PREVIOUS_SUFFIX, PARTIAL_SUFFIX):
        marker = f"{stage_folder(name)}{suffix}/{SET_ASIDE_FILE}"
        if not storage.exists(marker):
            continue
        try:
            record = json.loads(storage.read_text(marker))
            why = f" ({record['reason']}, {record['time']})"
        except (ValueError, KeyError, TypeError):
            why = ""
        notes.append(f"{storage.uri_of(stage_folder(name) + suffix)}{why}")
    return "; ".join(notes)


def collect_headlines(storage: Storage) -> list[tuple[str, str | None, list[str]]]:
    """``(stage, report location, lines)`` for every finished stage that records a headline."""
    config = read_run_config(storage)
    found = []
    for name in config.stages:
        manifest = read_manifest_head(storage.child(stage_folder(name)))
        if manifest is not None and manifest.metrics.get("headline"):
            found.append((name, manifest.metrics.get("report"), list(manifest.metrics["headline"])))
    return found


def stage_results(storage: Storage, types: Collection[str]) -> dict[str, dict[str, object]]:
    """The result record each finished stage of these ``types`` published in its manifest (stages
    know their kinds); other stages' manifests — an ingest's may be tens of MB — are not read."""
    config = read_run_config(storage)
    found = {}
    for name in (n for n, spec in config.stages.items() if spec.type in types):
        manifest = read_manifest(storage.child(stage_folder(name)))
        if manifest is not None and manifest.result:
            found[name] = manifest.result
    return found


def format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


def format_table(rows: list[StatusRow]) -> str:
    """The status table (the error column last, unpadded)."""
    header = ("STAGE", "TYPE", "STATE", "DURATION", "OUTPUTS", "ERROR")
    body = [
        (r.stage, r.type, r.state, _duration(r.duration_s),
         f"{r.outputs} ({format_bytes(r.output_bytes)})" if r.outputs else "-", r.error or "")
        for r in rows
    ]
    notes = [f"{r.stage}: set aside by re-runs, kept in {r.previous}" for r in rows if r.previous]
    return "\n".join([text_table(header, body), *notes])
