"""The run's JSONL event log: one JSON object per line, appended by the driver."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from typing import Any

from pipeline.redaction import redact
from pipeline.storage import Storage

__all__ = ["EVENTS_FILE", "EventLog", "read_events"]

EVENTS_FILE = "events.jsonl"


class EventLog:
    """Appends events to ``events.jsonl`` under the run root (single writer: the run lock holder)."""

    def __init__(self, storage: Storage, run_name: str) -> None:
        self._storage = storage
        self._run = run_name
        self._lock = threading.Lock()
        local = storage.local_path(EVENTS_FILE)
        self._local_path = local
        # S3 has no append: keep the text and rewrite the (small) object on each event.
        self._text = "" if local is not None else (storage.read_text(EVENTS_FILE) if storage.exists(EVENTS_FILE) else "")

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "run": self._run,
                  "event": event, **fields}
        line = redact(json.dumps(record, sort_keys=False, default=str)) + "\n"
        with self._lock:
            if self._local_path is not None:
                self._local_path.parent.mkdir(parents=True, exist_ok=True)
                with open(self._local_path, "a", encoding="utf-8") as f:
                    f.write(line)
                    f.flush()
            else:
                self._text += line
                self._storage.write_text(EVENTS_FILE, self._text)
        return record


def read_events(storage: Storage) -> list[dict[str, Any]]:
    """All events of a run; a torn last line (driver killed mid-write) is ignored."""
    if not storage.exists(EVENTS_FILE):
        return []
    events = []
    for line in storage.read_text(EVENTS_FILE).splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
