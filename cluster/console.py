"""A quiet console for ``vitpipe run``, and a log file that keeps everything.

Ray forwards every line its workers (stage tasks, Ray Train's controller and workers) write to
the driver's terminal. At default verbosity :class:`ConsoleCapture` drops the third-party lines
listed in :data:`SILENCED` — each matched exactly, each harmless for the reason given — and shows
the rest; with ``-v`` it drops nothing. Every line, shown or not, and every driver log record go
to the run's log file (``logs/driver-<UTC time>.log`` in the run directory; for a run on S3 it is
written locally and uploaded there when the driver exits).

Ray offers no public hook on its log stream: the capture wraps the handler Ray registers on
``ray._private.ray_logging.global_worker_stdstream_dispatcher``; if that handler is not found (a
future Ray), the console is left unfiltered and the file gets only the driver's records.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from pipeline.logsetup import LOG_FORMAT
from pipeline.redaction import redact
from pipeline.storage import Storage

__all__ = ["Silenced", "SILENCED", "silenced_reason", "ConsoleCapture", "LOGS_DIR"]

log = logging.getLogger(__name__)

LOGS_DIR = "logs"
_RAY_HANDLER = "ray_print_logs"


@dataclass(frozen=True)
class Silenced:
    pattern: re.Pattern[str]  # searched in one line of output
    why: str  # why hiding it loses nothing


def _silenced(pattern: str, why: str) -> Silenced:
    return Silenced(re.compile(pattern), why)


SILENCED: tuple[Silenced, ...] = (
    _silenced(r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher' and ID: '[0-9a-f]+' has constructor "
              r"arguments in the object store and max_restarts > 0\.",
              "Ray Train 2.60 creates this actor itself, once per training group (ray-project/ray#53727); a worker "
              "group that fails is restarted by Ray Train and reported by vitpipe either way"),
    _silenced(r"\[WARNING\] \[engine\.py:\d+:_do_optimizer_sanity_check\] \*\*\*\* You are using ZeRO with an "
              r"untested optimizer, proceed with caution \*{5}$",
              "DeepSpeed lists only Adam-family optimizers as tested with ZeRO; fine-tuning's SGD with momentum is "
              "ZeRO-partitioned like any torch optimizer, and the default pipeline's fine-tune runs it under "
              "ZeRO-2 in the tests"),
    _silenced(r"^Token authentication is enabled for this Ray cluster\. Set RAY_AUTH_MODE=disabled to opt out\.",
              "a notice printed at every connection; the token is Ray's own, generated for the local instance"),
    # Ray Train's account of each worker group start; vitpipe logs the group's size and the stage's
    # attempts itself, and a failed start still shows (it matches none of these).
    _silenced(r"^Requesting resources: \{.*\} \* \d+$", "Ray Train's worker group start (see above)"),
    _silenced(r"^Attempting to start training worker group of size \d+ with the following resources: ",
              "Ray Train's worker group start"),
    _silenced(r"^Started training worker group of size \d+: ?$", "Ray Train's worker group start"),
    _silenced(r"^- \(ip=[0-9a-fA-F.:]+, pid=\d+\) world_rank=\d+, local_rank=\d+, node_rank=\d+$",
              "Ray Train's worker group start: vitpipe records placement in workers.json"),
    _silenced(r"^Setting up process group for: env:// \[rank=\d+, world_size=\d+\]$",
              "Ray Train's process group set-up, per worker group"),
)


def silenced_reason(line: str) -> str | None:
    """Why ``line`` is kept off the console at default verbosity (None: it is shown)."""
    return next((s.why for s in SILENCED if s.pattern.search(line)), None)


class _DropSilenced(logging.Filter):
    """On the driver's console handlers: drops silenced records (they still reach the file handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return silenced_reason(record.getMessage()) is None


