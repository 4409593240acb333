"""The stage API: what a stage type declares and what it gets when it runs.

A stage type is a :class:`Stage` subclass registered by name. It declares a params model (a
strict pydantic model, validated when the config loads), the input roles it reads, and default
resources for the Ray task that runs it. At run time it receives a :class:`StageContext`: its
params, its inputs' manifests and storage, and a storage to write outputs into. Everything it
writes through the context is recorded (size, sha256) in its manifest; the engine commits the
manifest after ``run`` returns.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, ClassVar

from pydantic import BaseModel

from pipeline.config import StageResources, StorageSettings, StrictModel
from pipeline.manifest import MANIFEST_NAME, Manifest, OutputEntry
from pipeline.preflight import ResourceDemand
from pipeline.storage import Storage, WrittenObject, sha256_stream
from pipeline.trackers import TrackerIds

__all__ = ["StageParams", "Stage", "StageInput", "StageContext", "Progress"]


class StageParams(StrictModel):
    """Base of every stage's params model (strict, no unknown keys).

    ``execution_params`` names the params that change how a stage runs but not what it produces
    (workers, cadences, retry budgets, ...). They are left out of the stage's fingerprint, so a
    resume that changes one continues the stage from its checkpoints instead of re-running it.
    """

    execution_params: ClassVar[frozenset[str]] = frozenset()

    def result_params(self) -> dict[str, Any]:
        """The params that decide the stage's result, as JSON (what its fingerprint hashes)."""
        data = self.model_dump(mode="json")
        return {name: value for name, value in data.items() if name not in self.execution_params}


class Stage:
    """Base class of stage types. Subclasses set the class attributes and implement :meth:`run`."""

    type_name: ClassVar[str] = ""
    Params: ClassVar[type[StageParams]] = StageParams
    input_roles: ClassVar[tuple[str, ...]] = ()
    # Stages such as a report may read any number of upstream stages.
    accepts_extra_inputs: ClassVar[bool] = False
    # Folders of the stage folder that only a resume of an unfinished run reads (never outputs,
    # never checkpoints): removed once the manifest is committed, when nothing can read them again.
    working_dirs: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def default_resources(cls) -> StageResources:
        return StageResources()

    @classmethod
    def resource_demand(cls, params: StageParams) -> ResourceDemand:
        """What the stage's own Ray work (workers, tasks it starts) needs, for the driver's preflight
        check; nothing beyond its task by default."""
        return ResourceDemand()

    def run(self, ctx: StageContext) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class StageInput:
    """An upstream stage as seen by a consumer: its committed manifest and its storage."""

    stage: str
    manifest: Manifest
    storage: Storage

    def path_of(self, rel: str) -> str:
        return self.storage.uri_of(rel)


class Progress:
    """A progress bar that draws only when the driver has a terminal, else logs at coarse steps."""

    def __init__(self, total: int | None, desc: str, enabled: bool, logger: logging.Logger) -> None:
        self.total = total
        self.desc = desc
        self.count = 0
        self._logger = logger
        self._next_log = 0.25
        self._bar: Any = None
        if enabled:
            try:
                import ray
                from ray.experimental.tqdm_ray import tqdm as ray_tqdm

                if ray.is_initialized():
                    self._bar = ray_tqdm(total=total, desc=desc)
            except ImportError:  # pragma: no cover - Ray is a hard dependency
                self._bar = None
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, file=sys.stderr)

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.total and self.count >= self._next_log * self.total:
            # Without a terminal, a line per quarter instead of a bar (CI logs stay readable).
            self._logger.info("%s: %d/%d", self.desc, self.count, self.total)
            while self._next_log * self.total <= self.count:
                self._next_log += 0.25

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class StageContext:
    """Everything a running stage may use. Create through the engine, not by hand."""

    name: str
    type_name: str
    params: StageParams
    fingerprint: str
    seed: int
    out: Storage
    run_storage: Storage
    inputs: dict[str, StageInput]
    run_storage_settings: StorageSettings | None = None
    attempt: int = 1
    resumed: bool = False
    show_progress: bool = False
    trackers: TrackerIds | None = None  # where per-step and final metrics also go (MLflow, W&B), if configured
    metrics: dict[str, Any] = field(default_factory=dict)
    # The typed result record downstream stages read (a pydantic model; stored in the manifest).
    result: BaseModel | None = None
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("vitpipe.stage"))
    _outputs: dict[str, OutputEntry] = field(default_factory=dict)

    # Writing outputs. Every path is relative to the stage's folder.

    @contextlib.contextmanager
    def open_write(self, rel: str) -> Iterator[BinaryIO]:
        if rel == MANIFEST_NAME:
            raise ValueError(f"{MANIFEST_NAME} is written by the engine")
        with self.out.open_write(rel) as f:
            yield f
        self._record(f.written)  # type: ignore[attr-defined]

    def write_bytes(self, rel: str, data: bytes) -> None:
        with self.open_write(rel) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_text(rel, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def add_output(self, rel: str) -> None:
        """Record an object written by other means (e.g. a checkpoint library) as an output."""
        with self.out.open_read(rel) as f:
            digest, size = sha256_stream(f)
        self._outputs[rel] = OutputEntry(path=rel, size=size, sha256=digest)

    def record_output(self, rel: str, size: int, sha256: str) -> None:
        """Record an output whose size and checksum were computed where it was written (a Ray task)."""
        self._outputs[rel] = OutputEntry(path=rel, size=size, sha256=sha256)

    def _record(self, written: WrittenObject) -> None:
        self._outputs[written.path] = OutputEntry(path=written.path, size=written.size, sha256=written.sha256)

    @property
    def outputs(self) -> list[OutputEntry]:
        return sorted(self._outputs.values(), key=lambda o: o.path)

    # Reading inputs.

    def input(self, role: str) -> StageInput:
        try:
            return self.inputs[role]
        except KeyError:
            raise KeyError(f"stage {self.name!r} has no input role {role!r} (has: {', '.join(self.inputs)})") from None

    def progress(self, total: int | None, desc: str | None = None) -> Progress:
        return Progress(total, desc or self.name, self.show_progress, self.logger)