class _FileHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The log file's handler; it keeps vitpipe's format (``ray.init`` sets its own on every
    handler of Ray's logger, where this one also sits)."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self.formatter = logging.Formatter(LOG_FORMAT, "%Y-%m-%d %H:%M:%S")

    def setFormatter(self, fmt: logging.Formatter | None) -> None:  # noqa: N802 - logging's name
        pass


class ConsoleCapture:
    """Filters the console and writes the run's log file for the duration of a ``with`` block.

    ``enter`` before Ray starts (Ray logs its own notices while connecting); ``attach_to_ray``
    once it is connected.
    """

    def __init__(self, run: Storage, verbose: bool) -> None:
        self.run = run
        self.verbose = verbose
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.relative = f"{LOGS_DIR}/driver-{stamp}.log"
        self.remote = run.local_path() is None
        self.path = (Path(tempfile.mkdtemp(prefix="vitpipe-log-")) / Path(self.relative).name if self.remote
                     else run.local_path(self.relative))
        self._file: IO[str] | None = None
        self._lock = threading.Lock()
        self._handler: logging.Handler | None = None
        self._wrapped: tuple[str, Callable[[dict[str, Any]], None]] | None = None
        self._console_filter = _DropSilenced()

    def __enter__(self) -> ConsoleCapture:
        import ray  # noqa: F401 - importing Ray installs its logger's handlers, which are filtered below

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        handler = _FileHandler(self._file)
        handler.setLevel(logging.DEBUG if self.verbose else logging.INFO)
        self._handler = handler
        for logger in (logging.getLogger(), logging.getLogger("ray")):  # Ray's logger does not propagate
            logger.addHandler(handler)
        if not self.verbose:
            for h in self._console_handlers():
                h.addFilter(self._console_filter)
        return self

    def _console_handlers(self) -> list[logging.Handler]:
        return [h for logger in (logging.getLogger(), logging.getLogger("ray")) for h in logger.handlers
                if h is not self._handler]

    def attach_to_ray(self) -> None:
        """Route Ray's forwarded worker lines through :meth:`_forward` (see the module docstring)."""
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:  # pragma: no cover - another Ray
            log.debug("Ray's log dispatcher not found: worker lines are not filtered")
            return
        with dispatcher._lock:
            found = next((pair for pair in dispatcher.handlers if pair[0] == _RAY_HANDLER), None)
            if found is None:
                log.debug("Ray's log handler %r not found: worker lines are not filtered", _RAY_HANDLER)
                return
            self._wrapped = found
            dispatcher.handlers = [(_RAY_HANDLER, self._forward) if pair is found else pair
                                   for pair in dispatcher.handlers]

    def _forward(self, data: dict[str, Any]) -> None:
        lines = data.get("lines", [])
        logged = lines
        if data.get("pid") == "autoscaler":  # its status table every 5 s: Ray prints only its events
            from ray._private.worker import filter_autoscaler_events

            logged = list(filter_autoscaler_events(lines))
        source = data.get("actor_name") or data.get("task_name") or ""
        with self._lock:
            if self._file is not None:
                for line in logged:
                    self._file.write(f"({source} pid={data.get('pid')}) {redact(line)}\n")
                self._file.flush()
        shown = lines if self.verbose else [line for line in lines if silenced_reason(line) is None]
        if shown and self._wrapped is not None:
            self._wrapped[1]({**data, "lines": shown})

    def __exit__(self, *exc: object) -> None:
        if self._wrapped is not None:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

            with dispatcher._lock:
                dispatcher.handlers = [self._wrapped if name == _RAY_HANDLER else (name, fn)
                                       for name, fn in dispatcher.handlers]
        for h in self._console_handlers():
            h.removeFilter(self._console_filter)
        for logger in (logging.getLogger(), logging.getLogger("ray")):
            logger.removeHandler(self._handler)
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        if self.remote:  # a run on S3: the log goes beside its events
            try:
                self.run.upload_file(self.path, self.relative)
            except Exception as err:  # noqa: BLE001 - the run's outcome stands; say where the log is
                log.warning("could not upload the driver log to %s (%s); it is kept at %s",
                            self.run.uri_of(self.relative), str(err).splitlines()[0], self.path)
            else:
                shutil.rmtree(self.path.parent, ignore_errors=True)
